"""``train_tpu.py --plan``: what a run will cost, from a few real training steps on this device.

    measured = measure_training(cfg, placement, image_size, per_replica_batch=4, steps=3)
    for line in plan_lines(cfg, placement, numbers, measured, ...): print(line)

The steps are the run's own: the recipe's training model (``recipes.build_training_model``), compiled by
``step.compile_for_training`` under the placement, trained by ``model.fit`` on one synthetic batch of the
preset's shapes (images, targets, line masks) repeated from memory, so no record is read and nothing is
written. Random weights: the compute is that of the ImageNet start. The first call (tracing, XLA) is timed
apart; the steps after it give the time per step. Validation is timed as forward passes of the classifier.
Peak device memory is what the backend reports (TensorFlow: ``get_memory_info`` of the first accelerator;
JAX: ``memory_stats``); a CPU reports none.

The TPU v3-8 line is an estimate, not a measurement: the training step's floating-point work, counted from
the model's layer shapes (``model.build.count_macs`` x 2 FLOPs x 3 for forward + backward), over the
published peak of 4 chips x 123 TFLOP/s (bfloat16) at an assumed utilisation.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import keras
import numpy as np

from ranzcr_tf.config import Config
from ranzcr_tf.train import recipes, step
from ranzcr_tf.train.preset_rules import RANZCR_TRAIN_STUDIES, PresetNumbers

V3_8_PEAK_FLOPS = 4 * 123e12  # 4 chips x 123 TFLOP/s bfloat16 (Google's published TPU v3 figure), 8 cores
V3_8_REPLICAS = 8
ASSUMED_UTILISATION = 0.25  # an assumption (depthwise convolutions keep EfficientNets far below the MXU peak)
MEASURED_RECIPES = ("plain", "aux_seg")  # the others are timed as plain (see plan_lines)


@dataclass(frozen=True)
class Measured:
    global_batch: int
    steps: int
    seconds_per_step: float
    cpu_seconds_per_step: float  # this process's CPU time (all threads): far below the wall time on a shared host
    first_call_seconds: float
    seconds_per_eval_image: float
    train_macs_per_image: int
    peak_bytes: int | None
    recipe: str


def synthetic_batch(cfg: Config, image_size: int, global_batch: int, image_dtype: str, seed: int = 0):
    """One batch of the recipe's structure and shapes (``recipes.symbolic_targets`` says which), as numpy."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (global_batch, image_size, image_size, cfg.model.input_channels)).astype(image_dtype)
    targets = rng.integers(0, 2, (global_batch, cfg.task.num_classes)).astype("float32")
    symbolic = recipes.symbolic_targets(cfg, image_size)
    if symbolic is None:
        return images, targets
    batch = {"target": targets}
    for key, tensor in symbolic.items():  # line masks and tip maps (uint8), has_mask (float32)
        shape = (global_batch, *tensor.shape[1:])
        if key != "target":
            batch[key] = (rng.integers(0, 2, shape) if tensor.dtype == "uint8" else np.ones(shape)).astype(tensor.dtype)
    return images, batch


def peak_device_bytes(placement) -> int | None:
    """Peak memory of the first accelerator as the backend reports it; None where it reports none (CPU)."""
    if placement.accelerator == "cpu":
        return None
    try:
        if placement.strategy is None:  # JAX
            import jax

            stats = jax.devices()[0].memory_stats() or {}
            return stats.get("peak_bytes_in_use")
        import tensorflow as tf

        device = tf.config.list_logical_devices(placement.accelerator.upper())[0].name
        return int(tf.config.experimental.get_memory_info(device)["peak"])
    except (ImportError, IndexError, KeyError, ValueError, RuntimeError):
        return None


