"""Grad-CAM on a model whose answer is known: the backbone's feature map is the local brightness (8 x 8
average pooling), the head weighs it +1 for one column and -1 for another. The heat map of the first must
peak on the bright spot, the second must be empty; TensorFlow and JAX give the same maps. The trained
localisation check is in ``test_report.py``."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from ranzcr_tf.model.backbones import BACKBONE_NAME
from ranzcr_tf.report.gradcam import GradCam, make_cam, peak_position, tube_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
SPOTS = [(40, 20), (8, 52), (28, 30)]  # top-left corners of 4 x 4 bright squares, one per image


def brightness_model():
    """image -> backbone (8 x 8 average pooling: one feature, the brightness) -> avg pool -> Dense head."""
    inner = keras.Input((SIZE, SIZE, 1))
    backbone = keras.Model(inner, keras.layers.AveragePooling2D(8)(inner), name=BACKBONE_NAME)
    image = keras.Input((SIZE, SIZE, 1), name="image")
    pooled = keras.layers.GlobalAveragePooling2D()(backbone(image))
    head = keras.layers.Dense(11, name="head")
    logits = keras.layers.Activation("linear", name="logits")(head(pooled))
    kernel = np.zeros((1, 11), "float32")
    kernel[0, 2], kernel[0, 5] = 1.0, -1.0
    head.set_weights([kernel, np.zeros(11, "float32")])
    return keras.Model(image, logits)


def spot_images():
    images = np.full((len(SPOTS), SIZE, SIZE, 1), 10.0, "float32")
    for i, (row, column) in enumerate(SPOTS):
        images[i, row:row + 4, column:column + 4] = 250.0
    return images


def test_heat_map_peaks_on_the_bright_spot_and_is_empty_for_negative_evidence():
    cam = GradCam(brightness_model())
    maps = cam.heatmaps(spot_images(), column=2)
    assert maps.shape == (len(SPOTS), SIZE, SIZE) and maps.dtype == np.float32
    assert np.isclose(maps.max(axis=(1, 2)), 1.0).all() and maps.min() >= 0
    for heatmap, (row, column) in zip(maps, SPOTS):
        peak = np.array(peak_position(heatmap))
        centre = np.array([row + 1.5, column + 1.5])
        assert np.abs(peak - centre).max() <= 4, (peak, centre)  # within the spot's 8 x 8 cell
    assert not cam.heatmaps(spot_images(), column=5).any()  # the spot lowers column 5: nothing to show
    # any output size: the peak scales with it
    big = cam.heatmaps(spot_images()[:1], column=2, output_size=(128, 128))[0]
    assert np.abs(np.array(peak_position(big)) - 2 * np.array([41.5, 21.5])).max() <= 8


def test_layercam_weighs_each_position_by_its_own_gradient():
    cam = GradCam(brightness_model(), weighting="elementwise")
    maps = cam.heatmaps(spot_images(), column=2)
    for heatmap, (row, column) in zip(maps, SPOTS):
        assert np.abs(np.array(peak_position(heatmap)) - np.array([row + 1.5, column + 1.5])).max() <= 4
    assert not cam.heatmaps(spot_images(), column=5).any()  # negative gradients are cut before the sum
    assert cam.description.startswith("LayerCAM on the last stage")
    with pytest.raises(ValueError, match="weighting"):
        GradCam(brightness_model(), weighting="max")


def compact_model(backbone: str = "compact_cnn"):
    """The demo preset's classifier (``backbone``, no weights) at SIZE px, seeded."""
    from ranzcr_tf.config import load_config
    from ranzcr_tf.model.build import build_model

    keras.utils.set_random_seed(0)
    cfg = load_config(os.path.join(ROOT, "configs", "cpu_demo.yaml"),
                      [f"model.backbone={backbone}", "model.weights=none"])
    return build_model(cfg.model, SIZE)


