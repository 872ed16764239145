"""Read and validate the competition CSVs before any image work starts.

Every problem is a ``ValueError`` naming the file, the column and the line (line numbers as an
editor shows them: the header is line 1, the first data row line 2), so a bad table stops the run
in seconds instead of after hours of conversion.
"""

from __future__ import annotations

import ast
import json
import os

import numpy as np
import pandas as pd

from ranzcr_tf import tables
from ranzcr_tf.labels import ANNOTATION_COLUMNS, ID_COLUMN, LABELS, PATIENT_COLUMN, SUBMISSION_COLUMNS, TRAIN_COLUMNS

TRAIN_CSV = "train.csv"
ANNOTATIONS_CSV = "train_annotations.csv"
SAMPLE_SUBMISSION_CSV = "sample_submission.csv"
_TRUE_VALUES = {"1", "1.0"}
_FALSE_VALUES = {"0", "0.0"}


def _line(index: int) -> int:
    return int(index) + 2  # header is line 1


def _read_table(path: str) -> pd.DataFrame:
    # Everything as text, nothing turned into NaN silently: empty cells are reported by the checks.
    return tables.read_text_table(path, "point --data-dir at the competition folder")


def _check_columns(df: pd.DataFrame, expected: tuple[str, ...], path: str) -> None:
    missing = [c for c in expected if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column {missing[0]!r} (expected columns: {list(expected)})")
    unexpected = [c for c in df.columns if c not in expected]
    if unexpected:
        raise ValueError(f"{path}: unexpected column {unexpected[0]!r} (expected exactly: {list(expected)})")


def check_id(value: str, column: str, line: int, path: str) -> None:
    """An ID becomes a file name: reject empty IDs, path separators and ``..``."""
    if not value.strip():
        raise ValueError(f"{path} line {line}: column {column!r} is empty")
    if "/" in value or "\\" in value or ".." in value or "\x00" in value or os.sep in value:
        raise ValueError(f"{path} line {line}: column {column!r} value {value!r} contains a path separator "
                         f"or '..'; IDs must be plain file names")


def _check_ids(df: pd.DataFrame, column: str, path: str) -> None:
    for index, value in df[column].items():
        check_id(value, column, _line(index), path)
    duplicated = df[column].duplicated(keep=False)
    if duplicated.any():
        rows = [_line(i) for i in np.flatnonzero(duplicated.to_numpy())]
        value = df[column].iloc[int(np.flatnonzero(duplicated.to_numpy())[0])]
        raise ValueError(f"{path}: duplicate {column} {value!r} on lines {rows[:5]}; each study must appear once")


def read_train_csv(path: str, task=None) -> pd.DataFrame:
    """``train.csv`` validated: exact columns, 0/1 labels (as int8), unique safe IDs, non-empty PatientID.

    ``task`` (a ``TaskConfig`` other than RANZCR's, wide CSV): its ``id_column``, ``group_column`` and ``labels``
    must be present (other columns are ignored); the table keeps those columns in that order."""
    df = _read_table(path)
    id_column, group_column, labels = ID_COLUMN, PATIENT_COLUMN, LABELS
    if task is None or task.is_ranzcr:
        _check_columns(df, TRAIN_COLUMNS, path)
    else:
        id_column, group_column, labels = task.id_column, task.group_column, tuple(task.labels)
        expected = (id_column, group_column, *labels)
        missing = [c for c in expected if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing column {missing[0]!r} (task.id_column, task.group_column and "
                             f"task.labels: {list(expected)})")
    if len(df) == 0:
        raise ValueError(f"{path} has no rows")
    _check_ids(df, id_column, path)
    empty_patient = df[group_column].str.strip() == ""
    if empty_patient.any():
        raise ValueError(f"{path} line {_line(int(np.flatnonzero(empty_patient.to_numpy())[0]))}: "
                         f"column {group_column!r} is empty")
    out = df[[id_column, group_column]].copy()
    for label in labels:
        text = df[label].str.strip()
        ok = text.isin(_TRUE_VALUES | _FALSE_VALUES)
        if not ok.all():
            index = int(np.flatnonzero(~ok.to_numpy())[0])
            value = df[label].iloc[index]
            what = "NaN / empty" if value.strip().lower() in ("", "nan", "na", "null", "none") else f"{value!r}"
            raise ValueError(f"{path} line {_line(index)} ({id_column} {df[id_column].iloc[index]}): column "
                             f"{label!r} is {what}; labels must be 0 or 1")
        out[label] = text.isin(_TRUE_VALUES).astype(np.int8)
    return out[[id_column, group_column, *labels]].reset_index(drop=True)


def _parse_points(text: str) -> np.ndarray:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        value = ast.literal_eval(text)  # literals only: safe on untrusted text
    points = np.asarray(value, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
        raise ValueError("expected a non-empty list of [x, y] pairs")
    if not np.isfinite(points).all():
        raise ValueError("contains a non-finite coordinate")
    return points


def read_annotations(path: str, train_ids) -> dict[str, list[tuple[int, np.ndarray]]]:
    """``train_annotations.csv`` as ``{study_id: [(label_index, (n, 2) points in source pixels), ...]}``.

    Lines keep their file order. IDs not in ``train_ids`` are a CSV error (a mismatched file).
    """
    df = _read_table(path)
    _check_columns(df, ANNOTATION_COLUMNS, path)
    known = set(train_ids)
    label_index = {name: i for i, name in enumerate(LABELS)}
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for index, (study_id, label, data) in enumerate(zip(df[ID_COLUMN], df["label"], df["data"])):
        line = _line(index)
        check_id(study_id, ID_COLUMN, line, path)
        if study_id not in known:
            raise ValueError(f"{path} line {line}: {ID_COLUMN} {study_id!r} is not in train.csv")
        if label not in label_index:
            raise ValueError(f"{path} line {line}: column 'label' value {label!r} is not one of {list(LABELS)}")
        try:
            points = _parse_points(data)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            raise ValueError(f"{path} line {line}: column 'data' is not a list of [x, y] points "
                             f"({str(exc)[:80]}): {data[:60]!r}") from None
        out.setdefault(study_id, []).append((label_index[label], points))
    return out


def read_test_ids(data_dir: str, task=None) -> list[str]:
    """Test IDs: from ``sample_submission.csv`` (its order) when present, else the sorted ``test/*.jpg`` names
    (``task``: its sample submission, ID column, labels, first test folder and extension)."""
    sample, columns, folder, extension = SAMPLE_SUBMISSION_CSV, SUBMISSION_COLUMNS, "test", ".jpg"
    if task is not None and not task.is_ranzcr:
        sample, columns = task.sample_submission, (task.id_column, *task.labels)
        folder, extension = task.test_images[0], task.extension
    path = os.path.join(data_dir, sample)
    if os.path.exists(path):
        df = _read_table(path)
        _check_columns(df, columns, path)
        _check_ids(df, columns[0], path)
        return df[columns[0]].tolist()
    folder = os.path.join(data_dir, folder)
    if not os.path.isdir(folder):
        return []
    return sorted(name[:-len(extension)] for name in os.listdir(folder)
                  if name.endswith(extension) and not name.startswith("."))


def scale_points(points: np.ndarray, orig_height: int, orig_width: int, size: int) -> np.ndarray:
    """Source-pixel points into the ``size`` x ``size`` stored image: (x * size / w, y * size / h)."""
    scale = np.array([size / orig_width, size / orig_height], dtype=np.float64)
    return (np.asarray(points, dtype=np.float64) * scale).astype(np.float32)

