"""Tiny, learnable RANZCR-layout records for the training tests (no converter needed).

Each study's image is dim noise with one bright bar per positive label, at a row that depends on the
label, so a small CNN learns something within an epoch or two.
"""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pandas as pd

from ranzcr_tf.labels import ID_COLUMN, LABELS, NUM_CLASSES, PATIENT_COLUMN
from ranzcr_tf.prep import records

# Positive rates high enough that every class has both labels in every fold of a few dozen studies.
RATES = np.array([0.3, 0.3, 0.4, 0.3, 0.3, 0.3, 0.4, 0.3, 0.4, 0.6, 0.3])


def _image(rng, target, size):
    image = rng.normal(40, 12, (size, size)).clip(0, 255)
    band = size / (NUM_CLASSES + 1)
    for c in np.flatnonzero(target):
        top = int((c + 0.5) * band)
        image[top:top + max(2, int(band * 0.6)), size // 6: size - size // 6] = 220
    return image.astype(np.uint8)


def write_tiny_records(root: str, *, num_folds: int = 3, per_fold: int = 24, size: int = 32, shards_per_fold: int = 1,
                       seed: int = 0) -> pd.DataFrame:
    """Write ``root/train/fold{k}-*.tfrec``, ``manifest.json`` and ``train.csv``; returns the train table."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, records.TRAIN_DIR), exist_ok=True)
    rows, counts, positives = [], {}, {}
    for fold in range(num_folds):
        targets = (rng.random((per_fold, NUM_CLASSES)) < RATES).astype(np.float32)
        targets[0], targets[1] = 1, 0  # both classes present in every fold
        ids = [f"1.2.826.{seed}.{fold}.{i}" for i in range(per_fold)]
        for shard, chunk in enumerate(np.array_split(np.arange(per_fold), shards_per_fold)):
            path = os.path.join(root, records.TRAIN_DIR, records.shard_name(fold, shard, len(chunk)))
            import tensorflow as tf

            with tf.io.TFRecordWriter(path) as writer:
                for i in chunk:
                    ok, jpeg = cv2.imencode(".jpg", _image(rng, targets[i], size), [cv2.IMWRITE_JPEG_QUALITY, 95])
                    writer.write(records.serialize_example(jpeg.tobytes(), ids[i], target=targets[i], fold=fold,
                                                           height=size, width=size, orig_height=size, orig_width=size))
        for i in range(per_fold):
            rows.append({ID_COLUMN: ids[i], **{label: int(targets[i, c]) for c, label in enumerate(LABELS)},
                         PATIENT_COLUMN: f"p{fold}_{i}"})
        counts[str(fold)] = per_fold
        positives[str(fold)] = targets.sum(axis=0).astype(int).tolist()
    manifest = {"schema_version": records.SCHEMA_VERSION, "image_size": size, "num_folds": num_folds,
                "fold_counts": counts, "fold_positives": positives,
                "preprocess": {"image_size": size, "clahe_clip_limit": 2.0, "clahe_tile_grid": 8,
                               "interpolation": "linear", "jpeg_quality": 95, "reduced_decode": True,
                               "decoder": records.SOURCE_DECODER, "stored_dct_method": records.DCT_METHOD}}
    with open(os.path.join(root, records.MANIFEST), "w") as fh:
        json.dump(manifest, fh)
    table = pd.DataFrame(rows)
    table.to_csv(os.path.join(root, "train.csv"), index=False)
    # The converter's folds.csv beside the shards (train.soft_labels reads the studies per fold from it).
    folds = [int(sid.split(".")[-2]) for sid in table[ID_COLUMN]]
    table[[ID_COLUMN, PATIENT_COLUMN]].assign(fold=folds).to_csv(os.path.join(root, records.FOLDS_CSV), index=False)
    return table


TINY_SETTINGS = [
    "model.backbone=compact_cnn", "model.weights=none", "model.mixed_precision=float32", "model.dropout_rate=0.0",
    "train.batch_size=8", "train.learning_rate=0.003", "train.warmup_epochs=0", "train.seed=1",
    "infer.batch_size=16", "data.shuffle_buffer=64", "loss.name=bce",
]


def load_train_tpu():
    """``train_tpu.py`` (repo root) as a module, for in-process runs of its ``main``."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("train_tpu", os.path.join(root, "train_tpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_settings(*extra) -> list[str]:
    """``--set`` arguments: ``TINY_SETTINGS`` then ``extra``."""
    return [a for s in (*TINY_SETTINGS, *extra) for a in ("--set", s)]
