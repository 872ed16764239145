"""Preset arithmetic checked at start: replicas -> global batch and learning rate, steps per execution that
divide the epoch, and the one image-size rule. Pure functions over numbers and the config; ``train_tpu.py``
and ``fit`` print what they return.

    numbers = preset_arithmetic(cfg, num_replicas=8, num_train=24_066)   # B7 preset on a TPU v3-8
    numbers.global_batch, numbers.learning_rate, numbers.steps_per_epoch, numbers.steps_per_execution
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ranzcr_tf.config import Config
from ranzcr_tf.train.schedules import scaled_learning_rate

# Devices (= replicas of one data-parallel run) per slice as TensorFlow and JAX list them: a v2/v3 chip holds
# two TensorCores, each its own device; from v4 on, one chip is one device (its two cores act as one).
TPU_DEVICES = {"v2-8": 8, "v3-8": 8, "v4-8": 4, "v5e-8": 8, "v5p-8": 4}
# The real training set of RANZCR CLiP (RANZCR_DATA.md): used for estimates before any record exists.
RANZCR_TRAIN_STUDIES = 30_083


@dataclass(frozen=True)
class PresetNumbers:
    num_replicas: int
    global_batch: int
    learning_rate: float
    steps_per_epoch: int
    steps_per_execution: int
    notes: tuple[str, ...]


def largest_divisor_at_most(number: int, limit: int) -> int:
    """The largest divisor of ``number`` that is <= ``limit`` (1 at least)."""
    return max(d for d in range(1, max(1, min(number, limit)) + 1) if number % d == 0)


def fit_steps_per_execution(requested: int, steps_per_epoch: int) -> tuple[int, str | None]:
    """``train.steps_per_execution`` made a divisor of the steps per epoch, and the line that says so.

    Keras runs whole executions: 752 steps at 32 per execution would train 768 (16 more than the schedule
    and the run identity count), every epoch. The largest divisor not above the request keeps the host
    round trips few and the count exact.
    """
    if requested <= 1 or steps_per_epoch % requested == 0:
        return requested, None
    chosen = largest_divisor_at_most(steps_per_epoch, requested)
    return chosen, (f"train.steps_per_execution {requested} -> {chosen}: the largest divisor of the {steps_per_epoch} "
                    f"steps per epoch not above {requested} (a remainder would train extra steps off the schedule)")


def with_steps_per_execution(cfg: Config, steps_per_epoch: int, announce=print) -> Config:
    """``cfg`` itself, or a copy whose ``train.steps_per_execution`` divides ``steps_per_epoch`` (announced)."""
    chosen, note = fit_steps_per_execution(cfg.train.steps_per_execution, steps_per_epoch)
    if note is None:
        return cfg
    announce(note)
    adjusted = copy.deepcopy(cfg)
    adjusted.train.steps_per_execution = chosen
    return adjusted


def training_studies(manifest: dict | None, fold: int, num_folds: int) -> int:
    """Studies fold ``fold`` trains on: from the records' manifest, else the real training set's share."""
    if manifest:
        return sum(int(n) for k, n in manifest["fold_counts"].items() if int(k) != fold)
    return RANZCR_TRAIN_STUDIES * (num_folds - 1) // num_folds


def preset_arithmetic(cfg: Config, num_replicas: int, num_train: int) -> PresetNumbers:
    """Global batch, scaled learning rate, steps per epoch and a dividing steps per execution for ``num_replicas``."""
    global_batch = int(cfg.train.batch_size) * int(num_replicas)
    steps = int(cfg.train.steps_per_epoch) or num_train // global_batch
    if steps < 1:
        raise ValueError(f"{num_train} training studies make no global batch of {global_batch}: lower "
                         "train.batch_size or set train.steps_per_epoch")
    per_execution, note = fit_steps_per_execution(cfg.train.steps_per_execution, steps)
    return PresetNumbers(num_replicas, global_batch, scaled_learning_rate(cfg.train, global_batch), steps,
                         per_execution, tuple(n for n in (note,) if n))


def describe_scaling(cfg: Config, num_replicas: int, where: str) -> str:
    """One line: replicas -> global batch -> learning rate, as the run will use them."""
    global_batch = int(cfg.train.batch_size) * int(num_replicas)
    rate = scaled_learning_rate(cfg.train, global_batch)
    if cfg.train.lr_reference_batch:
        how = (f"train.learning_rate {cfg.train.learning_rate:g} x {global_batch}/{cfg.train.lr_reference_batch} "
               f"(train.lr_reference_batch) = {rate:.3g}")
    else:
        how = f"train.learning_rate {rate:.3g} (not scaled: train.lr_reference_batch is 0)"
    return (f"{num_replicas} replica(s) on {where}: global batch {global_batch} = train.batch_size "
            f"{cfg.train.batch_size} x {num_replicas}; learning rate {how}")


def follow_preset_image_size(cfg: Config, given: set[str], records_size: int) -> str | None:
    """The one image-size rule: a preset (or ``--set``) that names ``preprocess.image_size`` trains at that size
    when the records hold larger images, so ``b5_512_gpu`` on the default 768 px records trains at 512, resized
    in the input pipeline. Records smaller than that train at their own size (upsampling adds compute, not
    detail). ``data.image_size``, when given, wins. Returns the line that says which (None: sizes agree).
    """
    wanted = int(cfg.preprocess.image_size)
    if "data.image_size" in given or "preprocess.image_size" not in given or wanted == int(records_size):
        return None
    if wanted > records_size:
        return (f"image size: the preset says preprocess.image_size = {wanted} px but the records hold {records_size} "
                f"px: training at {records_size} px (convert at {wanted} px for the preset's resolution, or --set "
                f"data.image_size={wanted} to upsample)")
    cfg.data.image_size = wanted
    return (f"image size: the preset trains at preprocess.image_size = {wanted} px and the records hold {records_size} "
            f"px: each image is resized to {wanted} px in the input pipeline (convert at {wanted} px to skip the "
            f"resize, or --set data.image_size={records_size} to train at the records' size)")


def unused_settings(cfg: Config) -> str | None:
    """The line that says a preset's tip term is not trained by the chosen recipe (``--recipe plain`` on
    ``cpu_lines``): the tip head sits on the aux_seg decoder. None when nothing is left unused."""
    trains_tips = cfg.train.recipe == "aux_seg" or (cfg.train.recipe == "3stage" and cfg.train.finetune_recipe == "aux_seg")
    if cfg.train.tip_loss_weight > 0 and not trains_tips:
        return (f"train.tip_loss_weight = {cfg.train.tip_loss_weight:g} is for train.recipe aux_seg (the tip head sits on "
                f"its decoder): recipe {cfg.train.recipe} trains without tip maps")
    return None
