"""One typed configuration tree for every stage, with YAML presets and ``--set`` overrides.

    cfg = load_config("configs/cpu_demo.yaml", ["train.epochs=3", "model.backbone=efficientnet_b3"])
    cfg.validate()                     # ValueError naming the key and what to change
    save_config(cfg, "runs/x/config.yaml")   # plus versions and git revision

Unknown keys (a typo such as ``train.epoch``) are rejected with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from ranzcr_tf import kaggle_paths, presets
from ranzcr_tf.coerce import merge, parse_overrides
from ranzcr_tf.provenance import run_metadata

# Option lists, defined once: the config checks them, and every CLI offers them as choices.
INTERPOLATIONS = ("auto", "linear", "area", "cubic", "lanczos")  # resize filters (auto: linear below 2x, else area)
STRATEGIES = ("auto", "tpu", "mirrored", "multiworker", "jax", "default")  # where training runs (train/placement.py)
SCHEDULES = ("cosine", "exponential", "plateau", "constant")  # train.schedule (train/schedules.py)
TTA_VIEWS = ("identity", "hflip")  # test-time augmentation views
ENSEMBLE_METHODS = ("mean", "rank_mean", "weighted")  # how the kernel combines runs (serve/ensemble.py)
# How a fold is trained (train/recipes.py); 3stage runs teacher -> student -> finetune in turn (train/stages.py).
RECIPES = ("plain", "aux_seg", "teacher", "student", "finetune", "3stage")
FINETUNE_RECIPES = ("finetune", "aux_seg")  # 3stage's last stage: classification alone, or + the line-mask decoder
DISTILL_LOSSES = ("mse", "cosine")  # student: distance between the student's and the teacher's feature maps
MULTI_PROCESS = ("auto", "on", "off")  # whether the JAX backend joins a multi-process run (train/multihost.py)
READERS = ("jpeg", "png", "dicom")  # task.reader: how the converter reads a source image
TASK_METRICS = ("mean_auc", "weighted_log_loss")  # task.metric (model/metrics.py); the second is lower-is-better
LAYOUTS = ("wide", "long")  # task.csv_layout / task.submission_layout: one row per image, or one per image x label


def _one_of(options) -> str:
    return ", ".join(options[:-1]) + " or " + options[-1]


@dataclass
class PreprocessConfig:
    """How a source radiograph becomes a stored image (shared by converter and kernel)."""

    image_size: int = 768
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8  # tiles per side, as cv2.createCLAHE(tileGridSize=(8, 8))
    interpolation: str = "auto"  # auto (linear below a 2x shrink, area beyond) | linear | area | cubic | lanczos
    jpeg_quality: int = 95
    reduced_decode: bool = True  # JPEG DCT-domain downscale (M/8) to the smallest size with short side >= target

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessConfig:
        """Validated settings from a dict that may hold other keys too (a manifest's or a run's ``preprocess``)."""
        known = {f.name for f in fields(cls)}
        settings = cls(**{key: value for key, value in values.items() if key in known})
        settings.validate()
        return settings

    def validate(self) -> None:
        _check(self.image_size >= 32, "preprocess.image_size", self.image_size, "an integer >= 32")
        _check(self.clahe_clip_limit >= 0, "preprocess.clahe_clip_limit", self.clahe_clip_limit, ">= 0 (0 disables CLAHE)")
        _check(self.clahe_tile_grid >= 1, "preprocess.clahe_tile_grid", self.clahe_tile_grid, ">= 1")
        _check(self.interpolation in INTERPOLATIONS, "preprocess.interpolation", self.interpolation,
               f"one of {', '.join(INTERPOLATIONS)}")
        _check(1 <= self.jpeg_quality <= 100, "preprocess.jpeg_quality", self.jpeg_quality, "in 1..100")


@dataclass
class DataConfig:
    """Where the data is and how it is split and batched."""

    data_dir: str = field(default_factory=kaggle_paths.competition_dir)  # /kaggle/input/<competition>
    tfrecords: str = "tfrecords"
    folds: int = 5
    fold_seed: int = 42
    shard_mb: int = 150  # target shard size of the converter
    image_size: int = 0  # size fed to the model; 0 = the records' size (from the manifest)
    image_dtype: str = "auto"  # auto | uint8 | float32 | bfloat16 (what the pipeline hands the model)
    shuffle_buffer: int = 2048
    cache: bool = False  # cache decoded validation images in memory

    def validate(self) -> None:
        _check(self.folds >= 2, "data.folds", self.folds, "an integer >= 2")
        _check(self.shard_mb >= 1, "data.shard_mb", self.shard_mb, ">= 1")
        _check(self.image_size == 0 or self.image_size >= 32, "data.image_size", self.image_size, "0 or >= 32")
        _check(self.image_dtype in ("auto", "uint8", "float32", "bfloat16"), "data.image_dtype",
               self.image_dtype, "one of auto, uint8, float32, bfloat16")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, ">= 1")


@dataclass
class AugmentConfig:
    """In-graph training augmentations; each ``*_prob`` is the chance it is applied to an image."""

    hflip_prob: float = 0.5
    affine_prob: float = 0.75
    shift: float = 0.0625  # fraction of the side
    scale: float = 0.1  # +- relative zoom
    rotate_deg: float = 15.0
    shear_deg: float = 5.0
    crop_prob: float = 0.3
    crop_scale_min: float = 0.9  # random resized crop keeps at least this share of the area
    brightness_contrast_prob: float = 0.5
    brightness: float = 0.1  # +- fraction of 255
    contrast: float = 0.1  # +- relative
    gamma_prob: float = 0.3
    gamma_min: float = 0.8
    gamma_max: float = 1.25
    cutout_prob: float = 0.5
    cutout_holes: int = 4
    cutout_size: float = 0.1  # hole side as a fraction of the image side
    cutout_fill: str = "zero"  # zero | mean (the image's mean grey level)
    noise_prob: float = 0.0
    noise_std: float = 5.0  # in 0..255 pixel units
    blur_prob: float = 0.0
    blur_sigma: float = 1.0
    # Blank the left or the right half (each half equally likely), last: the RSNA PE 2020 team's "half mask".
    half_mask_prob: float = 0.0
    # How the one combined flip/crop/affine resampling runs: "xla" = a bilinear warp as an XLA-compiled gather on
    # the host CPU (default: less CPU than the op, docs/results.md#speed-measurements-behind-code-choices; rounds
    # instead of truncating); "projective" =
    # tf.raw_ops.ImageProjectiveTransformV3, the fallback for a TensorFlow build whose tf.data cannot run XLA.
    warp: str = "xla"

    def validate(self) -> None:
        for f in fields(self):
            if f.name.endswith("_prob"):
                v = getattr(self, f.name)
                _check(0.0 <= v <= 1.0, f"augment.{f.name}", v, "a probability in [0, 1]")
        _check(0 < self.crop_scale_min <= 1, "augment.crop_scale_min", self.crop_scale_min, "in (0, 1]")
        _check(0 < self.gamma_min <= self.gamma_max, "augment.gamma_min/gamma_max",
               (self.gamma_min, self.gamma_max), "0 < gamma_min <= gamma_max")
        _check(0 <= self.cutout_size < 1, "augment.cutout_size", self.cutout_size, "in [0, 1)")
        _check(self.cutout_holes >= 0, "augment.cutout_holes", self.cutout_holes, ">= 0")
        _check(self.cutout_fill in ("zero", "mean"), "augment.cutout_fill", self.cutout_fill, "zero or mean")
        _check(self.warp in ("projective", "xla"), "augment.warp", self.warp, "projective or xla")
        _check(0 <= self.shift < 0.5, "augment.shift", self.shift, "in [0, 0.5)")
        _check(0 <= self.scale < 1, "augment.scale", self.scale, "in [0, 1)")
        _check(self.rotate_deg >= 0 and self.shear_deg >= 0, "augment.rotate_deg/shear_deg",
               (self.rotate_deg, self.shear_deg), ">= 0 (a symmetric range +-value is drawn)")
        _check(0 <= self.brightness <= 1 and 0 <= self.contrast < 1, "augment.brightness/contrast",
               (self.brightness, self.contrast), "brightness in [0, 1], contrast in [0, 1)")
        _check(self.noise_std >= 0, "augment.noise_std", self.noise_std, ">= 0")
        _check(0 <= self.blur_sigma <= 10, "augment.blur_sigma", self.blur_sigma, "in [0, 10]")


HEADS = ("single", "per_group", "ett_softmax")  # model.head choices (ranzcr_tf.model.build)
POOLINGS = ("avg", "gem", "max", "avgmax")  # model.pooling choices (ranzcr_tf.model.build implements each)


@dataclass
class ModelConfig:
    """Backbone, head and numerics."""

    backbone: str = "efficientnet_b0"
    weights: str | None = None  # None | "imagenet" (offline, from the Keras cache) | path to a weights file
    # 1: grayscale in, expanded to 3 inside the model when the backbone needs it; 3 or more (DICOM windows x
    # slices, task.channels): mixed to the backbone's 3 by a learned 1x1 convolution when it needs 3.
    input_channels: int = 1
    # avg | gem | max | avgmax (average and max concatenated). Max keeps a feature that lights up a few
    # positions of a large map (a thin line) at full strength; averaging dilutes it by the map's area.
    pooling: str = "avg"
    gem_p: float = 3.0
    dropout_rate: float = 0.2
    head: str = "single"  # single | per_group | ett_softmax (ETT's three states exclusive: softmax with "no ETT")
    # train.recipe aux_seg only: the head also reads the final features pooled under each predicted line mask
    # (model/decoder.py), so the served model keeps the decoder (not the tip head).
    seg_attention: bool = False
    output: str = "logits"  # logits | probabilities (the loss matches)
    mixed_precision: str = "auto"  # auto | float32 | mixed_float16 | mixed_bfloat16

    def validate(self) -> None:
        _check(self.input_channels >= 1, "model.input_channels", self.input_channels,
               "1 (grey) or the task's stored channels (3 for RGB backbones)")
        _check(self.pooling in POOLINGS, "model.pooling", self.pooling, ", ".join(POOLINGS[:-1]) + " or " + POOLINGS[-1])
        _check(self.gem_p > 0, "model.gem_p", self.gem_p, "> 0")
        _check(0 <= self.dropout_rate < 1, "model.dropout_rate", self.dropout_rate, "in [0, 1)")
        _check(self.head in HEADS, "model.head", self.head, _one_of(HEADS))
        _check(self.output in ("logits", "probabilities"), "model.output", self.output, "logits or probabilities")
        _check(self.mixed_precision in ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
               "model.mixed_precision", self.mixed_precision, "auto, float32, mixed_float16 or mixed_bfloat16")


@dataclass
class LossConfig:
    """Training loss."""

    name: str = "weighted_bce"  # weighted_bce | bce | focal
    pos_weight_cap: float = 10.0  # cap on the per-class positive weight (neg/pos ratio)
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0

    def validate(self) -> None:
        _check(self.name in ("weighted_bce", "bce", "focal"), "loss.name", self.name, "weighted_bce, bce or focal")
        _check(self.pos_weight_cap >= 1, "loss.pos_weight_cap", self.pos_weight_cap, ">= 1")
        _check(0 <= self.label_smoothing < 0.5, "loss.label_smoothing", self.label_smoothing, "in [0, 0.5)")
        _check(self.focal_gamma >= 0, "loss.focal_gamma", self.focal_gamma, ">= 0")


@dataclass
class TrainConfig:
    """Optimisation, schedule, placement and callbacks."""

    epochs: int = 10
    batch_size: int = 16  # per replica; global batch = batch_size x replicas
    steps_per_epoch: int = 0  # 0 = one pass over the training folds
    learning_rate: float = 1e-3  # for a global batch of lr_reference_batch
    lr_reference_batch: int = 0  # 0 = no scaling; else lr x global_batch / lr_reference_batch
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 1e-5
    schedule: str = "cosine"  # one of SCHEDULES
    warmup_epochs: float = 1.0
    min_learning_rate: float = 1e-6
    plateau_factor: float = 0.5  # schedule plateau: lr x factor ...
    plateau_patience: int = 1  # ... after this many epochs without a better val_auc
    frozen_epochs: int = 0  # first epochs with the backbone frozen
    # Training steps per call of Keras' compiled training function. Keras runs whole calls: with a steps per
    # epoch that is not a multiple, each epoch trains up to steps_per_execution - 1 extra steps (3 steps at 2
    # per call trained 4) while the schedule and the run identity count the configured number, so pick a
    # divisor of the steps per epoch. On a CPU it helped a small model, whose step is short enough for the
    # per-call host overhead to matter, and should not matter for an EfficientNet step (benchmarks/bench_step.py;
    # docs/results.md#speed-measurements-behind-code-choices). On TPUs the host round trip per call is what it saves
    # (configs/b7_768_tpu.yaml: 32). Left at 1 by default because of the divisor rule above.
    steps_per_execution: int = 1
    # XLA for the TensorFlow training step (TPUStrategy compiles with XLA anyway; the JAX backend always does).
    # Off: on CPU, XLA made the step far slower, training and inference, small model and EfficientNet alike
    # (benchmarks/bench_step.py; docs/results.md#speed-measurements-behind-code-choices). GPUs are not
    # measured yet: run `benchmarks/bench_step.py --rows keras-tf,keras-tf-xla` there before turning it on.
    jit_compile: bool = False
    use_ema: bool = False
    ema_momentum: float = 0.99
    grad_accum_steps: int = 1
    early_stopping_patience: int = 0  # 0 = off
    # Stop cleanly, after an epoch's checkpoint, when the next epoch would end past this many minutes of the
    # process (0 = no limit): a Kaggle session (9 h) then ends in time to save its output, and the next
    # session resumes from it. The command exits 75 with one line saying so.
    max_minutes: float = 0.0
    strategy: str = "auto"  # auto | tpu | mirrored | multiworker | jax | default
    seed: int = 42
    recipe: str = "plain"  # plain | aux_seg | teacher | student | finetune | 3stage (train/recipes.py)
    mask_loss_weight: float = 1.0  # aux_seg: total loss = classification + weight x (Dice + BCE) of the masks
    mask_line_width: float = 8.0  # aux_seg, teacher, student: drawn line width in stored pixels
    mask_max_lines: int = 8  # aux_seg, teacher, student: polylines per study kept (fixed shapes; the rest are dropped)
    mask_max_points: int = 256  # aux_seg, teacher, student: polyline points per study kept, all lines together
    tip_loss_weight: float = 0.0  # aux_seg: + weight x tip heat-map loss (pipeline/tips.py); 0 = none; unused elsewhere
    tip_sigma: float = 8.0  # aux_seg: Gaussian sigma of the tip heat maps, in stored pixels
    teacher: str = ""  # student: the teacher's run folder (holds fold{k}/best.keras); 3stage sets it itself
    init_from: str = ""  # finetune, aux_seg: the run folder whose fold{k}/best.keras starts the weights (3stage: the student)
    distill_layer: str = ""  # student: backbone layer whose feature maps are compared ("" = the backbone's output)
    distill_loss: str = "mse"  # student: mse | cosine (1 - cosine similarity per position)
    distill_weight: float = 1.0  # student: total loss = classification + weight x feature distance
    teacher_epochs: int = 0  # 3stage: epochs of stage 1 (0 = train.epochs)
    student_epochs: int = 0  # 3stage: epochs of stage 2 (0 = train.epochs)
    finetune_epochs: int = 0  # 3stage: epochs of stage 3 (0 = train.epochs)
    finetune_recipe: str = "finetune"  # 3stage: stage 3's recipe, from the student's weights: finetune | aux_seg
    soft_labels: str | None = None  # CSV of ID + 11 probabilities (serve/pseudo.py): soft training targets
    soft_alpha: float = 0.5  # target = alpha x soft + (1 - alpha) x hard where a hard label exists (pipeline/soft.py)
    extra_records: str | None = None  # make_tfrecords.py --unlabeled output: its extra/ shards join training only
    extra_fraction: float = 0.5  # share of training examples drawn from extra_records (needs soft_labels for them)

    def validate(self) -> None:
        _check(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _check(self.max_minutes >= 0, "train.max_minutes", self.max_minutes, ">= 0 (0 = no time limit)")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _check(self.steps_per_epoch >= 0, "train.steps_per_epoch", self.steps_per_epoch, ">= 0")
        _check(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "> 0")
        _check(self.lr_reference_batch >= 0, "train.lr_reference_batch", self.lr_reference_batch, ">= 0")
        _check(self.optimizer in ("adam", "adamw"), "train.optimizer", self.optimizer, "adam or adamw")
        _check(self.schedule in SCHEDULES, "train.schedule", self.schedule, _one_of(SCHEDULES))
        _check(0 < self.plateau_factor < 1, "train.plateau_factor", self.plateau_factor, "in (0, 1)")
        _check(self.plateau_patience >= 0, "train.plateau_patience", self.plateau_patience, "an integer >= 0")
        _check(0 <= self.frozen_epochs <= self.epochs, "train.frozen_epochs", self.frozen_epochs, "in 0..train.epochs")
        _check(self.steps_per_execution >= 1, "train.steps_per_execution", self.steps_per_execution, ">= 1")
        _check(0 < self.ema_momentum < 1, "train.ema_momentum", self.ema_momentum, "in (0, 1)")
        _check(self.grad_accum_steps >= 1, "train.grad_accum_steps", self.grad_accum_steps, ">= 1")
        _check(self.strategy in STRATEGIES, "train.strategy", self.strategy, _one_of(STRATEGIES))
        _check(self.recipe in RECIPES, "train.recipe", self.recipe, _one_of(RECIPES))
        _check(self.mask_loss_weight >= 0, "train.mask_loss_weight", self.mask_loss_weight, ">= 0")
        _check(self.mask_line_width > 0, "train.mask_line_width", self.mask_line_width, "> 0 (stored pixels)")
        _check(self.mask_max_lines >= 1, "train.mask_max_lines", self.mask_max_lines, "an integer >= 1")
        _check(self.mask_max_points >= 2, "train.mask_max_points", self.mask_max_points, "an integer >= 2")
        _check(self.tip_loss_weight >= 0, "train.tip_loss_weight", self.tip_loss_weight, ">= 0 (0 = off)")
        _check(self.tip_sigma > 0, "train.tip_sigma", self.tip_sigma, "> 0 (stored pixels)")
        _check(0 <= self.soft_alpha <= 1, "train.soft_alpha", self.soft_alpha, "in [0, 1] (1: soft labels alone)")
        _check(0 < self.extra_fraction < 1, "train.extra_fraction", self.extra_fraction, "in (0, 1)")
        _check(not self.extra_records or bool(self.soft_labels), "train.extra_records", self.extra_records,
               "to come with train.soft_labels: unlabeled records train on their soft labels only")
        _check(self.distill_loss in DISTILL_LOSSES, "train.distill_loss", self.distill_loss, _one_of(DISTILL_LOSSES))
        _check(self.distill_weight >= 0, "train.distill_weight", self.distill_weight, ">= 0")
        for name in ("teacher_epochs", "student_epochs", "finetune_epochs"):
            _check(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "an integer >= 0 (0 = train.epochs)")
        _check(self.finetune_recipe in FINETUNE_RECIPES, "train.finetune_recipe", self.finetune_recipe,
               _one_of(FINETUNE_RECIPES))
        if self.recipe == "student" and not self.teacher:
            raise ValueError("train.recipe = student needs the teacher's run folder: --set train.teacher=runs/NAME "
                             "(trained with train.recipe=teacher), or run --recipe 3stage")
        if self.recipe == "finetune" and not self.init_from:
            raise ValueError("train.recipe = finetune needs the run folder to start from: --set "
                             "train.init_from=runs/NAME (the student), or run --recipe 3stage")


@dataclass
class DistributeConfig:
    """Several processes (hosts) training one model on the JAX backend (``train.multihost``).

    A TPU pod slice or a cluster scheduler tells each process its part; on GPU hosts without one, name the
    coordinator (process 0's ``HOST:PORT``, any free port) and give every process the same
    ``num_processes`` and its own ``process_id``. The TensorFlow backend uses ``TF_CONFIG`` instead.
    """

    multi_process: str = "auto"  # auto: when the settings below or the environment name a cluster | on | off
    coordinator: str = ""  # HOST:PORT of process 0; "" = from the environment
    num_processes: int | None = None  # every process's count; None = from the environment
    process_id: int | None = None  # this process, 0..num_processes-1 (0 writes the run folder); None = from the environment

    def validate(self) -> None:
        _check(self.multi_process in MULTI_PROCESS, "distribute.multi_process", self.multi_process,
               _one_of(MULTI_PROCESS))
        if self.coordinator:
            host, _, port = self.coordinator.rpartition(":")
            _check(bool(host) and port.isdigit() and 0 < int(port) < 65536, "distribute.coordinator",
                   self.coordinator, "HOST:PORT of process 0 (e.g. 10.0.0.1:1234), or '' to take it from the environment")
        _check(self.num_processes is None or self.num_processes >= 1, "distribute.num_processes", self.num_processes,
               "an integer >= 1 (the number of processes, usually one per host)")
        _check(self.process_id is None or self.process_id >= 0, "distribute.process_id", self.process_id,
               "an integer >= 0")
        if self.num_processes is not None and self.process_id is not None and self.process_id >= self.num_processes:
            raise ValueError(f"config distribute.process_id = {self.process_id} is invalid: processes are numbered "
                             f"0..{self.num_processes - 1} (distribute.num_processes = {self.num_processes}); give "
                             "each process its own number in that range")
        given = {"distribute.coordinator": bool(self.coordinator), "distribute.num_processes": self.num_processes is not None,
                 "distribute.process_id": self.process_id is not None}
        if any(given.values()) and not all(given.values()):
            named = ", ".join(key for key, ok in given.items() if ok)
            missing = ", ".join(key for key, ok in given.items() if not ok)
            raise ValueError(f"config {named} given without {missing}: a cluster without a scheduler needs all three "
                             "(coordinator=HOST:PORT of process 0, the same num_processes everywhere, each process its "
                             "own process_id), or none of them to take the cluster from the environment")
        if self.multi_process == "off" and self.coordinator:
            raise ValueError(f"config distribute.multi_process = 'off' contradicts distribute.coordinator = "
                             f"{self.coordinator!r}: drop the coordinator settings, or set multi_process to auto or on")


@dataclass
class InferConfig:
    """Submission: test-time augmentation and ensembling."""

    tta: list = field(default_factory=lambda: ["identity", "hflip"])
    ensemble: str = "mean"  # mean | rank_mean | weighted
    weights: list = field(default_factory=list)  # one per model when ensemble = weighted
    batch_size: int = 16

    def validate(self) -> None:
        _check(len(self.tta) >= 1 and all(t in TTA_VIEWS for t in self.tta), "infer.tta", self.tta,
               f"a non-empty list of {', '.join(TTA_VIEWS)}")
        _check(self.ensemble in ENSEMBLE_METHODS, "infer.ensemble", self.ensemble, _one_of(ENSEMBLE_METHODS))
        _check(self.batch_size >= 1, "infer.batch_size", self.batch_size, ">= 1")


def _ranzcr_groups() -> dict:
    from ranzcr_tf import labels

    return {name: list(members) for name, members in labels.GROUPS.items()}


def _ranzcr_labels() -> list:
    from ranzcr_tf import labels

    return list(labels.LABELS)


@dataclass
class TaskConfig:
    """What is predicted, from which files, scored how: RANZCR CLiP by default (its values live in
    ``labels.py``); another competition is a preset that sets this section (``configs/rsna_ich_*.yaml``).

    Saved with every run, so inference never re-types the labels, their order or the submission layout.
    """

    name: str = "ranzcr"  # ranzcr | any other name (RANZCR-only features refuse other tasks)
    labels: list = field(default_factory=_ranzcr_labels)  # targets, in the order of every array and CSV column
    groups: dict = field(default_factory=_ranzcr_groups)  # head name -> its labels, in label order ({} = none)
    id_column: str = "StudyInstanceUID"  # the image ID (train CSV, records, OOF, wide submission)
    group_column: str = "PatientID"  # folds are grouped by it (dicom: read from the files' metadata)
    csv_layout: str = "wide"  # wide: one row per image | long: ID,Label rows named <image id>_<label> (RSNA)
    train_csv: str = "train.csv"
    train_images: list = field(default_factory=lambda: ["train"])  # folder(s) under data_dir holding train images
    test_images: list = field(default_factory=lambda: ["test"])
    extension: str = ".jpg"  # source image file extension
    sample_submission: str = "sample_submission.csv"
    reader: str = "jpeg"  # jpeg | png | dicom
    windows: list = field(default_factory=list)  # dicom: names (brain, subdural, bone) or [center, width] HU pairs
    slice_context: int = 0  # dicom: 0 = the slice alone; k = also the k slices above and below (by z, same series)
    metric: str = "mean_auc"  # mean_auc (higher is better) | weighted_log_loss (lower is better)
    label_weights: list = field(default_factory=list)  # weighted_log_loss: one weight per label ([] = all 1)
    submission_layout: str = "wide"  # wide: ID + one column per label | long: ID,Label with <id>_<label> rows

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def is_ranzcr(self) -> bool:
        return self.name == "ranzcr"

    @property
    def channels(self) -> int:
        """Channels the converter stores per image: 1 for jpeg/png, (2 x slice_context + 1) x windows for dicom."""
        if self.reader != "dicom":
            return 1
        return (2 * self.slice_context + 1) * len(self.windows)

    def weights(self) -> list[float]:
        """Per-label weights of ``weighted_log_loss`` (all 1 when ``label_weights`` is empty)."""
        return [float(w) for w in self.label_weights] if self.label_weights else [1.0] * len(self.labels)

    def require_ranzcr(self, feature: str, advice: str = "leave it at its default or use a RANZCR preset") -> None:
        """One-line refusal for the RANZCR-specific parts (line masks, annotations, phantom styles, the report,
        blend and pseudo-label tools...): the one check every such part calls, ``advice`` saying what to do."""
        if not self.is_ranzcr:
            raise ValueError(f"{feature} is specific to the RANZCR CLiP task; task.name = {self.name!r} cannot use "
                             f"it: {advice}")

    def validate(self) -> None:
        _check(bool(self.name) and self.name.replace("_", "").isalnum(), "task.name", self.name,
               "a word such as ranzcr or rsna_ich")
        labels = [str(label) for label in self.labels]
        _check(len(labels) >= 1 and len(set(labels)) == len(labels), "task.labels", self.labels,
               "a non-empty list of distinct label names")
        if self.groups:
            members = [str(m) for group in self.groups.values() for m in (group or [])]
            _check(members == labels, "task.groups", self.groups,
                   "head name -> labels, covering task.labels once each in their order, or {} for no groups")
        _check(bool(self.id_column) and bool(self.group_column), "task.id_column/group_column",
               (self.id_column, self.group_column), "two column names")
        _check(self.csv_layout in LAYOUTS, "task.csv_layout", self.csv_layout, _one_of(LAYOUTS))
        _check(self.submission_layout in LAYOUTS, "task.submission_layout", self.submission_layout, _one_of(LAYOUTS))
        _check(self.reader in READERS, "task.reader", self.reader, _one_of(READERS))
        _check(self.metric in TASK_METRICS, "task.metric", self.metric, _one_of(TASK_METRICS))
        _check(bool(self.train_images) and all(isinstance(d, str) and d for d in self.train_images),
               "task.train_images", self.train_images, "a non-empty list of folder names under the data folder")
        _check(self.extension.startswith("."), "task.extension", self.extension, "a file extension such as .jpg or .dcm")
        _check(not self.label_weights or (len(self.label_weights) == len(labels)
                                          and all(float(w) > 0 for w in self.label_weights)),
               "task.label_weights", self.label_weights, f"[] or {len(labels)} positive weights, one per task.labels")
        _check(self.slice_context >= 0, "task.slice_context", self.slice_context, "an integer >= 0")
        if self.reader == "dicom":
            _check(len(self.windows) >= 1, "task.windows", self.windows,
                   "at least one window for the dicom reader: names (brain, subdural, bone) or [center, width] pairs")
            for window in self.windows:
                ok = isinstance(window, str) or (isinstance(window, (list, tuple)) and len(window) == 2
                                                 and all(isinstance(v, (int, float)) for v in window) and window[1] > 0)
                _check(ok, "task.windows", self.windows, "names (brain, subdural, bone) or [center, width] pairs, width > 0")
        else:
            _check(self.slice_context == 0 and not self.windows, "task.windows/slice_context",
                   (self.windows, self.slice_context), "empty and 0 unless task.reader is dicom")
        if self.csv_layout == "long" and any("_" in label for label in labels):
            raise ValueError(f"config task.labels = {labels} is invalid with task.csv_layout = long: a long CSV "
                             "names rows <id>_<label>, so labels must not contain '_'")


@dataclass
class Config:
    """The whole tree; ``validate()`` checks every section once at start-up."""

    task: TaskConfig = field(default_factory=TaskConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)

    def validate(self) -> Config:
        for f in fields(self):
            getattr(self, f.name).validate()
        self._check_task()
        return self

    def _check_task(self) -> None:
        """Cross-section rules of a non-RANZCR task (RANZCR's own settings are checked as before)."""
        task = self.task
        if task.channels > 1 and self.model.input_channels != task.channels:
            raise ValueError(f"config model.input_channels = {self.model.input_channels} is invalid: the task stores "
                             f"{task.channels} channels per image ((2 x task.slice_context + 1) x "
                             f"{len(task.windows)} windows); set model.input_channels={task.channels}")
        if self.model.seg_attention and self.train.recipe != "aux_seg":
            raise ValueError("config model.seg_attention = True needs train.recipe = aux_seg (the head reads its "
                             "decoder's masks); set model.seg_attention=false for other recipes")
        if self.model.head == "per_group" and not task.groups:
            raise ValueError("config model.head = per_group needs task.groups (head name -> labels); "
                             "set model.head=single for a task without groups")
        if not task.is_ranzcr:
            if self.model.head == "ett_softmax":
                task.require_ranzcr("model.head = 'ett_softmax'")
            for key, value, default in (("train.recipe", self.train.recipe, "plain"),
                                        ("train.soft_labels", self.train.soft_labels, None),
                                        ("train.extra_records", self.train.extra_records, None)):
                if value and value != default:
                    task.require_ranzcr(f"{key} = {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok or (isinstance(value, float) and not math.isfinite(value)):  # inf passes "> 0": refused here
        raise ValueError(f"config {key} = {value!r} is invalid: expected {expected}"
                         + (" (a finite number)" if isinstance(value, float) else ""))


def config_from_dict(values: dict | None) -> Config:
    cfg = Config()
    merge(cfg, values or {})
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML preset (if given; a saved run config is accepted too) <- ``--set`` overrides; validated."""
    values: dict = {}
    if path:
        found = presets.find_preset(str(path))  # a path, or a shipped preset's name (configs/x.yaml, x.yaml, x)
        if found is None:
            raise ValueError(f"config file {path} not found; presets in configs/: {', '.join(presets.list_presets())}")
        values = read_yaml(found)
    cfg = config_from_dict(values)
    merge(cfg, parse_overrides(overrides))
    return cfg.validate()


def read_yaml(path: str | os.PathLike) -> dict:
    """A config YAML file as a dict (``_meta`` dropped); a one-line ``ValueError`` for a folder, a file
    that is not YAML, or YAML that is not a mapping of sections."""
    if os.path.isdir(path):
        raise ValueError(f"config file {path} is a folder: pass a YAML file such as configs/cpu_demo.yaml "
                         "or a run's fold0/config.yaml")
    try:
        with open(path) as fh:
            values = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"config file {path}{where} is not valid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not a text (YAML) file") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} holds a {type(values).__name__}, not sections: expected e.g. "
                         "'train:' with 'epochs: 3' indented under it")
    values.pop("_meta", None)
    return values


def given_keys(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> set[str]:
    """The dotted keys that the YAML file and the ``--set`` overrides name (not the defaults)."""
    def walk(values: dict, prefix: str = "") -> set[str]:
        keys = set()
        for key, value in values.items():
            keys |= walk(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
        return keys

    return walk(read_yaml(presets.find_preset(str(path)) or path) if path else {}) | walk(parse_overrides(overrides))


PRESET_DIR = presets.preset_dir()


def config_to_yaml(cfg: Config, with_meta: bool = True) -> str:
    """The config as YAML, ``distribute`` at its defaults: that section says where one process of a run sat
    (process 0's address, this process's number), and a saved config reused on another machine must not try
    to join that cluster; ``_meta.distribute`` keeps it for the record."""
    values = cfg.to_dict()
    values["distribute"] = dataclasses.asdict(DistributeConfig())
    if with_meta:
        values["_meta"] = {**run_metadata(), "distribute": cfg.to_dict()["distribute"]}
    return yaml.safe_dump(values, sort_keys=False)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config plus ``_meta`` (versions, git revision) atomically; works for gs:// via tf.io.gfile."""
    text = config_to_yaml(cfg)
    from ranzcr_tf.io_utils import atomic_write_text

    atomic_write_text(path, text)
