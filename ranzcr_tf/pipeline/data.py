"""tf.data pipelines from the converted TFRecords: training (all folds but k), validation (fold k), test.

    ds = build_train_dataset(cfg, "tfrecords", fold=0, global_batch_size=32)        # (images, targets), endless
    ev = build_eval_dataset(cfg, "tfrecords", "valid", 32, fold=0)                    # ordered, padded
    probs = ev.unpad(model.predict(ev.dataset, steps=ev.num_batches))                       # rows line up with ev.ids

Every batch has the full batch size on every split (TPUs and JAX data parallelism reject a short last
batch): training drops its remainder (it repeats anyway), validation and test pad their last batch with
zero images that ``EvalData.unpad`` removes again, so padding never reaches a metric or a submission.
StudyInstanceUIDs travel beside the batches (``EvalData.ids``), never inside the Keras tuple: a third
element would be read as sample weights, and strings cannot go to a TPU or a JAX device.

Run ``python -m ranzcr_tf.pipeline --tfrecords DIR --fold 0 --show grid.png`` to see what the model sees
(the command line: ``pipeline/__main__.py``).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # ``python -m ranzcr_tf.pipeline.data``, the older spelling: the command
    from ranzcr_tf.pipeline.__main__ import main  # (pipeline/__main__.py) parses before TensorFlow loads

    sys.exit(main(prog="python -m ranzcr_tf.pipeline.data"))

import contextlib
import functools
import math
import re

import numpy as np
import tensorflow as tf

from ranzcr_tf import device
from ranzcr_tf.config import TTA_VIEWS, Config
from ranzcr_tf.labels import ID_COLUMN, NUM_CLASSES
from ranzcr_tf.pipeline import masks
from ranzcr_tf.pipeline.augment import augment_image, mirror
from ranzcr_tf.prep import records

AUTOTUNE = tf.data.AUTOTUNE

# Files read concurrently by the training interleave: enough to hide GCS latency, few enough that the
# per-file read-ahead buffers stay small.
_MAX_PARALLEL_FILES = 16


# ----------------------------------------------------------------------------------------------- devices
def image_dtype_for(cfg: Config, backend: str, accelerator: str) -> tf.DType:
    """The dtype of the images handed to the model (the model casts to its compute dtype itself).

    - ``cfg.data.image_dtype`` other than ``auto`` wins.
    - uint8 on CPU and GPU (TF backend) and on every JAX device: a quarter of float32's host-to-device
      traffic (2.4 MB instead of 9.4 MB per 768 px image, ×3 again for RGB), and it is the stored pixels
      exactly.
    - TF ``TPUStrategy``: uint8 infeed was unsupported on some TF-TPU versions, so a float type:
      bfloat16 (0..255 are exact in bfloat16, half of float32's infeed) unless the model runs in plain
      float32 (``model.mixed_precision: float32``), then float32.
    """
    if cfg.data.image_dtype != "auto":
        return tf.as_dtype(cfg.data.image_dtype)
    if backend == "tensorflow" and accelerator == "tpu":
        return tf.float32 if cfg.model.mixed_precision == "float32" else tf.bfloat16
    return tf.uint8


def _resolve_dtype(cfg: Config, image_dtype) -> tf.DType:
    if image_dtype is not None:
        return tf.as_dtype(image_dtype)
    return image_dtype_for(cfg, device.keras_backend(), device.detect_accelerator())


# ----------------------------------------------------------------------------------------------- decode
def decode_for_model(image_bytes, image_size: int, channels: int = 1):
    """Decode a stored JPEG to uint8 ``(image_size, image_size, channels)`` with a static shape.

    Uses the project's one decoder setting (``records.decode_image``), so a stored image gives the same
    pixels in training, validation, test and in the converter's checks. When the records hold another
    size than asked for, resizes: ``area`` when shrinking (no aliasing), ``bilinear`` when enlarging.
    """
    image = records.decode_image(image_bytes, channels=1)
    return expand_channels(_fit_size(image, image_size, 1), channels)


def decode_parsed_for_model(parsed: dict, image_size: int, layout: records.RecordLayout):
    """A parsed record's stored image as uint8 ``(image_size, image_size, C)``: the grey JPEG (C = 1, expand it
    with ``expand_channels`` after augmenting) or the ``image_png`` channels (C = ``layout.channels``)."""
    if layout.channels == 1:
        return decode_for_model(parsed[records.IMAGE], image_size, channels=1)
    return _fit_size(records.decode_stored(parsed, layout.channels), image_size, layout.channels)


def _model_channels(cfg: Config, layout: records.RecordLayout) -> int:
    """``model.input_channels``, checked against records that store several channels (they are fed as they are)."""
    channels = int(cfg.model.input_channels)
    if layout.channels > 1 and channels != layout.channels:
        raise ValueError(f"the records hold {layout.channels}-channel images but model.input_channels = {channels}: "
                         f"set model.input_channels={layout.channels}")
    return channels


def _fit_size(image, image_size: int, channels: int):
    """Resize to ``image_size`` square when the records hold another size (area shrinking, bilinear enlarging)."""
    shape = tf.shape(image)

    def resize():
        shrink = tf.logical_or(shape[0] > image_size, shape[1] > image_size)
        method = functools.partial(tf.image.resize, image, [image_size, image_size])
        out = tf.cond(shrink, lambda: method(method="area"), lambda: method(method="bilinear"))
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    same = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
    image = tf.cond(same, lambda: image, resize)
    return tf.ensure_shape(image, [image_size, image_size, channels])


def expand_channels(image, channels: int):
    """Grey ``(..., 1)`` to the model's channel count (1 or 3), after augmentation: 3x cheaper before."""
    if channels == image.shape[-1]:  # already the model's channels (grey to grey, or multi-channel records)
        return image
    if channels == 3 and image.shape[-1] == 1:
        return tf.repeat(image, 3, axis=-1)
    raise ValueError(f"model.input_channels must be 1 or 3, got {channels}")