@pytest.mark.parametrize("backbone", ["efficientnet_b0", "efficientnetv2_b0", "line_cnn"])
def test_the_report_heat_map_splits_every_staged_backbone_without_changing_its_scores(backbone):
    model = compact_model(backbone)
    images = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 1)).astype("float32")
    last, cam = GradCam(model), make_cam(model, backbone)
    assert cam.feature_size == (SIZE // 4, SIZE // 4), cam.description
    np.testing.assert_allclose(np.asarray(cam.head_model(cam.features_model(images))),
                               np.asarray(last.head_model(last.features_model(images))), rtol=1e-5, atol=1e-5)


def test_an_inner_stage_split_computes_the_same_scores_on_a_finer_grid():
    model = compact_model()
    images = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 1)).astype("float32")
    last = GradCam(model)
    reference = np.asarray(last.head_model(last.features_model(images)))
    for stage, grid in enumerate((16, 8, 4)):  # strides 4, 8, 16
        cam = GradCam(model, stage=stage, backbone="compact_cnn", weighting="elementwise")
        assert cam.feature_size == (grid, grid), cam.description
        np.testing.assert_allclose(np.asarray(cam.head_model(cam.features_model(images))), reference, rtol=1e-5,
                                   atol=1e-5)
        assert cam.heatmaps(images, 3).shape == (2, SIZE, SIZE)
    assert make_cam(model, "compact_cnn").feature_size == (16, 16)  # the report's default: LayerCAM, stride 4
    assert make_cam(model, "compact_cnn", "gradcam").feature_size == (2, 2)
    assert make_cam(brightness_model(), "mobilenetv3_small").description.startswith("Grad-CAM on the last")  # no stages
    with pytest.raises(ValueError, match="backbone="):
        GradCam(model, stage=0)


def test_jax_backend_gives_the_same_heat_maps(tmp_path):
    pytest.importorskip("jax")
    model = compact_model()
    np.savez(tmp_path / "weights.npz", *model.get_weights())
    images = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 1)).astype("float32")
    np.save(tmp_path / "images.npy", images)
    script = (f"import sys, json, numpy as np; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); "
              "import test_gradcam as t; from ranzcr_tf.report.gradcam import GradCam, make_cam; "
              f"np.save({str(tmp_path / 'jax.npy')!r}, GradCam(t.brightness_model()).heatmaps(t.spot_images(), 2)); "
              f"m = t.compact_model(); w = np.load({str(tmp_path / 'weights.npz')!r}); "
              "m.set_weights([w[f'arr_{i}'] for i in range(len(w.files))]); "
              f"np.save({str(tmp_path / 'jax_layercam.npy')!r}, make_cam(m, 'compact_cnn').heatmaps("
              f"np.load({str(tmp_path / 'images.npy')!r}), 2)); "
              "import keras; print(json.dumps(keras.backend.backend()))")
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == "jax"
    tensorflow_maps = GradCam(brightness_model()).heatmaps(spot_images(), 2)
    np.testing.assert_allclose(np.load(tmp_path / "jax.npy"), tensorflow_maps, atol=1e-5)
    layercam = make_cam(model, "compact_cnn").heatmaps(images, 2)  # an inner stage: three models chained
    assert layercam.max() > 0
    np.testing.assert_allclose(np.load(tmp_path / "jax_layercam.npy"), layercam, atol=1e-4)


def test_tube_mask_widens_the_family_lines_by_the_tolerance():
    # one ETT line (label 2) down column 10 from row 5 to row 25, one CVC line (label 9) elsewhere, 32 px stored
    parsed = {"height": 32, "width": 32, "ann_label": np.array([2, 9]), "ann_num_points": np.array([2, 2]),
              "ann_xy": np.array([[10, 5], [10, 25], [25, 2], [25, 8]], "float32")}
    mask = tube_mask(parsed, family=0, tolerance=2.0)  # ETT is family 0
    rows, columns = np.nonzero(mask)
    assert columns.min() == 8 and columns.max() == 12 and rows.min() == 3 and rows.max() == 27
    assert not mask[:, 20:].any()  # the CVC line is another family
    assert tube_mask(parsed, family=2, tolerance=1.0)[2:9, 25].all()
