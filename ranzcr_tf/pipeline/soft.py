"""Soft targets for training: ``train.soft_labels`` (a CSV of per-study probabilities) mixed with the hard labels.

    soft = SoftLabels.read("soft.csv")                       # ID + the 11 label columns (+ a free ``source``)
    soft.check_covers(ids, "the training folds of tfrecords/")   # every study trained on must have a row
    target_fn = soft.target_fn(alpha=0.5)                    # in a tf.data map: (id, hard, has_target) -> target

A training target becomes ``alpha * soft + (1 - alpha) * hard`` where the record has a hard label
(``has_target = 1``) and ``soft`` alone where it has none (unlabeled ``extra/`` records). The lookup
happens inside the tf.data graph: a ``tf.lookup.StaticHashTable`` from study ID to row, then a gather
from one constant ``(rows, 11)`` tensor, so nothing per study runs in Python while training.

Missing studies: a study trained on with no row in the CSV is an error before training starts (the
count and the first IDs are named) rather than a silent fall-back to its hard label, because a CSV that
misses studies is almost always the wrong file (another conversion, another fold split). Validation and
OOF never see soft targets: they score against the records' hard labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ranzcr_tf import tables
from ranzcr_tf.labels import ID_COLUMN, LABELS

SOURCE_COLUMN = "source"  # which models made a row (python -m ranzcr_tf.serve.pseudo writes it); not read here


@dataclass
class SoftLabels:
    """Per-study soft targets: ``ids`` (N,) and ``probs`` (N, 11) in ``labels.LABELS`` order."""

    ids: list
    probs: np.ndarray
    path: str = ""

    @classmethod
    def read(cls, path: str) -> SoftLabels:
        """The CSV at ``path``, checked: every label column present, each value a probability, no ID twice."""
        frame = tables.read_label_table(path, "train.soft_labels")
        probs = frame[list(LABELS)].to_numpy(np.float32)
        return cls(ids=frame[ID_COLUMN].astype(str).tolist(), probs=probs, path=path)

    def check_covers(self, ids, where: str) -> None:
        """``ValueError`` naming how many of ``ids`` have no row here, and the first few."""
        known = set(self.ids)
        missing = [sid for sid in ids if str(sid) not in known]
        if missing:
            first = ", ".join(map(str, missing[:3]))
            raise ValueError(f"train.soft_labels {self.path} has no row for {len(missing)} of the {len(ids)} studies "
                             f"in {where} (first: {first}{' ...' if len(missing) > 3 else ''}): write soft labels "
                             f"for these records (python -m ranzcr_tf.serve.pseudo) or unset train.soft_labels")

    def target_fn(self, alpha: float):
        """``fn(study_id, hard_target, has_target) -> float32 (11,)`` for a tf.data map (one example)."""
        import tensorflow as tf

        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"train.soft_alpha = {alpha}: expected a value in [0, 1]")
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(self.ids, tf.string),
                                                tf.range(len(self.ids), dtype=tf.int64)), default_value=-1)
        values = tf.constant(self.probs, tf.float32)

        def soft_target(study_id, hard, has_target):
            row = table.lookup(study_id)
            # A row missing here was ruled out by check_covers before training; the hard label stays the
            # target then (rather than an all-zero row) should a caller skip that check.
            found = row >= 0
            soft = tf.gather(values, tf.maximum(row, 0))
            hard = tf.cast(hard, tf.float32)
            mixed = tf.where(tf.cast(has_target, tf.bool), alpha * soft + (1.0 - alpha) * hard, soft)
            return tf.where(found, mixed, hard)

        return soft_target


def training_ids(tfrecords_dir: str, folds) -> list[str]:
    """Study IDs of the converted records' ``folds`` (from the converter's folds.csv; no shard is read)."""
    import io

    import pandas as pd

    from ranzcr_tf import io_utils
    from ranzcr_tf.prep import records

    path = io_utils.join(tfrecords_dir, records.FOLDS_CSV)
    if not io_utils.exists(path):
        raise ValueError(f"{path} not found: train.soft_labels needs the converter's {records.FOLDS_CSV} "
                         f"(convert again with make_tfrecords.py)")
    table = pd.read_csv(io.StringIO(io_utils.read_text(path)), dtype={ID_COLUMN: str})
    wanted = {int(f) for f in folds}
    return table[ID_COLUMN][table["fold"].astype(int).isin(wanted)].astype(str).tolist()
