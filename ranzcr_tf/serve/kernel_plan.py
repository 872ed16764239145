"""``kaggle_kernel.py --plan``: will the ensemble fit ``--max-minutes``? Measured on a few real test images.

For the first fold of every model: its file is loaded (``modelio.load_fold_model``, timed), the first
``sample`` test images are preprocessed with its run's settings (``TestSource.records_for``, the kernel's own
path; nothing when matching ``--tfrecords`` are given) and predicted through ``model.predict.predict_eval``,
the kernel's prediction function, with the first view of ``--tta``; batches after the first (tracing) give
the seconds per image. Those figures fill the kernel's own cost model (``budget.CostModel``), which then says
what the full plan (models x folds x TTA views x test images) costs and which plan of the degrade order fits
the budget. Nothing is written but the preprocessed sample in the scratch folder the kernel removes.
"""

from __future__ import annotations

import dataclasses
import math
import time

import keras

from ranzcr_tf.config import InferConfig
from ranzcr_tf.model import predict as model_predict
from ranzcr_tf.serve.budget import CostModel, choose_plan, degrade_levels, describe_plan
from ranzcr_tf.serve.modelio import ModelSpec, load_fold_model


class _StopAfter(keras.callbacks.Callback):
    """Records each predicted batch's end time and stops ``predict`` after ``batches``."""

    def __init__(self, batches: int):
        super().__init__()
        self.batches, self.ends = batches, []

    def on_predict_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())
        if len(self.ends) >= self.batches:
            self.model.stop_predicting = True


def measure_fold(fold, source, view: str, batch_size: int, sample: int) -> dict:
    """Load, preprocess (``sample`` images) and predict timings of one fold, in seconds (per image where so)."""
    from ranzcr_tf.pipeline.data import build_eval_dataset

    started = time.perf_counter()
    records_dir = source.records_for(fold)
    prepared = time.perf_counter() - started
    preprocess = prepared / max(1, len(source.ids)) if records_dir != source.tfrecords else 0.0
    if records_dir is None:
        raise ValueError(f"no readable test image among the first {len(source.ids)} for {fold.name}")
    started = time.perf_counter()
    model = load_fold_model(fold)
    predictor = model_predict.build_predictor(model, from_logits=fold.output == "logits")
    load = time.perf_counter() - started
    split = source.split if records_dir == source.tfrecords else "test"
    data = build_eval_dataset(fold.cfg, records_dir, split, batch_size, tta=view, image_size=fold.image_size,
                              with_targets=False)
    timer = _StopAfter(1 + max(1, math.ceil(sample / batch_size)))
    started = time.perf_counter()
    model_predict.predict_eval(None, data, from_logits=fold.output == "logits", predictor=predictor,
                               callbacks=[timer], allow_partial=True)
    if len(timer.ends) > 1:
        predict = (timer.ends[-1] - timer.ends[0]) / ((len(timer.ends) - 1) * batch_size)
    else:  # a sample of one batch: tracing included, an overestimate
        predict = (timer.ends[0] - started) / min(batch_size, data.num_examples)
    return {"load": load, "preprocess": preprocess, "predict": predict, "images": min(sample, data.num_examples)}


def plan_kernel(models: list[ModelSpec], source, infer_cfg: InferConfig, max_seconds: float | None, *,
                batch_size: int | None = None, sample: int = 16, announce=print) -> dict:
    """Print the plan: per-model measured speeds, the full plan's estimate and the largest plan that fits."""
    num_images = len(source.ids)
    views = list(infer_cfg.tta)
    fold_counts = [len(spec.folds) for spec in models]
    costs = CostModel(num_images=num_images,
                      image_sizes={(m, f): fold.image_size for m, spec in enumerate(models)
                                   for f, fold in enumerate(spec.folds)},
                      groups={(m, f): fold.preprocess_key() for m, spec in enumerate(models)
                              for f, fold in enumerate(spec.folds)})
    subset = dataclasses.replace(source, template=source.template.head(sample), records_check=None, progress=False,
                                 _prepared={}, skipped={}, unusable={})
    for index, spec in enumerate(models):
        fold = spec.folds[0]
        batch = batch_size or int(fold.cfg.infer.batch_size)
        measured = measure_fold(fold, subset, views[0], batch, sample)
        costs.load_seconds.append(measured["load"])
        costs.predict_seconds_per_image[(index, 0, 0)] = measured["predict"]
        group = fold.preprocess_key()
        costs.preprocess_seconds_per_image[group] = max(measured["preprocess"],
                                                        costs.preprocess_seconds_per_image.get(group, 0.0))
        announce(f"plan: model {index} {spec.name}: {len(spec.folds)} fold(s) at {fold.image_size} px; measured on "
                 f"{measured['images']} test images (batch {batch}): load {measured['load']:.1f} s per fold, "
                 f"preprocess {measured['preprocess'] * 1000:.1f} ms/image, predict {measured['predict'] * 1000:.1f} "
                 f"ms/image = {1 / measured['predict']:.1f} images/s")
    levels = degrade_levels(fold_counts, len(views))
    full = costs.estimate(levels[0]) / costs.safety
    limit = "no limit" if max_seconds is None else f"--max-minutes {max_seconds / 60:g}"
    announce(f"plan: full plan {describe_plan(levels[0], fold_counts, len(views))} x {num_images} test images: "
             f"estimated {full / 60:.1f} min ({limit}; the kernel compares with x{costs.safety} margin)")
    budget = float("inf") if max_seconds is None else max_seconds
    index, chosen = choose_plan(levels, costs, budget)
    fits = costs.estimate(chosen) <= budget
    smaller = f"{describe_plan(chosen, fold_counts, len(views))}, estimated {costs.estimate(chosen) / costs.safety / 60:.1f} min"
    verdict = "fits" if index == 0 else f"does not fit: the kernel would run {smaller}"
    if not fits:
        verdict = f"does not fit even at the minimum plan ({smaller})"
    announce(f"plan: the full plan {verdict}")
    return {"estimated_seconds": full, "level": index, "fits": fits}
