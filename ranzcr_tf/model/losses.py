"""Training losses: class-weighted binary cross-entropy (default), plain BCE, focal loss.

    positives, n = positives_from_manifest(manifest, train_folds=[1, 2, 3, 4])
    loss = build_loss(cfg.loss, positives, n, from_logits=cfg.model.output == "logits")

Written with ``keras.ops`` only, so it runs on the TensorFlow and JAX backends.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from ranzcr_tf import labels
from ranzcr_tf.config import LossConfig
from ranzcr_tf.prep.records import positives_from_manifest  # noqa: F401  (re-exported: the loss's input)


def class_weights(positives: Sequence[float], num_examples: int, cap: float) -> np.ndarray:
    """Per-class positive weights: ``pos_weight_c = min(cap, (N - P_c) / max(P_c, 1))``.

    ``N`` = ``num_examples`` (training examples), ``P_c`` = positives of class ``c``. The negative /
    positive ratio makes a rare class's positives count as much in total as its negatives (as PyTorch's
    ``BCEWithLogitsLoss(pos_weight=...)``); the cap stops one class dominating (ETT - Abnormal's ratio is
    about 330). A class that is mostly positive gets a weight below 1. Returns float32 of shape (11,).
    """
    pos = np.asarray(positives, dtype="float64")
    if pos.ndim != 1 or pos.size == 0:
        raise ValueError(f"positives must be a 1-D array of per-class counts; got shape {pos.shape}")
    if num_examples < 1:
        raise ValueError(f"num_examples = {num_examples}: expected >= 1 training examples")
    if (pos < 0).any() or (pos > num_examples).any():
        raise ValueError(f"positives {pos.tolist()} must lie in [0, num_examples={num_examples}]")
    if cap < 1:
        raise ValueError(f"cap = {cap}: expected >= 1 (loss.pos_weight_cap)")
    return np.minimum(cap, (num_examples - pos) / np.maximum(pos, 1.0)).astype("float32")


@keras.saving.register_keras_serializable(package="ranzcr_tf")
class WeightedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy with a per-class weight on the positive term, averaged over classes.

    ``loss = mean_c( -(w_c * y_c * log p_c + (1 - y_c) * log(1 - p_c)) )`` with ``y`` label-smoothed as
    ``y * (1 - s) + s / 2``. With ``from_logits`` it is computed stably from logits ``z``:
    ``w * y * softplus(-z) + (1 - y) * softplus(z)``; else probabilities are clipped to
    ``[eps, 1 - eps]`` like Keras' BCE. The batch reduction is Keras' (mean over the batch by default).
    """

    def __init__(self, pos_weight: Sequence[float], from_logits: bool = True, label_smoothing: float = 0.0,
                 epsilon: float = 1e-7, reduction: str = "sum_over_batch_size",
                 name: str = "weighted_binary_crossentropy", dtype: str | None = None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.pos_weight = [float(w) for w in np.asarray(pos_weight).reshape(-1)]
        self.from_logits = bool(from_logits)
        self.label_smoothing = float(label_smoothing)
        self.epsilon = float(epsilon)

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(y_true, "float32")
        if self.label_smoothing:
            y_true = y_true * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        weight = ops.convert_to_tensor(self.pos_weight, dtype="float32")
        if self.from_logits:
            per_class = weight * y_true * ops.softplus(-y_pred) + (1.0 - y_true) * ops.softplus(y_pred)
        else:
            p = ops.clip(y_pred, self.epsilon, 1.0 - self.epsilon)
            per_class = -(weight * y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))
        return ops.mean(per_class, axis=-1)

    def get_config(self):
        return {**super().get_config(), "pos_weight": self.pos_weight, "from_logits": self.from_logits,
                "label_smoothing": self.label_smoothing, "epsilon": self.epsilon}


def build_loss(loss_cfg: LossConfig, positives: Sequence[float] | None = None, num_examples: int | None = None,
               from_logits: bool = True, num_classes: int | None = None) -> keras.losses.Loss:
    """The loss named by ``loss_cfg.name``; ``from_logits`` must match the model's output.

    ``weighted_bce`` needs the training folds' ``positives`` (11 counts) and ``num_examples``
    (see ``positives_from_manifest``) and uses ``class_weights(..., cap=loss_cfg.pos_weight_cap)``;
    ``bce`` is ``keras.losses.BinaryCrossentropy``; ``focal`` is ``keras.losses.BinaryFocalCrossentropy``
    with ``gamma = loss_cfg.focal_gamma``. All honour ``loss_cfg.label_smoothing``.
    """
    loss_cfg.validate()
    if loss_cfg.name == "weighted_bce":
        if positives is None or num_examples is None:
            raise ValueError("loss.name = weighted_bce needs the training folds' positives and example count "
                             "(positives_from_manifest); or set loss.name=bce")
        expected = num_classes or labels.NUM_CLASSES
        if len(positives) != expected:
            raise ValueError(f"positives has {len(positives)} entries; expected {expected} (one per task label)")
        weights = class_weights(positives, num_examples, loss_cfg.pos_weight_cap)
        return WeightedBinaryCrossentropy(weights, from_logits=from_logits, label_smoothing=loss_cfg.label_smoothing)
    if loss_cfg.name == "bce":
        return keras.losses.BinaryCrossentropy(from_logits=from_logits, label_smoothing=loss_cfg.label_smoothing)
    return keras.losses.BinaryFocalCrossentropy(gamma=loss_cfg.focal_gamma, from_logits=from_logits,
                                                label_smoothing=loss_cfg.label_smoothing)
