"""A run folder's identity: the records and the settings its checkpoint was trained with.

``fold{k}/identity.json`` is written when a fold starts; a resume compares the current run with it and
refuses to continue a checkpoint with other records or settings (it would otherwise resume silently and
``config.yaml`` would then record values the checkpoint was not trained with).

Settings that MAY change on resume (they do not shape the weights or the optimizer state):

- ``infer.*`` (validation batch size, TTA), ``data.cache``, ``data.image_dtype`` (the pixels are the same
  integers in every dtype), ``data.tfrecords`` and ``data.data_dir`` (paths: the records themselves are
  compared by their manifest hash and shard bytes);
- ``train.strategy``, ``train.steps_per_execution``, ``train.jit_compile`` and ``distribute.*`` (placement
  and speed, and each host's own process number; the global batch and steps per epoch they lead to are
  compared);
- ``train.early_stopping_patience`` and ``train.max_minutes`` (when to stop, not what was learned);
- ``train.epochs`` only with ``train.schedule`` constant or plateau: cosine and exponential spread their
  curve over the epochs, so a changed count changes the learning rate the checkpoint continues with.

Everything else (``model.*``, ``preprocess.*``, ``loss.*``, ``augment.*``, the optimizer, schedule and
batch settings, seeds) must match.
"""

from __future__ import annotations

import hashlib
import json
import os

import yaml

from ranzcr_tf import io_utils, runs
from ranzcr_tf.config import Config
from ranzcr_tf.prep import records

IDENTITY_FILE = runs.IDENTITY_FILE
MAY_CHANGE = ("infer.", "data.cache", "data.image_dtype", "data.tfrecords", "data.data_dir", "train.strategy",
              "train.steps_per_execution", "train.jit_compile", "train.early_stopping_patience",
              "train.max_minutes", "distribute.")
EPOCHS_FREE_SCHEDULES = ("constant", "plateau")
# What a fold folder holds once training has made progress (identity.json alone is not progress).
PROGRESS_FILES = (runs.MODEL_FILE, runs.STATE_FILE, runs.BACKUP_DIR)


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def shaping_settings(values: dict) -> dict:
    """The dotted settings of a config dict that a checkpoint depends on (all but ``MAY_CHANGE``)."""
    flat = _flatten({k: v for k, v in values.items() if k != "_meta"})
    return {key: value for key, value in flat.items() if not key.startswith(MAY_CHANGE)}


def records_fingerprint(tfrecords_dir: str, manifest: dict) -> dict:
    """The manifest's hash (without its ``_meta`` timestamps) and the training shards' total bytes."""
    canonical = json.dumps({k: v for k, v in manifest.items() if k != "_meta"}, sort_keys=True, default=str)
    shards = records.list_shards(tfrecords_dir, records.TRAIN_DIR)
    if io_utils.is_remote(tfrecords_dir):
        import tensorflow as tf

        size = sum(tf.io.gfile.stat(path).length for path in shards)
    else:
        size = sum(os.path.getsize(path) for path in shards)
    return {"manifest_sha256": hashlib.sha256(canonical.encode()).hexdigest(), "train_shard_bytes": int(size)}


def run_identity(cfg: Config, tfrecords_dir: str, manifest: dict, derived: dict) -> dict:
    """What ``identity.json`` holds: records fingerprint, shaping settings, derived sizes (global batch ...)."""
    return {"records": records_fingerprint(tfrecords_dir, manifest), "settings": shaping_settings(cfg.to_dict()),
            "derived": dict(derived)}


def has_progress(fold_dir: str) -> bool:
    return any(io_utils.exists(io_utils.join(fold_dir, name)) for name in PROGRESS_FILES)


def _differences(saved: dict, current: dict, schedule: str) -> list[str]:
    changed = []
    for key in sorted(set(saved) & set(current)):
        if key == "train.epochs" and schedule in EPOCHS_FREE_SCHEDULES:
            continue
        if saved[key] != current[key]:
            changed.append(f"{key} {saved[key]!r} -> {current[key]!r}")
    return changed


def check_resumable(fold_dir: str, current: dict, fold: int) -> str | None:
    """``ValueError`` (one line, offering --restart) if the fold folder's checkpoint was trained with other
    records or settings than ``current`` (a ``run_identity``); returns a note when it cannot tell."""
    path = io_utils.join(fold_dir, IDENTITY_FILE)
    schedule = current["settings"].get("train.schedule")
    note = None
    if io_utils.exists(path):
        saved = json.loads(io_utils.read_text(path))
        changed = _differences(saved.get("settings", {}), current["settings"], schedule)
        changed += _differences(saved.get("derived", {}), current["derived"], schedule)
        if saved.get("records") != current["records"]:
            changed.insert(0, f"records (manifest hash {saved.get('records', {}).get('manifest_sha256', '?')[:12]} -> "
                              f"{current['records']['manifest_sha256'][:12]}, shard bytes "
                              f"{saved.get('records', {}).get('train_shard_bytes')} -> "
                              f"{current['records']['train_shard_bytes']})")
    else:  # a run folder from before identity.json: compare what config.yaml recorded
        config_path = io_utils.join(fold_dir, runs.CONFIG_FILE)
        if not io_utils.exists(config_path):
            return f"note: cannot verify that {fold_dir} was trained with these records and settings (no {IDENTITY_FILE})"
        saved_settings = shaping_settings(yaml.safe_load(io_utils.read_text(config_path)) or {})
        changed = _differences(saved_settings, current["settings"], schedule)
        note = f"note: {fold_dir} has no {IDENTITY_FILE}: its settings were checked, its records could not be"
    if changed:
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise ValueError(f"fold {fold} in {fold_dir} was trained with other records or settings than this run "
                         f"({shown}): rerun with the original ones to resume, pass --restart to discard fold "
                         f"{fold}'s checkpoint and train it anew, or choose a new --out-dir")
    return note


def write_identity(fold_dir: str, identity: dict) -> None:
    io_utils.atomic_write_json(io_utils.join(fold_dir, IDENTITY_FILE), identity)
