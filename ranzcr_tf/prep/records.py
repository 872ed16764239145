"""The TFRecord schema: feature keys, ``serialize_example`` and ``parse_example`` side by side (one owner).

One record is one study. Version 1 holds:

=================  ==========  ==============================================================
key                type        meaning
=================  ==========  ==============================================================
image              bytes       single-channel JPEG, already CLAHE'd and resized (preprocess.py)
image_png          bytes x n   instead of ``image`` when an image has C > 1 channels (DICOM windows x
                               slices): C split into PNGs of 3 channels, then 1-channel ones for
                               the rest (``part_channels``), lossless, concatenated in order
channels           int64       C, with ``image_png`` only (the manifest's ``image_channels`` too)
StudyInstanceUID   bytes       the image's ID (RANZCR: the study; other tasks: ``task.id_column``'s
                               value, e.g. RSNA ICH's ``ID_12cadc6af``; the key stays the same)
target             float x L   the task's labels in order (RANZCR: 11, ``labels.LABELS``; the manifest's
                               ``labels`` says which), zeros for test records
has_target         int64       1 for train records, 0 for test records
fold               int64       validation fold of the study (-1 for test)
height, width      int64       stored image size
orig_height/width  int64       source image size
ann_label          int64 x n   label index (into LABELS) of each annotated line
ann_num_points     int64 x n   points in each line
ann_xy             float x 2P  all lines' points, x then y, scaled into the stored image
=================  ==========  ==============================================================

New keys may be added in later versions; readers parse only the keys they know, so old readers keep
working (single-channel RANZCR records are written exactly as before; ``image_png`` records carry their
layout in the manifest: ``labels`` and ``image_channels``, which ``RecordLayout.from_manifest`` reads).
Shard files are named with their record count (``fold3-007-412.tfrec``) so that readers never
need a counting pass.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ranzcr_tf import io_utils
from ranzcr_tf.labels import ID_COLUMN, NUM_CLASSES

SCHEMA_VERSION = 1

IMAGE = "image"
IMAGE_PNG = "image_png"
CHANNELS = "channels"
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




@dataclass(frozen=True)
class RecordLayout:
    """Target length and image channels of a records folder: RANZCR's (11, 1) unless the manifest says other."""

    num_classes: int = NUM_CLASSES
    channels: int = 1

    @classmethod
    def from_manifest(cls, manifest: dict) -> RecordLayout:
        labels = manifest.get("labels")
        return cls(num_classes=len(labels) if labels else NUM_CLASSES, channels=int(manifest.get("image_channels", 1)))


def part_channels(channels: int) -> list[int]:
    """How ``image_png`` splits C channels: PNGs of 3 channels, then 1-channel PNGs (4 -> [3, 1], 9 -> [3, 3, 3])."""
    if channels < 2:
        raise ValueError(f"image_png holds 2 or more channels, got {channels}")
    return [3] * (channels // 3) + [1] * (channels % 3)


def encode_channels(image: np.ndarray) -> list[bytes]:
    """``(H, W, C)`` uint8 -> the ``image_png`` parts (lossless)."""
    import cv2

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"encode_channels needs an (H, W, C) uint8 image, got {image.dtype} {image.shape}")
    parts, start = [], 0
    for size in part_channels(image.shape[2]):
        part = image[..., start:start + size]
        part = part[..., ::-1] if size == 3 else part  # OpenCV writes BGR: reversed, the PNG holds channel order
        ok, buffer = cv2.imencode(".png", np.ascontiguousarray(part))
        if not ok:
            raise ValueError("PNG encoding failed")
        parts.append(buffer.tobytes())
        start += size
    return parts


def decode_channels_numpy(parts: Sequence[bytes]) -> np.ndarray:
    """The ``image_png`` parts back to ``(H, W, C)`` uint8 with OpenCV (no TensorFlow)."""
    import cv2

    out = []
    for data in parts:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError("stored image_png part is not a decodable PNG")
        out.append(image[..., ::-1] if image.ndim == 3 else image[..., None])
    return np.concatenate(out, axis=-1)


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
    positives = np.zeros(RecordLayout.from_manifest(manifest).num_classes, dtype="int64")
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


def settings_hash(preprocess: dict) -> str:
    """A short hash of a manifest's ``preprocess`` block: what the converter stamps on each shard it writes."""
    import hashlib

    return hashlib.sha256(json.dumps(preprocess, sort_keys=True, default=str).encode()).hexdigest()[:16]


def first_record_size(path: str) -> tuple[int, int]:
    """(height, width) stored in a local shard's first record (its header and payload only are read)."""
    import struct

    import tensorflow as tf

    with open(path, "rb") as fh:
        header = fh.read(12)
        if len(header) < 12:
            raise ValueError(f"shard {path} is empty or truncated: restore it or convert again")
        (length,) = struct.unpack("<Q", header[:8])
        example = tf.train.Example.FromString(fh.read(length))
    features = example.features.feature
    return int(features[HEIGHT].int64_list.value[0]), int(features[WIDTH].int64_list.value[0])


