"""The TFRecord schema: feature keys, ``serialize_example`` and ``parse_example`` side by side (one owner).

One record is one study. Version 1 holds:

=================  ==========  ==============================================================
key                type        meaning
=================  ==========  ==============================================================
image              bytes       single-channel JPEG, already CLAHE'd and resized (preprocess.py)
StudyInstanceUID   bytes       the study's ID
target             float x 11  the labels in ``labels.LABELS`` order (zeros for test records)
has_target         int64       1 for train records, 0 for test records
fold               int64       validation fold of the study (-1 for test)
height, width      int64       stored image size
orig_height/width  int64       source image size
ann_label          int64 x n   label index (into LABELS) of each annotated line
ann_num_points     int64 x n   points in each line
ann_xy             float x 2P  all lines' points, x then y, scaled into the stored image
=================  ==========  ==============================================================

New keys may be added in later versions; readers parse only the keys they know, so old readers keep
working. Shard files are named with their record count (``fold3-007-412.tfrec``) so that readers never
need a counting pass.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from ranzcr_tf import io_utils
from ranzcr_tf.labels import ID_COLUMN, NUM_CLASSES

SCHEMA_VERSION = 1

IMAGE = "image"
ID = ID_COLUMN  # the study-ID feature is keyed by the CSV column name: write labels.ID_COLUMN
TARGET = "target"
HAS_TARGET = "has_target"
FOLD = "fold"
HEIGHT = "height"
WIDTH = "width"
ORIG_HEIGHT = "orig_height"
ORIG_WIDTH = "orig_width"
ANN_LABEL = "ann_label"
ANN_NUM_POINTS = "ann_num_points"
ANN_XY = "ann_xy"

# The single decoder setting for stored JPEGs: libjpeg's accurate integer IDCT. TensorFlow's default
# (fast) IDCT differs from OpenCV on about half of the pixels; with this one both decode identically.
DCT_METHOD = "INTEGER_ACCURATE"
# How source JPEGs were decoded before preprocessing (``preprocess.decode_source``): libjpeg-turbo's
# accurate IDCT scaled by M/8. Records and runs carry it, so a model is never served test images
# decoded another way.
SOURCE_DECODER = "libjpeg-turbo-m8"

MANIFEST = "manifest.json"
FOLDS_CSV = "folds.csv"
TRAIN_DIR = "train"
TEST_DIR = "test"
EXTRA_DIR = "extra"  # unlabeled records (make_tfrecords.py --unlabeled): has_target 0, no fold, never validated on
SPLITS = (TRAIN_DIR, TEST_DIR, EXTRA_DIR)
SHARD_SUFFIX = ".tfrec"
_SHARD_RE = re.compile(r"^(?P<prefix>fold(?P<fold>\d+)|test|extra)-(?P<index>\d{3,})-(?P<count>\d+)\.tfrec$")


# ----------------------------------------------------------------------------------------------- naming
def shard_name(fold: int | None, index: int, count: int, split: str = TEST_DIR) -> str:
    """``fold{k}-{i:03d}-{count}.tfrec`` for train (fold k); ``{split}-{i:03d}-{count}.tfrec`` (test or extra)
    when fold is None."""
    if fold is None and split not in (TEST_DIR, EXTRA_DIR):
        raise ValueError(f"a shard without a fold is a test or extra shard, not {split!r}")
    prefix = split if fold is None else f"fold{fold}"
    return f"{prefix}-{index:03d}-{count}{SHARD_SUFFIX}"


def parse_shard_name(name: str) -> dict | None:
    """``{'fold': k or None, 'index': i, 'count': n}`` for a shard file name, ``None`` for anything else."""
    match = _SHARD_RE.match(os.path.basename(name))
    if not match:
        return None
    fold = match.group("fold")
    split = TRAIN_DIR if fold is not None else match.group("prefix")
    return {"fold": None if fold is None else int(fold), "index": int(match.group("index")),
            "count": int(match.group("count")), "split": split}


def list_shards(tfrecords_dir: str, split: str, folds: Iterable[int] | None = None) -> list[str]:
    """Complete shards of ``split`` ('train' or 'test'), sorted; train shards filtered to ``folds``.

    Temporary files of an interrupted writer (``.tmp-*``) are never listed.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'test' or 'extra', got {split!r}")
    folder = io_utils.join(tfrecords_dir, split)
    if not io_utils.exists(folder):
        return []
    wanted = None if folds is None else set(int(f) for f in folds)
    paths = []
    for name in io_utils.listdir(folder):
        info = parse_shard_name(name)
        if info is None:
            continue
        if info["split"] != split:  # a shard's name says its split: a test shard copied into extra/ is not listed
            continue
        if split == TRAIN_DIR and wanted is not None and info["fold"] not in wanted:
            continue
        paths.append(io_utils.join(folder, name))
    return sorted(paths)


