"""ranzcr_tf.report.cv: pooled OOF score equals sklearn on the concatenated folds; ROC PNG; clear errors."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ranzcr_tf import tables
from ranzcr_tf.labels import ID_COLUMN, LABELS
from ranzcr_tf.report import cv


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
        tables.merge_oof(run)
    with pytest.raises(ValueError, match="no fold"):
        tables.merge_oof(str(tmp_path / "empty"))


def test_empty_or_truncated_oof_is_named_not_blamed_on_the_model(tmp_path, capsys):
    rng = np.random.default_rng(2)
    run = str(tmp_path / "run")
    _write_fold(run, 0, 20, rng, signal=0.5)
    _write_fold(run, 1, 20, rng, signal=0.5)
    path = os.path.join(run, "fold1", "oof.csv")
    text = open(path).read()
    with open(path, "w") as fh:
        fh.write(text[: len(text) - 40])  # cut in the middle of the last line (a full disk, a killed copy)
    with pytest.raises(ValueError) as info:
        tables.merge_oof(run)
    assert path in str(info.value) and "truncated" in str(info.value) and "diverged" not in str(info.value)
    open(path, "w").close()
    with pytest.raises(ValueError, match=f"{path} is empty"):
        tables.merge_oof(run)
    assert cv.main([run]) == 2 and "is empty" in capsys.readouterr().err


def test_score_rejects_values_that_are_not_probabilities_naming_line_and_column(tmp_path):
    from ranzcr_tf.report import score

    rng = np.random.default_rng(3)
    ids = [f"id{i}" for i in range(12)]
    targets = (rng.random((12, len(LABELS))) < 0.5).astype(int)
    targets[0], targets[1] = 1, 0
    labels = tmp_path / "labels.csv"
    pd.DataFrame({ID_COLUMN: ids, **dict(zip(LABELS, targets.T))}).to_csv(labels, index=False)
    good = pd.DataFrame({ID_COLUMN: ids, **dict(zip(LABELS, rng.random((12, len(LABELS))).T))})
    sub = tmp_path / "sub.csv"
    good.to_csv(sub, index=False)
    assert 0 <= score.score_files(str(sub), str(labels))["mean_auc"] <= 1
    for bad in (5.0, -2.0, float("nan"), float("inf"), "abc"):
        frame = good.astype({LABELS[4]: object})
        frame.loc[6, LABELS[4]] = bad
        frame.to_csv(sub, index=False)
        with pytest.raises(ValueError) as info:
            score.score_files(str(sub), str(labels))
        assert f"line 8 ({ID_COLUMN} id6), column {LABELS[4]!r}" in str(info.value), bad
    sub.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        score.score_files(str(sub), str(labels))
