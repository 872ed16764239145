"""One owner for reading the project's CSV tables: every problem is a ``ValueError`` naming the file and line.

    frame = read_table(path, "train.soft_labels", (ID_COLUMN, *LABELS))    # IDs as strings, columns checked
    probs = check_values(frame, list(LABELS), path, "train.soft_labels")  # float64, each in [0, 1]
    oof = merge_oof("runs/b7")                                            # every fold's oof.csv in one frame
    train = read_text_table("data/train.csv", "point --data-dir at the competition folder")  # all cells text

The ID + 11-probability tables (soft labels, pseudo labels, out-of-fold predictions, submissions to score,
blends) and the competition's own CSVs (``prep.csv_checks``) are read here, by every stage that needs them.
Line numbers are as an editor shows them: the header is line 1, the first data row line 2.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from ranzcr_tf import io_utils
from ranzcr_tf.labels import ID_COLUMN, LABELS
from ranzcr_tf.runs import OOF_FILE, require_ranzcr_run

TARGET_COLUMNS = [f"target_{label}" for label in LABELS]  # an oof.csv's 0/1 labels beside its probabilities


def _named(what: str, path: str) -> str:
    return f"{what} {path}" if what else path


def _read_text(path: str, what: str, not_found: str = "") -> str:
    """The file's text; missing, unreadable or empty is a ``ValueError`` (``not_found``: what to do then)."""
    try:
        text = io_utils.read_text(path)
    except FileNotFoundError:
        raise ValueError(f"{_named(what, path)} not found" + (f": {not_found}" if not_found else "")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{_named(what, path)} cannot be read ({exc})") from None
    if not text.strip():
        raise ValueError(f"{_named(what, path)} is empty: write it again (an interrupted copy or a full disk?)")
    return text


def _parse(text: str, path: str, what: str, **read_csv) -> pd.DataFrame:
    try:
        return pd.read_csv(io.StringIO(text), **read_csv)
    except pd.errors.ParserError as exc:
        raise ValueError(f"{_named(what, path)} is not a readable CSV ({str(exc).splitlines()[0][:200]})") from None


def read_text_table(path: str, not_found: str, what: str = "") -> pd.DataFrame:
    """Every cell as text and nothing turned into NaN silently (empty cells are left for the caller's checks):
    the competition's CSVs, whose columns ``prep.csv_checks`` then checks one by one."""
    return _parse(_read_text(path, what, not_found), path, what, dtype=str, keep_default_na=False)


def read_table(path: str, what: str, columns) -> pd.DataFrame:
    """A CSV with ``columns`` (at least), IDs as strings; an empty, unreadable or truncated file is a
    ``ValueError`` naming it (not pandas' "No columns to parse from file")."""
    text = _read_text(path, what)
    frame = _parse(text, path, what, dtype={ID_COLUMN: str})
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} {path} lacks column(s) {missing}")
    if frame.empty:
        raise ValueError(f"{what} {path} has a header but no rows")
    if frame[ID_COLUMN].isna().any():
        raise ValueError(f"{what} {path} line {int(np.flatnonzero(frame[ID_COLUMN].isna())[0]) + 2}: empty {ID_COLUMN}")
    short = frame[list(columns)].isna().any(axis=1).to_numpy()
    if not text.endswith("\n") and short[-1]:
        raise ValueError(f"{what} {path} line {len(frame) + 1} is cut short: the file is truncated; write it again")
    return frame


def check_values(frame: pd.DataFrame, columns, path: str, what: str, probabilities: bool = True) -> np.ndarray:
    """``frame[columns]`` as float64, refusing strings, NaN, inf and (``probabilities``) values outside [0, 1],
    naming the first bad line and column."""
    values = np.empty((len(frame), len(columns)))
    for c, column in enumerate(columns):
        numbers = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64)
        if probabilities:
            bad = ~np.isfinite(numbers) | (numbers < 0) | (numbers > 1)
            need = "a probability in [0, 1]"
        else:
            bad = ~np.isin(numbers, (0.0, 1.0))
            need = "0 or 1"
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = frame[column].iloc[row]
            value = value.item() if isinstance(value, np.generic) else value  # 1.5, not np.float64(1.5)
            raise ValueError(f"{what} {path} line {row + 2} ({ID_COLUMN} {frame[ID_COLUMN].iloc[row]}), column "
                             f"{column!r}: {value!r} is not {need} ({int(bad.sum())} such value(s))")
        values[:, c] = numbers
    return values


def read_label_table(path: str, what: str, probabilities: bool = True) -> pd.DataFrame:
    """An ID + 11-label-column table with unique IDs (soft labels, a submission, test labels); the label
    columns checked (probabilities, else 0/1) and converted to float64."""
    frame = read_table(path, what, (ID_COLUMN, *LABELS))
    duplicated = frame[ID_COLUMN][frame[ID_COLUMN].duplicated()]
    if len(duplicated):
        raise ValueError(f"{what} {path} lists {ID_COLUMN} {duplicated.iloc[0]} twice ({len(duplicated)} repeat(s))")
    frame[list(LABELS)] = check_values(frame, list(LABELS), path, what, probabilities)
    return frame


def merge_oof(run_dir: str, feature: str = "the CV report (python -m ranzcr_tf.report.cv)") -> pd.DataFrame:
    """All ``run_dir/fold*/oof.csv`` rows in one frame; every study must appear once. A run of another task is
    refused, naming ``feature`` (the tool asking)."""
    require_ranzcr_run(run_dir, feature)
    paths = io_utils.glob(io_utils.join(run_dir, "fold*", OOF_FILE))
    if not paths:
        raise ValueError(f"no fold*/{OOF_FILE} under {run_dir}: train folds first "
                         f"(python train_tpu.py --fold all --out-dir {run_dir})")
    columns = [ID_COLUMN, *LABELS, *TARGET_COLUMNS]
    frames = []
    for path in paths:  # each file checked on its own, so a truncated or damaged one is named
        frame = read_table(path, "OOF file", columns)
        check_values(frame, list(LABELS), path, "OOF file")
        check_values(frame, TARGET_COLUMNS, path, "OOF file", probabilities=False)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    duplicated = frame[ID_COLUMN][frame[ID_COLUMN].duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"{len(duplicated)} studies appear in more than one fold's oof.csv (e.g. {duplicated[0]}): "
                         "the folds come from different conversions")
    return frame
