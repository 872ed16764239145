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

Resumable like the JPEG converter, through the same shard plan (``prep/shard_plan.py``): a rerun of an
interrupted conversion keeps its complete shards and writes the others; other settings or other slices are
refused unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ranzcr_tf import io_utils
from ranzcr_tf.config import PreprocessConfig, TaskConfig
from ranzcr_tf.locks import FolderLock
from ranzcr_tf.prep import records, shard_plan
from ranzcr_tf.prep.folds import FOLD_COLUMN, assign_folds, fold_positives
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
    per_image = size * size * channels * 0.5 + shard_plan.RECORD_OVERHEAD_BYTES  # PNG of CT windows: ~half a byte per value
    return max(1, int(opts.shard_mb * 1e6 // per_image))


# ----------------------------------------------------------------------------------------------- writing
def _write_shards(opts, pending: list[dict], tables: dict, windows, pool, bar) -> None:
    """Write every pending shard of the plan (train fold k, or test) and its progress file, so a rerun after a
    kill keeps the complete shards and redoes only the others."""
    from ranzcr_tf.prep.dicom import DicomError

    size, context = opts.preprocess.image_size, opts.task.slice_context
    written = 0
    for shard in pending:
        split, fold = shard["split"], shard["fold"]
        table = tables[split]
        paths_by_id = dict(zip(table["id"], table["path"]))

        def work(slice_id, table=table, paths_by_id=paths_by_id):
            try:
                return "ok", slice_image(table, paths_by_id, slice_id, windows, context, size)
            except (DicomError, OSError, ValueError) as exc:
                return "bad", str(exc).splitlines()[0] if str(exc) else type(exc).__name__

        state = {"ids_planned": shard["ids"], "shard": None, "ids": [], "skipped": [], "notes": []}
        with ShardWriter(opts.out_dir, split, fold, shard["index"]) as writer:
            for slice_id, (status, payload) in zip(shard["ids"], pool.map(work, shard["ids"])):
                bar.update(1)
                if status == "bad":
                    if opts.strict:
                        raise ValueError(f"--strict: {split} slice {paths_by_id[slice_id]}: {payload}")
                    state["skipped"].append({"split": split, "id": slice_id, "path": paths_by_id[slice_id],
                                             "reason": payload})
                    continue
                writer.write(records.serialize_example(
                    **_encode(payload, opts.preprocess), study_id=slice_id, target=tables["targets"].get(slice_id),
                    fold=-1 if fold is None else fold, height=size, width=size, orig_height=size, orig_width=size,
                    num_classes=opts.task.num_classes))
                state["ids"].append(slice_id)
                written += 1
                shard_plan.kill_hook(writer, written)
        state["shard"] = writer.name  # None when every slice of the shard was bad: no empty file
        shard_plan.save_progress(opts.out_dir, shard, state)


def _scan_inputs(opts: DicomConvertOptions, labels_df: pd.DataFrame, workers: int) -> dict:
    """The slices on disk: ``train_df`` (labelled slices with a readable file, with their DICOM metadata),
    the scan tables of both splits, the test IDs and the files skipped so far."""
    task = opts.task
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
    test_table, test_ids = pd.DataFrame(columns=["id", "path"]), []
    if opts.include_test:
        test_table, bad = scan(opts.data_dir, task.test_images, task.extension, workers)
        skipped += [{"split": records.TEST_DIR, "id": os.path.splitext(os.path.basename(e["path"]))[0], **e}
                    for e in bad]
        test_ids = list(test_table["id"])[:opts.limit or None]
    return {"train_df": train_df, "train_table": train_table, "test_table": test_table, "test_ids": test_ids,
            "skipped": skipped}


def _requested_settings(opts: DicomConvertOptions, inputs: dict) -> dict:
    """What the records depend on: a rerun with other settings or other slices is refused (or --overwrite)."""
    slices = [*inputs["train_df"][opts.task.id_column], "test", *inputs["test_ids"]]
    return {"schema_version": records.SCHEMA_VERSION, "preprocess": shard_plan.preprocess_settings(opts.preprocess),
            "task": shard_plan.task_summary(opts.task), "num_folds": opts.num_folds, "fold_seed": opts.fold_seed,
            "records_per_shard": _records_per_shard(opts, opts.task.channels), "include_test": opts.include_test,
            "limit": opts.limit, "inputs": {
                "train_csv_sha256": shard_plan.sha256_file(os.path.join(opts.data_dir, opts.task.train_csv)),
                "slices_sha256": hashlib.sha256("\n".join(map(str, slices)).encode()).hexdigest()}}


def convert_dicom(opts: DicomConvertOptions) -> dict:
    """Convert a DICOM competition folder (see the module docstring); returns the manifest. Resumes like the
    JPEG converter: a rerun keeps the complete shards of an interrupted run (``prep/shard_plan.py``)."""
    from ranzcr_tf.prep.dicom import parse_windows

    opts.validate()
    task = opts.task
    windows = parse_windows(task.windows)
    labels_df = read_labels(opts.data_dir, task)
    if opts.limit:
        labels_df = labels_df.head(opts.limit).reset_index(drop=True)
    with FolderLock(opts.out_dir, "make_tfrecords.py"):  # one converter per folder, as for the JPEG converter
        return _convert_locked(opts, labels_df, windows)


def _convert_locked(opts: DicomConvertOptions, labels_df: pd.DataFrame, windows) -> dict:
    from tqdm import tqdm

    task = opts.task
    if opts.overwrite:
        for path in shard_plan.own_files(opts.out_dir) + [io_utils.join(opts.out_dir, n) for n in (SKIPPED_CSV, TEST_SLICES_CSV)]:
            if io_utils.exists(path):
                io_utils.remove(path)
    workers = opts.workers or available_cores()
    inputs = _scan_inputs(opts, labels_df, workers)
    train_df = inputs["train_df"]
    folds = assign_folds(train_df, opts.num_folds, opts.fold_seed, labels=task.labels, group_column=task.group_column)
    settings_path = io_utils.join(opts.out_dir, shard_plan.PROGRESS_DIR, shard_plan.SETTINGS_FILE)
    requested = json.loads(json.dumps(_requested_settings(opts, inputs)))
    saved = shard_plan.read_json(settings_path)
    shard_plan.check_resume(opts.out_dir, saved, requested)
    if saved is None:
        io_utils.atomic_write_json(settings_path, requested)
    plan = shard_plan.plan_shards(train_df, folds, inputs["test_ids"], requested["records_per_shard"], opts.fold_seed,
                       opts.num_folds, task.id_column)
    states = shard_plan.remove_stale(opts.out_dir, plan)
    pending = [s for s in plan if shard_plan.slot_name(s) not in states]
    if len(pending) < len(plan):
        print(f"resuming: {len(plan) - len(pending)} of {len(plan)} shards already complete", file=sys.stderr)
    tables = {records.TRAIN_DIR: inputs["train_table"], records.TEST_DIR: inputs["test_table"],
              "targets": dict(zip(train_df[task.id_column], train_df[list(task.labels)].to_numpy(np.float32).tolist()))}
    bar = tqdm(total=sum(len(s["ids"]) for s in pending), unit="img", desc="converting", file=sys.stderr,
               disable=not opts.progress)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        _write_shards(opts, pending, tables, windows, pool, bar)
    bar.close()
    states = shard_plan.remove_stale(opts.out_dir, plan)
    return _finish(opts, plan, states, inputs, folds, requested["records_per_shard"])


def _finish(opts: DicomConvertOptions, plan: list[dict], states: dict, inputs: dict, folds: np.ndarray,
            per_shard: int) -> dict:
    """folds.csv, test_slices.csv, skipped.csv and manifest.json from the progress of every shard."""
    task, train_df = opts.task, inputs["train_df"]
    ordered = [states[shard_plan.slot_name(s)] for s in plan]
    written = {sid for st in ordered for sid in st["ids"]}
    skipped = inputs["skipped"] + [entry for st in ordered for entry in st["skipped"]]
    shards = {records.TRAIN_DIR: [], records.TEST_DIR: []}
    for shard, st in zip(plan, ordered):
        if st["shard"]:
            shards[shard["split"]].append(st["shard"])
    good = train_df[task.id_column].isin(written).to_numpy()
    table = train_df[good][[task.id_column, *META_COLUMNS]].assign(**{FOLD_COLUMN: folds[good]})
    io_utils.atomic_write_text(io_utils.join(opts.out_dir, records.FOLDS_CSV), table.to_csv(index=False))
    if len(inputs["test_table"]):
        io_utils.atomic_write_text(io_utils.join(opts.out_dir, TEST_SLICES_CSV),
                                   inputs["test_table"][["id", *META_COLUMNS]].to_csv(index=False))
    io_utils.atomic_write_text(io_utils.join(opts.out_dir, SKIPPED_CSV),
                               pd.DataFrame(skipped, columns=["split", "id", "path", "reason"]).to_csv(index=False))
    good_targets = train_df[list(task.labels)].to_numpy()[good]
    num_test = sum(len(st["ids"]) for s, st in zip(plan, ordered) if s["split"] == records.TEST_DIR)
    return write_manifest(
        opts.out_dir, preprocess=shard_plan.preprocess_settings(opts.preprocess), image_size=opts.preprocess.image_size,
        num_folds=opts.num_folds, num_train=int(good.sum()), num_test=num_test, shards=shards, skipped=skipped,
        labels=task.labels, image_channels=task.channels, task=shard_plan.task_summary(task),
        fold_seed=opts.fold_seed, fold_grouping=task.group_column,
        fold_counts={str(k): int((folds[good] == k).sum()) for k in range(opts.num_folds)},
        fold_positives=fold_positives(good_targets, folds[good], opts.num_folds),
        records_per_shard=per_shard, source={"data_dir": os.path.abspath(opts.data_dir), "limit": opts.limit},
        _meta=run_metadata())
