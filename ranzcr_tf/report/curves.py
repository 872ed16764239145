"""The numbers and figures of the run report: bootstrap AUC intervals, calibration (ECE), ROC / PR /
reliability panels per column, training curves from ``log.csv``, and the argmax confusion table of a
mutually exclusive tube family.

    low, high = bootstrap_auc_interval(y, p, num_resamples=1000, seed=0)   # 95 % percentile interval
    ece = expected_calibration_error(y, p, num_bins=10)
    png = column_figure(y, p, "ETT - Normal", interval=(low, high))         # PNG bytes: ROC | PR | reliability

Curves come from scikit-learn (``roc_curve``, ``precision_recall_curve``, ``calibration_curve``), figures
from matplotlib (Agg, no display). The ECE uses the very bins ``calibration_curve(strategy="uniform")``
draws, so the number printed on a reliability diagram is the one its points show.
"""

from __future__ import annotations

import io

import numpy as np

from ranzcr_tf.labels import LABELS, label_slug

NO_TUBE = "no tube"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 80) -> bytes:
    """The figure as PNG bytes (and closed)."""
    plt = _plt()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- numbers
def auc_or_nan(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC, or NaN when ``y`` holds one class only."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def bootstrap_aucs(y: np.ndarray, p: np.ndarray, resamples: np.ndarray, chunk: int = 64) -> np.ndarray:
    """AUC of each resample (a row of study indices into ``y``/``p``); NaN where a resample has one class.

    Vectorised over resamples by the rank-sum (Mann-Whitney) form of the AUC, ties given average ranks,
    which equals ``roc_auc_score``; ``chunk`` resamples at a time bound the memory on 30,000 studies.
    """
    from scipy.stats import rankdata

    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    resamples = np.asarray(resamples)
    out = np.empty(len(resamples))
    for start in range(0, len(resamples), chunk):
        rows = resamples[start:start + chunk]
        ranks = rankdata(p[rows], axis=1)
        positive = y[rows]
        num_positive = positive.sum(axis=1)
        num_negative = positive.shape[1] - num_positive
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = ((ranks * positive).sum(axis=1) - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative)
        out[start:start + chunk] = np.where((num_positive > 0) & (num_negative > 0), auc, np.nan)
    return out


def bootstrap_auc_interval(y, p, *, num_resamples: int = 1000, level: float = 0.95, seed: int = 0,
                           resamples: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC: studies drawn with replacement ``num_resamples``
    times (or the given ``resamples``, rows of indices), the AUC of each, and the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (numpy's linear interpolation). Resamples with one class only are left
    out; ``(nan, nan)`` when fewer than two remain."""
    y = np.asarray(y)
    if resamples is None:
        resamples = np.random.default_rng(seed).integers(0, len(y), size=(num_resamples, len(y)))
    aucs = bootstrap_aucs(y, p, resamples)
    aucs = aucs[np.isfinite(aucs)]
    if len(aucs) < 2:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(aucs, [tail, 1.0 - tail])
    return float(low), float(high)


def calibration_bins(p: np.ndarray, num_bins: int = 10) -> np.ndarray:
    """Bin index of each probability: ``num_bins`` equal-width bins on [0, 1], assigned exactly as
    ``sklearn.calibration.calibration_curve(strategy="uniform")`` assigns them."""
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    return np.searchsorted(edges[1:-1], np.asarray(p, dtype=np.float64))


def expected_calibration_error(y, p, num_bins: int = 10) -> float:
    """ECE: the mean over studies of ``|fraction positive - mean probability|`` of their bin, i.e.
    ``sum_b n_b / n * |mean(y_b) - mean(p_b)|`` over the non-empty bins."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    if len(y) == 0:
        raise ValueError("expected_calibration_error needs at least one study")
    bins = calibration_bins(p, num_bins)
    total = 0.0
    for b in np.unique(bins):
        inside = bins == b
        total += inside.sum() / len(y) * abs(y[inside].mean() - p[inside].mean())
    return float(total)


def argmax_confusion(targets: np.ndarray, probs: np.ndarray, members: list[str]) -> tuple[list[str], np.ndarray]:
    """Confusion counts of one mutually exclusive family (ETT or NGT): rows the true label, columns the
    predicted one, each with a last "no tube" class. True: the family's positive label (the highest
    index one if a study has several), "no tube" when none is on. Predicted: the argmax over the
    family's probabilities, or "no tube" when even that is below 0.5."""
    columns = [LABELS.index(m) for m in members]
    family_targets = np.asarray(targets)[:, columns]
    family_probs = np.asarray(probs)[:, columns]
    none = len(members)
    true = np.where(family_targets.max(axis=1) > 0.5, len(members) - 1 - np.argmax(family_targets[:, ::-1], axis=1),
                    none)
    predicted = np.where(family_probs.max(axis=1) >= 0.5, np.argmax(family_probs, axis=1), none)
    table = np.zeros((none + 1, none + 1), dtype=int)
    np.add.at(table, (true, predicted), 1)
    return [*members, NO_TUBE], table


def study_losses(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-study binary cross-entropy, averaged over the 11 columns (probabilities clipped to [1e-7, 1 - 1e-7])."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(targets, dtype=np.float64)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(axis=1)


# ----------------------------------------------------------------------------------------------- figures
def column_figure(y, p, label: str, interval: tuple[float, float], num_bins: int = 10) -> bytes:
    """One column: ROC (AUC and its interval), precision-recall (average precision), reliability
    diagram (ECE), side by side; PNG bytes."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    plt = _plt()
    y, p = np.asarray(y), np.asarray(p)
    fig, (roc_ax, pr_ax, cal_ax) = plt.subplots(1, 3, figsize=(11, 3.4))
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        roc_ax.plot(fpr, tpr, linewidth=1.5)
        roc_ax.set_title(f"ROC: AUC {auc_or_nan(y, p):.3f} (95% CI {interval[0]:.3f}-{interval[1]:.3f})", fontsize=9)
        precision, recall, _ = precision_recall_curve(y, p)
        pr_ax.plot(recall, precision, linewidth=1.5)
        pr_ax.set_title(f"precision-recall: AP {average_precision_score(y, p):.3f}", fontsize=9)
    else:
        roc_ax.set_title("ROC: one class only", fontsize=9)
        pr_ax.set_title("precision-recall: one class only", fontsize=9)
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    pr_ax.axhline(y.mean(), color="grey", linestyle=":", linewidth=1)
    pr_ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    fraction, mean_p = calibration_curve(y, p, n_bins=num_bins, strategy="uniform")
    cal_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    cal_ax.plot(mean_p, fraction, marker="o", linewidth=1.2)
    cal_ax.set(xlabel="mean predicted probability", ylabel="fraction positive", xlim=(0, 1), ylim=(0, 1.01))
    cal_ax.set_title(f"reliability: ECE {expected_calibration_error(y, p, num_bins):.3f}", fontsize=9)
    fig.suptitle(label, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def training_figure(log, best_epoch: int | None, title: str) -> bytes:
    """Loss, learning rate and validation AUC (mean and per column) per epoch from a ``log.csv`` frame,
    the best epoch marked by a dashed line; PNG bytes."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    epochs = log["epoch"].to_numpy() if "epoch" in log.columns else np.arange(len(log))
    for name in ("loss", "val_loss"):
        if name in log.columns:
            axes[0].plot(epochs, log[name], marker=".", label=name)
    axes[0].set(title="loss", xlabel="epoch")
    if "learning_rate" in log.columns:
        axes[1].plot(epochs, log["learning_rate"], marker=".")
    axes[1].set(title="learning rate", xlabel="epoch")
    for label in LABELS:
        if f"val_auc_{label_slug(label)}" in log.columns:
            axes[2].plot(epochs, log[f"val_auc_{label_slug(label)}"], linewidth=0.8, alpha=0.7, label=label)
    if "val_auc" in log.columns:
        axes[2].plot(epochs, log["val_auc"], color="black", linewidth=2.2, label="mean")
    axes[2].set(title="validation AUC", xlabel="epoch")
    for ax in axes:
        if best_epoch is not None:
            ax.axvline(best_epoch, color="crimson", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)
