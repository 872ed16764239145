"""Parallel, resumable conversion of the Kaggle layout into CLAHE TFRecord shards plus ``manifest.json``.

    manifest = convert(ConvertOptions(data_dir="data", out_dir="tfrecords", preprocess=cfg.preprocess))

Output (``out_dir``, local or ``gs://``)::

    train/fold{k}-{i:03d}-{count}.tfrec    test/test-{i:03d}-{count}.tfrec    folds.csv    manifest.json
    .progress/settings.json, .progress/<shard>.json   (resume state; readers ignore it)

How it stays correct when interrupted: the **shard plan** (which IDs go into which shard, in which
order) is a pure function of the CSVs and the settings, and is saved in ``.progress/settings.json``
with the settings. Each shard is written under a ``.tmp-`` name, renamed when complete, and then its
progress file (IDs written, skipped, notes) is saved. A rerun removes ``.tmp-*`` leftovers, keeps
every shard that has both its final file and its progress file, and redoes the rest, so a run
killed with ``kill -9`` and rerun ends byte-identical to an uninterrupted run.

Parallelism: worker threads (``convert_worker.start_threads``; the work is native code that releases
the GIL) read, decode, CLAHE, resize and encode images and return JPEG bytes; the main thread
consumes results strictly in plan order through a bounded window of in-flight tasks (memory stays
flat, and 1 or N workers write the same bytes), and writes shards with ``shard_writer.ShardWriter`` (the
kernel's test images use the same writer).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from ranzcr_tf import io_utils
from ranzcr_tf.config import PreprocessConfig, TaskConfig
from ranzcr_tf.labels import ID_COLUMN
from ranzcr_tf.locks import FolderLock
from ranzcr_tf.prep import records
from ranzcr_tf.prep.annotation_checks import check_annotations, parse_scale
from ranzcr_tf.prep.csv_checks import (
    ANNOTATIONS_CSV,
    TRAIN_CSV,
    read_annotations,
    read_test_ids,
    read_train_csv,
    scale_points,
)
from ranzcr_tf.prep.folds import assign_folds, fold_positives, folds_frame
from ranzcr_tf.prep.preprocess import BadImageError
from ranzcr_tf.prep.shard_plan import (
    PROGRESS_DIR,
    RECORD_OVERHEAD_BYTES,
    SETTINGS_FILE,
    check_resume,
    kill_hook,
    own_files,
    plan_shards,
    preprocess_settings,
    read_json,
    remove_stale,
    save_progress,
    sha256_file,
    slot_name,
    task_summary,
)
from ranzcr_tf.prep.shard_writer import ShardWriter, write_manifest
from ranzcr_tf.prep.workers import available_cores, ordered_map, process_image, start_threads
from ranzcr_tf.provenance import run_metadata

SIZE_SAMPLE = 8  # images preprocessed up front to estimate the stored bytes per image


@dataclass
class ConvertOptions:
    """Everything the converter needs; ``make_tfrecords.py`` fills it from flags and the config tree."""

    data_dir: str
    out_dir: str
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    num_folds: int = 5
    fold_seed: int = 42
    workers: int = 0  # 0 = every available core
    shard_mb: float = 150.0
    shard_records: int = 0  # > 0 overrides the size estimate (records per shard)
    include_test: bool = True
    limit: int = 0  # > 0: only the first N train rows and N test IDs (smoke runs)
    strict: bool = False
    overwrite: bool = False
    progress: bool = True
    task: TaskConfig = field(default_factory=TaskConfig)  # RANZCR, or a wide-CSV jpeg/png task (no annotations)
    annotations_scale: str = "1"  # "auto" or a factor applied to train_annotations.csv points (annotation_checks)

    @property
    def train_csv(self) -> str:
        return TRAIN_CSV if self.task.is_ranzcr else self.task.train_csv

    def image_path(self, split: str, sid: str) -> str:
        """The source image of ``sid``: RANZCR ``{split}/{id}.jpg``; another task its first train/test folder
        (``task.train_images`` / ``task.test_images``) and ``task.extension``."""
        if self.task.is_ranzcr:
            return os.path.join(self.data_dir, split, f"{sid}.jpg")
        folders = self.task.train_images if split == records.TRAIN_DIR else self.task.test_images
        return os.path.join(self.data_dir, folders[0], f"{sid}{self.task.extension}")

    def validate(self) -> None:
        self.preprocess.validate()
        if self.num_folds < 2:
            raise ValueError(f"--folds {self.num_folds}: need at least 2")
        if self.shard_mb <= 0 or self.shard_records < 0 or self.limit < 0 or self.workers < 0:
            raise ValueError("--shard-mb must be > 0 and --shard-records, --limit, --workers >= 0")
        parse_scale(self.annotations_scale)
        if io_utils.is_remote(self.data_dir):
            raise ValueError(f"--data-dir {self.data_dir}: source images must be on a local disk "
                             f"(copy them, e.g. with gsutil -m cp -r); --out-dir may be gs://")


# --------------------------------------------------------------------------------------------- planning
def _requested_settings(opts: ConvertOptions, test_ids: list[str]) -> dict:
    return {
        "schema_version": records.SCHEMA_VERSION,
        "preprocess": preprocess_settings(opts.preprocess),
        "num_folds": opts.num_folds,
        "fold_seed": opts.fold_seed,
        "shard_mb": opts.shard_mb,
        "shard_records": opts.shard_records,
        "include_test": opts.include_test,
        "limit": opts.limit,
        "inputs": {  # a changed table means a different plan: refuse to mix it with old shards
            "train_csv_sha256": sha256_file(os.path.join(opts.data_dir, opts.train_csv)),
            "annotations_sha256": sha256_file(os.path.join(opts.data_dir, ANNOTATIONS_CSV)),
            "test_ids_sha256": hashlib.sha256("\n".join(test_ids).encode()).hexdigest(),
        },
    } | ({} if opts.task.is_ranzcr else {"task": task_summary(opts.task)}) \
      | ({} if str(opts.annotations_scale) == "1" else {"annotations_scale": str(opts.annotations_scale)})


def _estimate_records_per_shard(opts: ConvertOptions, paths: list[str], pool) -> tuple[int, float, dict]:
    """Records per shard = shard_mb / (mean stored JPEG bytes of a few evenly spaced train images + overhead).

    The sample is fixed by the inputs (every len/SIZE_SAMPLE-th image) and the encoder is
    deterministic, so a rerun computes the same number; it is also saved with the settings. The
    sampled results are returned (by path) so the writing pass does not process them twice.
    """
    picks = sorted(set(np.linspace(0, len(paths) - 1, num=min(SIZE_SAMPLE, len(paths))).astype(int).tolist()))
    tasks = [(paths[i], opts.preprocess) for i in picks]
    sampled = dict(zip((t[0] for t in tasks), ordered_map(process_image, tasks, pool, len(tasks))))
    sizes = [len(r[1]) for r in sampled.values() if r[0] == "ok"]
    size = opts.preprocess.image_size
    per_image = float(np.mean(sizes)) if sizes else size * size * 0.25  # fallback: ~2 bits per pixel
    per_image += RECORD_OVERHEAD_BYTES
    return max(1, int(opts.shard_mb * 1e6 // per_image)), per_image, sampled


# -------------------------------------------------------------------------------------------- writing
def _write_shards(pending: list[dict], opts: ConvertOptions, lookup: dict, pool, window: int,
                  ready: dict) -> None:
    """Write every pending shard; results arrive in plan order whatever the number of workers."""
    from tqdm import tqdm

    size = opts.preprocess.image_size
    image_path = opts.image_path
    tasks = ((image_path(s["split"], sid), opts.preprocess) for s in pending for sid in s["ids"])
    results = ordered_map(process_image, tasks, pool, window, ready)
    bar = tqdm(total=sum(len(s["ids"]) for s in pending), unit="img", desc="converting", file=sys.stderr,
               disable=not opts.progress, smoothing=0.1)
    written = 0
    for shard in pending:
        split, fold = shard["split"], shard["fold"]
        state = {"ids_planned": shard["ids"], "shard": None, "ids": [], "skipped": [], "notes": [],
                 "settings_sha256": records.settings_hash(preprocess_settings(opts.preprocess))}
        try:
            with ShardWriter(opts.out_dir, split, fold, shard["index"]) as writer:
                for sid in shard["ids"]:
                    status, payload, info = next(results)
                    bar.update(1)
                    if status == "bad":
                        path = image_path(split, sid)
                        if opts.strict:
                            raise BadImageError(f"--strict: {split} image {path}: {payload}")
                        bar.write(f"skipped {split} image {path}: {payload}", file=sys.stderr)
                        state["skipped"].append({"split": split, "id": sid, "path": path, "reason": payload})
                        continue
                    annotations = []
                    if split == records.TRAIN_DIR:
                        annotations = [(label, scale_points(points, info["orig_height"], info["orig_width"], size))
                                       for label, points in lookup["annotations"].get(sid, ())]
                    writer.write(records.serialize_example(
                        payload, sid, target=lookup["targets"].get(sid), fold=-1 if fold is None else fold,
                        height=info["height"], width=info["width"], orig_height=info["orig_height"],
                        orig_width=info["orig_width"], annotations=annotations, num_classes=opts.task.num_classes))
                    state["ids"].append(sid)
                    if info.get("note"):
                        state["notes"].append({"split": split, "id": sid, "note": info["note"]})
                    written += 1
                    kill_hook(writer, written)
        except BaseException:
            bar.close()
            raise
        state["shard"] = writer.name  # None when every image of the shard was bad: no empty file
        save_progress(opts.out_dir, shard, state)
    bar.close()


def _finish(opts: ConvertOptions, plan: list[dict], states: dict, train_df, folds, saved: dict,
            annotation_summary: dict) -> dict:
    """folds.csv and manifest.json from the progress of every shard."""
    ordered = [states[slot_name(s)] for s in plan]
    written = {sid for st in ordered for sid in st["ids"]}
    task = opts.task
    good = train_df[task.id_column].isin(written).to_numpy()
    table = folds_frame(train_df[good], folds[good], task.id_column, task.group_column)
    io_utils.atomic_write_text(io_utils.join(opts.out_dir, records.FOLDS_CSV), table.to_csv(index=False))
    targets = train_df[list(task.labels)].to_numpy()[good]
    shards = {records.TRAIN_DIR: [], records.TEST_DIR: []}
    for shard, st in zip(plan, ordered):
        if st["shard"]:
            shards[shard["split"]].append(st["shard"])
    num_test = sum(len(st["ids"]) for s, st in zip(plan, ordered) if s["split"] == records.TEST_DIR)
    extra = {} if task.is_ranzcr else {"labels": task.labels, "image_channels": 1, "task": task_summary(task),
                                       "fold_grouping": task.group_column}
    manifest = write_manifest(
        opts.out_dir, preprocess=preprocess_settings(opts.preprocess), image_size=opts.preprocess.image_size,
        num_folds=opts.num_folds, num_train=int(good.sum()), num_test=num_test, shards=shards,
        skipped=[entry for st in ordered for entry in st["skipped"]],
        fold_seed=opts.fold_seed,
        fold_stratification=f"rarest positive label of the row (index into labels), {len(task.labels)} = no positive "
                            "label",
        fold_counts={str(k): int((folds[good] == k).sum()) for k in range(opts.num_folds)},
        fold_positives=fold_positives(targets, folds[good], opts.num_folds),
        records_per_shard=saved["records_per_shard"], bytes_per_image_estimate=saved["bytes_per_image_estimate"],
        notes=[entry for st in ordered for entry in st["notes"]],
        shard_settings={st["shard"]: st["settings_sha256"] for st in ordered if st["shard"] and st.get("settings_sha256")},
        source={"data_dir": os.path.abspath(opts.data_dir), "limit": opts.limit, **saved["inputs"]},
        annotations=annotation_summary, _meta=run_metadata(), **extra)
    return manifest


def _read_tables(opts: ConvertOptions):
    """train.csv, train_annotations.csv (checked against the images' sizes: ``annotation_checks``) and the test
    IDs, validated (ValueError naming column / line); returns them and the annotation check's summary."""
    task = opts.task
    train_csv = os.path.join(opts.data_dir, opts.train_csv)
    if not os.path.exists(train_csv):
        raise ValueError(f"{train_csv} not found: --data-dir must be the competition folder "
                         + ("(train.csv, train/, test/, train_annotations.csv)" if task.is_ranzcr else
                            f"({task.train_csv}, {task.train_images[0]}/, {task.test_images[0]}/)"))
    train_df = read_train_csv(train_csv, task)
    annotations_csv = os.path.join(opts.data_dir, ANNOTATIONS_CSV)
    annotations = (read_annotations(annotations_csv, train_df[ID_COLUMN])  # RANZCR only: other tasks have none
                   if task.is_ranzcr and os.path.exists(annotations_csv) else {})
    test_ids = read_test_ids(opts.data_dir, task) if opts.include_test else []
    if opts.limit:
        train_df, test_ids = train_df.head(opts.limit).reset_index(drop=True), test_ids[:opts.limit]
        kept = set(train_df[ID_COLUMN]) if task.is_ranzcr else set()
        annotations = {sid: lines for sid, lines in annotations.items() if sid in kept}
    annotations, summary = check_annotations(annotations, lambda sid: opts.image_path(records.TRAIN_DIR, sid),
                                             opts.annotations_scale, annotations_csv)
    if summary["scale"] != 1 or summary["points_clipped"]:
        print(f"annotations: points scaled by {summary['scale']:g}; {summary['points_clipped']} point(s) just outside "
              f"their image clipped to it (manifest.json: annotations)", file=sys.stderr)
    return train_df, annotations, test_ids, summary


def convert(opts: ConvertOptions) -> dict:
    """Validate the CSVs, assign folds, write (or resume) every shard, then folds.csv and manifest.json.

    Returns the manifest. CSV problems raise ``ValueError`` before any image is read; unreadable
    images are skipped and listed (``strict`` makes the first one fatal).
    """
    opts.validate()
    train_df, annotations, test_ids, annotation_summary = _read_tables(opts)
    # One converter per folder: a second one would mix settings and delete the first one's live shards.
    with FolderLock(opts.out_dir, "make_tfrecords.py"):
        return _convert_locked(opts, train_df, annotations, test_ids, annotation_summary)


def _convert_locked(opts: ConvertOptions, train_df, annotations, test_ids, annotation_summary: dict) -> dict:
    workers = opts.workers or available_cores()
    task = opts.task
    folds = assign_folds(train_df, opts.num_folds, opts.fold_seed, labels=task.labels, group_column=task.group_column)
    if opts.overwrite:
        for path in own_files(opts.out_dir):
            io_utils.remove(path)
    settings_path = io_utils.join(opts.out_dir, PROGRESS_DIR, SETTINGS_FILE)
    requested = _requested_settings(opts, test_ids)
    saved = read_json(settings_path)
    check_resume(opts.out_dir, saved, requested)

    with start_threads(workers) as pool:  # only after the CSV checks: no image is touched before they pass
        sampled: dict = {}
        if saved is None:
            if opts.shard_records:
                per_shard, per_image = opts.shard_records, None
            else:
                paths = [opts.image_path(records.TRAIN_DIR, i) for i in train_df[task.id_column]]
                per_shard, per_image, sampled = _estimate_records_per_shard(opts, paths, pool)
            saved = {**json.loads(json.dumps(requested)), "records_per_shard": per_shard,
                     "bytes_per_image_estimate": per_image}
            io_utils.atomic_write_json(settings_path, saved)
        plan = plan_shards(train_df, folds, test_ids, saved["records_per_shard"], opts.fold_seed, opts.num_folds,
                           task.id_column)
        states = remove_stale(opts.out_dir, plan)
        pending = [s for s in plan if slot_name(s) not in states]
        if len(pending) < len(plan):
            print(f"resuming: {len(plan) - len(pending)} of {len(plan)} shards already complete", file=sys.stderr)
        lookup = {"targets": dict(zip(train_df[task.id_column],
                                      train_df[list(task.labels)].to_numpy(np.float32).tolist())),
                  "annotations": annotations}
        _write_shards(pending, opts, lookup, pool, 4 * workers, sampled)
    states = remove_stale(opts.out_dir, plan)
    return _finish(opts, plan, states, train_df, folds, saved, annotation_summary)
