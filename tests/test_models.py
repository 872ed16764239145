"""Models: registry, heads, offline weights, freezing, mixed precision, safe-mode loading, weight conversion."""

import os

import h5py
import keras
import numpy as np
import pytest

from ranzcr_tf import labels
from ranzcr_tf.config import ModelConfig
from ranzcr_tf.model.__main__ import main
from ranzcr_tf.model.backbones import BACKBONES, build_backbone, list_backbones
from ranzcr_tf.model.build import assemble_model, build_model, count_macs, get_backbone, set_backbone_trainable
from ranzcr_tf.model.noisy_student import IMAGENET_MEAN, IMAGENET_STDDEV, convert_efficientnet_package_weights
from ranzcr_tf.model.precision import apply_policy

RNG = np.random.default_rng(0)


def _images(n, size, channels):
    return RNG.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def _copy_head(src, dst):
    for layer in src.layers:
        if layer.name.startswith("head") and layer.weights:
            dst.get_layer(layer.name).set_weights(layer.get_weights())


@pytest.mark.slow
def test_every_backbone_builds_with_1_and_3_channels():
    assert {f"efficientnet_b{i}" for i in range(8)} <= set(list_backbones())
    assert [BACKBONES[f"efficientnet_b{i}"].default_size for i in range(8)] == [224, 240, 260, 300, 380, 456, 528, 600]
    gray = _images(2, 32, 1)
    inputs = {1: gray, 3: np.repeat(gray, 3, axis=-1)}
    for name in list_backbones():
        if BACKBONES[name].channels is None:  # takes the model's channels natively: two separate builds
            models = {ch: build_model(ModelConfig(backbone=name, input_channels=ch), 32) for ch in (1, 3)}
        else:  # one (slow) backbone build wrapped twice
            backbone = build_backbone(name, 32, weights=None)
            models = {ch: assemble_model(ModelConfig(backbone=name, input_channels=ch), backbone) for ch in (1, 3)}
            _copy_head(models[1], models[3])
            assert "repeat_channels" in [layer.name for layer in models[1].layers]
        outputs = {}
        for ch, model in models.items():
            assert model.input.shape == (None, 32, 32, ch) and model.input.name == "image"
            outputs[ch] = np.asarray(model(inputs[ch]))
            assert outputs[ch].shape == (2, labels.NUM_CLASSES) and outputs[ch].dtype == np.float32, name
            assert np.isfinite(outputs[ch]).all(), name
        if BACKBONES[name].channels == 3:
            # Same backbone, same head: a grayscale image gives what its 3-channel repeat gives.
            scale = np.abs(outputs[3]).max()
            assert scale > 0, name
            np.testing.assert_allclose(outputs[1], outputs[3], rtol=1e-4, atol=1e-4 * scale, err_msg=name)
        keras.backend.clear_session()


def test_per_group_head_output_follows_label_order():
    cfg = ModelConfig(backbone="compact_cnn", head="per_group", output="logits", dropout_rate=0.0)
    model = build_model(cfg, 32)
    for group, members in labels.GROUPS.items():
        head = model.get_layer(f"head_{group.lower().replace(' ', '_')}")
        kernel, _ = head.get_weights()
        assert kernel.shape[1] == len(members)
        # Each unit's bias is the index of its label in LABELS: the output must read 0, 1, ..., 10.
        head.set_weights([np.zeros_like(kernel), np.array([labels.LABELS.index(m) for m in members], "float32")])
    np.testing.assert_array_equal(model(_images(3, 32, 1)), np.tile(np.arange(11, dtype="float32"), (3, 1)))

    probs = build_model(ModelConfig(backbone="compact_cnn", output="probabilities"), 32)(_images(2, 32, 1))
    assert np.all((np.asarray(probs) > 0) & (np.asarray(probs) < 1))


def _save_legacy_h5(model, path):
    from keras.src.legacy.saving import legacy_h5_format

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


