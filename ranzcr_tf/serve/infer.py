"""Ensemble prediction on the test set: runs x folds x TTA views, under a time budget.

    models = modelio.discover_models(["runs/b7_768", "runs/b5_512"])
    source = TestSource.from_paths(data_dir="...", tfrecords=None, work_dir="/tmp/x")
    probs, report = predict_ensemble(models, source, InferConfig(tta=["identity", "hflip"]), Budget(8 * 3600))
    write_submission(build_submission(source.template, probs), "submission.csv", source.template)

What is averaged (see ``ensemble.py``): a fold's probabilities over its TTA views (mean), a model's
over its folds (mean), and models with ``infer.ensemble`` (mean, rank_mean or weighted). Every model
gets the test images preprocessed with the settings saved in ITS run folder (``preprocess.json``) and
at ITS input size, so models trained on different sizes or CLAHE settings ensemble correctly: raw
test JPEGs are preprocessed once per distinct setting (``testimages.py``); converter test records
are used for the models whose settings they match.

The passes run model by model, fold by fold (each model file is loaded once). Before every pass the
plan is re-chosen from measured times (``budget.py`` states the degrade order), and a pass still
running at the deadline is abandoned, so the caller always has time to write a complete file.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np

from ranzcr_tf.config import InferConfig, PreprocessConfig
from ranzcr_tf.labels import ID_COLUMN
from ranzcr_tf.model import predict as model_predict
from ranzcr_tf.prep import records
from ranzcr_tf.prep.testimages import DeadlineReached, preprocess_test_images
from ranzcr_tf.serve import ensemble
from ranzcr_tf.serve.budget import DEGRADE_ORDER, Budget, CostModel, choose_plan, degrade_levels, describe_plan
from ranzcr_tf.serve.modelio import FoldSpec, ModelSpec, load_fold_model
from ranzcr_tf.serve.submission import SAMPLE_SUBMISSION, read_sample_submission, template_from_ids
from ranzcr_tf.serve.testrecords import RecordsCheck, check_test_records, complete_records, describe_ids

CALIBRATION_BATCHES = 3  # timed batches (after the first, which includes tracing) before estimating


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- sources
@dataclass
class TestSource:
    """Where the test images come from and in which row order the submission lists them."""

    template: object  # pandas DataFrame in the submission layout; its row order is the submission's
    data_dir: str | None = None  # competition folder (raw test/*.jpg)
    tfrecords: str | None = None  # converter output folder (test/ shards + manifest.json)
    work_dir: str = "."  # where raw test images are preprocessed to (one sub-folder per setting)
    workers: int = 0  # preprocessing threads (0 = every core)
    progress: bool = True  # preprocessing progress bar
    records_check: RecordsCheck | None = None  # what checking --tfrecords against the sample found
    _prepared: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # group key -> unusable images
    unusable: dict = field(default_factory=dict)  # test ID -> why it has no prediction
    split: str = "test"  # the shards of ``tfrecords`` predicted: test, or extra (unlabeled records, serve/pseudo.py)
    long_template: object = None  # submission.LongTemplate when the task submits ID,Label rows (RSNA)
    image_dir: str = "test"  # raw test images: data_dir/{image_dir}/{id}{extension} (a task's first test folder)
    extension: str = ".jpg"

    @property
    def ids(self) -> list[str]:
        return self.template[self.template.columns[0]].astype(str).tolist()

    @classmethod
    def from_paths(cls, data_dir: str | None, tfrecords: str | None, work_dir: str, workers: int = 0,
                   progress: bool = True, task=None) -> TestSource:
        """Template from ``data_dir/sample_submission.csv``, else from the test records' IDs (their order).

        ``tfrecords`` are checked against the sample before anything is predicted (``testrecords.py``).
        ``task`` (the runs' ``config.TaskConfig``): another task than RANZCR reads its own sample submission
        (long: ``ID,Label`` rows, predicted per image then written back long) and, for DICOM, needs ``tfrecords``.
        """
        if data_dir is None and tfrecords is None:
            raise ValueError("give the competition folder (--data-dir) or converted test records (--tfrecords)")
        if task is not None and not task.is_ranzcr:
            return cls._for_task(task, data_dir, tfrecords, work_dir, workers, progress)
        sample = os.path.join(data_dir, SAMPLE_SUBMISSION) if data_dir else None
        check = None
        if sample and os.path.exists(sample):
            template = read_sample_submission(sample)
            if tfrecords:
                check = check_test_records(tfrecords, template[ID_COLUMN].astype(str).tolist(), data_dir)
        elif tfrecords:
            _log(f"warning: no {SAMPLE_SUBMISSION} given; rows follow the test records' order")
            check = check_test_records(tfrecords, None, data_dir)
            template = template_from_ids(check.ids)
        else:
            raise ValueError(f"{sample} not found: --data-dir must be the competition folder")
        source = cls(template=template, data_dir=data_dir, tfrecords=tfrecords, work_dir=work_dir, workers=workers,
                     progress=progress, records_check=check)
        if check is not None:
            source.unusable.update({sid: f"unreadable when converted: {why}" for sid, why in check.unreadable.items()})
            if check.fallback_ids:
                _log(f"note: {describe_ids(check.fallback_ids)} of {SAMPLE_SUBMISSION} are missing from {tfrecords}; "
                     f"their raw JPEGs in {data_dir}/test are preprocessed with the run's own settings instead "
                     f"(documented fallback)")
        return source

    @classmethod
    def _for_task(cls, task, data_dir, tfrecords, work_dir, workers, progress) -> TestSource:
        from ranzcr_tf.serve.submission import LongTemplate

        if task.reader == "dicom":
            if not tfrecords:
                raise ValueError(f"task {task.name} reads DICOM, which the kernel does not preprocess: convert the "
                                 "test slices with make_tfrecords.py --config THE_PRESET and pass --tfrecords")
            check_records_task(tfrecords, task)
        long_template, template = None, None
        sample = os.path.join(data_dir, task.sample_submission) if data_dir else None
        if sample and os.path.exists(sample):
            if task.submission_layout == "long":
                long_template = LongTemplate(sample, task.labels, task.id_column)
                template = long_template.wide
            else:
                template = read_sample_submission(sample, (task.id_column, *task.labels))
        elif task.submission_layout == "long":
            raise ValueError(f"{sample or task.sample_submission} not found: the long submission of task {task.name} "
                             "follows its sample submission; pass --data-dir (the competition folder)")
        ids = None if template is None else template[template.columns[0]].astype(str).tolist()
        # DICOM: no raw-image fallback for a missing ID (the kernel does not preprocess DICOM); jpeg/png: the
        # task's first test folder and extension, preprocessed like RANZCR's test JPEGs.
        raw = task.reader != "dicom" and bool(task.test_images)
        image_dir, extension = (task.test_images[0], task.extension) if raw else ("test", ".jpg")
        check = (check_test_records(tfrecords, ids, data_dir if raw else None, image_dir, extension)
                 if tfrecords else None)
        if template is None:
            if check is None:
                raise ValueError(f"{sample or task.sample_submission} not found and no --tfrecords given: pass "
                                 f"--data-dir (the folder holding {task.sample_submission}) or --tfrecords")
            template = template_from_ids(check.ids, task.labels, task.id_column)
        source = cls(template=template, data_dir=data_dir,
                     tfrecords=tfrecords, work_dir=work_dir, workers=workers, progress=progress, records_check=check,
                     long_template=long_template, image_dir=image_dir, extension=extension)
        if check is not None:
            source.unusable.update({sid: f"unreadable when converted: {why}" for sid, why in check.unreadable.items()})
        return source

    @classmethod
    def from_records(cls, tfrecords: str, split: str, work_dir: str) -> TestSource:
        """Every record of ``tfrecords``'s ``split`` shards (test or extra), rows in record order; no sample.

        The models must have been trained with the records' preprocessing (there are no raw images to redo).
        """
        from ranzcr_tf.pipeline.data import read_shard_ids

        if split not in (records.TEST_DIR, records.EXTRA_DIR):
            raise ValueError(f"split must be test or extra, got {split!r}")
        ids = [sid for path in records.list_shards(tfrecords, split) for sid in read_shard_ids(path)]
        if not ids:
            raise ValueError(f"no {split} shards in {tfrecords}: convert them first (make_tfrecords.py"
                             f"{' --unlabeled DIR' if split == records.EXTRA_DIR else ''})")
        return cls(template=template_from_ids(ids), tfrecords=tfrecords, work_dir=work_dir, split=split)

    def records_for(self, fold: FoldSpec, budget: Budget | None = None,
                    on_measured: Callable[[float], None] | None = None) -> str | None:
        """A test-records folder preprocessed exactly as ``fold``'s training records (``None``: no image readable)."""
        key = fold.preprocess_key()
        if key in self._prepared:
            return self._prepared[key]
        if self.tfrecords and _records_settings(self.tfrecords) == fold.preprocess:
            folder = self.tfrecords
            if self.records_check is not None and self.records_check.fallback_ids:
                folder, skipped = complete_records(
                    self.tfrecords, self.data_dir, self.records_check.fallback_ids, fold.preprocess,
                    os.path.join(self.work_dir, f"records-completed-{len(self._prepared)}"), workers=self.workers,
                    progress=self.progress, expired=budget.expired if budget else None, image_dir=self.image_dir,
                    extension=self.extension)
                self._note_skipped(key, skipped)
            self._prepared[key] = folder
            return folder
        if self.split != records.TEST_DIR:  # extra records: no raw images to preprocess again
            raise ValueError(f"{fold.name} was trained on images preprocessed with {fold.preprocess}, but the "
                             f"{self.split} records in {self.tfrecords} were made with "
                             f"{_records_settings(self.tfrecords)}: convert them again with the run's settings")
        if not self.data_dir or not os.path.isdir(os.path.join(self.data_dir, self.image_dir)):
            where = (f"the records in {self.tfrecords} were made with {_records_settings(self.tfrecords)}"
                     if self.tfrecords else "no records were given")
            raise ValueError(f"{fold.name} was trained on images preprocessed with {fold.preprocess}, but {where} "
                             f"and there are no raw test images to preprocess: pass --data-dir (the competition "
                             f"folder with test/) or --tfrecords made with the run's settings")
        out = os.path.join(self.work_dir, f"test-{len(self._prepared)}-{fold.preprocess.image_size}px")
        _log(f"preprocessing test images for {fold.name}: {fold.preprocess}")
        start = budget.clock() if budget else 0.0

        def first(count: int, seconds: float) -> None:
            if on_measured is not None and budget is not None:
                on_measured((budget.clock() - start) / count)

        _, skipped = preprocess_test_images(self.data_dir, self.ids, fold.preprocess, out, workers=self.workers,
                                            expired=budget.expired if budget else None, on_first=first,
                                            progress=self.progress, image_dir=self.image_dir, extension=self.extension)
        if on_measured is not None and budget is not None:
            on_measured((budget.clock() - start) / max(1, len(self.ids)))
        self._note_skipped(key, skipped)
        self._prepared[key] = out if len(skipped) < len(self.ids) else None
        return self._prepared[key]

    def _note_skipped(self, key, skipped: list[dict]) -> None:
        self.skipped[key] = skipped
        for entry in skipped:
            self.unusable.setdefault(entry["id"], f"raw image {entry['path']}: {entry['reason']}")


def check_records_task(tfrecords: str, task) -> None:
    """The records were converted for ``task`` as the runs were trained: same labels, windows and slice context."""
    saved = records.read_manifest(tfrecords).get("task") or {}
    for key in ("labels", "windows", "slice_context"):
        if saved.get(key) != getattr(task, key):
            raise ValueError(f"the records in {tfrecords} were converted with task.{key} = {saved.get(key)!r} but the "
                             f"models were trained with {getattr(task, key)!r}: convert the test slices with the "
                             "runs' preset (make_tfrecords.py --config ...)")


def _records_settings(tfrecords: str) -> PreprocessConfig:
    return PreprocessConfig.from_dict(records.read_manifest(tfrecords).get("preprocess", {}))


# ----------------------------------------------------------------------------------------------- report
@dataclass
class InferReport:
    """What was predicted and why: the plan levels used, timings, rows filled."""

    full_plan: str = ""
    final_plan: str = ""
    level: int = 0
    done: list = field(default_factory=list)  # (model, fold, view) in completion order
    aborted: list = field(default_factory=list)  # passes abandoned at the deadline
    estimated_total_seconds: float | None = None
    filled_rows: int = 0
    partial_fallback: bool = False  # no pass finished: the rows of the unfinished one were used
    models_used: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- maths
def combine_results(results: dict, models: list[ModelSpec], infer_cfg: InferConfig,
                    blend: ensemble.BlendWeights | None = None) -> tuple[np.ndarray, list[int]]:
    """Views -> folds -> models, over the passes present in ``results``; returns ``(probs, models used)``.

    ``blend`` (fitted per-label weights, ``serve/blend.py``) replaces ``infer_cfg.ensemble``; a model dropped by
    the budget leaves its weight out, the other models' weights are renormalised per label.
    """
    used = sorted({m for m, _, _ in results})
    per_model = []
    for m in used:
        folds = sorted({f for mm, f, _ in results if mm == m})
        fold_probs = [ensemble.average_views([results[k] for k in sorted(results) if k[:2] == (m, f)])
                      for f in folds]
        per_model.append(ensemble.average_folds(fold_probs))
    if blend is not None:
        weights = np.array(blend.weights[used], dtype=np.float64)
        weights[:, weights.sum(axis=0) <= 0] = 1.0  # a label whose weighted models were all dropped: plain mean
        return ensemble.blend_models(per_model, weights, rank=blend.rank), used
    weights = None
    if infer_cfg.ensemble == "weighted":
        weights = [ensemble.check_weights(infer_cfg.weights, len(models))[m] for m in used]
    return ensemble.combine_models(per_model, infer_cfg.ensemble, weights), used


# ----------------------------------------------------------------------------------------------- passes
class _PassMonitor(keras.callbacks.Callback):
    """Keras predict callback of one pass: progress bar, time calibration, and the budget's stop."""

    def __init__(self, data, budget: Budget, bar, on_calibrated):
        super().__init__()
        self.data, self.budget, self.bar, self.on_calibrated = data, budget, bar, on_calibrated
        self.start = self.timed_from = self.now = budget.clock()
        self.complete, self.done = True, 0

    def on_predict_batch_begin(self, batch, logs=None):
        # Keras checks ``stop_predicting`` after each batch: a batch begun past the deadline is the last.
        if self.budget.expired():
            self.complete = False
            self.model.stop_predicting = True

    def on_predict_batch_end(self, batch, logs=None):
        data = self.data
        stop = min((batch + 1) * data.batch_size, data.num_examples)
        self.bar.update(stop - self.done)
        self.done, self.now = stop, self.budget.clock()
        if batch == 0:
            self.timed_from = self.now  # the first batch includes tracing/compilation: not representative
            if data.num_batches == 1:
                self.on_calibrated((self.now - self.start) / stop)
        elif batch == min(CALIBRATION_BATCHES, data.num_batches - 1):
            self.on_calibrated((self.now - self.timed_from) / (batch * data.batch_size))



def _run_pass(predictor, fold: FoldSpec, records_dir: str, view: str, batch_size: int, row_of: dict, budget: Budget,
              on_calibrated: Callable[[float], None], progress: bool,
              split: str = "test") -> tuple[np.ndarray, bool, float]:
    """One fold x one view: ``(probs in template rows with NaN where absent, complete?, seconds per image)``.

    Predicts through ``model.predict.predict_eval``, the function validation and OOF writing use.
    """
    from tqdm.auto import tqdm

    from ranzcr_tf.pipeline.data import build_eval_dataset

    data = build_eval_dataset(fold.cfg, records_dir, split, batch_size, tta=view, image_size=fold.image_size,
                              with_targets=False)
    rows = np.array([row_of.get(i, -1) for i in data.ids])
    num_classes = fold.cfg.task.num_classes
    probs = np.full((len(row_of), num_classes), np.nan)
    bar = tqdm(total=data.num_examples, desc=f"{fold.name} {view}", unit="img", disable=not progress, file=sys.stderr)
    monitor = _PassMonitor(data, budget, bar, on_calibrated)
    try:
        predicted = model_predict.predict_eval(None, data, from_logits=fold.output == "logits", predictor=predictor,
                                               callbacks=[monitor], allow_partial=True)
    finally:
        bar.close()
    if predicted.shape != (data.num_examples, num_classes):
        raise ValueError(f"{fold.path}: predicted shape {predicted.shape}, expected ({data.num_examples}, {num_classes})")
    keep = rows >= 0
    probs[rows[keep]] = predicted[keep]
    if data.num_batches > 1 and monitor.complete:
        seconds_per_image = (monitor.now - monitor.timed_from) / ((data.num_batches - 1) * batch_size)
    else:
        seconds_per_image = (monitor.now - monitor.start) / max(1, data.num_examples)
    return probs, monitor.complete, seconds_per_image


def predict_ensemble(models: list[ModelSpec], source: TestSource, infer_cfg: InferConfig, budget: Budget, *,
                     batch_size: int | None = None, progress: bool = True,
                     checkpoint: Callable[[np.ndarray], None] | None = None,
                     blend: ensemble.BlendWeights | None = None) -> tuple[np.ndarray, InferReport]:
    """Predict every test row with the largest plan that fits the budget; ``(probs, report)``.

    ``probs`` has the template's rows and ``labels.LABELS`` columns, every value in [0, 1], no NaN:
    rows no finished pass covers (unreadable images) get the column means. ``checkpoint(probs)`` is
    called after every finished pass with the ensemble so far (the kernel writes it out atomically).
    ``batch_size`` None uses each fold's own ``infer.batch_size`` from its saved config.
    If no pass finishes in time, the rows the unfinished pass did predict are used and the rest filled.
    ``blend``: fitted per-label weights (``serve/blend.py``) used instead of ``infer_cfg.ensemble``.
    """
    run = _EnsembleRun.plan(models, source, infer_cfg, budget, batch_size=batch_size, progress=progress,
                            checkpoint=checkpoint, blend=blend)
    try:
        # Model by model, fold by fold, so each model file is loaded once (module docstring).
        for model_index, spec in enumerate(models):
            for fold_index, fold in enumerate(spec.folds):
                run.predict_fold(model_index, fold_index, fold)
    except DeadlineReached as exc:
        # Stop predicting but still return a complete array: the caller must have time to write it.
        _log(f"budget: {exc}; writing the ensemble of the {len(run.results)} finished pass(es)")
    return run.final_probs()


@dataclass
class _EnsembleRun:
    """The state one ``predict_ensemble`` call carries from pass to pass: the plan, the costs, the results.

    Keys are ``(model index, fold index, view index)`` throughout, as in ``budget.py``.
    """

    models: list[ModelSpec]
    source: TestSource
    infer_cfg: InferConfig
    budget: Budget
    views: list[str]
    fold_counts: list[int]
    levels: list  # degrade levels, largest plan first (budget.degrade_levels)
    costs: CostModel
    report: InferReport
    row_of: dict  # test ID -> template row
    batch_size: int | None
    progress: bool
    checkpoint: Callable[[np.ndarray], None] | None
    blend: ensemble.BlendWeights | None = None
    results: dict = field(default_factory=dict)  # key -> probs of a finished pass
    partial: np.ndarray | None = None  # rows of the pass abandoned at the deadline
    announced: set = field(default_factory=set)  # models whose time estimate was already logged

    # ------------------------------------------------------------------------------------------- planning
    @classmethod
    def plan(cls, models: list[ModelSpec], source: TestSource, infer_cfg: InferConfig, budget: Budget, *,
             batch_size: int | None, progress: bool,
             checkpoint: Callable[[np.ndarray], None] | None,
             blend: ensemble.BlendWeights | None = None) -> _EnsembleRun:
        """Check the inputs and lay out the degrade levels and cost model before any pass runs."""
        infer_cfg.validate()
        if not models:
            raise ValueError("no models to predict with")
        views = list(infer_cfg.tta)
        # When models must be dropped, the lowest-weighted go first (weighted ensembles), else the last listed.
        if blend is not None:  # a blend's least-weighted model (mean over labels) is dropped first
            weights = np.asarray(blend.weights).mean(axis=1)
            priority = sorted(range(len(models)), key=lambda m: -weights[m])
        elif infer_cfg.ensemble == "weighted":
            weights = ensemble.check_weights(infer_cfg.weights, len(models))
            priority = sorted(range(len(models)), key=lambda m: -weights[m])
        else:
            priority = list(range(len(models)))
        fold_counts = [len(m.folds) for m in models]
        levels = degrade_levels(fold_counts, len(views), priority)
        costs = CostModel(num_images=len(source.ids),
                          image_sizes={(m, f): fold.image_size for m, spec in enumerate(models)
                                       for f, fold in enumerate(spec.folds)},
                          groups={(m, f): fold.preprocess_key() for m, spec in enumerate(models)
                                  for f, fold in enumerate(spec.folds)})
        return cls(models=models, source=source, infer_cfg=infer_cfg, budget=budget, views=views,
                   fold_counts=fold_counts, levels=levels, costs=costs,
                   report=InferReport(full_plan=describe_plan(levels[0], fold_counts, len(views))),
                   row_of={sid: row for row, sid in enumerate(source.ids)}, batch_size=batch_size,
                   progress=progress, checkpoint=checkpoint, blend=blend)

    def replan(self) -> frozenset:
        """The largest plan that still fits the time left, never larger than the one already chosen."""
        index, plan = choose_plan(self.levels, self.costs, self.budget.remaining(), start=self.report.level)
        if index != self.report.level:
            _log(f"budget: the estimate exceeds the time left -> plan "
                 f"{describe_plan(plan, self.fold_counts, len(self.views))} "
                 f"(degrade order: {'; then '.join(DEGRADE_ORDER)})")
            self.report.level = index
        return plan

    def calibrated(self, key: tuple, seconds_per_image: float) -> None:
        """Record a measured prediction speed; log the total estimate once per model (its first speed)."""
        self.costs.predict_seconds_per_image[key] = seconds_per_image
        if key[0] in self.announced:
            return
        self.announced.add(key[0])
        plan = self.levels[self.report.level]
        total = self.budget.elapsed() + self.costs.estimate(plan) / self.costs.safety
        self.report.estimated_total_seconds = total
        limit = "no limit" if self.budget.max_seconds is None else f"budget {self.budget.max_seconds / 60:.1f} min"
        _log(f"estimated total time: {total / 60:.1f} min for {describe_plan(plan, self.fold_counts, len(self.views))} "
             f"({seconds_per_image * 1000:.1f} ms/image for {self.models[key[0]].name}; {limit})")

    # ------------------------------------------------------------------------------------------- passes
    def predict_fold(self, model_index: int, fold_index: int, fold: FoldSpec) -> None:
        """Every planned view of one fold: prepare its test records, load it once, run the views.

        Raises ``DeadlineReached`` when the budget runs out before or during a pass.
        """
        all_views = [(model_index, fold_index, v) for v in range(len(self.views))]
        plan = self.replan()
        if not any(key in plan for key in all_views):
            # Marked as passed so the cost model stops counting them as work still to do.
            self.costs.passed.update(all_views)
            return
        if self.budget.expired():
            raise DeadlineReached("time budget spent")
        group = fold.preprocess_key()
        records_dir = self.source.records_for(
            fold, self.budget,
            on_measured=lambda s, group=group: self.costs.preprocess_seconds_per_image.__setitem__(group, s))
        self.costs.prepared.add(fold.preprocess_key())
        if records_dir is None:
            _log(f"warning: no readable test image for {fold.name}'s preprocessing; skipping it")
            self.costs.passed.update(all_views)
            return
        load_start = self.budget.clock()
        model = load_fold_model(fold)
        predictor = model_predict.build_predictor(model, from_logits=fold.output == "logits")
        self.costs.load_seconds.append(self.budget.clock() - load_start)
        self.costs.loaded.add((model_index, fold_index))
        for key in all_views:
            # Re-planned before every view: a slow earlier view may have pushed this one out of the budget.
            if key not in self.replan():
                self.costs.passed.add(key)
                continue
            self.predict_view(predictor, fold, records_dir, key)
        del model, predictor
        _release_memory()

    def predict_view(self, predictor, fold: FoldSpec, records_dir: str, key: tuple) -> None:
        """One fold x one view; a finished pass is stored and checkpointed, an abandoned one kept as partial."""
        view = self.views[key[2]]
        probs, complete, seconds_per_image = _run_pass(
            predictor, fold, records_dir, view, self.batch_size or int(fold.cfg.infer.batch_size), self.row_of,
            self.budget, lambda s, key=key: self.calibrated(key, s), self.progress,
            split=self.source.split if self.source.tfrecords and records_dir == self.source.tfrecords else "test")
        if not complete:
            self.report.aborted.append(key)
            self.partial = probs  # the fallback if no pass at all finishes (final_probs)
            raise DeadlineReached(f"time budget spent during {fold.name} {view}")
        self.costs.predict_seconds_per_image[key] = seconds_per_image
        self.results[key] = probs
        self.costs.done.add(key)
        self.report.done.append(key)
        if self.checkpoint is not None:
            self.checkpoint(_finish(self.results, self.models, self.infer_cfg, self.report, self.source, quiet=True,
                                    blend=self.blend))

    # ------------------------------------------------------------------------------------------- result
    def final_probs(self) -> tuple[np.ndarray, InferReport]:
        """The ensemble of the finished passes, else the abandoned pass's rows, else 0.5 everywhere."""
        if self.results:
            return _finish(self.results, self.models, self.infer_cfg, self.report, self.source,
                           blend=self.blend), self.report
        partial = self.partial
        if partial is None and not self.budget.expired():  # not the budget: say what really happened, write nothing
            reasons = list(dict.fromkeys(self.source.unusable.values()))
            cause = (f"none of the {len(self.source.ids)} test images could be read ({'; '.join(reasons[:2])}"
                     f"{' ...' if len(reasons) > 2 else ''})" if reasons else "no model produced a prediction")
            raise ValueError(f"no prediction at all, within the time budget ({self.budget.elapsed() / 60:.1f} min "
                             f"used): {cause}; no submission written")
        if partial is None:
            _log("warning: no prediction finished within the budget: every row gets 0.5")
            partial = np.full((len(self.source.ids), self.models[0].folds[0].cfg.task.num_classes), np.nan)
        self.report.partial_fallback = True
        filled, self.report.filled_rows = ensemble.fill_missing_rows(partial)
        return np.clip(filled, 0.0, 1.0), self.report


def _finish(results: dict, models: list[ModelSpec], infer_cfg: InferConfig, report: InferReport,
            source: TestSource, quiet: bool = False, blend: ensemble.BlendWeights | None = None) -> np.ndarray:
    probs, used = combine_results(results, models, infer_cfg, blend)
    filled, count = ensemble.fill_missing_rows(probs)
    if not quiet:
        report.filled_rows = count
        report.models_used = [models[m].name for m in used]
        report.final_plan = describe_plan(results.keys(), [len(m.folds) for m in models], len(infer_cfg.tta))
        if count:
            missing = [sid for sid, row in zip(source.ids, np.isnan(probs).any(axis=1)) if row]
            why = "; ".join(f"{sid}: {source.unusable.get(sid, 'not in any predicted records')}" for sid in missing[:3])
            _log(f"warning: {count} test row(s) had no prediction, filled with column means ({why}"
                 f"{' ...' if count > 3 else ''})")
    return np.clip(filled, 0.0, 1.0)


def _release_memory() -> None:
    import keras

    keras.backend.clear_session()
    gc.collect()
