"""folds.py: patient-grouped, label-stratified, deterministic K-fold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ranzcr_tf.labels import ID_COLUMN, LABELS, NUM_CLASSES, PATIENT_COLUMN
from ranzcr_tf.prep.folds import assign_folds, fold_positives, folds_frame, stratification_key

RATES = np.array([0.03, 0.06, 0.24, 0.02, 0.04, 0.09, 0.16, 0.11, 0.28, 0.71, 0.05])


def _table(n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, NUM_CLASSES)) < RATES).astype(np.int8)
    patients = rng.integers(0, n // 3, size=n)  # about three studies per patient
    df = pd.DataFrame(labels, columns=list(LABELS))
    df.insert(0, ID_COLUMN, [f"1.2.{i}" for i in range(n)])
    df[PATIENT_COLUMN] = [f"pt{p}" for p in patients]
    return df


def test_stratification_key_is_rarest_positive_label():
    df = _table(50)
    df.loc[:, list(LABELS)] = 0
    df.loc[0, ["CVC - Normal", "ETT - Abnormal"]] = 1
    df.loc[1:10, "CVC - Normal"] = 1
    df.loc[1:3, "NGT - Normal"] = 1
    key = stratification_key(df)
    assert key[0] == LABELS.index("ETT - Abnormal")  # 1 positive: rarer than CVC - Normal (11)
    assert key[2] == LABELS.index("NGT - Normal")  # 3 positives beats CVC - Normal
    assert key[5] == LABELS.index("CVC - Normal")
    assert key[20] == NUM_CLASSES  # no positive label


def test_folds_are_patient_disjoint_cover_every_row_and_are_deterministic():
    df = _table()
    folds = assign_folds(df, 5, seed=42)
    assert folds.shape == (len(df),) and set(folds.tolist()) == {0, 1, 2, 3, 4}
    assert (df.assign(fold=folds).groupby(PATIENT_COLUMN)["fold"].nunique() == 1).all()
    counts = np.bincount(folds, minlength=5)
    assert counts.min() > 0.6 * len(df) / 5  # roughly balanced
    np.testing.assert_array_equal(folds, assign_folds(df, 5, seed=42))
    assert not np.array_equal(folds, assign_folds(df, 5, seed=7))


def test_rare_labels_are_spread_over_folds():
    df = _table(900, seed=3)
    folds = assign_folds(df, 5, seed=42)
    positives = np.array(list(fold_positives(df[list(LABELS)].to_numpy(), folds, 5).values()))
    assert positives.shape == (5, NUM_CLASSES)
    np.testing.assert_array_equal(positives.sum(axis=0), df[list(LABELS)].sum().to_numpy())
    # Every label with at least 10 positives has positives in every fold.
    enough = positives.sum(axis=0) >= 10
    assert (positives[:, enough] > 0).all()


def test_too_few_patients_is_a_clear_error():
    df = _table(12)
    df[PATIENT_COLUMN] = ["a", "b", "c"] * 4
    with pytest.raises(ValueError, match="3 distinct patients for 5 folds"):
        assign_folds(df, 5, seed=0)


def test_folds_frame_columns():
    df = _table(30)
    table = folds_frame(df, assign_folds(df, 3, seed=1))
    assert list(table.columns) == [ID_COLUMN, PATIENT_COLUMN, "fold"]
    assert table[ID_COLUMN].tolist() == df[ID_COLUMN].tolist()