def test_imagenet_from_cache_and_local_path_compute_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    cfg = ModelConfig(backbone="efficientnet_b0", weights="imagenet", input_channels=1, pooling="avg")
    with pytest.raises(ValueError, match=r"efficientnetb0_notop\.h5.*keras_home/models"):
        build_model(cfg, 64)
    with pytest.raises(ValueError, match="no such file"):
        build_model(ModelConfig(backbone="efficientnet_b0", weights=str(tmp_path / "missing.h5")), 64)
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model(ModelConfig(backbone="compact_cnn", weights="imagenet"), 64)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model(ModelConfig(backbone="efficientnet_b9"), 64)

    # A random B0 stands in for the published file, with non-trivial normalisation statistics.
    source = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(64, 64, 3))
    norm = next(layer for layer in source.layers if isinstance(layer, keras.layers.Normalization))
    norm.set_weights([np.array([0.4, 0.5, 0.6], "float32"), np.array([0.2, 0.25, 0.3], "float32"), norm.get_weights()[2]])
    weights_file = str(tmp_path / "keras_home" / "models" / "efficientnetb0_notop.h5")
    _save_legacy_h5(source, weights_file)

    from_cache = build_model(cfg, 64)
    from_path = build_model(ModelConfig(backbone="efficientnet_b0", weights=weights_file, input_channels=1), 64)
    _copy_head(from_cache, from_path)
    np.testing.assert_array_equal(get_backbone(from_cache).get_layer("stem_conv").get_weights()[0],
                                  source.get_layer("stem_conv").get_weights()[0])
    x = _images(2, 64, 1)
    np.testing.assert_array_equal(from_cache(x), from_path(x))

    # The trap this avoids: Keras' own weights=<path> graph lacks one Rescaling and computes differently.
    naive = keras.applications.EfficientNetB0(include_top=False, weights=weights_file, input_shape=(64, 64, 3))
    x3 = np.repeat(x, 3, axis=-1).astype("float32")
    ours = np.asarray(get_backbone(from_path)(x3))
    assert np.abs(np.asarray(naive(x3)) - ours).max() > 0.1 * np.abs(ours).max()


def test_frozen_backbone_keeps_weights_and_bn_statistics_then_unfrozen_trains():
    model = build_model(ModelConfig(backbone="compact_cnn", dropout_rate=0.0), 32)
    backbone = get_backbone(model)
    x, y = _images(16, 32, 1), RNG.integers(0, 2, size=(16, 11)).astype("float32")

    set_backbone_trainable(model, False)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    before = [v.numpy().copy() for v in backbone.weights]
    head_before = model.get_layer("head").get_weights()[0].copy()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, backbone.weights))
    assert not np.array_equal(head_before, model.get_layer("head").get_weights()[0])
    assert any("moving_mean" in v.path for v in backbone.weights)

    set_backbone_trainable(model, True)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    changed = {v.path: not np.array_equal(b, v.numpy()) for b, v in zip(before, backbone.weights)}
    kernels = [c for p, c in changed.items() if p.endswith("kernel")]
    assert len(kernels) >= 10 and all(kernels)
    moving = [c for p, c in changed.items() if "moving_mean" in p or "moving_variance" in p]
    assert moving and all(moving)


@pytest.fixture
def restore_policy():
    yield
    apply_policy("float32")


@pytest.mark.parametrize("policy,compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_outputs_are_float32_under_mixed_precision(policy, compute, restore_policy):
    apply_policy(policy)
    model = build_model(ModelConfig(backbone="compact_cnn", pooling="gem", head="per_group"), 32)
    assert get_backbone(model).get_layer("stage1_conv").compute_dtype == compute
    assert model.get_layer("cast").compute_dtype == compute
    for x in (_images(2, 32, 1), _images(2, 32, 1).astype("float32")):
        out = model(x)
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
    model.compile(optimizer="adam", loss=keras.losses.BinaryCrossentropy(from_logits=True))
    history = model.fit(_images(4, 32, 1), np.ones((4, 11), "float32"), batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_saved_model_with_custom_layers_reloads_in_safe_mode_but_lambda_does_not(tmp_path):
    model = build_model(ModelConfig(backbone="mobilenetv3_small", pooling="gem", input_channels=1), 32)
    model.get_layer("gem_pool").p.assign(2.5)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert {"cast", "repeat_channels", "gem_pool"} <= {layer.name for layer in loaded.layers}
    assert float(loaded.get_layer("gem_pool").p.numpy()) == 2.5
    x = _images(2, 32, 1)
    np.testing.assert_allclose(model(x), loaded(x), rtol=1e-6, atol=1e-6)

    inputs = keras.Input((4,))
    lambda_model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0)(inputs))
    lambda_path = str(tmp_path / "lambda.keras")
    lambda_model.save(lambda_path)
    with pytest.raises(ValueError, match="(?i)lambda|safe_mode"):
        keras.models.load_model(lambda_path, safe_mode=True)


