"""The converters' shard plan and resume state (which IDs go where; what an earlier run finished).

The plan is a pure function of the tables and the settings, so a rerun after a crash rebuilds the
same plan, keeps the shards whose final file *and* progress file exist, and redoes the others. Both
converters (JPEG/PNG: ``convert.py``; DICOM: ``convert_dicom.py``) plan and resume through this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal

import numpy as np

from ranzcr_tf import io_utils
from ranzcr_tf.config import PreprocessConfig
from ranzcr_tf.labels import ID_COLUMN
from ranzcr_tf.prep import records

PROGRESS_DIR = ".progress"
SETTINGS_FILE = "settings.json"
KILL_HOOK_ENV = "RANZCR_CONVERT_KILL_AFTER"  # tests: SIGKILL this process after N records (mid-shard)
RECORD_OVERHEAD_BYTES = 600  # ID, targets, sizes, typical annotations and TFRecord framing per record


def kill_hook(writer, written: int) -> None:
    """Test hook: with ``KILL_HOOK_ENV=N``, a real SIGKILL of this process right after its N-th record."""
    limit = int(os.environ.get(KILL_HOOK_ENV, "0") or 0)
    if limit and written >= limit:
        writer.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def task_summary(task) -> dict:
    """The manifest's (and the resume settings') ``task`` block: what the records were made for."""
    return {"name": task.name, "reader": task.reader, "labels": list(task.labels), "windows": task.windows,
            "slice_context": task.slice_context, "id_column": task.id_column, "group_column": task.group_column}


def save_progress(out_dir: str, shard: dict, state: dict) -> None:
    """A finished shard's progress file (its IDs planned and written, what was skipped): the resume state."""
    io_utils.atomic_write_json(io_utils.join(out_dir, PROGRESS_DIR, slot_name(shard) + ".json"), state)


def sha256_file(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def preprocess_settings(settings: PreprocessConfig) -> dict:
    """The manifest's ``preprocess`` block: every PreprocessConfig field plus the decoders used."""
    return {**dataclasses.asdict(settings), "decoder": records.SOURCE_DECODER, "stored_dct_method": records.DCT_METHOD}


def plan_shards(train_df, folds: np.ndarray, test_ids: list[str], per_shard: int, seed: int, num_folds: int,
                id_column: str = ID_COLUMN) -> list[dict]:
    """Shards in writing order: each ``{'split', 'fold', 'index', 'ids'}``. Within a fold the rows are
    shuffled with ``(seed, fold)`` so every shard is a random sample of its fold."""
    shards = []
    ids = train_df[id_column].to_numpy()
    for fold in range(num_folds):
        members = ids[folds == fold]
        members = members[np.random.default_rng([seed, fold]).permutation(len(members))]
        for index, start in enumerate(range(0, len(members), per_shard)):
            shards.append({"split": records.TRAIN_DIR, "fold": fold, "index": index,
                           "ids": [str(x) for x in members[start:start + per_shard]]})
    for index, start in enumerate(range(0, len(test_ids), per_shard)):
        shards.append({"split": records.TEST_DIR, "fold": None, "index": index,
                       "ids": list(test_ids[start:start + per_shard])})
    return shards


def slot_name(shard: dict) -> str:
    prefix = "test" if shard["fold"] is None else f"fold{shard['fold']}"
    return f"{shard['split']}-{prefix}-{shard['index']:03d}"


# ----------------------------------------------------------------------------------------- resume state
def read_json(path: str):
    return json.loads(io_utils.read_text(path)) if io_utils.exists(path) else None


def _differences(saved, requested, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(requested, dict):
        out = []
        for key in sorted(set(saved) | set(requested)):
            out += _differences(saved.get(key), requested.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == requested else [f"{prefix[:-1]}: existing {saved!r}, requested {requested!r}"]


def own_files(out_dir: str) -> list[str]:
    """Files this converter writes in ``out_dir`` (and only those: --overwrite never touches others)."""
    found = [io_utils.join(out_dir, name) for name in (records.MANIFEST, records.FOLDS_CSV)
             if io_utils.exists(io_utils.join(out_dir, name))]
    if io_utils.exists(out_dir):
        found += [io_utils.join(out_dir, n) for n in io_utils.listdir(out_dir) if n.startswith(".tmp-")]
    for sub in (records.TRAIN_DIR, records.TEST_DIR, PROGRESS_DIR):
        folder = io_utils.join(out_dir, sub)
        if io_utils.exists(folder):
            found += [io_utils.join(folder, n) for n in io_utils.listdir(folder)
                      if records.parse_shard_name(n) or n.startswith(".tmp-") or (sub == PROGRESS_DIR and n.endswith(".json"))]
    return found


def check_resume(out_dir: str, saved: dict | None, requested: dict) -> None:
    """Refuse to mix shards made with other settings or inputs; say how to proceed."""
    hint = "rerun with --overwrite to start over, or choose another --out-dir"
    if saved is None:
        leftovers = [p for p in own_files(out_dir) if not os.path.basename(p).startswith(".tmp-")]
        if leftovers:
            raise ValueError(f"{out_dir} already holds converted records without resume state "
                             f"({os.path.basename(leftovers[0])}, ...): {hint}")
        return
    saved_request = {k: v for k, v in saved.items() if k in requested}
    diffs = _differences(saved_request, json.loads(json.dumps(requested)))
    if diffs:
        raise ValueError(f"{out_dir} holds records converted with different settings or inputs "
                         f"({'; '.join(diffs[:4])}): {hint}")


def remove_stale(out_dir: str, plan: list[dict]) -> dict[str, dict]:
    """Delete ``.tmp-*`` leftovers and unfinished shards; return the progress of complete shards by slot."""
    complete: dict[str, dict] = {}
    keep = set()
    for shard in plan:
        state = read_json(io_utils.join(out_dir, PROGRESS_DIR, slot_name(shard) + ".json"))
        if state is None or state.get("ids_planned") != shard["ids"]:
            continue
        if state["shard"] is None or io_utils.exists(io_utils.join(out_dir, state["shard"])):
            complete[slot_name(shard)] = state
            if state["shard"]:
                keep.add(os.path.basename(state["shard"]))
    for path in own_files(out_dir):
        name = os.path.basename(path)
        if name.startswith(".tmp-") or (records.parse_shard_name(name) and name not in keep):
            io_utils.remove(path)
    return complete
