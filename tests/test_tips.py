"""Tip heat maps (pipeline/tips.py), the ETT softmax head (model.head ett_softmax) and the seg-attention head
(model.seg_attention): where the targets sit after augmentation, what the served model keeps. No records on disk
here; the tip loss's zero gradient without annotations, the batches, the real fits and the train_tpu.py + kernel
run are in test_auxseg.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers_convert import polyline_record

from ranzcr_tf.config import AugmentConfig, ModelConfig, load_config
from ranzcr_tf.model import build as models
from ranzcr_tf.model.decoder import build_aux_seg_model
from ranzcr_tf.model.layers import ExclusiveGroupLogits
from ranzcr_tf.pipeline import augment, masks, tips

SIZE = 64
STRONG = AugmentConfig(hflip_prob=0.5, affine_prob=1.0, crop_prob=0.5, rotate_deg=25.0, shift=0.08, scale=0.15,
                       shear_deg=8.0, brightness_contrast_prob=1.0)


def _peak(heat):
    """Sub-pixel peak (row, column) of one channel: the centroid of its values above half the maximum."""
    rows, cols = np.nonzero(heat >= 0.5 * heat.max())
    weights = heat[rows, cols]
    return np.array([np.average(rows, weights=weights), np.average(cols, weights=weights)])


# ----------------------------------------------------------------------------------------------- targets
def test_each_tube_gets_a_gaussian_at_its_last_point_in_its_family_channel():
    # ETT - Normal (label 2) ends at (140, 200); a CVC (label 8) ends at (60, 220); NGT and Swan Ganz absent.
    lines = [(2, [[40, 30], [120, 90], [140, 200]]), (8, [[200, 20], [160, 150], [60, 220]])]
    heat = tips.tip_heatmaps(polyline_record(lines, width=256, height=512), 128, tips.TipSettings(sigma=32.0)).numpy()
    assert heat.shape == (32, 32, 4) and heat.dtype == np.float32
    assert heat[..., 1].max() == 0 and heat[..., 3].max() == 0
    # Stored (x, y) -> mask pixel: (x + 0.5) * 32 / W - 0.5 (pixel centres at integers on both grids).
    for channel, (x, y) in ((0, (140, 200)), (2, (60, 220))):
        expected = np.array([(y + 0.5) * 32 / 512 - 0.5, (x + 0.5) * 32 / 256 - 0.5])
        np.testing.assert_allclose(_peak(heat[..., channel]), expected, atol=0.25)
        assert 0.8 < heat[..., channel].max() <= 1.0
    empty = tips.tip_heatmaps(polyline_record([]), 128, tips.TipSettings()).numpy()
    assert empty.shape == (32, 32, 4) and empty.sum() == 0


def test_a_line_whose_last_point_was_cut_by_the_padding_gets_no_tip():
    lines = [(2, [[10, 10], [20, 20], [30, 30]]), (5, [[100, 100], [110, 120], [120, 140]])]
    heat = tips.tip_heatmaps(polyline_record(lines), 64, tips.TipSettings(padding=masks.MaskSettings(max_points=4))).numpy()
    assert heat[..., 0].max() > 0.3 and heat[..., 1].max() == 0  # the NGT's last point is past max_points
    one_line = tips.tip_heatmaps(polyline_record(lines), 64, tips.TipSettings(padding=masks.MaskSettings(max_lines=1))).numpy()
    assert one_line[..., 0].max() > 0.3 and one_line[..., 1].max() == 0


@pytest.mark.parametrize("seed", range(6))
def test_tip_target_follows_the_image_through_augmentation_within_one_pixel(seed):
    """The image path is the reference: a bright blob drawn at each tip is warped by augment_image itself, and
    the tip map's peak must lie within 1 mask pixel of where the blob landed."""
    settings = tips.TipSettings(sigma=6.0)
    rng = np.random.default_rng(seed)
    ends = rng.uniform(60, 196, (2, 2))
    lines = [(1, [[128, 5], [128, 60], list(ends[0])]), (9, [[5, 40], [90, 90], list(ends[1])])]
    element_seed = tf.constant([seed, 11])
    heat = tips.tip_heatmaps(polyline_record(lines), 256, settings, STRONG, element_seed).numpy()
    assert not np.allclose(heat, tips.tip_heatmaps(polyline_record(lines), 256, settings).numpy())  # the warp moved them
    for channel, (x, y) in ((0, ends[0]), (2, ends[1])):
        yy, xx = np.mgrid[0:256, 0:256]
        blob = 250.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 4.0 ** 2))
        warped = augment.augment_image(tf.constant(blob[..., None], tf.float32), STRONG, element_seed).numpy()[..., 0]
        landed = (_peak(warped) + 0.5) * 64 / 256 - 0.5  # image pixel -> mask pixel
        assert np.abs(_peak(heat[..., channel]) - landed).max() <= 1.0, (seed, channel)