# ------------------------------------------------------------------------------------- noisy-student conversion


def _write_package_style_h5(path, backbone, corrupt=None):
    """A weight file in the `efficientnet` package layout (Keras-2 HDF5, no Normalization layer)."""
    arrays = {}
    with h5py.File(path, "w") as f:
        names = [layer.name for layer in backbone.layers if not isinstance(layer, keras.layers.Normalization)]
        if corrupt == "extra_layer":
            names.append("block9a_dwconv")
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.2.4"
        for name in names:
            group = f.create_group(name)
            weights = backbone.get_layer(name).weights if name != "block9a_dwconv" else backbone.get_layer("stem_conv").weights
            weight_names = []
            for variable in weights:
                short = variable.name.split("/")[-1]
                if name.endswith("dwconv") and short == "kernel":
                    short = "depthwise_kernel"  # the package's (Keras 2) name for a depthwise kernel
                shape = tuple(variable.shape)
                if corrupt == "bad_shape" and name == "top_conv":
                    shape = (1, 1, shape[2], shape[3] + 8)
                data = RNG.normal(size=shape).astype("float32")
                if "variance" in short:
                    data = np.abs(data) + 0.5
                weight_names.append(f"{name}/{short}:0".encode())
                group.create_dataset(f"{name}/{short}:0", data=data)
                arrays[(name, variable.name.split("/")[-1])] = data
            group.attrs["weight_names"] = np.array(weight_names, dtype="S")
    return arrays


def test_noisy_student_conversion_reproduces_source_weights(tmp_path):
    reference = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(64, 64, 3))
    source = str(tmp_path / "efficientnet-b0_noisy-student_notop.h5")
    arrays = _write_package_style_h5(source, reference)
    out = str(tmp_path / "b0_ns.weights.h5")
    assert main(["--convert-noisy-student", source, "--backbone", "efficientnet_b0", "--out", out]) == 0

    model = build_model(ModelConfig(backbone="efficientnet_b0", weights=out, input_channels=3), 64)
    backbone = get_backbone(model)
    for (layer_name, variable), data in arrays.items():
        value = next(v for v in backbone.get_layer(layer_name).weights if v.name.split("/")[-1] == variable)
        np.testing.assert_array_equal(value.numpy(), data, err_msg=f"{layer_name}/{variable}")
    # Inside the model, pixels are normalised as the package's preprocess_input(mode="torch") does.
    x = _images(2, 64, 3).astype("float32")
    stem_in = keras.Model(backbone.input, backbone.get_layer("stem_conv_pad").input)(x)
    expected = (x / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STDDEV)
    np.testing.assert_allclose(stem_in, expected, rtol=1e-4, atol=1e-4)

    for corrupt, message in (("extra_layer", "block9a_dwconv"), ("bad_shape", "top_conv")):
        bad = str(tmp_path / f"{corrupt}.h5")
        _write_package_style_h5(bad, reference, corrupt=corrupt)
        with pytest.raises(ValueError, match=message):
            convert_efficientnet_package_weights(bad, "efficientnet_b0", str(tmp_path / "x.weights.h5"))


def test_macs_are_counted_from_layer_shapes(capsys):
    b0 = build_model(ModelConfig(backbone="efficientnet_b0"), 224)
    # EfficientNet-B0 is published at 0.39 G multiply-adds at 224 px.
    assert 0.37e9 < count_macs(b0) < 0.41e9
    tiny = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(4, 3, padding="same"),
                             keras.layers.DepthwiseConv2D(3, strides=2, padding="same"), keras.layers.Flatten(),
                             keras.layers.Dense(5)])
    assert count_macs(tiny) == 8 * 8 * 9 * 2 * 4 + 4 * 4 * 9 * 4 + 64 * 5
    assert main(["--summary", "--image-size", "64", "--backbones", "compact_cnn"]) == 0
    assert "compact_cnn" in capsys.readouterr().out
    assert main(["--summary", "--backbones", "resnet9000"]) == 2  # the CLI's bad-input exit, one line
    assert "unknown backbone" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- pooling options, wide CNN