def _to_model_dtype(image, dtype: tf.DType):
    return image if image.dtype == dtype else tf.cast(image, dtype)


# ----------------------------------------------------------------------------------------------- manifest
def _manifest_info(tfrecords_dir: str) -> tuple[dict, int, int]:
    manifest = records.read_manifest(tfrecords_dir)
    return manifest, int(manifest.get("num_folds") or 0), int(manifest["image_size"])  # 0: a test-only folder


def _check_fold(fold, num_folds: int) -> int:
    if fold is None or not 0 <= int(fold) < num_folds:
        raise ValueError(f"fold must be an integer in 0..{num_folds - 1} (the records have {num_folds} folds), got {fold!r}")
    return int(fold)


def _model_image_size(cfg: Config, stored_size: int, image_size: int | None) -> int:
    size = image_size or cfg.data.image_size or stored_size
    if size < 32:
        raise ValueError(f"image size {size} is too small: use data.image_size >= 32 (or 0 for the records' size)")
    return int(size)


def training_positive_counts(tfrecords_dir: str, fold: int) -> tuple[np.ndarray, int]:
    """Per-class positives (11,) and the number of studies in all folds but ``fold``, from the manifest."""
    manifest, num_folds, _ = _manifest_info(tfrecords_dir)
    fold = _check_fold(fold, num_folds)
    return records.positives_from_manifest(manifest, [k for k in range(num_folds) if k != fold])


def annotated_positive_counts(tfrecords_dir: str, fold: int) -> tuple[np.ndarray, int]:
    """``training_positive_counts`` of the annotated studies only (the teacher's and the student's data).

    The manifest does not count annotated studies, so this reads the training shards once, parsing two
    small features per record (no image decoding): about a second per 1,000 studies on local disk.
    """
    _, num_folds, _ = _manifest_info(tfrecords_dir)
    fold = _check_fold(fold, num_folds)
    files = _train_files(tfrecords_dir, fold, num_folds)
    spec = {records.TARGET: tf.io.FixedLenFeature([NUM_CLASSES], tf.float32)}
    ds = _ordered_records(files).filter(masks.is_annotated).batch(1024).map(lambda s: tf.io.parse_example(s, spec))
    positives, count = np.zeros(NUM_CLASSES, np.int64), 0
    with naming_corrupt_shard(files):
        for batch in ds.as_numpy_iterator():
            positives += (batch[records.TARGET] > 0.5).sum(axis=0).astype(np.int64)
            count += len(batch[records.TARGET])
    if count == 0:
        raise ValueError(f"no annotated study in the training folds of {tfrecords_dir} (fold {fold} validates): "
                         "the teacher and the student train on studies with train_annotations.csv lines")
    return positives, count


