"""train.recipe aux_seg: in-graph line masks that follow the augmentation, the masked Dice+BCE term, real fits
(TF, mixed precision, JAX), the exported decoder-free model and the kernel on it.

Records come from the real converter on a small hard-style synthetic set (about 30 % of the train studies
annotated), at 64 px so that the CPU fits stay short.
"""

import glob
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from helpers_convert import hard_records, polyline_record

from ranzcr_tf.config import AugmentConfig, ModelConfig, load_config
from ranzcr_tf.labels import LABELS
from ranzcr_tf.model import build as models
from ranzcr_tf.model.backbones import build_backbone, stage_outputs
from ranzcr_tf.model.decoder import LineMaskLoss, TipHeatmapLoss, build_aux_seg_model
from ranzcr_tf.pipeline import augment, data, masks
from ranzcr_tf.prep import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
SETTINGS = ["model.backbone=compact_cnn", "model.weights=none", "model.mixed_precision=float32", "model.dropout_rate=0.0",
            "train.batch_size=8", "train.learning_rate=0.003", "train.warmup_epochs=0", "train.seed=1",
            "infer.batch_size=16", "data.shuffle_buffer=64", "loss.name=bce", "train.recipe=aux_seg"]


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", KERAS_BACKEND="tensorflow",
               PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dataset(shared_build):  # built once per test run: test_auxseg.py and test_three_stage.py read the same records
    return shared_build(f"hard_records_{SIZE}", lambda folder: hard_records(folder, SIZE, _env()))


def _parsed_records(records_dir):
    files = sorted(glob.glob(os.path.join(records_dir, "train", "*.tfrec")))
    return [records.parse_example(s, with_annotations=True) for s in tf.data.TFRecordDataset(files)]


def _cfg(*extra):
    return load_config(None, [*SETTINGS, *extra])


# ----------------------------------------------------------------------------------------------- masks
def _dilate(mask):
    return tf.nn.max_pool2d(tf.cast(mask, tf.float32)[None], 3, 1, "SAME")[0].numpy() > 0


def test_masks_put_each_label_in_its_family_channel_and_empty_studies_get_no_mask():
    settings = masks.MaskSettings(line_width=8.0)
    # ETT - Normal (label 2), a NGT (label 5), Swan Ganz (label 10); CVC (channel 2) has no line.
    mask, has_mask = masks.line_masks(polyline_record([(2, [[20, 20], [200, 40]]), (5, [[30, 230], [220, 200], [240, 100]]),
                                                        (10, [[128, 10], [128, 250]])]), 256, settings)
    assert mask.shape == (64, 64, 4) and float(has_mask) == 1.0
    on = mask.numpy().sum(axis=(0, 1))
    assert on[0] > 30 and on[1] > 60 and on[2] == 0 and on[3] > 40
    # Two separate lines of one study do not join: the gap between the NGT's and the ETT's points stays empty.
    assert mask.numpy()[30, 5:60, 0].sum() == 0
    empty, has_empty = masks.line_masks(polyline_record([]), 256, settings)
    assert float(has_empty) == 0.0 and float(tf.reduce_sum(empty)) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_warped_mask_equals_mask_of_warped_polyline_within_one_pixel(seed):
    aug = AugmentConfig(hflip_prob=0.5, affine_prob=1.0, crop_prob=0.5, rotate_deg=25.0, shift=0.08, scale=0.15,
                        shear_deg=8.0, brightness_contrast_prob=1.0, gamma_prob=1.0, cutout_prob=1.0)
    settings = masks.MaskSettings(line_width=6.0)
    lines = [(2, [[40.0, 30.0], [120.0, 90.0], [140.0, 200.0]]), (8, [[200.0, 20.0], [160.0, 150.0], [60.0, 220.0]])]
    mask, _ = masks.line_masks(polyline_record(lines), 256, settings)
    image = tf.zeros([256, 256, 1], tf.uint8)
    element_seed = tf.constant([seed, 7])
    _, warped = augment.augment_image(image, aug, element_seed, mask=mask)

    inverse = np.linalg.inv(augment.geometric_matrix(aug, element_seed, 256).numpy())
    moved = [(label, (np.c_[np.asarray(p), np.ones(len(p))] @ inverse.T)[:, :2]) for label, p in lines]
    reference, _ = masks.line_masks(polyline_record(moved), 256, settings)

    warped, reference = warped.numpy() > 0.5, reference.numpy() > 0.5
    assert reference.sum() > 50 and warped.sum() > 50
    assert not np.array_equal(warped, mask.numpy() > 0.5)  # the warp moved the lines
    # Max error 1 px: every pixel of either mask lies within one mask pixel of the other.
    assert not (warped & ~_dilate(reference)).any()
    assert not (reference & ~_dilate(warped)).any()


