"""The one shard writer and the one manifest writer: the converter and the kernel's test images both use them.

    with ShardWriter(out_dir, "test", fold=None, index=0) as shard:      # writes test/.tmp-...-test-000-0.tfrec
        shard.write(records.serialize_example(...))
    shard.name                                                           # "test/test-000-12.tfrec", or None if empty
    write_manifest(out_dir, preprocess=settings, num_folds=0, num_train=0, num_test=12, shards={...}, skipped=[...])

A shard is written under a ``.tmp-`` name (readers never list those) and renamed to its final name,
which carries its record count (``records.shard_name``), only when it closes without an error; a
shard that received no record leaves no file. An error (or a kill) leaves no partial shard behind.
"""

from __future__ import annotations

from ranzcr_tf import io_utils
from ranzcr_tf.labels import LABELS
from ranzcr_tf.prep import records


class ShardWriter:
    """Context manager writing one ``split`` shard (train fold ``fold``, or test / extra when ``fold`` is None)."""

    def __init__(self, out_dir: str, split: str, fold: int | None, index: int):
        self.folder = io_utils.join(out_dir, split)
        self.split, self.fold, self.index = split, fold, int(index)
        self.count = 0
        self.name: str | None = None  # "split/file.tfrec" once closed with records
        self._tmp = io_utils.temp_name(io_utils.join(self.folder, records.shard_name(fold, self.index, 0, split)))
        self._writer = None

    def __enter__(self) -> ShardWriter:
        import tensorflow as tf

        io_utils.makedirs(self.folder)
        self._writer = tf.io.TFRecordWriter(self._tmp)
        return self

    def write(self, example: bytes) -> None:
        self._writer.write(example)
        self.count += 1

    def flush(self) -> None:
        self._writer.flush()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.close()
        if exc_type is not None or not self.count:
            if io_utils.exists(self._tmp):
                io_utils.remove(self._tmp)
            return
        final = records.shard_name(self.fold, self.index, self.count, self.split)
        io_utils.rename(self._tmp, io_utils.join(self.folder, final))
        self.name = f"{self.split}/{final}"


def write_manifest(out_dir: str, *, preprocess: dict, image_size: int, num_folds: int, num_train: int,
                   num_test: int, shards: dict, skipped: list, labels=LABELS, **extra) -> dict:
    """``out_dir/manifest.json`` with the fields every reader relies on, then ``extra`` (converter details).

    ``labels`` is the task's label order (the records' target length; RANZCR's 11 by default).
    ``num_folds`` is 0 for a test-only folder (the kernel's preprocessed test images): there is no train split.
    """
    manifest = {"schema_version": records.SCHEMA_VERSION, "preprocess": preprocess, "image_size": int(image_size),
                "num_folds": int(num_folds), "labels": list(labels), "num_train": int(num_train),
                "num_test": int(num_test), "shards": shards, "skipped": list(skipped), **extra}
    io_utils.atomic_write_json(io_utils.join(out_dir, records.MANIFEST), manifest)
    return manifest


