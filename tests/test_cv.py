"""ranzcr_tf.report.cv: pooled OOF score equals sklearn on the concatenated folds; ROC PNG; clear errors."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ranzcr_tf.report import cv
from ranzcr_tf.labels import ID_COLUMN, LABELS


def _write_fold(run, fold, n, rng, signal):
    targets = (rng.random((n, len(LABELS))) < 0.4).astype(int)
    targets[0], targets[1] = 1, 0
    probs = np.clip(signal * targets + rng.random(targets.shape), 0, None) / (1 + signal)
    frame = pd.DataFrame({ID_COLUMN: [f"{fold}.{i}" for i in range(n)], "fold": fold})
    for c, label in enumerate(LABELS):
        frame[label] = probs[:, c]
    for c, label in enumerate(LABELS):
        frame[f"target_{label}"] = targets[:, c]
    os.makedirs(os.path.join(run, f"fold{fold}"))
    frame.to_csv(os.path.join(run, f"fold{fold}", "oof.csv"), index=False)
    return frame


def test_cv_pools_folds_and_plots(tmp_path, capsys):
    rng = np.random.default_rng(0)
    run = str(tmp_path / "run")
    frames = [_write_fold(run, k, 40, rng, signal=0.8) for k in range(2)]
    assert cv.main([run]) == 0
    pooled = pd.concat(frames)
    expected = np.mean([roc_auc_score(pooled[f"target_{label}"], pooled[label]) for label in LABELS])
    report = json.load(open(os.path.join(run, "cv.json")))
    assert report["cv_auc"] == pytest.approx(expected) and report["num_studies"] == 80
    assert set(report["per_fold_auc"]) == {"0", "1"}
    out = capsys.readouterr().out
    assert "CV mean AUC" in out and "Swan Ganz Catheter Present" in out
    with open(os.path.join(run, "roc.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"

    # A run folder on gs:// (TensorFlow's in-memory ram:// filesystem takes the same tf.io.gfile path).
    import tensorflow as tf

    remote = f"ram://cv-test-{os.getpid()}/run"
    for k in range(2):
        tf.io.gfile.makedirs(f"{remote}/fold{k}")
        tf.io.gfile.copy(os.path.join(run, f"fold{k}", "oof.csv"), f"{remote}/fold{k}/oof.csv")
    assert cv.main([remote]) == 0
    with tf.io.gfile.GFile(f"{remote}/cv.json") as fh:
        assert json.load(fh)["cv_auc"] == pytest.approx(expected)
    with tf.io.gfile.GFile(f"{remote}/roc.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cv_rejects_duplicates_and_empty_runs(tmp_path):
    rng = np.random.default_rng(1)
    run = str(tmp_path / "dup")
    frame = _write_fold(run, 0, 20, rng, signal=0.5)
    os.makedirs(os.path.join(run, "fold1"))
    frame.to_csv(os.path.join(run, "fold1", "oof.csv"), index=False)
    with pytest.raises(ValueError, match="more than one fold"):
        cv.merge_oof(run)
    with pytest.raises(ValueError, match="no fold"):
        cv.merge_oof(str(tmp_path / "empty"))
