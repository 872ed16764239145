"""The competition metric (mean column-wise ROC AUC) and a streaming Keras AUC for training logs.

    score, per_class = competition_metric(y_true, y_prob)     # exact, scikit-learn
    model.compile(..., metrics=build_metrics(from_logits=True))  # approximate, streaming, in fit logs

A column with a single class (all 0 or all 1, e.g. a rare label absent from a small validation fold)
has no ROC AUC: ``competition_metric`` reports it as NaN in the per-class dict, leaves it out of the
mean, and emits a ``RuntimeWarning`` naming the columns. If every column is single-class the score
is NaN. (Kaggle's test set has both classes in every column, so there the mean is over all 11.)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import keras
import numpy as np

from ranzcr_tf import labels


def competition_metric(y_true, y_pred, label_names: Sequence[str] = labels.LABELS) -> tuple[float, dict[str, float]]:
    """Mean over columns of ``sklearn.metrics.roc_auc_score(y_true[:, c], y_pred[:, c])``, and the per-class AUCs.

    ``y_true``: (n, 11) 0/1 targets; ``y_pred``: (n, 11) scores (probabilities or logits: AUC only needs
    their order), columns in ``labels.LABELS`` order. Single-class columns: see the module docstring.
    """
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred, dtype="float64")
    if y_true.ndim != 2 or y_true.shape != y_pred.shape or y_true.shape[1] != len(label_names):
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must both be (n, {len(label_names)})")
    if not np.isfinite(y_pred).all():
        raise ValueError("y_pred contains NaN or inf: the model diverged or the predictions are incomplete")
    per_class: dict[str, float] = {}
    single = []
    for c, name in enumerate(label_names):
        column = y_true[:, c]
        if np.unique(column).size < 2:
            per_class[name] = float("nan")
            single.append(name)
        else:
            per_class[name] = float(roc_auc_score(column, y_pred[:, c]))
    if single:
        warnings.warn(f"ROC AUC undefined for single-class column(s) {single}: left out of the mean", RuntimeWarning,
                      stacklevel=2)
    defined = [v for v in per_class.values() if not math.isnan(v)]
    score = float(np.mean(defined)) if defined else float("nan")
    return score, per_class


@keras.saving.register_keras_serializable(package="ranzcr_tf")
class MeanColumnAUC(keras.metrics.AUC):
    """Streaming mean of the per-column ROC AUCs (``keras.metrics.AUC(multi_label=True)``).

    Approximates the competition metric from ``num_thresholds`` buckets (a few 1e-3 off); use
    ``competition_metric`` on out-of-fold predictions for the exact score.
    """

    def __init__(self, num_labels: int = labels.NUM_CLASSES, from_logits: bool = False, num_thresholds: int = 500,
                 name: str = "mean_auc", dtype=None):
        super().__init__(num_thresholds=num_thresholds, curve="ROC", multi_label=True, num_labels=num_labels,
                         from_logits=from_logits, name=name, dtype=dtype)

    def get_config(self):
        config = super().get_config()  # the public way to read back from_logits
        return {key: config[key] for key in ("num_labels", "from_logits", "num_thresholds", "name", "dtype")}


def build_metrics(from_logits: bool) -> list:
    """Metrics for ``model.compile``: the streaming mean column AUC (matching the model's output kind)."""
    return [MeanColumnAUC(from_logits=from_logits)]
