"""Validation studies for the run report, read back from the records by ID: stored pixels, the model's
input (the evaluation pipeline's own decode), and the annotation lines.

    studies = read_studies("tfrecords", fold=0, ids=["1.2.3", ...], image_size=128, channels=1)
    studies["1.2.3"].model_input      # (128, 128, 1) float32, what validation fed the model
    counts = annotated_counts("tfrecords")   # {fold: studies with at least one annotation line}
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ranzcr_tf.labels import ID_COLUMN
from ranzcr_tf.prep import records


@dataclass
class Study:
    """One validation study as stored, with its annotation lines in stored pixels."""

    study_id: str
    fold: int
    image: np.ndarray  # (height, width) uint8, the stored pixels
    model_input: np.ndarray  # (size, size, channels) float32, as the evaluation pipeline decodes it
    parsed: dict  # the record's fields as numpy (annotations included), for gradcam.tube_mask
    lines: list  # [(label_index, (n, 2) float32 points in stored pixels)]


def _shards(tfrecords_dir: str, fold: int | None) -> list[str]:
    files = records.list_shards(tfrecords_dir, records.TRAIN_DIR, None if fold is None else [fold])
    if not files:
        raise ValueError(f"no training shards for fold {fold} in {tfrecords_dir}: pass the records this run was "
                         "trained on (--tfrecords)")
    return files


def read_studies(tfrecords_dir: str, fold: int, ids, image_size: int, channels: int) -> dict[str, Study]:
    """The studies ``ids`` of validation fold ``fold``; a ``ValueError`` naming one that is not there."""
    import tensorflow as tf

    from ranzcr_tf.pipeline import data

    wanted = sorted({str(i) for i in ids})
    if not wanted:
        return {}
    wanted_tensor = tf.constant(wanted)

    def keep(parsed):
        return tf.reduce_any(tf.equal(parsed[ID_COLUMN], wanted_tensor))

    def decode(parsed):
        parsed = dict(parsed)
        parsed["model_input"] = tf.cast(data.decode_for_model(parsed[records.IMAGE], image_size, channels), tf.float32)
        parsed["stored"] = records.decode_image(parsed[records.IMAGE])[..., 0]
        return parsed

    files = _shards(tfrecords_dir, fold)
    ds = (tf.data.TFRecordDataset(files).map(lambda s: records.parse_example(s, with_annotations=True))
          .filter(keep).map(decode))
    found = {}
    with data.naming_corrupt_shard(files):
        for parsed in ds.as_numpy_iterator():
            study_id = parsed[ID_COLUMN].decode("utf-8")
            fields = {k: v for k, v in parsed.items() if k not in ("model_input", "stored", records.IMAGE)}
            found[study_id] = Study(study_id, fold, parsed["stored"], parsed["model_input"], fields,
                                    records.annotations_from_parsed(fields))
    missing = [i for i in wanted if i not in found]
    if missing:
        raise ValueError(f"study {missing[0]} (and {len(missing) - 1} more) of the run's oof.csv is not in fold {fold} "
                         f"of {tfrecords_dir}: pass the records this run was trained on (--tfrecords)")
    return found


def annotated_counts(tfrecords_dir: str) -> dict[int, int]:
    """Per fold, how many training studies carry at least one annotation line (no image is decoded)."""
    import tensorflow as tf

    from ranzcr_tf.pipeline import data

    spec = {records.FOLD: tf.io.FixedLenFeature([], tf.int64), records.ANN_LABEL: tf.io.VarLenFeature(tf.int64)}
    files = _shards(tfrecords_dir, None)
    ds = tf.data.TFRecordDataset(files).batch(1024).map(lambda s: tf.io.parse_example(s, spec))
    counts: dict[int, int] = {}
    with data.naming_corrupt_shard(files):
        for batch in ds:
            lines = tf.sparse.reduce_sum(tf.sparse.map_values(tf.ones_like, batch[records.ANN_LABEL]), axis=1,
                                         output_is_sparse=False).numpy()
            for fold, count in zip(batch[records.FOLD].numpy(), lines):
                counts[int(fold)] = counts.get(int(fold), 0) + int(count > 0)
    return counts