def test_augment_image_gives_the_same_image_with_or_without_a_mask():
    aug = AugmentConfig(hflip_prob=0.5, affine_prob=1.0, crop_prob=0.5, brightness_contrast_prob=1.0)
    image = tf.cast(tf.random.stateless_uniform([64, 64, 1], seed=[1, 2], maxval=255), tf.uint8)
    alone = augment.augment_image(image, aug, tf.constant([3, 4]))
    with_mask, _ = augment.augment_image(image, aug, tf.constant([3, 4]), mask=tf.zeros([16, 16, 4]))
    np.testing.assert_array_equal(alone.numpy(), with_mask.numpy())


def test_training_batches_carry_masks_that_match_the_records(dataset):
    cfg = _cfg("augment.hflip_prob=0", "augment.affine_prob=0", "augment.crop_prob=0")
    ds = data.build_train_dataset(cfg, dataset["records"], 0, 32, seed=0, image_dtype=tf.uint8, augment=False)
    images, targets = next(iter(ds))
    assert images.shape == (32, SIZE, SIZE, 1)
    assert targets["mask"].shape == (32, SIZE // 4, SIZE // 4, 4) and targets["mask"].dtype == tf.uint8
    has = targets["has_mask"].numpy()
    assert 0 < has.sum() < 32  # some annotated studies, not all
    per_study = targets["mask"].numpy().reshape(32, -1).sum(axis=1)
    assert (per_study[has == 0] == 0).all() and (per_study[has == 1] > 0).all()
    parsed = _parsed_records(dataset["records"])
    annotated = sum(int(tf.size(p[records.ANN_LABEL]) > 0) for p in parsed)
    assert 0.15 < annotated / len(parsed) < 0.5  # the hard style's ~30 %


def test_training_batches_carry_tip_maps_on_annotated_studies_only(dataset):
    ds = data.build_train_dataset(_cfg("train.tip_loss_weight=1"), dataset["records"], 0, 32, seed=0,
                                  image_dtype=tf.uint8)
    _, targets = next(iter(ds))
    assert targets["tip"].shape == (32, SIZE // 4, SIZE // 4, 4) and targets["tip"].dtype == tf.uint8
    has, peak = targets["has_mask"].numpy(), targets["tip"].numpy().max(axis=(1, 2, 3))
    assert 0 < has.sum() < 32 and (peak[has == 0] == 0).all() and (peak[has == 1] > 0.3 * 255).all()
    assert "tip" not in next(iter(data.build_train_dataset(_cfg(), dataset["records"], 0, 8, seed=0)))[1]


# ----------------------------------------------------------------------------------------------- loss
def _tiny_model(backbone="compact_cnn", size=SIZE, loss=None, tip_loss_weight=0.0, seg_attention=False):
    model_cfg = ModelConfig(backbone=backbone, weights=None, mixed_precision="float32", dropout_rate=0.0)
    return build_aux_seg_model(models.build_model(model_cfg, size), backbone,
                               loss or keras.losses.BinaryCrossentropy(from_logits=True),
                               tip_loss_weight=tip_loss_weight, seg_attention=model_cfg if seg_attention else None)


@pytest.mark.parametrize("term", ["mask", "tip"])
def test_unannotated_studies_contribute_exactly_zero_mask_or_tip_loss_and_gradient(term):
    model = _tiny_model(tip_loss_weight=1.0 if term == "tip" else 0.0)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (4, SIZE, SIZE, 1)), tf.float32)
    mask = tf.constant(rng.integers(0, 2, (4, 16, 16, 4)), tf.uint8)
    tip = tf.constant(rng.uniform(0, 1, (4, 16, 16, 4)), tf.float32)
    truth, loss, output = (mask, LineMaskLoss(), "masks") if term == "mask" else (tip, TipHeatmapLoss(), "tips")
    has_mask = tf.constant([1.0, 0.0, 1.0, 0.0])
    with tf.GradientTape() as tape:
        tape.watch(images)
        out = model(images, training=False)  # inference BatchNorm: no coupling between studies
        value = loss(truth, out[output], sample_weight=has_mask)
    grad = tape.gradient(value, images).numpy()
    assert np.abs(grad[[1, 3]]).max() == 0.0
    assert np.abs(grad[0]).max() > 0 and np.abs(grad[2]).max() > 0
    # Changing an unannotated study's target changes nothing; the mean is over annotated studies.
    other = tf.tensor_scatter_nd_update(truth, [[1]], [1 - truth[1]])
    assert float(loss(other, out[output], sample_weight=has_mask)) == float(value)
    per_study = loss.call(truth, out[output]).numpy()
    assert float(value) == pytest.approx(per_study[[0, 2]].mean(), rel=1e-6)
    # No annotated study at all: the mask (and tip) terms are exactly 0 and the total is the classification loss.
    y = {"target": tf.zeros([4, 11]), "mask": mask, "tip": tf.cast(tf.round(tip * 255), tf.uint8), "has_mask": tf.zeros([4])}
    total = model.compute_loss(images, y, out)
    assert float(total) == float(model.classification_loss(y["target"], out["logits"]))
    if term == "tip":  # the batches' uint8 maps are read as [0, 1]
        with_tips = model.compute_loss(images, {**y, "has_mask": has_mask}, out)
        expected = (float(total) + float(LineMaskLoss()(mask, out["masks"], sample_weight=has_mask))
                    + float(loss(tf.cast(y["tip"], tf.float32) / 255, out["tips"], sample_weight=has_mask)))
        assert float(with_tips) == pytest.approx(expected, rel=1e-5)
        with pytest.raises(ValueError, match="'tip' target"):
            model.compute_loss(images, {k: v for k, v in y.items() if k != "tip"}, out)


