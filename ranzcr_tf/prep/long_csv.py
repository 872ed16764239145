"""Long label tables (RSNA's ``ID,Label`` with one row per image x label) to and from wide ones.

    wide = long_to_wide(pd.read_csv("stage_2_train.csv"), labels, "ID", "stage_2_train.csv")
    # -> ID (ID_12cadc6af), epidural, ..., any  (one row per image, images in first-appearance order)
    long = wide_to_long(["ID_12cadc6af"], probs, labels)
    # -> ID (ID_12cadc6af_epidural, ...), Label

A long row's ID is ``<image id>_<label>``; the image ID itself may hold underscores (``ID_12cadc6af``),
the label may not (``TaskConfig`` checks), so the split is at the last underscore.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

LONG_ID, LONG_VALUE = "ID", "Label"


def split_long_ids(ids: Sequence[str], labels: Sequence[str], source: str = "the CSV") -> tuple[list[str], list[str]]:
    """``ID_12cadc6af_any`` -> (``ID_12cadc6af``, ``any``) for each; a ``ValueError`` naming the first bad row."""
    known = set(labels)
    images, names = [], []
    for row, value in enumerate(ids):
        image, _, label = str(value).rpartition("_")
        if not image or label not in known:
            raise ValueError(f"{source} line {row + 2}: ID {value!r} is not <image id>_<label> with a label of "
                             f"{list(labels)}")
        images.append(image)
        names.append(label)
    return images, names


def read_long_csv(path: str) -> pd.DataFrame:
    """A long ``ID,Label`` CSV (train labels or sample submission), its columns checked."""
    try:
        frame = pd.read_csv(path, dtype={LONG_ID: str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, FileNotFoundError) as exc:
        raise ValueError(f"{path}: not a readable long CSV ({str(exc).splitlines()[0][:200]})") from None
    if list(frame.columns)[:2] != [LONG_ID, LONG_VALUE]:
        raise ValueError(f"{path} has columns {list(frame.columns)}; expected {LONG_ID},{LONG_VALUE} (one row per "
                         "<image id>_<label>)")
    if frame.empty:
        raise ValueError(f"{path} has a header but no rows")
    return frame[[LONG_ID, LONG_VALUE]]


def long_to_wide(frame: pd.DataFrame, labels: Sequence[str], id_column: str, source: str = "the CSV") -> pd.DataFrame:
    """One row per image (first-appearance order) with a column per label, from ``ID,Label`` rows.

    Every image needs every label exactly once (RSNA's stage_2_train.csv repeats some rows: identical
    duplicates are dropped, conflicting ones are an error), values 0 or 1.
    """
    images, names = split_long_ids(frame[LONG_ID].tolist(), labels, source)
    values = pd.to_numeric(frame[LONG_VALUE], errors="coerce").to_numpy(dtype=np.float64)
    table = pd.DataFrame({id_column: images, "label": names, "value": values}).drop_duplicates()
    bad = table[~table["value"].isin([0.0, 1.0])]
    if len(bad):
        row = bad.iloc[0]
        raise ValueError(f"{source}: {row[id_column]}_{row['label']} has Label {row['value']!r}; expected 0 or 1")
    conflict = table[table.duplicated([id_column, "label"], keep=False)]
    if len(conflict):
        row = conflict.iloc[0]
        raise ValueError(f"{source}: {row[id_column]}_{row['label']} is listed with both 0 and 1")
    wide = table.pivot(index=id_column, columns="label", values="value")
    missing = wide.isna().any(axis=1)
    if missing.any():
        image = wide.index[missing][0]
        absent = [label for label in labels if pd.isna(wide.loc[image, label])] if all(
            label in wide.columns for label in labels) else [label for label in labels if label not in wide.columns]
        raise ValueError(f"{source}: image {image} has no row for label(s) {absent}")
    for label in labels:
        if label not in wide.columns:
            raise ValueError(f"{source}: no row names the label {label!r}")
    order = pd.unique(pd.Series(images))
    wide = wide.loc[order, list(labels)].astype(np.int64).reset_index()
    wide.columns.name = None
    return wide


def wide_to_long(image_ids: Sequence[str], probs, labels: Sequence[str]) -> pd.DataFrame:
    """``ID,Label`` rows ``<image id>_<label>`` for every image and label (image-major, labels in order)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(image_ids), len(labels)):
        raise ValueError(f"predictions have shape {probs.shape}; expected ({len(image_ids)}, {len(labels)})")
    ids = [f"{image}_{label}" for image in image_ids for label in labels]
    return pd.DataFrame({LONG_ID: ids, LONG_VALUE: probs.reshape(-1)})
