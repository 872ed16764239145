"""Fixtures for the converter tests: a tiny Kaggle-layout dataset and record readers.

The dataset comes from the shared generator (``ranzcr_tf.synth.generate.make_dataset``) when it is
available, otherwise from a small OpenCV drawing here, so these tests do not depend on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd

from ranzcr_tf.labels import ID_COLUMN, LABELS, PATIENT_COLUMN, SUBMISSION_COLUMNS
from ranzcr_tf.prep import records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def phantom(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = 50 + 140 * np.exp(-(((xx - width / 2) / (width * 0.35)) ** 2 + ((yy - height / 2) / (height * 0.4)) ** 2))
    image += 20 * np.sin(yy / max(4.0, height / 40))
    for _ in range(3):
        x0 = rng.uniform(0.2, 0.8) * width
        pts = np.stack([x0 + np.cumsum(rng.normal(0, 2, 20)), np.linspace(0.1, 0.9, 20) * height], 1)
        cv2.polylines(image, [pts.astype(np.int32)], False, 235, max(1, width // 150))
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_tiny_dataset(out_dir: str, n_train: int = 24, n_test: int = 6, seed: int = 0,
                      size_range: tuple[int, int] = (180, 320)) -> str:
    """Kaggle layout with small images (portrait and landscape), several studies per patient, annotations."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "train"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "test"), exist_ok=True)
    rows, annotations = [], []
    for i in range(n_train):
        study = f"1.2.826.0.1.{seed}.{i}"
        height, width = (int(v) for v in rng.integers(*size_range, size=2))
        cv2.imwrite(os.path.join(out_dir, "train", f"{study}.jpg"), phantom(rng, height, width),
                    [cv2.IMWRITE_JPEG_QUALITY, 92])
        labels = (rng.random(len(LABELS)) < 0.3).astype(int)
        rows.append({ID_COLUMN: study, **dict(zip(LABELS, labels)), PATIENT_COLUMN: f"pt{i // 2}"})
        for _ in range(int(rng.integers(0, 3))):
            points = [[int(rng.integers(0, width)), int(rng.integers(0, height))] for _ in range(int(rng.integers(2, 6)))]
            annotations.append({ID_COLUMN: study, "label": LABELS[int(rng.integers(0, len(LABELS)))],
                                "data": json.dumps(points)})
    pd.DataFrame(rows)[[ID_COLUMN, *LABELS, PATIENT_COLUMN]].to_csv(os.path.join(out_dir, "train.csv"), index=False)
    pd.DataFrame(annotations, columns=[ID_COLUMN, "label", "data"]).to_csv(
        os.path.join(out_dir, "train_annotations.csv"), index=False)
    test_ids = [f"1.2.826.0.2.{seed}.{i}" for i in range(n_test)]
    for study in test_ids:
        height, width = (int(v) for v in rng.integers(*size_range, size=2))
        cv2.imwrite(os.path.join(out_dir, "test", f"{study}.jpg"), phantom(rng, height, width))
    sub = pd.DataFrame({ID_COLUMN: test_ids, **{label: 0.5 for label in LABELS}})[list(SUBMISSION_COLUMNS)]
    sub.to_csv(os.path.join(out_dir, "sample_submission.csv"), index=False)
    return out_dir


def make_dataset(out_dir: str, n_train: int = 24, n_test: int = 6, seed: int = 0) -> str:
    """The shared synthetic generator at a small scale when present, else :func:`make_tiny_dataset`."""
    try:
        from ranzcr_tf.synth import generate as synthetic
    except ImportError:
        synthetic = None
    if getattr(synthetic, "make_dataset", None) is None:
        return make_tiny_dataset(out_dir, n_train, n_test, seed)
    synthetic.make_dataset(out_dir, n_train, n_test, seed=seed, workers=0, scale=0.12)
    return out_dir


def read_records(tfrecords_dir: str, split: str) -> list[dict]:
    """Every record of a split, eagerly parsed (numpy values), in shard order."""
    import tensorflow as tf

    out = []
    for path in records.list_shards(tfrecords_dir, split):
        for raw in tf.data.TFRecordDataset(path):
            parsed = records.parse_example(raw, with_annotations=True)
            item = {k: v.numpy() for k, v in parsed.items()}
            item[ID_COLUMN] = item[ID_COLUMN].decode()
            item["shard"] = os.path.basename(path)
            item["annotations"] = records.annotations_from_parsed(parsed)
            out.append(item)
    return out


def mismatched_targets(targets_by_id: dict[str, np.ndarray], train_df: pd.DataFrame) -> list[str]:
    """IDs whose record targets differ from their train.csv row (checked per ID, never by position)."""
    table = train_df.set_index(ID_COLUMN)[list(LABELS)]
    bad = []
    for study, target in targets_by_id.items():
        if study not in table.index or not np.array_equal(np.asarray(target, np.float32),
                                                          table.loc[study].to_numpy(np.float32)):
            bad.append(study)
    return bad


def shard_bytes(tfrecords_dir: str) -> dict[str, bytes]:
    """``{'train/fold0-000-3.tfrec': bytes, ...}`` for comparing two conversions byte for byte."""
    out = {}
    for split in (records.TRAIN_DIR, records.TEST_DIR):
        for path in records.list_shards(tfrecords_dir, split):
            with open(path, "rb") as fh:
                out[f"{split}/{os.path.basename(path)}"] = fh.read()
    return out


def run_cli(args: list[str], env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python make_tfrecords.py ARGS`` in a subprocess (real process: real SIGKILL, real worker threads)."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(REPO, "make_tfrecords.py"), *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def load_cli_module():
    """``make_tfrecords.py`` (repo root) as a module, whatever the current directory."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tfrecords", os.path.join(REPO, "make_tfrecords.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hard_records(root: str, image_size: int, env: dict) -> dict[str, str]:
    """48 train / 6 test hard-style phantoms (30 % annotated) under ``root/data``, converted at ``image_size``
    into ``root/records`` (3 folds): the dataset of the line-mask recipe tests."""
    raw, rec = os.path.join(root, "data"), os.path.join(root, "records")
    made = subprocess.run([sys.executable, "-m", "ranzcr_tf.synth.generate", "--style", "hard", "--out-dir", raw,
                           "--n-train", "48", "--n-test", "6", "--seed", "0"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert made.returncode == 0, made.stderr[-2000:]
    converted = run_cli(["--data-dir", raw, "--out-dir", rec, "--image-size", str(image_size), "--folds", "3",
                         "--workers", "1", "--no-progress"])
    assert converted.returncode == 0, converted.stderr[-2000:]
    return {"raw": raw, "records": rec}
