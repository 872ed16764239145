"""Converted test records checked against what they claim, before the kernel predicts anything.

    check = check_test_records("tfrecords", sample_ids, data_dir="competition")   # ValueError when unusable
    check.unreadable     # {id: reason} the converter skipped as unreadable (rows get column means, named)
    check.fallback_ids   # IDs missing from the records whose raw JPEGs exist in data_dir/test

What is checked: every test shard's record count against its file name (a truncated or replaced shard),
the shards the manifest lists against those on disk (a deleted shard), the manifest's test count, and
the records' IDs against ``sample_submission.csv``. IDs in the sample but not in the records are an
error naming them and the missing shards, unless the converter listed them as unreadable (their rows
get column means, as documented) or their raw JPEGs are in ``--data-dir/test``: then those images are
preprocessed with the run's own preprocessing and predicted with the rest (:func:`complete_records`).
Records of IDs the sample does not list (records from another dataset) are an error too.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from ranzcr_tf.prep import records

SHOWN = 3  # IDs named in a message (then the count)


def describe_ids(ids) -> str:
    ids = list(ids)
    more = f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else ""
    return f"{len(ids)} ID(s): {', '.join(ids[:SHOWN])}{more}"


def read_test_shards(tfrecords: str) -> dict[str, list[str]]:
    """``{shard path: its IDs}``, each shard's count checked against its name."""
    from ranzcr_tf.pipeline.data import read_shard_ids  # imports TensorFlow: only when shards are read

    shards = {}
    for path in records.list_shards(tfrecords, records.TEST_DIR):
        ids = read_shard_ids(path)
        named = records.parse_shard_name(path)["count"]
        if len(ids) != named:
            raise ValueError(f"{path} holds {len(ids)} records but its name says {named}: the shard was truncated "
                             f"or replaced; re-run the converter on {tfrecords}")
        shards[path] = ids
    return shards


@dataclass
class RecordsCheck:
    ids: list = field(default_factory=list)  # record IDs in shard order
    unreadable: dict = field(default_factory=dict)  # id -> why the converter skipped it
    fallback_ids: list = field(default_factory=list)  # missing from the records; raw JPEGs present


def check_test_records(tfrecords: str, sample_ids: list[str] | None, data_dir: str | None,
                       image_dir: str = records.TEST_DIR, extension: str = ".jpg") -> RecordsCheck:
    """Check ``tfrecords``' test split (see the module docstring); ``sample_ids`` None checks the shards only.
    Raw images are ``data_dir/{image_dir}/{id}{extension}`` (another task: its test folder and extension)."""
    manifest = records.read_manifest(tfrecords)
    shards = read_test_shards(tfrecords)
    if not shards:
        raise ValueError(f"no test shards in {tfrecords}/test: convert the test images first (make_tfrecords.py)")
    listed = [os.path.join(tfrecords, name) for name in (manifest.get("shards") or {}).get(records.TEST_DIR, [])]
    absent = [os.path.basename(p) for p in listed if not os.path.exists(p)]
    ids = [sid for shard_ids in shards.values() for sid in shard_ids]
    claimed = records.manifest_num_test(manifest)
    result = RecordsCheck(ids=ids, unreadable={entry["id"]: entry.get("reason", "unreadable")
                                               for entry in manifest.get("skipped", [])
                                               if entry.get("split", records.TEST_DIR) == records.TEST_DIR})
    seen, twice = set(), []
    for sid in ids:
        if sid in seen:
            twice.append(sid)
        seen.add(sid)
    if twice:
        where = sorted(os.path.basename(p) for p, shard_ids in shards.items() if set(shard_ids) & set(twice))
        raise ValueError(f"{tfrecords}/test holds {describe_ids(twice)} more than once (in {', '.join(where)}): "
                         f"a shard was copied twice or two conversions were mixed; re-run the converter on this folder")
    if sample_ids is None:
        if absent or (claimed is not None and claimed != len(ids)):
            raise ValueError(f"{tfrecords}: the manifest lists {claimed} test records in {len(listed)} shard(s) but "
                             f"{len(ids)} are on disk (missing: {', '.join(absent) or 'none'}); re-run the converter")
        return result
    wanted, present = set(sample_ids), set(ids)
    extra = [sid for sid in ids if sid not in wanted]
    missing = [sid for sid in sample_ids if sid not in present and sid not in result.unreadable]
    if not missing and not extra:
        return result
    shard_note = (f"; shard(s) listed in its manifest but absent: {', '.join(absent)}" if absent else "")
    jpeg = (lambda sid: os.path.join(data_dir, image_dir, f"{sid}{extension}")) if data_dir else None
    without_jpeg = [sid for sid in missing if jpeg is None or not os.path.exists(jpeg(sid))]
    if not without_jpeg and missing:
        result.fallback_ids = missing
        return result  # extras (if any) are ignored: rows follow the sample, and every sample ID is covered
    problems = []
    if missing:
        problems.append(f"{describe_ids(missing)} of sample_submission.csv are not in the test records "
                        f"({tfrecords}/test{shard_note})")
    if extra:
        where = sorted({os.path.basename(p) for p, shard_ids in shards.items() if set(shard_ids) & set(extra)})
        problems.append(f"the records hold {describe_ids(extra)} that sample_submission.csv does not list "
                        f"(in {', '.join(where[:SHOWN])}{' ...' if len(where) > SHOWN else ''}): converted "
                        f"from another dataset?")
    raise ValueError("; ".join(problems) + ". Re-run the converter on this competition folder, or pass --data-dir "
                     "with the raw test/ images (their missing IDs are then preprocessed with each run's settings)")


def complete_records(tfrecords: str, data_dir: str, ids: list[str], settings, work_dir: str, *,
                     workers: int = 0, progress: bool = True, expired=None, image_dir: str = records.TEST_DIR,
                     extension: str = ".jpg") -> tuple[str, list[dict]]:
    """A records folder in ``work_dir``: ``tfrecords``' test shards (linked) plus one shard of ``ids``
    preprocessed from ``data_dir/test`` with ``settings`` (the records' own, equal to the run's)."""
    from ranzcr_tf.prep.testimages import preprocess_test_images

    folder = os.path.join(work_dir, records.TEST_DIR)
    os.makedirs(folder, exist_ok=True)
    existing = records.list_shards(tfrecords, records.TEST_DIR)
    for path in existing:
        target = os.path.join(folder, os.path.basename(path))
        try:
            os.symlink(os.path.abspath(path), target)
        except OSError:  # a file system without links
            shutil.copy2(path, target)
    next_index = 1 + max(records.parse_shard_name(p)["index"] for p in existing)
    _, skipped = preprocess_test_images(data_dir, ids, settings, work_dir, workers=workers, progress=progress,
                                        expired=expired, shard_index=next_index, image_dir=image_dir,
                                        extension=extension)
    return work_dir, skipped
