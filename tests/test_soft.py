"""Soft training targets (train.soft_labels / train.soft_alpha): the loss, the tf.data lookup, the checks."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers_train import TINY_SETTINGS, write_tiny_records

from ranzcr_tf.config import load_config
from ranzcr_tf.labels import ID_COLUMN, LABELS
from ranzcr_tf.model.losses import WeightedBinaryCrossentropy
from ranzcr_tf.pipeline.soft import SoftLabels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("from_logits", [True, False])
def test_weighted_bce_on_soft_targets_equals_the_hand_formula(from_logits):
    rng = np.random.default_rng(0)
    soft = rng.random((5, 11)).astype(np.float32)
    logits = rng.normal(0, 2, (5, 11)).astype(np.float32)
    weights = rng.uniform(0.5, 4, 11)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    per_class = -(weights * soft * np.log(p) + (1 - soft) * np.log(1 - p))
    loss = WeightedBinaryCrossentropy(weights, from_logits=from_logits)
    got = float(loss(soft, logits if from_logits else p.astype(np.float32)))
    assert got == pytest.approx(per_class.mean(), rel=1e-5)
    # Not the loss of the rounded (hard) targets: soft targets really reach the formula.
    assert abs(float(loss(np.round(soft), logits if from_logits else p.astype(np.float32))) - got) > 1e-2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("soft")
    table = write_tiny_records(str(root / "records"), num_folds=3, per_fold=8, size=32)
    rng = np.random.default_rng(1)
    soft = pd.DataFrame(rng.random((len(table), 11)).round(6), columns=list(LABELS))
    soft.insert(0, ID_COLUMN, table[ID_COLUMN])
    soft["source"] = "test"
    path = root / "soft.csv"
    soft.to_csv(path, index=False)
    return {"records": str(root / "records"), "table": table, "soft": soft, "path": str(path), "root": root}


def _targets_of_training_stream(tiny, alpha, batches=6):
    from ranzcr_tf.pipeline.data import build_train_dataset

    cfg = load_config(None, [*TINY_SETTINGS, f"train.soft_labels={tiny['path']}", f"train.soft_alpha={alpha}"])
    ds = build_train_dataset(cfg, tiny["records"], fold=0, global_batch_size=4, seed=3, augment=False,
                             deterministic=True)
    return np.concatenate([targets.numpy() for _, targets in ds.take(batches)])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_training_targets_are_alpha_soft_plus_one_minus_alpha_hard(tiny, alpha):
    table, soft = tiny["table"], tiny["soft"]
    hard = table[list(LABELS)].to_numpy(np.float64)
    expected = alpha * soft[list(LABELS)].to_numpy(np.float64) + (1 - alpha) * hard
    fold = np.array([int(s.split(".")[-2]) for s in table[ID_COLUMN]])
    got = _targets_of_training_stream(tiny, alpha)
    training = np.flatnonzero(fold != 0)  # fold 0 validates: its studies never enter the training stream
    for row in got:  # each target is the mix of a training study (with alpha > 0 the random soft part names it)
        close = np.flatnonzero(np.abs(expected[training] - row).max(axis=1) < 1e-5)
        assert len(close) == 1 or (alpha == 0 and len(close) > 1), row
    if alpha > 0:
        assert not np.isin(got, (0.0, 1.0)).all()  # soft values really arrive
    else:
        assert np.isin(got, (0.0, 1.0)).all()


def test_soft_labels_missing_studies_or_bad_values_are_refused_before_training(tiny, tmp_path):
    short = tiny["soft"].iloc[3:]  # three studies of fold 0 lack a soft label
    path = tmp_path / "short.csv"
    short.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"no row for 3 of the 24 studies .* \(first: 1\.2\.826\.0\.0\.0, "):
        SoftLabels.read(str(path)).check_covers(tiny["table"][ID_COLUMN].tolist(), "the records")
    bad = tiny["soft"].copy()
    bad.loc[2, LABELS[4]] = 1.5
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"line 4 .*'NGT - Borderline': 1.5 is not a probability"):
        SoftLabels.read(str(tmp_path / "bad.csv"))

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", KERAS_BACKEND="tensorflow")
    args = [sys.executable, os.path.join(ROOT, "train_tpu.py"), "--fold", "1", "--tfrecords", tiny["records"],
            "--out", str(tmp_path / "run"), "--quiet"]
    for setting in (*TINY_SETTINGS, f"train.soft_labels={path}", "train.epochs=1"):
        args += ["--set", setting]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "has no row for 3 of the 24 studies" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "fold1").exists()  # refused before the fold started


@pytest.mark.slow
def test_a_real_fit_on_soft_targets_validates_and_writes_oof_on_hard_labels(tiny, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", KERAS_BACKEND="tensorflow")
    args = [sys.executable, os.path.join(ROOT, "train_tpu.py"), "--fold", "0", "--tfrecords", tiny["records"],
            "--out", str(tmp_path / "run"), "--quiet"]
    for setting in (*TINY_SETTINGS, f"train.soft_labels={tiny['path']}", "train.soft_alpha=0.7", "train.epochs=1"):
        args += ["--set", setting]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    oof = pd.read_csv(tmp_path / "run" / "fold0" / "oof.csv", dtype={ID_COLUMN: str})
    table = tiny["table"].set_index(ID_COLUMN)
    targets = oof[[f"target_{label}" for label in LABELS]].to_numpy()
    np.testing.assert_array_equal(targets, table.loc[oof[ID_COLUMN], list(LABELS)].to_numpy())  # hard, not soft
    assert len(oof) == 8