def count_records(paths: Sequence[str]) -> int:
    """Number of records in shards, read from their names."""
    total = 0
    for path in paths:
        info = parse_shard_name(path)
        if info is None:
            raise ValueError(f"{path} is not a shard name of this project (expected e.g. fold0-000-123.tfrec)")
        total += info["count"]
    return total


def read_manifest(tfrecords_dir: str) -> dict:
    """The converter's ``manifest.json``; a clear error if the folder holds no converted records."""
    path = io_utils.join(tfrecords_dir, MANIFEST)
    if not io_utils.exists(path):
        raise FileNotFoundError(
            f"no {MANIFEST} in {tfrecords_dir}: convert the data first with "
            f"`python make_tfrecords.py --data-dir DATA --out-dir {tfrecords_dir}`")
    manifest = json.loads(io_utils.read_text(path))
    version = manifest.get("schema_version")
    if version is None or version > SCHEMA_VERSION:
        raise ValueError(f"{path} has schema version {version}; this ranzcr-tf reads up to {SCHEMA_VERSION}: upgrade it")
    return manifest


def positives_from_manifest(manifest: dict, train_folds: Iterable[int]) -> tuple[np.ndarray, int]:
    """Sum the converter manifest's ``fold_positives`` / ``fold_counts`` over ``train_folds``: (P, N)."""
    fold_positives, fold_counts = manifest.get("fold_positives"), manifest.get("fold_counts")
    if fold_positives is None or fold_counts is None:
        raise ValueError("manifest has no fold_positives / fold_counts: re-run the converter (make_tfrecords.py)")
    positives = np.zeros(NUM_CLASSES, dtype="int64")
    total = 0
    for fold in train_folds:
        key = str(int(fold))
        if key not in fold_positives or key not in fold_counts:
            raise ValueError(f"fold {fold} is not in the manifest (folds: {sorted(fold_counts)})")
        positives += np.asarray(fold_positives[key], dtype="int64")
        total += int(fold_counts[key])
    return positives, total



def manifest_num_test(manifest: dict) -> int | None:
    """Test records the manifest claims (``num_test``; manifests before it also wrote ``test_count``)."""
    value = manifest.get("num_test", manifest.get("test_count"))
    return None if value is None else int(value)