# ----------------------------------------------------------------------------------------------- fits
@pytest.mark.parametrize("seg_attention", [False, True])
def test_short_fit_on_real_records_then_exported_model_has_no_decoder_and_matches(dataset, tmp_path, seg_attention):
    """Plain aux_seg serves the classifier without its decoder; model.seg_attention serves the decoder with it."""
    cfg = _cfg(*(["model.seg_attention=true"] if seg_attention else []))
    ds = data.build_train_dataset(cfg, dataset["records"], 0, 8, seed=0, image_dtype=tf.uint8)
    model = _tiny_model(seg_attention=seg_attention)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    before = [w.numpy().copy() for w in model.get_layer("mask_decoder").weights]
    history = model.fit(ds, steps_per_epoch=3, epochs=2, verbose=0, shuffle=False).history
    assert np.isfinite(history["loss"]).all() and np.isfinite(history["mask_loss"]).all()
    assert history["mask_loss"][-1] > 0
    after = model.get_layer("mask_decoder").weights
    assert any(not np.array_equal(b, a.numpy()) for b, a in zip(before, after))  # the decoder trained

    path = str(tmp_path / "best.keras")
    model.inference_model.save(path)
    exported = models.load_model(path)
    plain = models.build_model(ModelConfig(backbone="compact_cnn", weights=None, dropout_rate=0.0), SIZE)
    names = [layer.name for layer in exported.layers]
    assert ("mask_decoder" in names) == seg_attention
    if not seg_attention:
        assert len(exported.weights) == len(plain.weights)
    images, _ = next(iter(ds))
    np.testing.assert_allclose(exported.predict(images, verbose=0), model.predict(images, verbose=0)["logits"],
                               rtol=1e-5, atol=1e-5)


def test_mixed_precision_step_has_finite_float32_losses(dataset):
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = _tiny_model()
        model.compile(optimizer=keras.optimizers.Adam(3e-3))
        ds = data.build_train_dataset(_cfg(), dataset["records"], 0, 8, seed=0, image_dtype=tf.uint8)
        images, targets = next(iter(ds))
        out = model(images, training=False)
        assert out["masks"].dtype == "float32" and out["logits"].dtype == "float32"
        assert model.get_layer("mask_decoder").get_layer("smooth4_conv").compute_dtype == "bfloat16"
        logs = model.train_on_batch(images, targets, return_dict=True)
        assert all(np.isfinite(v) for v in logs.values()) and logs["mask_loss"] > 0
    finally:
        keras.config.set_dtype_policy("float32")


def test_train_cli_aux_seg_run_then_kernel_serves_it_like_a_plain_one(dataset, tmp_path):
    """With the tip head and the ETT softmax head on: both are what issue 29 adds to the preset's recipe."""
    out = str(tmp_path / "run")
    extra = ["train.epochs=2", "train.tip_loss_weight=1", "model.head=ett_softmax"]
    args = ["--fold", "0", "--tfrecords", dataset["records"], "--out", out, "--quiet",
            *[a for s in [*SETTINGS, *extra] for a in ("--set", s)]]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train_tpu.py"), *args], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    run = os.path.join(out, "fold0")
    log = pd.read_csv(os.path.join(run, "log.csv"))
    assert {"mask_loss", "tip_loss", "classification_loss", "val_auc"} <= set(log.columns)
    assert np.isfinite(log["mask_loss"]).all() and (log["mask_loss"] > 0).all() and (log["tip_loss"] > 0).all()
    with open(os.path.join(run, "metrics.json")) as handle:
        metrics = json.load(handle)
    assert np.isfinite(metrics["val_auc"])
    best = models.load_model(os.path.join(run, "best.keras"))
    assert best.output.shape == (None, len(LABELS))
    names = [layer.name for layer in best.layers]
    assert "mask_decoder" not in names and "ett_softmax" in names

    from ranzcr_tf.serve import kernel

    sub = str(tmp_path / "submission.csv")
    parsed = kernel.build_parser().parse_args(["--data-dir", dataset["raw"], "--models", out, "--out", sub,
                                               "--no-progress", "--workers", "1"])
    parsed.clock = None
    kernel.run(parsed)
    frame = pd.read_csv(sub)
    assert len(frame) == 6 and list(frame.columns[1:]) == list(LABELS)
    assert np.isfinite(frame[list(LABELS)].to_numpy()).all()
    assert (frame[list(LABELS[:3])].sum(axis=1) < 1.0).all()  # the ETT states are exclusive


