"""DICOM slices (RSNA Intracranial Hemorrhage layout) -> windowed, multi-channel TFRecord shards + manifest.

    manifest = convert_dicom(DicomConvertOptions(data_dir="data/ich", out_dir="records/ich", task=cfg.task,
                                                 preprocess=cfg.preprocess))

What it does, in order:

1. The label table ``task.train_csv``: long (``ID,Label`` rows ``ID_<sop>_<label>``) or wide, to one row
   per image (``long_csv.long_to_wide``); a bad row is a one-line error before any file is read.
2. Every ``task.extension`` file of ``task.train_images`` (and ``task.test_images``) is scanned for its
   metadata (``prep/dicom.py``: PatientID, Study, Series, z, neighbours by z within the series). Corrupt
   files and files without pixels are skipped and named (``skipped.csv`` and the manifest), as are labelled
   images without a readable file.
3. Folds grouped by ``task.group_column`` read from the files (the CSV has no patient column).
4. Per image: Hounsfield units -> ``task.windows`` as channels; with ``task.slice_context`` k > 0 the
   k slices above and below in the same series too (``(2k + 1) x windows`` channels, slice-major; a series
   edge repeats its last slice), resized to ``preprocess.image_size`` and stored as uint8: one channel as
   the usual JPEG, several as ``image_png`` parts (``records.py``).
5. ``folds.csv`` (ID, fold and the DICOM metadata), ``test_slices.csv``, ``skipped.csv``, ``manifest.json``
   (with ``labels``, ``image_channels`` and the ``task`` the records were made for; the kernel checks it).

Not resumable (unlike the JPEG converter): an interrupted run is rerun with ``--overwrite``.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ranzcr_tf import io_utils
from ranzcr_tf.config import PreprocessConfig, TaskConfig
from ranzcr_tf.prep import records
from ranzcr_tf.prep.folds import FOLD_COLUMN, assign_folds, fold_positives
from ranzcr_tf.prep.shard_plan import own_files, preprocess_settings
from ranzcr_tf.prep.shard_writer import ShardWriter, write_manifest
from ranzcr_tf.prep.workers import available_cores
from ranzcr_tf.provenance import run_metadata

SKIPPED_CSV = "skipped.csv"
TEST_SLICES_CSV = "test_slices.csv"
META_COLUMNS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "z")


@dataclass
class DicomConvertOptions:
    """What ``make_tfrecords.py`` passes for a ``task.reader: dicom`` preset."""

    data_dir: str
    out_dir: str
    task: TaskConfig
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    num_folds: int = 5
    fold_seed: int = 42
    workers: int = 0
    shard_mb: float = 150.0
    shard_records: int = 0
    include_test: bool = True
    limit: int = 0
    strict: bool = False
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        self.task.validate()
        self.preprocess.validate()
        if self.task.reader != "dicom":
            raise ValueError(f"task.reader = {self.task.reader!r}: this converter reads DICOM only")
        if self.num_folds < 2:
            raise ValueError(f"--folds {self.num_folds}: need at least 2")
        if self.shard_mb <= 0 or self.shard_records < 0 or self.limit < 0 or self.workers < 0:
            raise ValueError("--shard-mb must be > 0 and --shard-records, --limit, --workers >= 0")


# ----------------------------------------------------------------------------------------------- tables
def read_labels(data_dir: str, task: TaskConfig) -> pd.DataFrame:
    """One row per labelled image: ``task.id_column`` + ``task.labels`` (0/1 ints), in the CSV's order."""
    from ranzcr_tf.prep.long_csv import long_to_wide, read_long_csv

    path = os.path.join(data_dir, task.train_csv)
    if not os.path.exists(path):
        raise ValueError(f"{path} not found: --data-dir must hold {task.train_csv} (task.train_csv) and "
                         f"{', '.join(task.train_images)}/")
    if task.csv_layout == "long":
        return long_to_wide(read_long_csv(path), task.labels, task.id_column, path)
    frame = pd.read_csv(path, dtype={task.id_column: str})
    missing = [c for c in (task.id_column, *task.labels) if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing} (task.id_column, task.labels)")
    return frame[[task.id_column, *task.labels]]


def scan(data_dir: str, folders, extension: str, workers: int) -> tuple[pd.DataFrame, list[dict]]:
    """Every slice of ``folders`` (metadata, neighbours) and the skipped files as ``{path, reason}``."""
    from ranzcr_tf.prep import dicom

    tables, skipped = [], []
    for folder in folders:
        path = os.path.join(data_dir, folder)
        if not os.path.isdir(path):
            raise ValueError(f"image folder {path} does not exist (task.train_images / task.test_images)")
        table, bad = dicom.scan_folder(path, ext=extension, workers=workers)
        tables.append(table)
        skipped += [{"path": str(p), "reason": str(r)} for p, r in bad]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    duplicated = table["id"][table["id"].duplicated()].tolist() if len(table) else []
    if duplicated:
        raise ValueError(f"slice ID(s) {duplicated[:3]} appear in more than one of {list(folders)}")
    return table, skipped


