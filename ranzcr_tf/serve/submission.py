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


def read_sample_submission(path: str, columns=SUBMISSION_COLUMNS) -> pd.DataFrame:
    """The competition's template: checked for the 11 label columns, an ID column and unique IDs (another wide
    task: ``columns`` = its ID column then its labels)."""
    id_column = columns[0]
    if not os.path.exists(path):
        raise ValueError(f"{path} not found: --data-dir must be the competition folder holding "
                         f"{SAMPLE_SUBMISSION} and test/")
    try:
        frame = pd.read_csv(path, dtype={id_column: str})
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty: expected the competition's {SAMPLE_SUBMISSION} (a header and one row "
                         f"per test image); copy it again") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable CSV ({str(exc).splitlines()[0][:200]})") from None
    if list(frame.columns) != list(columns):
        raise ValueError(f"{path} has columns {list(frame.columns)}; expected {list(columns)} "
                         + ("(the RANZCR CLiP sample_submission.csv)" if tuple(columns) == tuple(SUBMISSION_COLUMNS)
                            else "(task.id_column then task.labels)"))
    if frame.empty:
        raise ValueError(f"{path} has a header but no rows: there is no test image to predict; copy the "
                         f"competition's {SAMPLE_SUBMISSION} again")
    ids = frame[id_column]
    if ids.isna().any() or (ids.str.strip() == "").any():
        raise ValueError(f"{path}: empty {id_column} on line(s) {list(np.flatnonzero(ids.isna()) + 2)[:5]}")
    duplicated = ids[ids.duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{path}: {len(duplicated)} duplicated {id_column}(s), e.g. {duplicated[:3]}")
    return frame


def template_from_ids(ids, labels=LABELS, id_column: str = ID_COLUMN) -> pd.DataFrame:
    """A template in the (wide) submission layout for ``ids`` (when no sample_submission.csv is available)."""
    frame = pd.DataFrame({id_column: [str(i) for i in ids]})
    for label in labels:
        frame[label] = 0.0
    return frame[[id_column, *labels]]


def build_submission(template: pd.DataFrame, probs) -> pd.DataFrame:
    """``template``'s IDs and column order with ``probs`` (rows in template order, columns in label order: the
    template's columns after its first, the ID)."""
    probs = np.asarray(probs, dtype=np.float64)
    id_column, labels = template.columns[0], list(template.columns[1:])
    if probs.shape != (len(template), len(labels)):
        raise ValueError(f"predictions have shape {probs.shape}; the template needs ({len(template)}, {len(labels)})")
    frame = pd.DataFrame({id_column: template[id_column].astype(str).to_numpy()})
    for index, label in enumerate(labels):
        frame[label] = probs[:, index]
    return frame[list(template.columns)]


def validate_submission(frame: pd.DataFrame, template: pd.DataFrame) -> None:
    """Raise ``ValueError`` unless ``frame`` is a complete, well-formed submission for ``template``."""
    if list(frame.columns) != list(template.columns):
        raise ValueError(f"submission columns {list(frame.columns)} differ from the template's {list(template.columns)}")
    id_column = template.columns[0]
    if len(frame) != len(template) or not (frame[id_column].astype(str).to_numpy()
                                           == template[id_column].astype(str).to_numpy()).all():
        raise ValueError("submission IDs are not exactly the template's IDs in the template's order")
    if frame[id_column].duplicated().any():
        raise ValueError("submission has a duplicated ID")
    values = frame[list(template.columns[1:])].to_numpy(dtype=np.float64)
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


# ----------------------------------------------------------------------------------------------- long layout
class LongTemplate:
    """A long sample submission (RSNA: ``ID,Label``, one row per ``<image id>_<label>``) and the wide template of
    its images (``id_column`` + one column per label, images in first-appearance order) that prediction fills."""

    def __init__(self, path: str, labels, id_column: str):
        from ranzcr_tf.prep.long_csv import LONG_ID, read_long_csv, split_long_ids

        if not os.path.exists(path):
            raise ValueError(f"{path} not found: --data-dir must be the competition folder holding the sample "
                             "submission (task.sample_submission)")
        self.path, self.labels = path, list(labels)
        self.frame = read_long_csv(path)
        ids = self.frame[LONG_ID].astype(str)
        duplicated = ids[ids.duplicated()].tolist()
        if duplicated:
            raise ValueError(f"{path}: {len(duplicated)} duplicated ID(s), e.g. {duplicated[:3]}")
        images, _ = split_long_ids(ids.tolist(), self.labels, path)
        order = list(dict.fromkeys(images))
        expected = len(order) * len(self.labels)
        if expected != len(ids):
            raise ValueError(f"{path}: {len(ids)} rows for {len(order)} images x {len(self.labels)} labels "
                             f"({expected}); every image needs one row per label")
        self.wide = pd.DataFrame({id_column: order})
        for label in self.labels:
            self.wide[label] = 0.0


def build_long_submission(template: LongTemplate, image_ids, probs) -> pd.DataFrame:
    """``ID,Label`` rows in the sample submission's order from wide ``probs`` (rows follow ``image_ids``)."""
    from ranzcr_tf.prep.long_csv import LONG_ID, LONG_VALUE, wide_to_long

    long = wide_to_long([str(i) for i in image_ids], probs, template.labels).set_index(LONG_ID)
    wanted = template.frame[LONG_ID].astype(str)
    missing = wanted[~wanted.isin(long.index)]
    if len(missing):
        raise ValueError(f"the predictions lack {len(missing)} ID(s) of {template.path}, e.g. {missing.tolist()[:3]}")
    return pd.DataFrame({LONG_ID: wanted.to_numpy(), LONG_VALUE: long.loc[wanted, LONG_VALUE].to_numpy()})


def validate_long_submission(frame: pd.DataFrame, template: LongTemplate) -> None:
    """Raise one ``ValueError`` line unless ``frame`` has exactly the sample's IDs, once each, in its order,
    with probabilities in [0, 1]."""
    from ranzcr_tf.prep.long_csv import LONG_ID, LONG_VALUE

    if list(frame.columns) != [LONG_ID, LONG_VALUE]:
        raise ValueError(f"submission columns {list(frame.columns)}; expected {LONG_ID},{LONG_VALUE}")
    got, wanted = frame[LONG_ID].astype(str), template.frame[LONG_ID].astype(str)
    missing, extra = sorted(set(wanted) - set(got)), sorted(set(got) - set(wanted))
    if missing or extra:
        raise ValueError(f"submission IDs differ from {template.path}: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(extra)} extra (e.g. {extra[:3]})")
    if got.duplicated().any():
        raise ValueError(f"submission has duplicated IDs, e.g. {got[got.duplicated()].tolist()[:3]}")
    if not (got.to_numpy() == wanted.to_numpy()).all():
        raise ValueError(f"submission rows are not in {template.path}'s order")
    values = frame[LONG_VALUE].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all() or values.min(initial=0.0) < 0 or values.max(initial=0.0) > 1:
        raise ValueError("submission Label values must be finite probabilities in [0, 1]")


def write_long_submission(frame: pd.DataFrame, path: str, template: LongTemplate) -> str:
    """Validate against the long sample, then write ``path`` atomically; returns ``path``."""
    validate_long_submission(frame, template)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.6f")
    io_utils.atomic_write_text(path, buffer.getvalue())
    return path
