"""Score a submission against known test labels: mean column-wise ROC AUC, and each column's.

    python -m ranzcr_tf.report.score submission.csv demo/data/test_labels.csv

``test_labels.csv`` has ``StudyInstanceUID`` and the 11 label columns (the synthetic generator writes
one; Kaggle keeps its own). Rows are matched by ID, never by position. A column whose labels are all 0
or all 1 has no AUC; it is reported as such and left out of the mean.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd

from ranzcr_tf import cli, io_utils, tables
from ranzcr_tf.labels import ID_COLUMN, LABELS


def _header(path: str) -> list[str]:
    try:
        return io_utils.read_text(path).split("\n", 1)[0].strip().split(",")
    except (OSError, UnicodeDecodeError):
        return []


def _read(path: str, what: str, probabilities: bool) -> pd.DataFrame:
    try:
        frame = tables.read_label_table(path, what, probabilities)
    except ValueError:
        if _header(path) == ["ID", "Label"]:
            raise ValueError(f"{what} {path} is a long ID,Label file (another task, e.g. rsna_ich): this score is "
                             "specific to the RANZCR CLiP task's wide files; another task's fold score is its run's "
                             "fold*/metrics.json (the task metric)") from None
        raise
    return frame.set_index(ID_COLUMN)


def score_frames(submission: pd.DataFrame, labels: pd.DataFrame) -> dict:
    """``{'mean_auc': float, 'per_class': {label: auc or None}, 'rows': n}``; inputs indexed by ID.

    The metric is ``model.metrics.competition_metric`` (the one training and CV report).
    """
    import warnings

    from ranzcr_tf.model.metrics import competition_metric

    missing = labels.index.difference(submission.index)
    if len(missing):
        raise ValueError(f"the submission has no row for {len(missing)} labelled ID(s), e.g. {missing[0]}")
    predictions = submission.loc[labels.index, list(LABELS)].to_numpy(np.float64)
    targets = labels[list(LABELS)].to_numpy(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # single-class columns are reported below as n/a
        mean_auc, per_class = competition_metric(targets, predictions)
    per_class = {label: (None if math.isnan(auc) else auc) for label, auc in per_class.items()}
    if math.isnan(mean_auc):
        raise ValueError("no label column has both classes in the test labels: AUC is undefined")
    return {"mean_auc": float(mean_auc), "per_class": per_class, "rows": int(len(labels))}


def score_files(submission_csv: str, labels_csv: str) -> dict:
    """:func:`score_frames` on two CSV files."""
    return score_frames(_read(submission_csv, "submission", True), _read(labels_csv, "test labels", False))


def format_score(result: dict) -> str:
    width = max(len(label) for label in LABELS)
    lines = [f"{label:<{width}}  {'n/a (one class only)' if auc is None else f'{auc:.4f}'}"
             for label, auc in result["per_class"].items()]
    defined = sum(v is not None for v in result["per_class"].values())
    lines.append(f"{'mean AUC':<{width}}  {result['mean_auc']:.4f}  ({defined} columns, {result['rows']} rows)")
    return "\n".join(lines)


def build_parser():
    parser = cli.build_parser("python -m ranzcr_tf.report.score",
                              "Mean column-wise ROC AUC of a submission against test labels.")
    parser.add_argument("submission", help="submission.csv (StudyInstanceUID + 11 probability columns)")
    parser.add_argument("labels", help="test_labels.csv (StudyInstanceUID + 11 0/1 columns)")
    return parser


def run(args) -> int:
    print(format_score(score_files(args.submission, args.labels)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
