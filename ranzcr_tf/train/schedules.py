"""Learning-rate schedules, counted in ``fit`` steps (the optimizer's raw iteration counter).

* ``cosine`` (default): linear warmup over ``train.warmup_epochs``, then cosine decay to
  ``train.min_learning_rate`` at the last step (Keras' own ``CosineDecay``, so saved models need no
  custom object).
* ``exponential``: the public RANZCR TensorFlow notebooks' rule, ``lr * exp(-0.1)`` after every epoch,
  never below ``train.min_learning_rate`` (1e-6 by default), after the same warmup.
* ``constant``: warmup, then flat.
* ``plateau``: a plain learning rate that ``ReduceLROnPlateau`` (monitoring ``val_auc``) lowers by
  ``train.plateau_factor`` after ``train.plateau_patience`` epochs without improvement; no warmup (the
  callback needs a settable rate, not a schedule).

The learning rate is the one configured for ``train.lr_reference_batch`` images; with that set, it
scales linearly to the real global batch.
"""

from __future__ import annotations

import math

import keras

from ranzcr_tf.config import SCHEDULES

EXPONENTIAL_RATE = 0.1  # per epoch: lr * exp(-0.1), as in the public notebook


def scaled_learning_rate(train_cfg, global_batch_size: int) -> float:
    """``learning_rate x global_batch / lr_reference_batch`` when a reference batch is set, else as given."""
    if train_cfg.lr_reference_batch:
        return float(train_cfg.learning_rate) * global_batch_size / train_cfg.lr_reference_batch
    return float(train_cfg.learning_rate)


def warmup_steps(train_cfg, steps_per_epoch: int) -> int:
    total = train_cfg.epochs * steps_per_epoch
    return int(min(round(train_cfg.warmup_epochs * steps_per_epoch), max(total - 1, 0)))


@keras.saving.register_keras_serializable(package="ranzcr_tf")
class WarmupExponentialDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to ``peak``, then ``peak * exp(-rate * epochs_since_warmup)`` per whole epoch, >= ``floor``.

    ``rate = 0`` gives warmup then a constant rate.
    """

    def __init__(self, peak: float, steps_per_epoch: int, warmup_steps: int = 0, rate: float = EXPONENTIAL_RATE,
                 floor: float = 1e-6, name: str | None = None):
        super().__init__()
        self.peak = float(peak)
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_steps = int(warmup_steps)
        self.rate = float(rate)
        self.floor = float(floor)
        self.name = name

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warm = self.peak * (step + 1.0) / max(self.warmup_steps, 1)
        epochs_after = keras.ops.floor(keras.ops.maximum(step - self.warmup_steps, 0.0) / self.steps_per_epoch)
        decayed = keras.ops.maximum(self.peak * keras.ops.exp(-self.rate * epochs_after), min(self.floor, self.peak))
        return keras.ops.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return {"peak": self.peak, "steps_per_epoch": self.steps_per_epoch, "warmup_steps": self.warmup_steps,
                "rate": self.rate, "floor": self.floor, "name": self.name}


def build_learning_rate(train_cfg, steps_per_epoch: int, peak: float):
    """The optimizer's ``learning_rate``: a schedule over fit steps, or a float for ``plateau``."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}: use a smaller train.batch_size")
    warm = warmup_steps(train_cfg, steps_per_epoch)
    floor = min(float(train_cfg.min_learning_rate), peak)
    if train_cfg.schedule == "plateau":
        return float(peak)
    if train_cfg.schedule in ("exponential", "constant"):
        rate = EXPONENTIAL_RATE if train_cfg.schedule == "exponential" else 0.0
        return WarmupExponentialDecay(peak, steps_per_epoch, warm, rate=rate, floor=floor)
    if train_cfg.schedule != "cosine":
        raise ValueError(f"train.schedule {train_cfg.schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")
    total = train_cfg.epochs * steps_per_epoch
    decay_steps = max(total - warm, 1)
    alpha = floor / peak
    if warm == 0:
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps, alpha=alpha)
    # Start the warmup one step's worth above zero so the very first update is not wasted.
    return keras.optimizers.schedules.CosineDecay(peak / (warm + 1), decay_steps, alpha=alpha,
                                                  warmup_target=peak, warmup_steps=warm)


def learning_rate_value(optimizer) -> float:
    """The optimizer's current learning rate as a Python float (schedules evaluated at its step)."""
    lr = optimizer.learning_rate
    try:
        return float(keras.ops.convert_to_numpy(lr))
    except (TypeError, ValueError):
        return math.nan
