"""The competition metric (mean column-wise ROC AUC), exact (scikit-learn), and the other validation scores.

    score, per_class = competition_metric(y_true, y_prob)

Training scores every epoch's out-of-fold predictions with it (``train/callbacks.py``), so no streaming Keras
metric is compiled in; this module imports neither Keras nor TensorFlow (``report.score``, ``serve.blend``
and the report read CSVs in a second, not after a framework's start-up).

A column with a single class (all 0 or all 1, e.g. a rare label absent from a small validation fold)
has no ROC AUC: ``competition_metric`` reports it as NaN in the per-class dict, leaves it out of the
mean, and emits a ``RuntimeWarning`` naming the columns. If every column is single-class the score
is NaN. (Kaggle's test set has both classes in every column, so there the mean is over all 11.)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

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


LOG_LOSS_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps], as the RSNA ICH scorer did


def weighted_log_loss(y_true, y_prob, weights: Sequence[float]) -> tuple[float, dict[str, float]]:
    """RSNA Intracranial Hemorrhage 2019's score (lower is better) and the per-label mean log losses.

    Per image, the weighted mean over labels of the binary log loss
    ``-(y log p + (1 - y) log(1 - p))`` with ``p`` clipped to ``[1e-7, 1 - 1e-7]`` and weights
    normalised by their sum (``any`` 2, the five subtypes 1); then the mean over images. ``y_prob`` must be
    probabilities (not logits). Returns ``(score, {label index: mean log loss of that column})``.
    """
    y_true = np.asarray(y_true, dtype="float64")
    y_prob = np.asarray(y_prob, dtype="float64")
    weights = np.asarray(weights, dtype="float64")
    if y_true.ndim != 2 or y_true.shape != y_prob.shape or weights.shape != (y_true.shape[1],):
        raise ValueError(f"y_true {y_true.shape}, y_prob {y_prob.shape} and weights {weights.shape} must be "
                         "(n, labels), (n, labels) and (labels,)")
    if not np.isfinite(y_prob).all():
        raise ValueError("y_prob contains NaN or inf: the model diverged or the predictions are incomplete")
    if len(y_true) == 0:
        return float("nan"), {}
    p = np.clip(y_prob, LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    losses = -(y_true * np.log(p) + (1.0 - y_true) * np.log(1.0 - p))  # (n, labels)
    per_image = (losses * weights).sum(axis=1) / weights.sum()
    return float(per_image.mean()), {c: float(v) for c, v in enumerate(losses.mean(axis=0))}


# task.metric -> (log key, Keras mode): what validation writes and what checkpoints, early stopping and the
# plateau schedule compare. Every "best" in the project goes through ``is_better``.
MONITORS = {"mean_auc": ("val_auc", "max"), "weighted_log_loss": ("val_weighted_log_loss", "min")}


def monitor_for(metric: str) -> tuple[str, str]:
    """``(log key, "max" | "min")`` of a ``task.metric``."""
    if metric not in MONITORS:
        raise ValueError(f"unknown task.metric {metric!r}; expected one of {', '.join(MONITORS)}")
    return MONITORS[metric]


def is_better(current: float, best: float | None, mode: str) -> bool:
    """Whether ``current`` beats ``best`` (None or non-finite: anything finite does) in ``mode``."""
    if current is None or not math.isfinite(current):
        return False
    if best is None or not math.isfinite(best):
        return True
    return current > best if mode == "max" else current < best


def task_scores(task, y_true, y_prob) -> dict[str, float]:
    """Every validation number of ``task`` (a ``config.TaskConfig``): ``val_auc`` and per-label AUCs always;
    ``val_weighted_log_loss`` and per-label log losses too when the task is scored by it. ``y_prob``:
    probabilities."""
    labels_ = list(task.labels)
    mean_auc, per_class = competition_metric(y_true, y_prob, labels_)
    scores = {"val_auc": float(mean_auc)}
    scores.update({f"val_auc_{labels.label_slug(label)}": float(per_class[label]) for label in labels_})
    if task.metric == "weighted_log_loss":
        score, per_label = weighted_log_loss(y_true, y_prob, task.weights())
        scores["val_weighted_log_loss"] = score
        scores.update({f"val_log_loss_{labels.label_slug(labels_[c])}": v for c, v in per_label.items()})
    return scores
