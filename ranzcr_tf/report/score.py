"""Score a submission against known test labels: mean column-wise ROC AUC, and each column's.

    python -m ranzcr_tf.report.score submission.csv demo/data/test_labels.csv

``test_labels.csv`` has ``StudyInstanceUID`` and the 11 label columns (the synthetic generator writes
one; Kaggle keeps its own). Rows are matched by ID, never by position. A column whose labels are all 0
or all 1 has no AUC; it is reported as such and left out of the mean.
"""

from __future__ import annotations

import sys

from ranzcr_tf import cli
import numpy as np
import pandas as pd

from ranzcr_tf.labels import ID_COLUMN, LABELS


def _read(path: str, what: str) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={ID_COLUMN: str})
    except FileNotFoundError:
        raise ValueError(f"{what} {path} not found") from None
    missing = [c for c in (ID_COLUMN, *LABELS) if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} {path} lacks column(s) {missing}")
    if frame[ID_COLUMN].duplicated().any():
        raise ValueError(f"{what} {path} lists {ID_COLUMN} {frame[ID_COLUMN][frame[ID_COLUMN].duplicated()].iloc[0]} twice")
    return frame.set_index(ID_COLUMN)


def score_frames(submission: pd.DataFrame, labels: pd.DataFrame) -> dict:
    """``{'mean_auc': float, 'per_class': {label: auc or None}, 'rows': n}``; inputs indexed by ID."""
    from sklearn.metrics import roc_auc_score

    missing = labels.index.difference(submission.index)
    if len(missing):
        raise ValueError(f"the submission has no row for {len(missing)} labelled ID(s), e.g. {missing[0]}")
    predictions = submission.loc[labels.index, list(LABELS)].to_numpy(np.float64)
    targets = labels[list(LABELS)].to_numpy(np.float64)
    per_class = {}
    for index, label in enumerate(LABELS):
        column = targets[:, index]
        per_class[label] = (float(roc_auc_score(column, predictions[:, index]))
                            if 0 < column.sum() < len(column) else None)
    defined = [v for v in per_class.values() if v is not None]
    if not defined:
        raise ValueError("no label column has both classes in the test labels: AUC is undefined")
    return {"mean_auc": float(np.mean(defined)), "per_class": per_class, "rows": int(len(labels))}


def score_files(submission_csv: str, labels_csv: str) -> dict:
    """:func:`score_frames` on two CSV files."""
    return score_frames(_read(submission_csv, "submission"), _read(labels_csv, "test labels"))


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
