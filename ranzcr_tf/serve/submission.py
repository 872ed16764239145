"""``submission.csv``: exactly ``sample_submission.csv``'s columns and row order, every test ID once.

    template = read_sample_submission("/kaggle/input/.../sample_submission.csv")
    frame = build_submission(template, probs)          # probs rows in template order
    write_submission(frame, "/kaggle/working/submission.csv", template)   # validated, then atomic

The file is written to a temporary sibling and renamed, so a reader (or Kaggle, if the notebook is
stopped) sees either the previous complete file or the new complete file, never half of one.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd

from ranzcr_tf import io_utils
from ranzcr_tf.labels import ID_COLUMN, LABELS, SUBMISSION_COLUMNS

SAMPLE_SUBMISSION = "sample_submission.csv"


def read_sample_submission(path: str) -> pd.DataFrame:
    """The competition's template: checked for the 11 label columns, an ID column and unique IDs."""
    if not os.path.exists(path):
        raise ValueError(f"{path} not found: --data-dir must be the competition folder holding "
                         f"{SAMPLE_SUBMISSION} and test/")
    try:
        frame = pd.read_csv(path, dtype={ID_COLUMN: str})
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty: expected the competition's {SAMPLE_SUBMISSION} (a header and one row "
                         f"per test image); copy it again") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable CSV ({str(exc).splitlines()[0][:200]})") from None
    if list(frame.columns) != list(SUBMISSION_COLUMNS):
        raise ValueError(f"{path} has columns {list(frame.columns)}; expected {list(SUBMISSION_COLUMNS)} "
                         f"(the RANZCR CLiP sample_submission.csv)")
    if frame.empty:
        raise ValueError(f"{path} has a header but no rows: there is no test image to predict; copy the "
                         f"competition's {SAMPLE_SUBMISSION} again")
    ids = frame[ID_COLUMN]
    if ids.isna().any() or (ids.str.strip() == "").any():
        raise ValueError(f"{path}: empty {ID_COLUMN} on line(s) {list(np.flatnonzero(ids.isna()) + 2)[:5]}")
    duplicated = ids[ids.duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{path}: {len(duplicated)} duplicated {ID_COLUMN}(s), e.g. {duplicated[:3]}")
    return frame


def template_from_ids(ids) -> pd.DataFrame:
    """A template in the submission layout for ``ids`` (when no sample_submission.csv is available)."""
    frame = pd.DataFrame({ID_COLUMN: [str(i) for i in ids]})
    for label in LABELS:
        frame[label] = 0.0
    return frame[list(SUBMISSION_COLUMNS)]


def build_submission(template: pd.DataFrame, probs) -> pd.DataFrame:
    """``template``'s IDs and column order with ``probs`` (rows in template order, columns in LABELS order)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(template), len(LABELS)):
        raise ValueError(f"predictions have shape {probs.shape}; the template needs ({len(template)}, {len(LABELS)})")
    frame = pd.DataFrame({ID_COLUMN: template[ID_COLUMN].astype(str).to_numpy()})
    for index, label in enumerate(LABELS):
        frame[label] = probs[:, index]
    return frame[list(template.columns)]


def validate_submission(frame: pd.DataFrame, template: pd.DataFrame) -> None:
    """Raise ``ValueError`` unless ``frame`` is a complete, well-formed submission for ``template``."""
    if list(frame.columns) != list(template.columns):
        raise ValueError(f"submission columns {list(frame.columns)} differ from the template's {list(template.columns)}")
    if len(frame) != len(template) or not (frame[ID_COLUMN].astype(str).to_numpy()
                                           == template[ID_COLUMN].astype(str).to_numpy()).all():
        raise ValueError("submission IDs are not exactly the template's IDs in the template's order")
    if frame[ID_COLUMN].duplicated().any():
        raise ValueError("submission has a duplicated ID")
    values = frame[list(LABELS)].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"submission has {int((~np.isfinite(values)).sum())} missing or infinite values")
    if values.min(initial=0.0) < 0 or values.max(initial=0.0) > 1:
        raise ValueError(f"submission values must lie in [0, 1]; found {values.min():.4g}..{values.max():.4g}")


def write_submission(frame: pd.DataFrame, path: str, template: pd.DataFrame) -> str:
    """Validate against ``template`` then write ``path`` atomically; returns ``path``."""
    validate_submission(frame, template)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.6f")
    io_utils.atomic_write_text(path, buffer.getvalue())
    return path