def measure_training(cfg: Config, placement, image_size: int, per_replica_batch: int, steps: int = 3,
                     steps_per_execution: int = 1) -> Measured:
    """Time ``steps`` real training steps (after one first call) and two forward passes, as described above."""
    import tensorflow as tf

    from ranzcr_tf.model import build as models
    from ranzcr_tf.model import precision
    from ranzcr_tf.pipeline.data import image_dtype_for

    cfg = copy.deepcopy(cfg)
    recipe = cfg.train.recipe if cfg.train.recipe in MEASURED_RECIPES else "plain"
    cfg.train.recipe, cfg.model.weights = recipe, None
    per_execution = steps_per_execution if placement.accelerator != "cpu" else 1
    cfg.train.steps_per_execution = per_execution
    steps = per_execution * max(1, math.ceil(steps / per_execution))
    global_batch = placement.global_batch_size(per_replica_batch)
    precision.apply_policy(precision.choose_policy(cfg.model, placement.accelerator))
    dtype = image_dtype_for(cfg, "jax" if placement.strategy is None else "tensorflow", placement.accelerator).name
    batch = synthetic_batch(cfg, image_size, global_batch, dtype)
    dataset = tf.data.Dataset.from_tensors(batch).repeat().prefetch(2)
    counts = np.ones(cfg.task.num_classes, "float32")
    with placement.scope():
        model, loss = recipes.build_training_model(cfg, image_size, counts, 4, from_logits=cfg.model.output == "logits")
    step.compile_for_training(model, cfg, loss, 1e-4, placement, image_size)
    started = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=per_execution, verbose=0, shuffle=False)
    first = time.perf_counter() - started
    started, cpu_started = time.perf_counter(), time.process_time()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    per_step, cpu_per_step = (time.perf_counter() - started) / steps, (time.process_time() - cpu_started) / steps
    classifier = getattr(model, "inference_model", model)
    images = batch[0]
    classifier.predict_on_batch(images)
    started = time.perf_counter()
    classifier.predict_on_batch(images)
    per_image = (time.perf_counter() - started) / global_batch
    return Measured(global_batch, steps, per_step, cpu_per_step, first, per_image, models.count_macs(model),
                    peak_device_bytes(placement), recipe)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def epoch_seconds(numbers: PresetNumbers, measured: Measured, val_images: int) -> float:
    """Training steps of the run's global batch (time scaled from the measured batch) + validation."""
    per_step = measured.seconds_per_step * numbers.global_batch / measured.global_batch
    return numbers.steps_per_epoch * per_step + val_images * measured.seconds_per_eval_image


def train_flops_per_step(measured: Measured, global_batch: int) -> float:
    """Multiply-adds x 2 FLOPs x 3 (forward, and backward at about twice the forward) x images per step."""
    return measured.train_macs_per_image * 2 * 3 * global_batch


def plan_lines(cfg: Config, placement, numbers: PresetNumbers, measured: Measured, *, image_size: int,
               num_folds: int, val_images: int, source: str) -> list[str]:
    """The plan as printed: devices, batch, steps, measured step, estimates per epoch / fold / all folds."""
    epochs = int(cfg.train.epochs)
    per_epoch = epoch_seconds(numbers, measured, val_images)
    scaled = "" if measured.global_batch == numbers.global_batch else \
        f", scaled x {numbers.global_batch}/{measured.global_batch} to the run's global batch"
    peak = "not reported by this backend" if measured.peak_bytes is None else f"{measured.peak_bytes / 2**30:.2f} GiB"
    achieved = train_flops_per_step(measured, measured.global_batch) / measured.seconds_per_step
    lines = [
        f"plan: {placement.describe()}",
        f"plan: devices {', '.join(str(d) for d in placement.devices) or placement.accelerator}",
        f"plan: {cfg.model.backbone} at {image_size} px, recipe {cfg.train.recipe}"
        + ("" if measured.recipe == cfg.train.recipe else f" (timed as {measured.recipe})")
        + f", dtype policy {keras.config.dtype_policy().name}",
        f"plan: global batch {numbers.global_batch} ({cfg.train.batch_size} x {numbers.num_replicas} replicas), "
        f"learning rate {numbers.learning_rate:.3g}; {numbers.steps_per_epoch} steps per epoch ({source}); "
        f"steps per execution {numbers.steps_per_execution}",
        *[f"plan: {note}" for note in numbers.notes],
        f"plan: measured {measured.steps} training steps at global batch {measured.global_batch}: "
        f"{measured.seconds_per_step:.3f} s per step{scaled} (this process's CPU time "
        f"{measured.cpu_seconds_per_step:.1f} s per step, all threads; first call, tracing included: "
        f"{measured.first_call_seconds:.1f} s); forward {measured.seconds_per_eval_image * 1000:.1f} ms per image; "
        f"{achieved / 1e9:.1f} GFLOP/s achieved ({measured.train_macs_per_image / 1e9:.2f} G multiply-adds per "
        f"training image)",
        f"plan: peak device memory {peak}",
        f"plan: estimated {_duration(per_epoch)} per epoch ({numbers.steps_per_epoch} steps + {val_images} validation "
        f"images), {_duration(per_epoch * epochs)} per fold ({epochs} epochs), {_duration(per_epoch * epochs * num_folds)} "
        f"for --fold all ({num_folds} folds)",
    ]
    if placement.accelerator != "tpu":
        lines.append(v3_8_estimate_line(cfg, numbers, measured, achieved, epochs, num_folds, val_images))
    return lines