# ----------------------------------------------------------------------------------------------- corrupt shards
def find_corrupt_shard(files) -> tuple[str, str] | None:
    """The first of ``files`` that TensorFlow cannot read through (bad framing or CRC), with its error."""
    for path in files:
        try:
            for _ in tf.data.TFRecordDataset(path, buffer_size=8 << 20):
                pass
        except tf.errors.DataLossError as exc:
            return path, str(exc.message).splitlines()[0]
    return None


@contextlib.contextmanager
def naming_corrupt_shard(files):
    """Turn TensorFlow's ``DataLossError`` (which names no file) while ``files`` are read into one
    ``ValueError`` naming the shard. TensorFlow raises it from the reader before any record exists, so
    tagging records with their file cannot help; the files are instead re-read one by one, which costs
    a pass over them only when a read has already failed."""
    try:
        yield
    except tf.errors.DataLossError as exc:
        found = find_corrupt_shard(files)
        where = f"shard {found[0]} is corrupt ({found[1]})" if found else \
            f"one of the {len(files)} shards is corrupt ({str(exc.message).splitlines()[0]})"
        raise ValueError(f"{where}: restore it or convert again (make_tfrecords.py --overwrite)") from None


# ----------------------------------------------------------------------------------------------- training
def read_shard_ids(path: str) -> list[str]:
    """The IDs in one shard, in order; a truncated or corrupt shard is a ``ValueError`` naming it."""
    spec = {ID_COLUMN: tf.io.FixedLenFeature([], tf.string)}
    ids = []
    try:
        with naming_corrupt_shard([path]):  # bad framing or CRC: the same one-line error as in training
            for batch in tf.data.TFRecordDataset([path]).batch(1024).map(lambda s: tf.io.parse_example(s, spec)):
                ids.extend(x.decode("utf-8") for x in batch[ID_COLUMN].numpy())
    except tf.errors.InvalidArgumentError as exc:  # records that are not this project's (no ID feature)
        reason = re.sub(r"\{\{.*?\}\}\s*", "", str(exc.message)).splitlines()[0][:160]
        raise ValueError(f"{path}: not a test shard of this project ({reason}); re-run the converter on this "
                         f"folder, or pass --data-dir with test/ and no --tfrecords") from None
    return ids


def _train_files(tfrecords_dir: str, fold: int, num_folds: int) -> list[str]:
    folds = [k for k in range(num_folds) if k != fold]
    files = records.list_shards(tfrecords_dir, records.TRAIN_DIR, folds)
    # By construction: the validation fold's shards are not in the list, so they are never opened.
    if any(records.parse_shard_name(f)["fold"] == fold for f in files):
        raise RuntimeError(f"validation fold {fold} leaked into the training file list")
    if not files:
        raise ValueError(f"no training shards for folds {folds} in {tfrecords_dir}/train: convert the data first")
    return files