@pytest.mark.parametrize("backbone,pooling", [("compact_cnn", "avg"), ("compact_cnn", "gem"), ("compact_cnn", "max"),
                                              ("compact_cnn", "avgmax"), ("compact_cnn_wide", "max"),
                                              ("line_cnn", "max")])
def test_each_pooling_trains_a_step_and_reloads_in_safe_mode_with_equal_predictions(backbone, pooling, tmp_path):
    model = build_model(ModelConfig(backbone=backbone, pooling=pooling, dropout_rate=0.1), 32)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    head_before = model.get_layer("head").get_weights()[0].copy()
    x, y = _images(8, 32, 1), RNG.integers(0, 2, size=(8, 11)).astype("float32")
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.array_equal(head_before, model.get_layer("head").get_weights()[0])

    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_max_and_avgmax_pool_the_backbone_features_as_named():
    x = _images(3, 64, 1)
    for pooling, layer in (("avg", "avg_pool"), ("max", "max_pool"), ("avgmax", "avgmax_pool")):
        model = build_model(ModelConfig(backbone="compact_cnn", pooling=pooling), 64)
        features = np.asarray(get_backbone(model)(x.astype("float32")))  # (3, 2, 2, 192)
        pooled = np.asarray(keras.Model(model.input, model.get_layer(layer).output)(x))
        expected = {"avg": features.mean(axis=(1, 2)), "max": features.max(axis=(1, 2)),
                    "avgmax": np.concatenate([features.mean(axis=(1, 2)), features.max(axis=(1, 2))], axis=-1)}[pooling]
        assert pooled.shape == expected.shape, pooling
        np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-5, err_msg=pooling)
    # The head of avgmax reads twice the backbone's features.
    assert model.get_layer("head").get_weights()[0].shape == (2 * 192, labels.NUM_CLASSES)


def test_pooling_option_is_validated_naming_the_key():
    from ranzcr_tf.config import load_config

    with pytest.raises(ValueError, match=r"model\.pooling.*'median'.*avgmax"):
        ModelConfig(pooling="median").validate()
    with pytest.raises(ValueError, match=r"model\.pooling"):
        load_config(None, ["model.pooling=mean"])
    assert load_config(None, ["model.pooling=avgmax"]).model.pooling == "avgmax"


def test_compact_cnn_wide_keeps_full_resolution_in_its_stem():
    assert BACKBONES["compact_cnn_wide"].default_size == 256 and BACKBONES["compact_cnn_wide"].channels is None
    wide = build_backbone("compact_cnn_wide", 64, channels=1)
    narrow = build_backbone("compact_cnn", 64, channels=1)
    # compact_cnn halves the image in its first convolution; the wide one convolves every pixel first.
    assert narrow.get_layer("stage1_conv").output.shape[1:3] == (32, 32)
    assert wide.get_layer("stem_conv").output.shape[1:3] == (64, 64)
    assert wide.output.shape[1:] == (2, 2, 256) and narrow.output.shape[1:] == (2, 2, 192)
    assert wide.count_params() > 3 * narrow.count_params()
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_backbone("compact_cnn_wide", 64, weights="imagenet")


def test_line_cnn_subsamples_by_max_pooling_and_keeps_a_one_pixel_line():
    spec = BACKBONES["line_cnn"]
    assert spec.default_size == 256 and spec.channels is None
    net = build_backbone("line_cnn", 64, channels=1)
    assert net.get_layer("stem_conv").output.shape[1:3] == (64, 64)
    assert not [layer.name for layer in net.layers if getattr(layer, "strides", (1, 1)) != (1, 1)
                and not layer.name.endswith("_pool")], "only the max pools subsample"
    # The decoder's feature stages exist at strides 4, 8 and 16.
    assert [net.get_layer(name).output.shape[1] for name in spec.feature_stages] == [16, 8, 4]
    # A 2x2 max pool passes a 1-px bright line at full height wherever it lies; a stride-2 average halves it.
    pool = net.get_layer("stage1_pool")
    for column in (10, 11):
        image = np.zeros((1, 8, 32, 1), "float32")
        image[:, :, column] = 1.0
        assert np.asarray(pool(image)).max() == 1.0
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_backbone("line_cnn", 64, weights="imagenet")
