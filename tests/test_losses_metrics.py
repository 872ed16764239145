"""Losses, the competition metric and the precision policy."""

import math
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ranzcr_tf import labels
from ranzcr_tf.config import LossConfig, ModelConfig
from ranzcr_tf.model.losses import WeightedBinaryCrossentropy, build_loss, class_weights, positives_from_manifest
from ranzcr_tf.model.metrics import competition_metric
from ranzcr_tf.model.precision import choose_policy

RNG = np.random.default_rng(1)


def test_class_weights_follow_the_stated_formula():
    positives = np.array([3, 40, 250, 10, 15, 90, 240, 5, 280, 700, 28])
    n = 1000
    expected = [min(10.0, (n - p) / max(p, 1)) for p in positives]
    np.testing.assert_allclose(class_weights(positives, n, cap=10.0), expected, rtol=1e-6)
    # By hand: 250 positives of 1000 -> 750 / 250 = 3; 3 positives -> 997/3 = 332.3, capped at 10; 700 -> 0.43.
    w = class_weights(positives, n, cap=10.0)
    assert w[2] == pytest.approx(3.0) and w[0] == 10.0 and w[9] == pytest.approx(300 / 700)
    assert class_weights([0] * 11, 10, cap=5.0)[0] == 5.0  # a class with no positives: N / 1, capped
    with pytest.raises(ValueError, match="num_examples"):
        class_weights(positives, 100, cap=10.0)


def test_positives_from_manifest_sums_training_folds():
    manifest = {"fold_positives": {str(f): [f + 1] * 11 for f in range(5)}, "fold_counts": {str(f): 100 for f in range(5)}}
    positives, n = positives_from_manifest(manifest, [0, 2, 3])
    assert n == 300 and positives.tolist() == [1 + 3 + 4] * 11
    with pytest.raises(ValueError, match="fold 7"):
        positives_from_manifest(manifest, [7])


def test_weighted_bce_equals_hand_computation():
    # Two examples, two classes, by hand: loss = mean_batch mean_class -(w y log p + (1-y) log(1-p)).
    y = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    z = np.array([[0.5, -1.0], [2.0, 0.0]], "float32")
    w = np.array([3.0, 0.5], "float32")
    p = 1 / (1 + np.exp(-z))
    hand = np.mean(-(w * y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert float(WeightedBinaryCrossentropy(w, from_logits=True)(y, z)) == pytest.approx(hand, rel=1e-6)
    assert float(WeightedBinaryCrossentropy(w, from_logits=False)(y, p)) == pytest.approx(hand, rel=1e-5)
    # Label smoothing s: targets become y (1 - s) + s / 2.
    s = 0.1
    ys = y * (1 - s) + s / 2
    hand_smooth = np.mean(-(w * ys * np.log(p) + (1 - ys) * np.log(1 - p)))
    smoothed = WeightedBinaryCrossentropy(w, from_logits=True, label_smoothing=s)(y, z)
    assert float(smoothed) == pytest.approx(hand_smooth, rel=1e-6)
    # Unit weights reduce to Keras' BCE.
    unit = WeightedBinaryCrossentropy([1.0, 1.0], from_logits=True)(y, z)
    assert float(unit) == pytest.approx(float(keras.losses.BinaryCrossentropy(from_logits=True)(y, z)), rel=1e-5)


def test_build_loss_variants_and_serialisation():
    positives, n = np.arange(1, 12) * 10, 500
    loss = build_loss(LossConfig(name="weighted_bce", pos_weight_cap=8.0), positives, n, from_logits=True)
    np.testing.assert_allclose(loss.pos_weight, class_weights(positives, n, 8.0))
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    y, z = RNG.integers(0, 2, (4, 11)).astype("float32"), RNG.normal(size=(4, 11)).astype("float32")
    assert float(clone(y, z)) == pytest.approx(float(loss(y, z)), rel=1e-6)
    assert isinstance(build_loss(LossConfig(name="bce"), from_logits=False), keras.losses.BinaryCrossentropy)
    focal = build_loss(LossConfig(name="focal", focal_gamma=1.5), from_logits=True)
    assert isinstance(focal, keras.losses.BinaryFocalCrossentropy) and focal.gamma == 1.5 and focal.from_logits
    with pytest.raises(ValueError, match="positives"):
        build_loss(LossConfig(name="weighted_bce"), from_logits=True)


def test_competition_metric_equals_sklearn():
    y = RNG.integers(0, 2, (200, 11))
    pred = RNG.random((200, 11)) + 0.3 * y
    score, per_class = competition_metric(y, pred)
    expected = [roc_auc_score(y[:, c], pred[:, c]) for c in range(11)]
    assert list(per_class) == list(labels.LABELS)
    np.testing.assert_allclose(list(per_class.values()), expected, rtol=1e-12)
    assert score == pytest.approx(np.mean(expected), rel=1e-12)


def test_single_class_column_is_nan_excluded_and_warned():
    y = RNG.integers(0, 2, (50, 11))
    y[:, 0] = 0  # e.g. no ETT - Abnormal in a small fold
    pred = RNG.random((50, 11))
    with pytest.warns(RuntimeWarning, match="ETT - Abnormal"):
        score, per_class = competition_metric(y, pred)
    assert math.isnan(per_class["ETT - Abnormal"])
    assert score == pytest.approx(np.mean([roc_auc_score(y[:, c], pred[:, c]) for c in range(1, 11)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(competition_metric(np.zeros((5, 11)), np.ones((5, 11)))[0])
    with pytest.raises(ValueError, match=r"\(n, 11\)"):
        competition_metric(y[:, :10], pred[:, :10])


def test_the_metric_needs_no_framework():
    """``report.score`` and ``serve.blend`` score CSVs: importing the metric (and them) starts no framework."""
    code = ("import sys; import ranzcr_tf.model.metrics, ranzcr_tf.report.score, ranzcr_tf.serve.blend; "
            "print(sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_choose_policy_by_accelerator_and_override():
    auto = ModelConfig(mixed_precision="auto")
    assert [choose_policy(auto, a) for a in ("tpu", "gpu", "cpu")] == ["mixed_bfloat16", "mixed_float16", "float32"]
    assert choose_policy(ModelConfig(mixed_precision="float32"), "tpu") == "float32"
    assert choose_policy(ModelConfig(mixed_precision="mixed_bfloat16"), "GPU") == "mixed_bfloat16"
    with pytest.raises(ValueError, match="accelerator"):
        choose_policy(auto, "npu")