# ----------------------------------------------------------------------------------------------- loss and model
def _tip_model(seg_attention: bool):
    model_cfg = ModelConfig(backbone="compact_cnn", weights=None, mixed_precision="float32", dropout_rate=0.0,
                            head="ett_softmax", seg_attention=seg_attention)
    return build_aux_seg_model(models.build_model(model_cfg, SIZE), "compact_cnn",
                               keras.losses.BinaryCrossentropy(from_logits=True), tip_loss_weight=1.0,
                               seg_attention=model_cfg if seg_attention else None)


@pytest.mark.parametrize("seg_attention", [False, True])
def test_served_model_drops_the_training_heads_and_keeps_its_outputs(seg_attention, tmp_path):
    model = _tip_model(seg_attention)
    images = tf.constant(np.random.default_rng(1).uniform(0, 255, (3, SIZE, SIZE, 1)), tf.float32)
    out = model(images, training=False)
    assert set(out) == {"logits", "masks", "tips"} and out["tips"].shape == (3, 16, 16, 4)
    path = str(tmp_path / "best.keras")
    model.inference_model.save(path)
    served = models.load_model(path)  # safe mode: every layer registered
    names = [layer.name for layer in served.layers]
    assert "tip_logits" not in names and "ett_softmax" in names
    # Plain aux_seg serves the classifier alone; seg_attention serves the decoder with it (the head reads its masks).
    assert ("mask_decoder" in names) == seg_attention and ("mask_attention" in names) == seg_attention
    training_only = {id(w) for w in model.get_layer("tip_logits").weights}
    if not seg_attention:
        training_only |= {id(w) for w in model.get_layer("mask_decoder").weights}
    assert len(served.weights) == len(model.weights) - len(training_only)
    np.testing.assert_allclose(served.predict(images, verbose=0), out["logits"].numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- ETT softmax
def test_ett_softmax_columns_are_a_softmax_with_absent_and_the_others_pass_through():
    z = np.random.default_rng(2).normal(0, 3, (5, 11)).astype(np.float32)
    out = ExclusiveGroupLogits([0, 1, 2])(z).numpy()
    probs = 1.0 / (1.0 + np.exp(-out[:, :3]))
    expected = np.exp(z[:, :3]) / (1.0 + np.exp(z[:, :3]).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert (probs.sum(axis=1) < 1.0).all()
    np.testing.assert_array_equal(out[:, 3:], z[:, 3:])
    big = ExclusiveGroupLogits([0, 1, 2])(np.full((1, 11), 80.0, np.float32)).numpy()  # stable at large logits
    assert np.isfinite(big).all()


def test_tip_and_head_settings_are_checked():
    cfg = load_config(None, ["train.recipe=aux_seg", "train.tip_loss_weight=0.5", "model.head=ett_softmax"])
    assert tips.TipSettings.from_config(cfg.train) == tips.TipSettings(sigma=8.0)
    assert tips.TipSettings.from_config(load_config(None, ["train.recipe=aux_seg"]).train) is None
    # recipe plain: the weight is left unused (a preset's tip term under --recipe plain), not refused
    assert tips.TipSettings.from_config(load_config(None, ["train.tip_loss_weight=1"]).train) is None
    for bad, match in ((["train.recipe=aux_seg", "train.tip_loss_weight=-1"], "train.tip_loss_weight"),
                       (["train.tip_sigma=0"], "train.tip_sigma"), (["model.head=softmax"], "model.head"),
                       (["model.seg_attention=true"], "seg_attention")):
        with pytest.raises(ValueError, match=match):
            load_config(None, bad).validate()
    with pytest.raises(ValueError, match="ett_softmax"):
        models.build_model(ModelConfig(backbone="compact_cnn", weights=None, head="ett_softmax"), SIZE, num_classes=4)
