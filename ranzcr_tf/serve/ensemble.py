"""Ensembling maths for the submission: TTA views -> folds -> models (NumPy only, no TensorFlow).

    fold_probs  = average_views([identity_probs, hflip_probs])          # mean of probabilities
    model_probs = average_folds([fold0_probs, fold1_probs])              # mean of probabilities
    final       = combine_models([model_a, model_b], "rank_mean")        # mean | rank_mean | weighted

Every array is ``(num_rows, num_classes)`` probabilities in ``labels.LABELS`` order. A row that a
prediction does not cover (an unreadable test image, say) is NaN; averages skip NaNs, so a row
missing from one view, fold or model is averaged over the predictions that have it.

Why probabilities, not logits, are averaged: models trained with different losses or outputs
(``model.output: logits | probabilities``) are only comparable on the probability scale, and the
mean of probabilities is what the public RANZCR ensembles used.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ranzcr_tf.config import ENSEMBLE_METHODS  # the one list of methods


def sigmoid(logits) -> np.ndarray:
    """Numerically stable logistic function in float64 (no overflow warning for large |logits|)."""
    x = np.asarray(logits, dtype=np.float64)
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    exp_x = np.exp(x[~positive])
    out[~positive] = exp_x / (1.0 + exp_x)
    return out


def _stack(arrays: Sequence, what: str) -> np.ndarray:
    if len(arrays) == 0:
        raise ValueError(f"no {what} to average")
    stacked = np.stack([np.asarray(a, dtype=np.float64) for a in arrays])
    if stacked.ndim != 3:
        raise ValueError(f"each of the {what} must be a (rows, classes) array, got shape {stacked.shape[1:]}")
    return stacked


def nanmean(stacked: np.ndarray, weights=None) -> np.ndarray:
    """(Weighted) mean over axis 0 that ignores NaNs; all-NaN positions stay NaN (no warning).

    ``weights``: one per entry of axis 0, or (for ``(models, rows, classes)`` stacks) a ``(models, classes)``
    array, one weight per model and column (a per-label blend).
    """
    stacked = np.asarray(stacked, dtype=np.float64)
    if weights is None:
        weights = np.ones(stacked.shape[0])
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim == 2 and stacked.ndim == 3:
        weights = weights[:, None, :]  # (models, 1, classes): broadcast over rows
    else:
        weights = weights.reshape(-1, *([1] * (stacked.ndim - 1)))
    present = ~np.isnan(stacked)
    total = np.where(present, weights, 0.0).sum(axis=0)
    summed = np.where(present, stacked * weights, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, summed / np.where(total > 0, total, 1.0), np.nan)


def average_views(view_probs: Sequence) -> np.ndarray:
    """Mean over test-time-augmentation views of one fold's probabilities."""
    return nanmean(_stack(view_probs, "TTA views"))


def average_folds(fold_probs: Sequence) -> np.ndarray:
    """Mean over the folds of one model (each fold already averaged over its views)."""
    return nanmean(_stack(fold_probs, "folds"))


def rank_normalize(probs) -> np.ndarray:
    """Per column, each row's rank among the non-NaN rows, scaled into (0, 1): ``(rank - 0.5) / n``.

    Ties share their average rank. Only the order within a column survives, which is all that a
    column-wise ROC AUC sees; it puts models with different calibration on one scale.
    """
    from scipy.stats import rankdata

    probs = np.asarray(probs, dtype=np.float64)
    out = np.full_like(probs, np.nan)
    for column in range(probs.shape[1]):
        present = ~np.isnan(probs[:, column])
        count = int(present.sum())
        if count:
            out[present, column] = (rankdata(probs[present, column], method="average") - 0.5) / count
    return out


def check_weights(weights, num_models: int) -> np.ndarray:
    """Validate ensemble weights (one per model, >= 0, not all 0) and return them as float64."""
    weights = np.asarray(list(weights), dtype=np.float64)
    if weights.shape != (num_models,):
        raise ValueError(f"ensemble 'weighted' needs one weight per model: got {weights.size} weight(s) for "
                         f"{num_models} model(s); pass --weights W1 W2 ... in the order the models are listed")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"ensemble weights {weights.tolist()} must be finite, >= 0 and not all 0")
    return weights


def combine_models(model_probs: Sequence, method: str = "mean", weights=None) -> np.ndarray:
    """Combine per-model probabilities: ``mean``, ``rank_mean`` (mean of per-column ranks) or ``weighted``.

    ``weighted`` uses ``weights`` (one per model, normalised to sum 1 over the models that predict a
    row). ``rank_mean`` returns ranks in (0, 1), not probabilities; AUC is unchanged by that.
    """
    stacked = _stack(model_probs, "models")
    if method not in ENSEMBLE_METHODS:
        raise ValueError(f"ensemble method {method!r} unknown: use one of {', '.join(ENSEMBLE_METHODS)}")
    if method == "weighted":
        if weights is None:
            raise ValueError("ensemble 'weighted' needs weights: pass --weights W1 W2 ... (one per model)")
        return nanmean(stacked, check_weights(weights, stacked.shape[0]))
    if weights is not None and len(weights):
        warnings.warn(f"ensemble {method!r} ignores the given weights; use 'weighted' to apply them", stacklevel=2)
    if method == "rank_mean":
        stacked = np.stack([rank_normalize(p) for p in stacked])
    return nanmean(stacked)


@dataclass(frozen=True)
class BlendWeights:
    """A fitted blend as the kernel applies it: ``weights (models, classes)`` in the kernel's model order."""

    weights: np.ndarray
    rank: bool = False


def blend_models(model_probs: Sequence, weights, rank: bool = False) -> np.ndarray:
    """Per-label weighted mean of per-model probabilities (the fitted blend of ``serve/blend.py``).

    ``weights`` is ``(models, classes)``: column ``c`` of the result is ``sum_m weights[m, c] * p_m[:, c]``
    divided by the weights of the models that predict that row (NaN rows skipped as in ``nanmean``).
    ``rank``: each model's columns are first replaced by their ranks in (0, 1) (``rank_normalize``), as
    when the blend was fitted. The one function both the OOF fit and the kernel apply.
    """
    stacked = _stack(model_probs, "models")
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (stacked.shape[0], stacked.shape[2]):
        raise ValueError(f"blend weights of shape {weights.shape} do not fit {stacked.shape[0]} model(s) x "
                         f"{stacked.shape[2]} label(s)")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or np.any(weights.sum(axis=0) <= 0):
        raise ValueError("blend weights must be finite, >= 0 and not all 0 for any label")
    if rank:
        stacked = np.stack([rank_normalize(p) for p in stacked])
    return nanmean(stacked, weights)


def fill_missing_rows(probs) -> tuple[np.ndarray, int]:
    """Replace rows with no prediction by the column means of the predicted rows (0.5 if none): ``(filled, n)``.

    A test image that could not be read must still appear in the submission; the column mean is the
    neutral guess (it neither helps nor hurts the AUC much) and keeps every value in [0, 1].
    """
    probs = np.array(probs, dtype=np.float64, copy=True)
    missing = np.isnan(probs)
    if not missing.any():
        return probs, 0
    rows = int(missing.any(axis=1).sum())
    column_means = nanmean(probs)  # over rows; a column with no prediction at all stays NaN -> 0.5
    column_means = np.where(np.isnan(column_means), 0.5, column_means)
    probs[missing] = np.broadcast_to(column_means, probs.shape)[missing]
    return probs, rows