def v3_8_estimate_line(cfg, numbers, measured, achieved, epochs, num_folds, val_images) -> str:
    """The ESTIMATE for a TPU v3-8 from the counted FLOPs and the published peak (see the module docstring)."""
    global_batch = cfg.train.batch_size * V3_8_REPLICAS
    steps = numbers.steps_per_epoch * numbers.global_batch // global_batch
    step = train_flops_per_step(measured, global_batch) / (V3_8_PEAK_FLOPS * ASSUMED_UTILISATION)
    eval_image = measured.train_macs_per_image * 2 / (V3_8_PEAK_FLOPS * ASSUMED_UTILISATION)
    epoch = steps * step + val_images * eval_image
    return (f"plan: ESTIMATE for a TPU v3-8 (not measured): {train_flops_per_step(measured, global_batch) / 1e12:.1f} "
            f"TFLOP per step of global batch {global_batch} / (4 chips x 123 TFLOP/s bf16 peak x "
            f"{ASSUMED_UTILISATION:.0%} assumed utilisation) = {step:.2f} s per step, {steps} steps -> "
            f"{_duration(epoch)} per epoch, {_duration(epoch * epochs)} per fold, {_duration(epoch * epochs * num_folds)} "
            f"for all folds ({V3_8_PEAK_FLOPS * ASSUMED_UTILISATION / achieved:,.0f} x the rate measured here)")


# ----------------------------------------------------------------------------------------------- at start
def _records_facts(cfg: Config, tfrecords: str | None) -> tuple[dict | None, str]:
    from ranzcr_tf import io_utils
    from ranzcr_tf.prep import records

    if tfrecords and io_utils.exists(io_utils.join(tfrecords, "manifest.json")):
        return records.read_manifest(tfrecords), f"fold 0 of the records in {tfrecords}"
    return None, (f"no records at {tfrecords}: the real training set's {RANZCR_TRAIN_STUDIES:,} studies "
                  f"x {cfg.data.folds - 1}/{cfg.data.folds}")


def prepare(cfg: Config, placement, tfrecords: str | None, given: set[str], announce=print):
    """Image size (the one rule), fold counts and the preset arithmetic for fold 0, from the records if any."""
    from ranzcr_tf.train.preset_rules import follow_preset_image_size, preset_arithmetic, training_studies

    manifest, source = _records_facts(cfg, tfrecords)
    num_folds = int(manifest["num_folds"]) if manifest else int(cfg.data.folds)
    records_size = int(manifest["image_size"]) if manifest else int(cfg.preprocess.image_size)
    note = follow_preset_image_size(cfg, given, records_size)
    if note:
        announce(f"plan: {note}")
    num_train = training_studies(manifest, 0, num_folds)
    total = sum(int(n) for n in manifest["fold_counts"].values()) if manifest else RANZCR_TRAIN_STUDIES
    numbers = preset_arithmetic(cfg, placement.num_replicas, num_train)
    return numbers, int(cfg.data.image_size) or records_size, num_folds, total - num_train, source


def run_plan(cfg: Config, placement, tfrecords: str | None, given: set[str], *, per_replica_batch: int = 0,
             steps: int = 3, announce=print) -> None:
    """``--plan``: print the plan (``plan_lines``); trains nothing for real and writes nothing."""
    numbers, image_size, num_folds, val_images, source = prepare(cfg, placement, tfrecords, given, announce)
    batch = per_replica_batch or cfg.train.batch_size
    announce(f"plan: timing {steps} training steps of {cfg.model.backbone} at {image_size} px, batch {batch} per "
             f"replica, on synthetic data ...")
    measured = measure_training(cfg, placement, image_size, batch, steps, numbers.steps_per_execution)
    for line in plan_lines(cfg, placement, numbers, measured, image_size=image_size, num_folds=num_folds,
                           val_images=val_images, source=source):
        announce(line)


class CpuRunRefused(ValueError):
    """The default (mission) preset on a CPU without ``--force-cpu``: exit 2 after the cost lines."""


def refuse_cpu_run(cfg: Config, placement, tfrecords: str | None, given: set[str], preset: str, cpu_preset: str,
                   announce=print) -> None:
    """No accelerator and the mission preset by default: say what it would cost (measured here), then stop."""
    announce(f"no accelerator here ({placement.accelerator}): {preset} (the default preset) is sized for a TPU; "
             f"timing 2 of its training steps at batch 1 on this CPU to say what it would cost ...")
    numbers, image_size, num_folds, val_images, _ = prepare(cfg, placement, tfrecords, given, lambda _line: None)
    measured = measure_training(cfg, placement, image_size, 1, steps=2)
    per_epoch = epoch_seconds(numbers, measured, val_images)
    epochs = int(cfg.train.epochs)
    announce(f"cost on this CPU: {measured.seconds_per_step:.1f} s per image-step measured x {numbers.global_batch} "
             f"images per step x {numbers.steps_per_epoch} steps per epoch (+ validation) x {epochs} epochs = about "
             f"{_duration(per_epoch * epochs)} per fold, {_duration(per_epoch * epochs * num_folds)} for --fold all")
    raise CpuRunRefused(f"not training {preset} on a CPU: for a CPU run use --config configs/{cpu_preset}.yaml; "
                        "--force-cpu trains the default preset here anyway; --plan prints the full estimate")