# ----------------------------------------------------------------------------------------------- images
def slice_image(table: pd.DataFrame, paths_by_id: dict, slice_id: str, windows, context: int, size: int) -> np.ndarray:
    """uint8 ``(size, size, (2 context + 1) x windows)`` of one slice: its windows, and its neighbours' when
    ``context`` > 0 (slice-major: the slice below's windows, then its own, then the one above)."""
    import cv2

    from ranzcr_tf.prep import dicom

    ids = dicom.neighbour_ids(table, slice_id, context) if context else [slice_id]
    channels = dicom.slice_channels(paths_by_id, ids, windows)
    height, width = channels.shape[:2]
    if (height, width) != (size, size):
        interpolation = cv2.INTER_AREA if height > size or width > size else cv2.INTER_LINEAR
        planes = [cv2.resize(channels[..., c], (size, size), interpolation=interpolation)
                  for c in range(channels.shape[2])]  # plane by plane: cv2.resize caps the channel count
        channels = np.stack(planes, axis=-1)
    return np.clip(np.rint(channels * 255.0), 0, 255).astype(np.uint8)


def _encode(image: np.ndarray, preprocess: PreprocessConfig) -> dict:
    import cv2

    if image.shape[2] == 1:  # one window, one slice: the usual single-channel JPEG record
        ok, buffer = cv2.imencode(".jpg", image[..., 0], [cv2.IMWRITE_JPEG_QUALITY, preprocess.jpeg_quality])
        return {"image_jpeg": buffer.tobytes()}
    return {"image_jpeg": None, "image_parts": records.encode_channels(image), "channels": image.shape[2]}


