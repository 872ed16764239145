"""The run report's numbers against hand computations on small arrays: bootstrap AUC intervals, ECE (and
that it uses the reliability diagram's bins), the argmax confusion table and the per-study loss; and the
report command's one-line errors for bad run folders."""

import json
import os

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from ranzcr_tf.labels import GROUPS, LABELS
from ranzcr_tf.report import curves

Y = np.array([0, 0, 1, 1])
P = np.array([0.1, 0.4, 0.35, 0.8])
# Resamples (rows of study indices) and their AUCs counted by hand: positive-negative pairs ranked right.
RESAMPLES = np.array([
    [0, 1, 2, 3],  # pos .35 .8, neg .1 .4: 3 of 4 pairs -> 0.75
    [0, 1, 2, 2],  # pos .35 .35, neg .1 .4: 2 of 4 -> 0.5
    [0, 0, 3, 3],  # pos .8 .8, neg .1 .1: 4 of 4 -> 1.0
    [1, 1, 2, 3],  # pos .35 .8, neg .4 .4: 2 of 4 -> 0.5
    [0, 1, 1, 1],  # negatives only -> left out
    [1, 2, 2, 3],  # pos .35 .35 .8, neg .4: 1 of 3 -> 1/3
])
HAND_AUCS = [0.75, 0.5, 1.0, 0.5, np.nan, 1 / 3]


def test_bootstrap_aucs_match_hand_counts():
    np.testing.assert_allclose(curves.bootstrap_aucs(Y, P, RESAMPLES), HAND_AUCS)
    # ties count one half, as in roc_auc_score
    assert curves.bootstrap_aucs(np.array([0, 1, 1]), np.array([0.5, 0.5, 0.9]), [[0, 1, 2]])[0] == 0.75


def test_bootstrap_interval_is_the_percentiles_of_the_hand_aucs():
    # sorted finite AUCs: 1/3, .5, .5, .75, 1; numpy's linear quantile at q sits at position q * 4
    low, high = curves.bootstrap_auc_interval(Y, P, level=0.5, resamples=RESAMPLES)
    assert (low, high) == pytest.approx((0.5, 0.75))  # positions 1 and 3
    low, high = curves.bootstrap_auc_interval(Y, P, level=0.9, resamples=RESAMPLES)
    assert low == pytest.approx(1 / 3 + 0.2 * (0.5 - 1 / 3))  # position 0.2
    assert high == pytest.approx(0.75 + 0.8 * 0.25)  # position 3.8
    assert np.isnan(curves.bootstrap_auc_interval(Y, P, resamples=RESAMPLES[4:5])[0])  # one-class resamples only


def test_random_bootstrap_matches_sklearn_per_resample_and_covers_the_auc():
    rng = np.random.default_rng(0)
    y = (rng.random(120) < 0.3).astype(int)
    p = np.clip(0.3 * y + rng.random(120) * 0.7, 0, 1).round(2)  # rounded: ties on purpose
    resamples = np.random.default_rng(5).integers(0, 120, size=(50, 120))
    expected = [roc_auc_score(y[r], p[r]) for r in resamples]
    np.testing.assert_allclose(curves.bootstrap_aucs(y, p, resamples), expected, atol=1e-12)
    low, high = curves.bootstrap_auc_interval(y, p, num_resamples=500, seed=1)
    assert low < roc_auc_score(y, p) < high and high - low < 0.3


def test_ece_by_hand_and_on_the_reliability_diagram_bins():
    p = np.array([0.05, 0.15, 0.12, 0.95, 0.85])
    y = np.array([0, 1, 0, 1, 0])
    # bins [0, .1): {.05 | 0} -> .05;  (.1, .2]: {.15, .12 | 1, 0} -> |.5 - .135| = .365;  {.85 | 0} -> .85;  {.95 | 1} -> .05
    assert curves.expected_calibration_error(y, p) == pytest.approx((0.05 + 2 * 0.365 + 0.85 + 0.05) / 5)
    assert curves.expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0
    assert curves.expected_calibration_error([0, 1], [0.5, 0.5]) == pytest.approx(0.0)
    # the ECE's bins are the diagram's: its points are the per-bin means of the same studies
    p = np.array([0.1, 0.2, 0.2, 0.55, 0.7, 0.9, 1.0, 0.0, 0.3])
    y = np.array([0, 1, 0, 1, 1, 1, 1, 0, 0])
    fraction, mean_p = calibration_curve(y, p, n_bins=10, strategy="uniform")
    bins = curves.calibration_bins(p)
    assert np.allclose(mean_p, [p[bins == b].mean() for b in np.unique(bins)])
    assert np.allclose(fraction, [y[bins == b].mean() for b in np.unique(bins)])
    counts = np.array([(bins == b).sum() for b in np.unique(bins)])
    assert curves.expected_calibration_error(y, p) == pytest.approx(np.sum(counts / len(p) * np.abs(fraction - mean_p)))


def test_argmax_confusion_of_a_family():
    members = list(GROUPS["ETT"])  # Abnormal, Borderline, Normal
    targets = np.zeros((4, len(LABELS)))
    probs = np.zeros((4, len(LABELS)))
    targets[0, 2] = 1; probs[0, [0, 1, 2]] = [0.1, 0.2, 0.9]  # Normal -> Normal  # noqa: E702
    targets[1, 2] = 1; probs[1, [0, 1, 2]] = [0.1, 0.7, 0.6]  # Normal -> Borderline  # noqa: E702
    probs[2, [0, 1, 2]] = [0.3, 0.2, 0.1]  # no tube -> no tube (max below 0.5)
    targets[3, 0] = 1; probs[3, 0] = 0.2  # Abnormal -> no tube  # noqa: E702
    names, table = curves.argmax_confusion(targets, probs, members)
    assert names == [*members, "no tube"]
    expected = np.zeros((4, 4), int)
    expected[2, 2] = expected[2, 1] = expected[3, 3] = expected[0, 3] = 1
    np.testing.assert_array_equal(table, expected)


def test_study_loss_is_the_mean_binary_cross_entropy():
    targets = np.zeros((1, 11))
    targets[0, 0] = 1
    probs = np.full((1, 11), 0.5)
    probs[0, 0] = 0.25
    expected = (-np.log(0.25) + 10 * -np.log(0.5)) / 11
    assert curves.study_losses(targets, probs)[0] == pytest.approx(expected)


def test_bad_run_folders_are_one_line_errors(tmp_path, capsys):
    from ranzcr_tf.report.__main__ import main

    assert main([str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere does not exist" in err and "Traceback" not in err
    unfinished = tmp_path / "runs" / "unfinished"
    os.makedirs(unfinished / "fold0")
    (unfinished / "fold0" / "log.csv").write_text("epoch,loss\n0,0.7\n")
    assert main([str(unfinished), "--out-dir", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no fold*/metrics.json" in err and "train_tpu.py" in err
    (unfinished / "fold0" / "metrics.json").write_text(json.dumps({"val_auc": 0.5})[:-3])  # cut short
    assert main([str(unfinished), "--out-dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out" / "index.html").exists()
    (tmp_path / "a_file").write_text("x")
    assert main([str(unfinished), "--out-dir", str(tmp_path / "a_file"), "--quiet"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