def check_shard_settings(tfrecords_dir: str, manifest: dict, paths: Sequence[str]) -> None:
    """Every shard was written with the manifest's settings: the converter's per-shard settings hash
    (``shard_settings``) and, for local shards, the image size stored in the first record. One
    ``ValueError`` naming the first shards that disagree (two conversions into one folder, say)."""
    wanted_size = int(manifest["image_size"])
    wanted_hash = settings_hash(manifest.get("preprocess") or {})
    stamped = manifest.get("shard_settings") or {}
    problems = []
    for path in paths:
        name = os.path.basename(path)
        key = next((k for k in stamped if os.path.basename(k) == name), None)
        if key is not None and stamped[key] != wanted_hash:
            problems.append(f"{name} was written with other settings (hash {stamped[key]} vs {wanted_hash})")
        elif not io_utils.is_remote(path):
            size = first_record_size(path)
            if size[0] != wanted_size and size[1] != wanted_size:
                problems.append(f"{name} holds {size[0]}x{size[1]} px images, the manifest says {wanted_size} px")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(f"the records in {tfrecords_dir} mix conversions: {shown}: convert again into an empty "
                         f"folder (make_tfrecords.py --overwrite)")


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
    image_jpeg: bytes | None,
    study_id: str,
    *,
    target: Sequence[float] | None,
    fold: int,
    height: int,
    width: int,
    orig_height: int,
    orig_width: int,
    annotations: Sequence[tuple[int, np.ndarray]] = (),
    num_classes: int = NUM_CLASSES,
    image_parts: Sequence[bytes] | None = None,
    channels: int = 1,
) -> bytes:
    """One study as a serialized ``tf.train.Example``.

    ``target`` is None for test studies. ``annotations`` is a sequence of ``(label_index, points)``
    with ``points`` an ``(n, 2)`` array of x, y already scaled into the stored image. A multi-channel
    image comes as ``image_parts`` (``encode_channels``) with its ``channels`` instead of ``image_jpeg``.
    """
    import tensorflow as tf

    if target is not None and len(target) != num_classes:
        raise ValueError(f"target of {study_id} has {len(target)} values, expected {num_classes}")
    if (image_parts is None) == (image_jpeg is None):
        raise ValueError("serialize_example takes a single-channel image_jpeg or multi-channel image_parts, not both")
    if image_parts is not None and len(image_parts) != len(part_channels(channels)):
        raise ValueError(f"{study_id}: {len(image_parts)} image_png parts for {channels} channels; expected "
                         f"{len(part_channels(channels))}")
    points = [np.asarray(p, dtype=np.float32).reshape(-1, 2) for _, p in annotations]
    image = {IMAGE: _bytes([image_jpeg])} if image_parts is None else \
        {IMAGE_PNG: _bytes(list(image_parts)), CHANNELS: _ints([channels])}
    feature = {
        **image,
        ID: _bytes([study_id.encode("utf-8")]),
        TARGET: _floats(target if target is not None else [0.0] * num_classes),
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
def feature_spec(with_annotations: bool = False, layout: RecordLayout | None = None) -> dict:
    import tensorflow as tf

    layout = layout or RecordLayout()
    image = {IMAGE: tf.io.FixedLenFeature([], tf.string)} if layout.channels == 1 else \
        {IMAGE_PNG: tf.io.FixedLenFeature([len(part_channels(layout.channels))], tf.string)}
    spec = {
        **image,
        ID: tf.io.FixedLenFeature([], tf.string),
        TARGET: tf.io.FixedLenFeature([layout.num_classes], tf.float32),
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


def parse_example(serialized, with_annotations: bool = False, layout: RecordLayout | None = None) -> dict:
    """Apply the schema to one serialized record (no decoding, no augmentation); ``layout`` (default RANZCR's)
    says the target length and whether the image is ``image`` (1 channel) or ``image_png`` parts.

    Annotation fields, when asked for, come back dense: ``ann_label`` (n,), ``ann_num_points`` (n,),
    ``ann_xy`` (P, 2).
    """
    import tensorflow as tf

    parsed = tf.io.parse_single_example(serialized, feature_spec(with_annotations, layout))
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


def decode_stored(parsed: dict, channels: int = 1):
    """The parsed record's image as uint8 ``(h, w, channels)``: the JPEG (``decode_image``), or the ``image_png``
    parts decoded and concatenated in order."""
    import tensorflow as tf

    if channels == 1:
        return decode_image(parsed[IMAGE], channels=1)
    parts = [tf.io.decode_png(parsed[IMAGE_PNG][i], channels=size) for i, size in enumerate(part_channels(channels))]
    return tf.concat(parts, axis=-1)


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
