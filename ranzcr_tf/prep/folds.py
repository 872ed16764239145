"""Patient-grouped, label-stratified K-fold assignment (deterministic per seed).

    folds = assign_folds(train_df, num_folds=5, seed=42)   # one fold id per row, in row order

Grouping is by ``PatientID``: all studies of a patient land in the same fold, so validation never
sees a patient the model trained on (grouping matters: ~30k studies come from ~3.3k patients).

Stratification key (one class per row, what ``StratifiedGroupKFold`` balances): the row's **rarest
positive label**, rarity measured by that label's positive count over the whole table, or an extra
class ``NUM_CLASSES`` ("no tube") for rows with no positive label. Rare labels (ETT - Abnormal at
0.3%) are therefore spread over the folds first, instead of being drowned by the CVC - Normal
majority that almost every row carries; a multi-label combination key would give hundreds of
singleton classes on the real data, which stratifies nothing. (A table so small that no class has
``num_folds`` rows is split by patient only.)
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ranzcr_tf.labels import ID_COLUMN, LABELS, NUM_CLASSES, PATIENT_COLUMN

FOLD_COLUMN = "fold"


def stratification_key(train_df: pd.DataFrame, labels=LABELS) -> np.ndarray:
    """Per row: index (into ``labels``) of its rarest positive label, or ``len(labels)`` if it has none."""
    num_classes = len(labels)
    targets = train_df[list(labels)].to_numpy(dtype=np.int64)
    positives = targets.sum(axis=0)
    # Rank labels from rarest to most common; ties broken by label order so the key is deterministic.
    rarity_order = np.lexsort((np.arange(num_classes), positives))
    rank_of_label = np.empty(num_classes, dtype=np.int64)
    rank_of_label[rarity_order] = np.arange(num_classes)
    ranks = np.where(targets > 0, rank_of_label[None, :], num_classes)
    best_rank = ranks.min(axis=1)
    return np.where(best_rank < num_classes, rarity_order[np.minimum(best_rank, num_classes - 1)], num_classes)


def assign_folds(train_df: pd.DataFrame, num_folds: int, seed: int, labels=LABELS,
                 group_column: str = PATIENT_COLUMN) -> np.ndarray:
    """Fold id (0..num_folds-1) of every row, grouped by ``group_column`` (RANZCR: ``PatientID``; another task:
    ``task.group_column``) and stratified on :func:`stratification_key` of ``labels``, with
    ``StratifiedGroupKFold(shuffle=True, random_state=seed)``.

    Same table (same row order) and seed give the same folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if num_folds < 2:
        raise ValueError(f"num_folds = {num_folds}: need at least 2 folds (set --folds / data.folds)")
    missing = [c for c in (group_column, *labels) if c not in train_df.columns]
    if missing:
        raise ValueError(f"assign_folds needs the columns {missing} in the training table")
    groups = train_df[group_column].astype(str).to_numpy()
    num_patients = len(np.unique(groups))
    if num_patients < num_folds:
        raise ValueError(f"only {num_patients} distinct patients for {num_folds} folds: "
                         f"use fewer folds (--folds) or more data")
    key = stratification_key(train_df, labels)
    if np.bincount(key).max() < num_folds:
        # Tiny tables (smoke runs): no class is big enough to stratify, so group only.
        key = np.zeros_like(key)
    splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    folds = np.full(len(train_df), -1, dtype=np.int64)
    with warnings.catch_warnings():
        # Rare classes with fewer rows than folds are expected on small data; sklearn warns about each.
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        for fold, (_, valid_index) in enumerate(splitter.split(np.zeros(len(train_df)), key, groups)):
            folds[valid_index] = fold
    return folds


def folds_frame(train_df: pd.DataFrame, folds: np.ndarray, id_column: str = ID_COLUMN,
                group_column: str = PATIENT_COLUMN) -> pd.DataFrame:
    """The ``folds.csv`` table: StudyInstanceUID, PatientID, fold (another task: its ID and group columns)."""
    return pd.DataFrame({id_column: train_df[id_column].to_numpy(), group_column: train_df[group_column].to_numpy(),
                         FOLD_COLUMN: np.asarray(folds, dtype=np.int64)})


def fold_positives(targets: np.ndarray, folds: np.ndarray, num_folds: int) -> dict[str, list[int]]:
    """Per fold, the positive count of each class: ``{"0": [11 ints], ...}`` (JSON-ready; a 2-D ``targets`` of
    another task keeps its own label count)."""
    targets = np.asarray(targets, dtype=np.int64)
    targets = targets if targets.ndim == 2 else targets.reshape(-1, NUM_CLASSES)
    folds = np.asarray(folds)
    return {str(k): [int(v) for v in targets[folds == k].sum(axis=0)] for k in range(num_folds)}