def build_train_dataset(cfg: Config, tfrecords_dir: str, fold: int, global_batch_size: int, *,
                        image_size: int | None = None, input_context=None, seed: int | None = None,
                        image_dtype=None, augment: bool = True, deterministic: bool = False) -> tf.data.Dataset:
    """Endless, shuffled, augmented ``(images, targets)`` batches from every fold except ``fold``.

    With ``train.recipe: aux_seg`` or ``student`` the targets are a dict: ``target`` (B, 11), ``mask``
    (B, S/4, S/4, 4) uint8 line masks that follow the augmented image (``masks.line_masks``) and ``has_mask``
    (B,) float32; with ``teacher`` the masks are an input: ``({"image", "masks"}, targets)``. ``teacher``
    and ``student`` read the annotated studies only (``masks.RECIPE_DATA``).

    images: ``(B, S, S, model.input_channels)`` of ``image_dtype`` (default ``image_dtype_for`` the
    current Keras backend and accelerator); targets: ``(B, 11)`` float32. ``B`` is the global batch,
    or its per-replica share under ``input_context`` (``distribute_datasets_from_function``), which
    also shards the input: by file when there are at least as many files as input pipelines, else by
    record. Reads are interleaved across files and element order is not deterministic (faster); a fixed
    ``seed`` fixes the shuffles and the sequence of augmentation seeds. Batches drop their remainder.
    ``augment=False`` yields the stored pixels (for checks and previews); ``deterministic=True`` with a
    ``seed`` makes the element order reproducible too (slower: for debugging and tests).
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    manifest, num_folds, stored_size = _manifest_info(tfrecords_dir)
    fold = _check_fold(fold, num_folds)
    size = _model_image_size(cfg, stored_size, image_size)
    layout = records.RecordLayout.from_manifest(manifest)
    files = _train_files(tfrecords_dir, fold, num_folds)
    batch_size, pipelines, pipeline_id, seed = _pipeline_share(global_batch_size, input_context, seed)

    ds = _endless_records(files, pipelines, pipeline_id, seed, deterministic)
    # Shuffle serialized records (~0.2 MB at 768 px), not decoded images (0.6 MB): a big buffer stays affordable.
    needs = masks.recipe_data(cfg.train.recipe)
    if needs.annotated_only:  # before the shuffle buffer, so it holds only studies that will be used
        ds = ds.filter(masks.is_annotated)
    ds = ds.shuffle(cfg.data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if cfg.train.extra_records:
        ds = _mix_extra_records(cfg, ds, pipelines, pipeline_id, seed, deterministic)
    # One independent [2] seed per element for the stateless augmentation ops.
    element_seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
    prepare = _training_example_fn(cfg, size, layout, _model_channels(cfg, layout), _resolve_dtype(cfg, image_dtype),
                                   augment, needs)
    ds = tf.data.Dataset.zip((ds, element_seeds)).map(prepare, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = ds.batch(batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.prefetch(AUTOTUNE).with_options(options)


def _pipeline_share(global_batch_size: int, input_context, seed: int | None) -> tuple[int, int, int, int | None]:
    """``(batch size, input pipelines, this pipeline's index, seed)``: the whole batch in one pipeline, or this
    pipeline's share under ``input_context``, with a seed of its own (still reproducible)."""
    if input_context is None:
        return global_batch_size, 1, 0, seed
    pipeline_id = input_context.input_pipeline_id
    if seed is not None:  # each worker its own shuffle order and augmentation draws
        seed = seed + 1_000_003 * pipeline_id
    return (input_context.get_per_replica_batch_size(global_batch_size), input_context.num_input_pipelines,
            pipeline_id, seed)


def _endless_records(files: list[str], pipelines: int, pipeline_id: int, seed, deterministic: bool):
    """This input pipeline's serialized training records, endless: its share of the files (all of them in one
    pipeline), shuffled every pass and read interleaved."""
    if pipelines > len(files):
        # Fewer files than pipelines: every pipeline reads all files in the same fixed order and keeps every
        # pipelines-th record, so the pipelines' shares partition the data exactly.
        return tf.data.TFRecordDataset(files).shard(pipelines, pipeline_id).repeat()
    file_ds = tf.data.Dataset.from_tensor_slices(files)
    if pipelines > 1:
        file_ds = file_ds.shard(pipelines, pipeline_id)
    num_files = len(range(pipeline_id, len(files), pipelines))
    file_ds = file_ds.shuffle(num_files, seed=seed, reshuffle_each_iteration=True).repeat()
    return file_ds.interleave(tf.data.TFRecordDataset, cycle_length=min(num_files, _MAX_PARALLEL_FILES),
                              block_length=1, num_parallel_calls=AUTOTUNE, deterministic=deterministic)


def _training_example_fn(cfg: Config, size: int, layout: records.RecordLayout, channels: int, dtype, augment: bool,
                         needs):
    """``(serialized record, element seed) -> (images, targets)`` of one training example (``needs``: what the
    recipe reads, ``masks.recipe_data``)."""
    aug_cfg, target_of = cfg.augment, _target_fn(cfg)
    with_masks = needs.masks is not None
    if with_masks:
        mask_settings = masks.MaskSettings.from_config(cfg.train)
        masks.mask_size(size)  # a clear error now rather than inside the map

    def prepare(serialized, element_seed):
        parsed = records.parse_example(serialized, with_annotations=with_masks, layout=layout)
        parsed[records.TARGET] = target_of(parsed)
        image = decode_parsed_for_model(parsed, size, layout)
        if not with_masks:
            if augment:
                image = augment_image(image, aug_cfg, element_seed, channels=layout.channels)
            return _to_model_dtype(expand_channels(image, channels), dtype), parsed[records.TARGET]
        mask, has_mask = masks.line_masks(parsed, size, mask_settings)
        if augment:
            image, mask = augment_image(image, aug_cfg, element_seed, mask=mask)
        # uint8 masks: a quarter of float32's host-to-device traffic; the loss (or the teacher) casts them.
        image, mask = _to_model_dtype(expand_channels(image, channels), dtype), tf.cast(mask, tf.uint8)
        if needs.masks == "input":
            return {"image": image, "masks": mask}, parsed[records.TARGET]
        return image, {"target": parsed[records.TARGET], "mask": mask, "has_mask": has_mask}

    return prepare


def extra_files(extra_dir: str) -> list[str]:
    """The ``extra/`` shards of ``make_tfrecords.py --unlabeled`` output; a clear error when there are none."""
    files = records.list_shards(extra_dir, records.EXTRA_DIR)
    if not files:
        raise ValueError(f"train.extra_records {extra_dir} holds no extra/ shards: convert the images with "
                         f"make_tfrecords.py --unlabeled DIR --out-dir {extra_dir}")
    return files


def _mix_extra_records(cfg: Config, ds, pipelines: int, pipeline_id: int, seed, deterministic: bool):
    """``train.extra_fraction`` of the serialized training records drawn from ``train.extra_records`` (endless).

    Training only: validation, OOF and the test set read their own shards and never this folder. Steps per
    epoch stay those of the competition folds, so an epoch then holds fewer competition images.
    """
    files = extra_files(cfg.train.extra_records)
    extra = tf.data.TFRecordDataset(files) if pipelines == 1 else tf.data.TFRecordDataset(files).shard(pipelines,
                                                                                                      pipeline_id)
    extra = extra.repeat().shuffle(cfg.data.shuffle_buffer, seed=None if seed is None else seed + 7,
                                   reshuffle_each_iteration=True)
    fraction = float(cfg.train.extra_fraction)
    return tf.data.Dataset.sample_from_datasets([ds, extra], weights=[1.0 - fraction, fraction],
                                                seed=None if seed is None else seed + 11)


def _target_fn(cfg: Config):
    """``parsed -> target``: the record's hard labels, or with ``train.soft_labels`` the soft/hard mix
    (``pipeline/soft.py``). Training only: validation and OOF always score against the hard labels."""
    if not cfg.train.soft_labels:
        return lambda parsed: parsed[records.TARGET]
    from ranzcr_tf.pipeline.soft import SoftLabels

    soft_target = SoftLabels.read(cfg.train.soft_labels).target_fn(cfg.train.soft_alpha)
    return lambda parsed: soft_target(parsed[ID_COLUMN], parsed[records.TARGET], parsed[records.HAS_TARGET])


# ----------------------------------------------------------------------------------------------- evaluation
class EvalData:
    """An ordered, padded evaluation dataset and, beside it, the IDs and targets of its real rows.

    ``dataset`` yields ``num_batches`` full batches of ``batch_size``: ``(images, targets)``, or
    ``images`` alone, or ``(images, targets, weights)`` with weight 0 on padding rows (so
    ``model.evaluate`` ignores them). Row ``i < num_examples`` of the concatenated predictions belongs
    to ``ids[i]``; ``unpad(predictions)`` drops the padding rows.

    One share of ``num_shards`` (several JAX processes, ``shard_index`` this one): ``dataset`` yields
    ``num_batches`` batches of ``local_batch_size`` = ``batch_size / num_shards``, and row ``k`` of the
    share is record ``k * num_shards + shard_index`` (``record_index``; past ``num_examples``: padding).
    ``ids`` and ``targets`` still cover every record, for the metric.
    """

    def __init__(self, dataset, files, num_examples: int, batch_size: int, split: str, *, num_shards: int = 1,
                 shard_index: int = 0, annotated_only: bool = False, num_classes: int = NUM_CLASSES):
        self.dataset = dataset
        self.num_classes = int(num_classes)  # target length (the records' task labels)
        self.files = list(files)
        self.annotated_only = bool(annotated_only)  # the rows are the files' annotated studies only
        self.num_examples = int(num_examples)
        self.batch_size = int(batch_size)
        self.split = split
        self.num_shards, self.shard_index = int(num_shards), int(shard_index)
        self.local_batch_size = self.batch_size // self.num_shards
        self.num_batches = math.ceil(self.num_examples / self.batch_size)
        self.num_padding = self.num_batches * self.batch_size - self.num_examples

    def record_index(self, position):
        """The record (row of ``ids``) at ``position`` in this share's stream of rows (numbers or tensors)."""
        return position * self.num_shards + self.shard_index

    def indexed_dataset(self):
        """``dataset`` with each row's record index beside the image: ``{"image", "index"}`` (a model of several
        named inputs: those names and ``"index"``), for ``model.predict.predict_eval``, which places every
        prediction by its index whatever order a strategy hands batches to replicas in."""
        batch = self.local_batch_size  # the whole batch, or this process's share of it

        def add_index(step, element):
            images = element[0] if isinstance(element, (tuple, list)) else element
            index = self.record_index(tf.cast(step, tf.int32) * batch + tf.range(batch, dtype=tf.int32))
            return {**images, "index": index} if isinstance(images, dict) else {"image": images, "index": index}

        # A known length lets predict stop without probing (and warning about) the end of the data.
        return (self.dataset.enumerate().map(add_index)
                .apply(tf.data.experimental.assert_cardinality(self.num_batches)))

    @functools.cached_property
    def _labels(self) -> tuple[np.ndarray, np.ndarray]:
        # A pass over the same files in the same order, parsing only two small features (no decoding).
        spec = {ID_COLUMN: tf.io.FixedLenFeature([], tf.string),
                records.TARGET: tf.io.FixedLenFeature([self.num_classes], tf.float32)}
        ds = _ordered_records(self.files, self.annotated_only).batch(1024).map(lambda s: tf.io.parse_example(s, spec))
        ids, targets = [], []
        with naming_corrupt_shard(self.files):
            for batch in ds.as_numpy_iterator():
                ids.extend(x.decode("utf-8") for x in batch[ID_COLUMN])
                targets.append(batch[records.TARGET])
        ids = np.asarray(ids, dtype=object)
        targets = np.concatenate(targets) if targets else np.zeros((0, self.num_classes), np.float32)
        if len(ids) != self.num_examples:
            raise ValueError(f"the shards hold {len(ids)} records but their names say {self.num_examples}: "
                             "re-run the converter on this folder")
        return ids, targets

    @property
    def ids(self) -> np.ndarray:
        """StudyInstanceUIDs of the real rows, in dataset order."""
        return self._labels[0]

    @property
    def targets(self) -> np.ndarray:
        """``(num_examples, 11)`` float32 targets in dataset order (zeros for test)."""
        return self._labels[1]

    def unpad(self, predictions):
        """Drop the padding rows: ``predictions[:num_examples]`` (after checking the row count)."""
        if self.num_shards > 1:
            raise ValueError("unpad needs every row in order, but this is one share of several processes: predict "
                             "with model.predict.predict_eval, which places rows by their record index")
        predictions = np.asarray(predictions)
        if predictions.shape[0] != self.num_batches * self.batch_size:
            raise ValueError(f"expected {self.num_batches * self.batch_size} predicted rows "
                             f"({self.num_batches} batches of {self.batch_size}), got {predictions.shape[0]}: "
                             f"predict with steps={self.num_batches}")
        return predictions[:self.num_examples]


def _ordered_records(files, annotated_only: bool = False):
    # One file after another: the order is the sorted file order, identical on every pass.
    ds = tf.data.TFRecordDataset(files, buffer_size=8 << 20)
    return ds.filter(masks.is_annotated) if annotated_only else ds


def build_eval_dataset(cfg: Config, tfrecords_dir: str, split: str, global_batch_size: int, *,
                       fold: int | None = None, image_size: int | None = None, tta: str = "identity",
                       with_targets: bool = True, with_weights: bool = False, image_dtype=None,
                       num_shards: int = 1, shard_index: int = 0, recipe: str = "plain",
                       mask_settings: masks.MaskSettings | None = None) -> EvalData:
    """Validation (``split='valid'``, fold ``fold``), test or extra data, in a fixed order, every batch full.

    No augmentation; ``tta='hflip'`` mirrors every image (test-time augmentation). The last batch is
    padded with zero images (targets 0, weight 0) up to ``global_batch_size``; drop them from
    predictions with ``EvalData.unpad``. ``with_targets=False`` yields images only (prediction);
    ``with_weights=True`` adds per-row weights (0 on padding) for ``model.evaluate``.

    ``num_shards`` > 1 (several JAX processes): only share ``shard_index``, every ``num_shards``-th record
    (chosen before decoding, so each process decodes its share alone), in batches of
    ``global_batch_size / num_shards``, padded so that every share has the same number of batches.

    ``recipe="teacher"`` (validation of the teacher, ``masks.RECIPE_DATA``): the annotated studies only, each
    as ``{"image", "masks"}`` with its line masks (``mask_settings``) as the teacher's second input.
    """
    _check_eval_request(split, tta, global_batch_size, num_shards, shard_index)
    manifest, num_folds, stored_size = _manifest_info(tfrecords_dir)
    layout = records.RecordLayout.from_manifest(manifest)
    if split == "valid":
        fold = _check_fold(fold, num_folds)
    files = _eval_files(tfrecords_dir, split, fold)
    size = _model_image_size(cfg, stored_size, image_size)
    channels = _model_channels(cfg, layout)
    dtype = _resolve_dtype(cfg, image_dtype)
    needs = masks.recipe_data(recipe)
    if needs.masks == "input" and tta != "identity":
        raise ValueError("the teacher (masks as input) is validated without TTA: set infer.tta=identity")
    num_examples = _count_eval_examples(files, needs.annotated_only, fold, tfrecords_dir)
    settings = (mask_settings or masks.MaskSettings()) if needs.masks == "input" else None
    ds = _ordered_records(files, needs.annotated_only)
    if num_shards > 1:
        ds = ds.shard(num_shards, shard_index)
    ds = ds.map(_eval_example_fn(size, layout, channels, dtype, tta, settings), num_parallel_calls=AUTOTUNE,
                deterministic=True)
    if cfg.data.cache and split == "valid":
        ds = ds.cache()
    local_batch = global_batch_size // num_shards
    share_rows = len(range(shard_index, num_examples, num_shards))
    pad = math.ceil(num_examples / global_batch_size) * local_batch - share_rows
    if pad:
        ds = ds.concatenate(tf.data.Dataset.from_tensors(_padding_row(size, layout, channels, dtype, settings))
                            .repeat(pad))
    if not with_targets:
        ds = ds.map(lambda x, y, w: x)
    elif not with_weights:
        ds = ds.map(lambda x, y, w: (x, y))
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(AUTOTUNE)
    return EvalData(ds, files, num_examples, global_batch_size, split, num_shards=num_shards, shard_index=shard_index,
                    annotated_only=needs.annotated_only, num_classes=layout.num_classes)


def _check_eval_request(split: str, tta: str, global_batch_size: int, num_shards: int, shard_index: int) -> None:
    if split not in ("valid", "test", "extra"):
        raise ValueError(f"split must be 'valid', 'test' or 'extra', got {split!r}")
    if tta not in TTA_VIEWS:
        raise ValueError(f"tta must be one of {', '.join(TTA_VIEWS)}, got {tta!r}")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if num_shards < 1 or not 0 <= shard_index < num_shards or global_batch_size % num_shards:
        raise ValueError(f"share {shard_index} of {num_shards} of batches of {global_batch_size}: the shares are "
                         "numbered 0..num_shards-1 and must split the global batch evenly")


def _eval_files(tfrecords_dir: str, split: str, fold: int | None) -> list[str]:
    """The shards of the validation fold, or of the test or extra records (unlabeled records, predicted to
    make their soft labels: serve/pseudo.py)."""
    if split == "valid":
        files = records.list_shards(tfrecords_dir, records.TRAIN_DIR, [fold])
    else:
        files = records.list_shards(tfrecords_dir, records.TEST_DIR if split == "test" else records.EXTRA_DIR)
    if not files:
        raise ValueError(f"no {split} shards in {tfrecords_dir} (fold {fold}): convert the data first")
    return files


def _count_eval_examples(files: list[str], annotated_only: bool, fold, tfrecords_dir: str) -> int:
    if not annotated_only:
        return records.count_records(files)
    # The filtered count, by a pass parsing one small feature per record.
    count = int(_ordered_records(files, True).reduce(np.int64(0), lambda n, _: n + 1))
    if count == 0:
        raise ValueError(f"validation fold {fold} of {tfrecords_dir} has no annotated study, which the teacher "
                         "needs to be validated: convert with more annotated studies or other folds")
    return count


def _eval_example_fn(size: int, layout: records.RecordLayout, channels: int, dtype, tta: str,
                     mask_settings: masks.MaskSettings | None):
    """``serialized record -> (images, target, weight 1)``; ``mask_settings``: the line masks are an input too."""
    def prepare(serialized):
        parsed = records.parse_example(serialized, with_annotations=mask_settings is not None, layout=layout)
        image = decode_parsed_for_model(parsed, size, layout)
        if tta == "hflip":
            image = mirror(image)
        image = _to_model_dtype(expand_channels(image, channels), dtype)
        if mask_settings is not None:
            image = {"image": image,
                     "masks": tf.cast(masks.line_masks(parsed, size, mask_settings)[0], tf.uint8)}
        return image, parsed[records.TARGET], tf.constant(1.0)

    return prepare


def _padding_row(size: int, layout: records.RecordLayout, channels: int, dtype, mask_settings) -> tuple:
    """One padding row: zero image (and zero masks), zero target, weight 0."""
    blank = tf.zeros([size, size, channels], dtype)
    if mask_settings is not None:
        side = masks.mask_size(size)
        blank = {"image": blank, "masks": tf.zeros([side, side, masks.NUM_FAMILIES], tf.uint8)}
    return blank, tf.zeros([layout.num_classes], tf.float32), tf.constant(0.0)


# ----------------------------------------------------------------------------------------------- preview
def show_grid(cfg: Config, tfrecords_dir: str, fold: int, path: str, n: int = 16, seed: int = 0,
              augment: bool = True) -> str:
    """Write a PNG grid of ``n`` training samples (augmented unless told) titled with their positive labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ranzcr_tf.labels import LABELS

    ds = build_train_dataset(cfg, tfrecords_dir, fold, n, seed=seed, image_dtype=tf.uint8, augment=augment)
    images, targets = next(iter(ds))
    images, targets = images.numpy(), targets.numpy()
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.7 * rows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i][..., 0], cmap="gray", vmin=0, vmax=255)
        names = [LABELS[j] for j in np.flatnonzero(targets[i] > 0.5)]
        ax.set_title("\n".join(names) or "no tube", fontsize=7)
    fig.suptitle(f"training samples (folds != {fold}), augment={'on' if augment else 'off'}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # leave the top strip to the suptitle
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
