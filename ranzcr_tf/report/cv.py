"""Cross-validation score of a run: pool the folds' ``oof.csv`` files, per-class AUCs, ROC curves.

    python -m ranzcr_tf.report.cv runs/NAME            # prints the table, writes runs/NAME/cv.json and roc.png

The score is the competition metric on the pooled out-of-fold predictions (every study predicted by
the model that did not train on it); the mean of the per-fold scores is printed beside it.
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pandas as pd

from ranzcr_tf import cli, io_utils
from ranzcr_tf.labels import GROUPS, LABELS
from ranzcr_tf.runs import CV_REPORT_FILE, ROC_PLOT_FILE
from ranzcr_tf.tables import TARGET_COLUMNS, merge_oof


def cv_report(frame: pd.DataFrame) -> dict:
    """Pooled mean AUC, per-class AUCs, positives per class and per-fold mean AUCs."""
    from ranzcr_tf.model.metrics import competition_metric

    targets = frame[TARGET_COLUMNS].to_numpy()
    probs = frame[list(LABELS)].to_numpy()
    mean_auc, per_class = competition_metric(targets, probs)
    per_fold = {}
    if "fold" in frame.columns:
        for fold, part in frame.groupby("fold"):
            per_fold[int(fold)] = competition_metric(part[TARGET_COLUMNS].to_numpy(),
                                                     part[list(LABELS)].to_numpy())[0]
    return {"cv_auc": mean_auc, "per_class_auc": per_class, "num_studies": int(len(frame)),
            "positives": {label: int(targets[:, c].sum()) for c, label in enumerate(LABELS)},
            "per_fold_auc": per_fold,
            "mean_fold_auc": float(np.nanmean(list(per_fold.values()))) if per_fold else float("nan")}


def format_report(report: dict) -> str:
    lines = [f"{'label':<28} {'AUC':>7} {'positives':>10}"]
    for label in LABELS:
        lines.append(f"{label:<28} {report['per_class_auc'][label]:>7.4f} {report['positives'][label]:>10d}")
    lines.append(f"{'CV mean AUC (pooled OOF)':<28} {report['cv_auc']:>7.4f} {report['num_studies']:>10d} studies")
    if report["per_fold_auc"]:
        folds = ", ".join(f"fold {k}: {v:.4f}" for k, v in sorted(report["per_fold_auc"].items()))
        lines.append(f"per fold: {folds}; mean {report['mean_fold_auc']:.4f}")
    return "\n".join(lines)


def plot_roc(frame: pd.DataFrame, path: str, title: str = "") -> str:
    """One figure, one panel per tube family (ETT, NGT, CVC, Swan Ganz), one ROC curve per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, axes = plt.subplots(1, len(GROUPS), figsize=(4.2 * len(GROUPS), 4.4), squeeze=False)
    for ax, (group, members) in zip(axes[0], GROUPS.items()):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for label in members:
            y, p = frame[f"target_{label}"].to_numpy(), frame[label].to_numpy()
            if len(np.unique(y)) < 2:
                ax.plot([], [], label=f"{label}: one class only")
                continue
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, linewidth=1.5, label=f"{label.split(' - ')[-1]}  AUC {roc_auc_score(y, p):.3f}")
        ax.set_title(group)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    io_utils.atomic_write_bytes(path, png.getvalue())
    return path


def build_parser():
    parser = cli.build_parser("python -m ranzcr_tf.report.cv",
                              "Pool a run's out-of-fold predictions: CV AUC, per-class AUCs, ROC plot.")
    parser.add_argument("run_dir", help="the --out-dir folder of train_tpu.py (holding fold*/oof.csv)")
    parser.add_argument("--plot", default=None, help="ROC figure path (default: RUN_DIR/roc.png)")
    return parser


def run(args) -> int:
    frame = merge_oof(args.run_dir)
    cli.check_output_file(args.plot or io_utils.join(args.run_dir, ROC_PLOT_FILE), "--plot")
    report = cv_report(frame)
    print(format_report(report))
    plot = plot_roc(frame, args.plot or io_utils.join(args.run_dir, ROC_PLOT_FILE),
                    title=f"{os.path.basename(os.path.normpath(args.run_dir))}: CV AUC {report['cv_auc']:.4f}")
    io_utils.atomic_write_json(io_utils.join(args.run_dir, CV_REPORT_FILE), report)
    print(f"ROC curves: {plot}; report: {io_utils.join(args.run_dir, CV_REPORT_FILE)}")
    return 0


def main(argv=None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
