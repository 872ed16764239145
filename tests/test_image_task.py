"""A wide-CSV multi-label PNG task (not RANZCR) end to end on a tiny drawn set: make_tfrecords.py ->
train_tpu.py --fold 0 -> kaggle_kernel.py, as subprocesses; folds grouped by the task's group column; a CSV
without a label column is a one-line error."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ["circle", "square", "bar"]
SIZE = 64


def _draw(rng: np.random.Generator, target) -> np.ndarray:
    image = rng.integers(0, 40, (SIZE, SIZE), dtype=np.uint8)
    if target[0]:
        cv2.circle(image, (int(rng.integers(16, 48)), int(rng.integers(16, 48))), 8, 220, -1)
    if target[1]:
        x, y = (int(v) for v in rng.integers(4, 40, 2))
        cv2.rectangle(image, (x, y), (x + 14, y + 14), 180, -1)
    if target[2]:
        x = int(rng.integers(4, 58))
        cv2.line(image, (x, 2), (x, 61), 255, 3)
    return image


def _dataset(folder: str) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "images"))
    os.makedirs(os.path.join(folder, "holdout"))
    rows = []
    for i in range(48):
        target = rng.integers(0, 2, 3)
        cv2.imwrite(os.path.join(folder, "images", f"img{i:03d}.png"), _draw(rng, target))
        rows.append({"image": f"img{i:03d}", "patient": f"p{i // 4}", "site": "a", **dict(zip(LABELS, target))})
    pd.DataFrame(rows).to_csv(os.path.join(folder, "labels.csv"), index=False)
    test_ids = [f"t{i:02d}" for i in range(8)][::-1]  # the sample's order, not sorted
    for sid in test_ids:
        cv2.imwrite(os.path.join(folder, "holdout", f"{sid}.png"), _draw(rng, rng.integers(0, 2, 3)))
    pd.DataFrame({"image": test_ids, **{label: 0.5 for label in LABELS}}).to_csv(
        os.path.join(folder, "sample.csv"), index=False)


def _config(path: str) -> str:
    with open(os.path.join(ROOT, "configs", "cpu_demo.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    cfg["task"] = {"name": "shapes", "labels": LABELS, "groups": {}, "id_column": "image", "group_column": "patient",
                   "csv_layout": "wide", "train_csv": "labels.csv", "train_images": ["images"],
                   "test_images": ["holdout"], "extension": ".png", "sample_submission": "sample.csv",
                   "reader": "png", "metric": "mean_auc", "submission_layout": "wide"}
    cfg["preprocess"]["image_size"] = 32
    cfg["data"]["folds"] = 3
    cfg["train"].update(epochs=2, batch_size=8, steps_per_epoch=2, warmup_epochs=0)
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "--quiet"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    data = str(root / "data")
    _dataset(data)
    return data, _config(str(root / "shapes.yaml"))


def test_png_task_convert_train_submit(shapes, tmp_path):
    from ranzcr_tf.prep import records

    data, config = shapes
    records_dir, run_dir, out = str(tmp_path / "records"), str(tmp_path / "run"), str(tmp_path / "submission.csv")
    done = _run("make_tfrecords.py", "--config", config, "--data-dir", data, "--out-dir", records_dir,
                "--shard-records", "16")
    assert done.returncode == 0, done.stderr
    manifest = records.read_manifest(records_dir)
    assert manifest["labels"] == LABELS and manifest["num_train"] == 48 and manifest["num_test"] == 8
    assert manifest["task"]["name"] == "shapes" and manifest["fold_grouping"] == "patient"
    folds = pd.read_csv(os.path.join(records_dir, "folds.csv"))
    assert list(folds.columns) == ["image", "patient", "fold"] and len(folds) == 48
    assert folds.groupby("patient")["fold"].nunique().max() == 1 and folds["fold"].nunique() == 3

    done = _run("train_tpu.py", "--config", config, "--fold", "0", "--tfrecords", records_dir, "--out-dir", run_dir)
    assert done.returncode == 0, done.stderr
    oof = pd.read_csv(os.path.join(run_dir, "fold0", "oof.csv"))
    assert list(oof.columns[:2]) == ["image", "fold"] and [f"target_{x}" in oof.columns for x in LABELS] == [True] * 3

    # Raw test PNGs from the task's test folder (no --tfrecords): the kernel's own preprocessing path.
    done = _run("kaggle_kernel.py", "--data-dir", data, "--models", run_dir, "--out", out)
    assert done.returncode == 0, done.stderr
    sample, written = pd.read_csv(os.path.join(data, "sample.csv")), pd.read_csv(out)
    assert list(written.columns) == ["image", *LABELS]
    assert written["image"].tolist() == sample["image"].tolist()
    values = written[LABELS].to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
    assert written[LABELS].nunique().max() > 1  # predicted per image, not a constant fill

    # The converted test records give the same rows.
    done = _run("kaggle_kernel.py", "--data-dir", data, "--tfrecords", records_dir, "--models", run_dir,
                "--out", str(tmp_path / "from_records.csv"))
    assert done.returncode == 0, done.stderr
    from_records = pd.read_csv(tmp_path / "from_records.csv")
    assert from_records["image"].tolist() == sample["image"].tolist()
    np.testing.assert_allclose(from_records[LABELS].to_numpy(), values, atol=1e-4)


def test_a_csv_without_a_label_or_group_column_is_one_line(shapes, tmp_path):
    data, config = shapes
    table = pd.read_csv(os.path.join(data, "labels.csv"))
    for column in ("square", "patient"):
        broken = tmp_path / f"no_{column}"  # the CSV is checked before any image is read: the table alone
        os.makedirs(broken)
        table.drop(columns=[column]).to_csv(broken / "labels.csv", index=False)
        done = _run("make_tfrecords.py", "--config", config, "--data-dir", str(broken), "--out-dir",
                    str(tmp_path / column))
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and f"missing column {column!r}" in lines[0] and "labels.csv" in lines[0], done.stderr
        assert not os.path.exists(tmp_path / column / "manifest.json")