def _records_per_shard(opts: DicomConvertOptions, channels: int) -> int:
    if opts.shard_records:
        return opts.shard_records
    size = opts.preprocess.image_size
    per_image = size * size * channels * 0.5 + records_overhead()  # PNG of CT windows: ~half a byte per value
    return max(1, int(opts.shard_mb * 1e6 // per_image))


def records_overhead() -> int:
    from ranzcr_tf.prep.convert import RECORD_OVERHEAD_BYTES

    return RECORD_OVERHEAD_BYTES


# ----------------------------------------------------------------------------------------------- writing
def _write_split(opts, split, fold, ids, table, targets, windows, pool, bar, skipped) -> tuple[list[str], list[str]]:
    """Shards of ``ids`` (train fold ``fold``, or test when None): (shard names, IDs written)."""
    from ranzcr_tf.prep.dicom import DicomError

    paths_by_id = dict(zip(table["id"], table["path"]))
    size, context = opts.preprocess.image_size, opts.task.slice_context
    per_shard = _records_per_shard(opts, opts.task.channels)

    def work(slice_id):
        try:
            return "ok", slice_image(table, paths_by_id, slice_id, windows, context, size)
        except (DicomError, OSError, ValueError) as exc:
            return "bad", str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    names, written = [], []
    for index, start in enumerate(range(0, len(ids), per_shard)):
        chunk = ids[start:start + per_shard]
        with ShardWriter(opts.out_dir, split, fold, index) as writer:
            for slice_id, (status, payload) in zip(chunk, pool.map(work, chunk)):
                bar.update(1)
                if status == "bad":
                    if opts.strict:
                        raise ValueError(f"--strict: {split} slice {paths_by_id[slice_id]}: {payload}")
                    skipped.append({"split": split, "id": slice_id, "path": paths_by_id[slice_id], "reason": payload})
                    continue
                writer.write(records.serialize_example(
                    **_encode(payload, opts.preprocess), study_id=slice_id, target=targets.get(slice_id),
                    fold=-1 if fold is None else fold, height=size, width=size, orig_height=size, orig_width=size,
                    num_classes=opts.task.num_classes))
                written.append(slice_id)
        if writer.name:
            names.append(writer.name)
    return names, written


def convert_dicom(opts: DicomConvertOptions) -> dict:
    """Convert a DICOM competition folder (see the module docstring); returns the manifest."""
    from tqdm import tqdm

    from ranzcr_tf.prep.dicom import parse_windows

    opts.validate()
    task = opts.task
    windows = parse_windows(task.windows)
    labels_df = read_labels(opts.data_dir, task)
    if opts.limit:
        labels_df = labels_df.head(opts.limit).reset_index(drop=True)
    if io_utils.exists(io_utils.join(opts.out_dir, records.MANIFEST)) and not opts.overwrite:
        raise ValueError(f"{opts.out_dir} already holds converted records: pass --overwrite or another --out-dir")
    for path in own_files(opts.out_dir):
        io_utils.remove(path)
    for name in (SKIPPED_CSV, TEST_SLICES_CSV):
        if io_utils.exists(io_utils.join(opts.out_dir, name)):
            io_utils.remove(io_utils.join(opts.out_dir, name))
    workers = opts.workers or available_cores()

    train_table, skipped_files = scan(opts.data_dir, task.train_images, task.extension, workers)
    skipped = [{"split": records.TRAIN_DIR, "id": os.path.splitext(os.path.basename(e["path"]))[0], **e}
               for e in skipped_files]
    present = set(train_table["id"]) if len(train_table) else set()
    labelled = labels_df[task.id_column].isin(present).to_numpy()
    named_bad = {e["id"] for e in skipped}
    for sid in labels_df[task.id_column][~labelled]:
        if sid not in named_bad:  # a corrupt file is named once, with its reason
            skipped.append({"split": records.TRAIN_DIR, "id": sid, "path": "", "reason": "no readable file in "
                            f"{', '.join(task.train_images)}"})
    train_df = labels_df[labelled].reset_index(drop=True)
    if train_df.empty:
        raise ValueError(f"none of the {len(labels_df)} labelled images of {task.train_csv} has a readable "
                         f"{task.extension} file in {', '.join(task.train_images)}/")
    meta = train_table.set_index("id")
    for column in META_COLUMNS:
        train_df[column] = meta.loc[train_df[task.id_column], column].to_numpy()
    if task.group_column not in train_df.columns:
        raise ValueError(f"task.group_column = {task.group_column!r} is not a DICOM field the scan reads "
                         f"({', '.join(META_COLUMNS[:3])})")
    folds = assign_folds(train_df, opts.num_folds, opts.fold_seed, labels=task.labels, group_column=task.group_column)
    targets = dict(zip(train_df[task.id_column], train_df[list(task.labels)].to_numpy(np.float32).tolist()))

    test_table, test_ids = pd.DataFrame(columns=["id", "path"]), []
    if opts.include_test:
        test_table, bad = scan(opts.data_dir, task.test_images, task.extension, workers)
        skipped += [{"split": records.TEST_DIR, "id": os.path.splitext(os.path.basename(e["path"]))[0], **e}
                    for e in bad]
        test_ids = list(test_table["id"])[:opts.limit or None]

    total = len(train_df) + len(test_ids)
    bar = tqdm(total=total, unit="img", desc="converting", file=sys.stderr, disable=not opts.progress)
    shards = {records.TRAIN_DIR: [], records.TEST_DIR: []}
    written: set = set()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for fold in range(opts.num_folds):
            members = train_df[task.id_column].to_numpy()[folds == fold]
            members = list(members[np.random.default_rng([opts.fold_seed, fold]).permutation(len(members))])
            names, done = _write_split(opts, records.TRAIN_DIR, fold, members, train_table, targets, windows, pool,
                                       bar, skipped)
            shards[records.TRAIN_DIR] += names
            written |= set(done)
        names, done_test = (_write_split(opts, records.TEST_DIR, None, test_ids, test_table, {}, windows, pool, bar,
                                         skipped) if test_ids else ([], []))
        shards[records.TEST_DIR] += names
    bar.close()

    good = train_df[task.id_column].isin(written).to_numpy()
    table = train_df[good][[task.id_column, *META_COLUMNS]].assign(**{FOLD_COLUMN: folds[good]})
    io_utils.atomic_write_text(io_utils.join(opts.out_dir, records.FOLDS_CSV), table.to_csv(index=False))
    if len(test_table):
        io_utils.atomic_write_text(io_utils.join(opts.out_dir, TEST_SLICES_CSV),
                                   test_table[["id", *META_COLUMNS]].to_csv(index=False))
    io_utils.atomic_write_text(io_utils.join(opts.out_dir, SKIPPED_CSV),
                               pd.DataFrame(skipped, columns=["split", "id", "path", "reason"]).to_csv(index=False))
    good_targets = train_df[list(task.labels)].to_numpy()[good]
    return write_manifest(
        opts.out_dir, preprocess=preprocess_settings(opts.preprocess), image_size=opts.preprocess.image_size,
        num_folds=opts.num_folds, num_train=int(good.sum()), num_test=len(done_test), shards=shards, skipped=skipped,
        labels=task.labels, image_channels=task.channels,
        task={"name": task.name, "reader": task.reader, "labels": list(task.labels), "windows": task.windows,
              "slice_context": task.slice_context, "id_column": task.id_column, "group_column": task.group_column},
        fold_seed=opts.fold_seed, fold_grouping=task.group_column,
        fold_counts={str(k): int((folds[good] == k).sum()) for k in range(opts.num_folds)},
        fold_positives=fold_positives(good_targets, folds[good], opts.num_folds),
        records_per_shard=_records_per_shard(opts, task.channels),
        source={"data_dir": os.path.abspath(opts.data_dir), "limit": opts.limit}, _meta=run_metadata())