JAX_STEP = r"""
import sys
import numpy as np, keras, tensorflow as tf
assert keras.backend.backend() == "jax"
from ranzcr_tf.config import load_config
from ranzcr_tf.pipeline import data
from ranzcr_tf.train import recipes
cfg = load_config(None, sys.argv[2:])
ds = data.build_train_dataset(cfg, sys.argv[1], 0, 8, seed=0, image_dtype=tf.uint8)
pos = np.ones(11)
model, loss = recipes.build_training_model(cfg, 64, pos, 32, from_logits=True)
assert loss is None
model.compile(optimizer=keras.optimizers.Adam(3e-3))
h = model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0, shuffle=False).history
print("LOSSES", h["loss"][-1], h["mask_loss"][-1], h["classification_loss"][-1])
"""


def test_jax_backend_aux_seg_steps_have_finite_losses(dataset, tmp_path):
    script = tmp_path / "jax_step.py"
    script.write_text(JAX_STEP)
    done = subprocess.run([sys.executable, str(script), dataset["records"], *SETTINGS], cwd=ROOT, timeout=300,
                          env=_env(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu"), capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    values = [float(v) for v in done.stdout.split("LOSSES")[1].split()]
    assert all(np.isfinite(values)) and values[1] > 0


# ----------------------------------------------------------------------------------------------- registry/config
@pytest.mark.parametrize("name", ["compact_cnn", "efficientnet_b0", "efficientnet_b7"])
def test_registry_names_encoder_stages_at_strides_4_8_16(name):
    backbone = build_backbone(name, 64, 3, None)
    shapes = [tuple(t.shape[1:3]) for t in stage_outputs(backbone, name)]
    assert shapes == [(16, 16), (8, 8), (4, 4)]


def test_recipe_settings_are_checked():
    assert load_config(None, []).train.recipe == "plain"
    with pytest.raises(ValueError, match="train.recipe"):
        load_config(None, ["train.recipe=distill"]).validate()
    with pytest.raises(ValueError, match="divisible by 32"):
        masks.mask_size(100)
    with pytest.raises(ValueError, match="exposes no encoder stages"):
        stage_outputs(build_backbone("mobilenetv3_small", 64, 3, None), "mobilenetv3_small")


def test_memory_estimate_counts_the_tip_head_apart_and_its_help_starts_no_framework(capsys):
    """``python -m ranzcr_tf.model.memory``: each part counted once, the tip head (one 1x1 conv: a map per tube
    family at stride 4) apart from the decoder, and ``--help`` answers before any framework is imported."""
    from ranzcr_tf.labels import NUM_FAMILIES
    from ranzcr_tf.model import memory

    plain, tipped = memory.aux_seg_parts("compact_cnn", 64), memory.aux_seg_parts("compact_cnn", 64, tip=True)
    assert plain["tip"] == 0 and tipped["tip"] == NUM_FAMILIES * 16 * 16
    for part in ("encoder", "decoder", "rest"):
        assert tipped[part] == plain[part] > 0, part
    assert tipped["params"] - plain["params"] == NUM_FAMILIES * (64 + 1)  # 1x1 conv on the 64-wide stride-4 features
    assert memory.main(["--backbone", "compact_cnn", "--image-size", "64", "--tip", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "aux_seg + tip head, 2 image(s) per device" in out and "  tip " in out and "total" in out
    helped = subprocess.run([sys.executable, "-c", "import sys\ntry:\n    from ranzcr_tf.model import memory; "
                             "memory.main(['--help'])\nexcept SystemExit:\n    pass\n"
                             "print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))"],
                            capture_output=True, text=True, check=True)
    assert "--tip" in helped.stdout and helped.stdout.strip().endswith("[]"), helped.stdout[-500:]
    assert "oneDNN" not in helped.stderr