def check_shards(tfrecords_dir: str, manifest: dict, split: str = TRAIN_DIR, folds: Iterable[int] | None = None,
                 framing: bool = True) -> list[str]:
    """The shards of ``split`` (train: of ``folds``, default all) exactly as ``manifest.json`` lists them;
    returns their paths, or raises one ``ValueError`` line naming what is wrong.

    Checks, before any record is read: no listed shard missing, no unlisted one present, the record
    counts in the file names add up to the manifest's per-fold (or test) count, and, for local files,
    each shard's record framing (a truncated shard is named here). The framing walk reads 12 bytes per
    record (length header, then a seek past the payload), so it costs a few milliseconds per shard
    locally; on gs:// every read is a request, so it is skipped there and a corrupt shard is named when
    it is read (``pipeline.data.naming_corrupt_shard``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'test' or 'extra', got {split!r}")
    num_folds = int(manifest.get("num_folds", 0))
    wanted = sorted(set(int(f) for f in folds)) if folds is not None else list(range(num_folds))
    on_disk = list_shards(tfrecords_dir, split, wanted if split == TRAIN_DIR else None)
    problems = []
    listed_all = (manifest.get("shards") or {}).get(split)
    if listed_all is not None:
        listed = {os.path.basename(p) for p in listed_all
                  if split == TEST_DIR or (parse_shard_name(p) or {}).get("fold") in wanted}
        present = {os.path.basename(p) for p in on_disk}
        missing, extra = sorted(listed - present), sorted(present - listed)
        if missing:
            problems.append(f"missing shard(s) {', '.join(f'{split}/{n}' for n in missing)}")
        if extra:
            problems.append(f"shard(s) not in the manifest {', '.join(f'{split}/{n}' for n in extra)}")
    if not problems:
        if split == TRAIN_DIR:
            expected = {int(k): int(v) for k, v in (manifest.get("fold_counts") or {}).items()}
            for fold in wanted:
                found = count_records([p for p in on_disk if parse_shard_name(p)["fold"] == fold])
                if fold in expected and found != expected[fold]:
                    problems.append(f"fold {fold} has {found} records in its shards but the manifest says {expected[fold]}")
        else:
            expected = manifest_num_test(manifest)
            found = count_records(on_disk)
            if expected is not None and found != expected:
                problems.append(f"the test shards hold {found} records but the manifest says {expected}")
    if problems:
        raise ValueError(f"the records in {tfrecords_dir} do not match its {MANIFEST}: {'; '.join(problems)}: "
                         "restore the files or convert again (make_tfrecords.py --overwrite)")
    if framing:
        for path in on_disk:
            if not io_utils.is_remote(path):
                check_framing(path)
    return on_disk


def check_framing(path: str) -> None:
    """Walk a local shard's record headers: a ``ValueError`` naming the shard if it is truncated, its
    framing is broken, or it holds another number of records than its name says (payload CRCs are
    not checked here: that needs a full read)."""
    import struct

    expected = (parse_shard_name(path) or {}).get("count")
    size = os.path.getsize(path)
    count, offset = 0, 0
    with open(path, "rb") as fh:
        while offset < size:
            header = fh.read(12)  # uint64 length + uint32 masked CRC of the length
            if len(header) < 12:
                break
            (length,) = struct.unpack("<Q", header[:8])
            offset += 12 + length + 4
            if offset > size:
                break
            fh.seek(offset)
            count += 1
    if offset != size:
        raise ValueError(f"shard {path} is truncated or corrupt (record {count} runs past the end of the "
                         f"{size}-byte file): restore it or convert again (make_tfrecords.py --overwrite)")
    if expected is not None and count != expected:
        raise ValueError(f"shard {path} holds {count} records but its name says {expected}: restore it or "
                         "convert again (make_tfrecords.py --overwrite)")


# ----------------------------------------------------------------------------------------------- writing
def _bytes(values):
    import tensorflow as tf

    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _ints(values):
    import tensorflow as tf

    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values):
    import tensorflow as tf

    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def serialize_example(
    image_jpeg: bytes,
    study_id: str,
    *,
    target: Sequence[float] | None,
    fold: int,
    height: int,
    width: int,
    orig_height: int,
    orig_width: int,
    annotations: Sequence[tuple[int, np.ndarray]] = (),
) -> bytes:
    """One study as a serialized ``tf.train.Example``.

    ``target`` is None for test studies. ``annotations`` is a sequence of ``(label_index, points)``
    with ``points`` an ``(n, 2)`` array of x, y already scaled into the stored image.
    """
    import tensorflow as tf

    if target is not None and len(target) != NUM_CLASSES:
        raise ValueError(f"target of {study_id} has {len(target)} values, expected {NUM_CLASSES}")
    points = [np.asarray(p, dtype=np.float32).reshape(-1, 2) for _, p in annotations]
    feature = {
        IMAGE: _bytes([image_jpeg]),
        ID: _bytes([study_id.encode("utf-8")]),
        TARGET: _floats(target if target is not None else [0.0] * NUM_CLASSES),
        HAS_TARGET: _ints([target is not None]),
        FOLD: _ints([fold]),
        HEIGHT: _ints([height]),
        WIDTH: _ints([width]),
        ORIG_HEIGHT: _ints([orig_height]),
        ORIG_WIDTH: _ints([orig_width]),
        ANN_LABEL: _ints([label for label, _ in annotations]),
        ANN_NUM_POINTS: _ints([len(p) for p in points]),
        ANN_XY: _floats(np.concatenate(points).ravel() if points else []),
    }
    # Protobuf writes the feature map in a per-process hash order; deterministic serialization sorts it,
    # so reruns, resumed runs and any number of workers write byte-identical shards.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


# ----------------------------------------------------------------------------------------------- reading
def feature_spec(with_annotations: bool = False) -> dict:
    import tensorflow as tf

    spec = {
        IMAGE: tf.io.FixedLenFeature([], tf.string),
        ID: tf.io.FixedLenFeature([], tf.string),
        TARGET: tf.io.FixedLenFeature([NUM_CLASSES], tf.float32),
        HAS_TARGET: tf.io.FixedLenFeature([], tf.int64),
        FOLD: tf.io.FixedLenFeature([], tf.int64),
        HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        WIDTH: tf.io.FixedLenFeature([], tf.int64),
        ORIG_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        ORIG_WIDTH: tf.io.FixedLenFeature([], tf.int64),
    }
    if with_annotations:
        spec[ANN_LABEL] = tf.io.VarLenFeature(tf.int64)
        spec[ANN_NUM_POINTS] = tf.io.VarLenFeature(tf.int64)
        spec[ANN_XY] = tf.io.VarLenFeature(tf.float32)
    return spec


def parse_example(serialized, with_annotations: bool = False) -> dict:
    """Apply the schema to one serialized record (no decoding, no augmentation).

    Annotation fields, when asked for, come back dense: ``ann_label`` (n,), ``ann_num_points`` (n,),
    ``ann_xy`` (P, 2).
    """
    import tensorflow as tf

    parsed = tf.io.parse_single_example(serialized, feature_spec(with_annotations))
    if with_annotations:
        for key in (ANN_LABEL, ANN_NUM_POINTS, ANN_XY):
            parsed[key] = tf.sparse.to_dense(parsed[key])
        parsed[ANN_XY] = tf.reshape(parsed[ANN_XY], [-1, 2])
    return parsed


def decode_image(image_jpeg, channels: int = 1):
    """Decode a stored JPEG to uint8 ``(h, w, channels)`` with the project's one decoder setting."""
    import tensorflow as tf

    image = tf.io.decode_jpeg(image_jpeg, channels=1, dct_method=DCT_METHOD)
    if channels == 3:
        image = tf.image.grayscale_to_rgb(image)
    return image


def decode_image_numpy(image_jpeg: bytes) -> np.ndarray:
    """The same decode with OpenCV (bit-identical to ``decode_image``), ``(h, w)`` uint8; no TensorFlow needed."""
    import cv2

    image = cv2.imdecode(np.frombuffer(image_jpeg, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError("stored image bytes are not a decodable JPEG")
    return image


def annotations_from_parsed(parsed: dict) -> list[tuple[int, np.ndarray]]:
    """Eager helper: split a parsed record's annotation fields back into ``[(label_index, (n, 2) points)]``."""
    labels = np.asarray(parsed[ANN_LABEL])
    counts = np.asarray(parsed[ANN_NUM_POINTS])
    xy = np.asarray(parsed[ANN_XY]).reshape(-1, 2)
    out, start = [], 0
    for label, count in zip(labels, counts):
        out.append((int(label), xy[start:start + count]))
        start += count
    return out
