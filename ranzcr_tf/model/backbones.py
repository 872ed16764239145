"""Backbone registry: name -> constructor, default resolution, channels; offline weight resolution.

    spec = BACKBONES["efficientnet_b7"]          # spec.default_size == 600
    backbone = build_backbone("efficientnet_b7", image_size=768, weights="imagenet")

Every backbone is a ``keras.Model`` named ``"backbone"`` that maps float pixels in [0, 255] (of its
``channels``) to a 4-D feature map; it normalises its input itself.

Weights (nothing is ever downloaded):

* ``None``: random initialisation.
* ``"imagenet"``: the file Keras would download, looked up under its original name in the Keras
  cache, ``$KERAS_HOME/models`` (default ``~/.keras/models``), e.g. ``efficientnetb0_notop.h5``.
  A missing file is a ``ValueError`` saying which file to put where.
* a local path (``.h5`` in the Keras-applications layout, or a ``.weights.h5`` such as the output of
  ``convert_efficientnet_package_weights``).

Both non-``None`` cases build the *same* graph: ``keras.applications.EfficientNet`` adds one extra
``Rescaling(1/sqrt(stddev))`` layer after its ``Normalization`` only when ``weights == "imagenet"``
(the published ImageNet files store the standard deviation where the variance belongs), so passing
a path straight to Keras would compute something different from the ``"imagenet"`` model. We always
pass ``weights="imagenet"`` and temporarily swap the application module's ``file_utils`` for a proxy
whose ``get_file`` returns the local file (``compat.application_file_utils``, Keras private API).
That also skips Keras' hash check, which would otherwise try to re-download a cached file whose hash
differs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import keras

from ranzcr_tf import compat

BACKBONE_NAME = "backbone"

KAGGLE_HINT = (
    "On Kaggle (no internet): attach a dataset that holds the file and copy it into the cache in the "
    "first cell: `mkdir -p ~/.keras/models && cp /kaggle/input/<your-dataset>/{fname} ~/.keras/models/` "
    "(or set KERAS_HOME before importing keras, or give model.weights=/kaggle/input/<your-dataset>/{fname})."
)


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone.

    ``channels``: 3 when the backbone needs RGB (a grayscale input is repeated to 3 channels inside the
    model); ``None`` when it takes whatever the model input has. ``application``: the
    ``keras.applications`` constructor, or ``None`` for our own architectures (random init only).
    """

    name: str
    default_size: int
    build: Callable[[tuple, str | None], keras.Model]
    channels: int | None
    application: str | None = None
    # Encoder stages at strides 4, 8 and 16 for a decoder (``train.recipe: aux_seg``): each the name prefix
    # of a stage's layers; the stage's output is its last layer (``stage_outputs``). None: not supported.
    feature_stages: tuple[str, ...] | None = None


def keras_cache_dir() -> str:
    """``$KERAS_HOME/models`` (read now, not at keras import) or Keras' default ``~/.keras/models``."""
    home = os.environ.get("KERAS_HOME")
    if not home:
        home = compat.keras_home()
    return os.path.join(os.path.expanduser(home), "models")


class _OfflineFileUtils:
    """Stands in for an application module's ``file_utils``: ``get_file`` serves a local file."""

    def __init__(self, original, backbone: str, weights: str):
        self._original = original
        self._backbone = backbone
        self._weights = weights
        self.resolved: str | None = None

    def __getattr__(self, name):  # exists(), etc. keep their real behaviour
        return getattr(self._original, name)

    def get_file(self, fname=None, origin=None, cache_subdir="models", **_ignored):
        if self._weights != "imagenet":
            self.resolved = self._weights
            return self._weights
        folder = keras_cache_dir() if cache_subdir == "models" else os.path.join(os.path.dirname(keras_cache_dir()), cache_subdir)
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            raise ValueError(
                f"ImageNet weights for backbone {self._backbone!r} are not in the Keras cache: put {fname} "
                f"into {folder} (download it from {origin} on a machine with internet). "
                + KAGGLE_HINT.format(fname=fname)
                + " Or set model.weights=none to train from scratch."
            )
        self.resolved = path
        return path


def _application(name: str, constructor_name: str, module_name: str, **extra):
    def build(input_shape: tuple, weights: str | None) -> keras.Model:
        constructor = getattr(keras.applications, constructor_name)
        if weights is None:
            return constructor(include_top=False, weights=None, input_shape=input_shape, **extra)
        with compat.application_file_utils(module_name, lambda original: _OfflineFileUtils(original, name, weights)):
            return constructor(include_top=False, weights="imagenet", input_shape=input_shape, **extra)

    return build


def _conv_bn(x, filters: int, kernel: int, strides: int, name: str):
    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation("swish", name=f"{name}_act")(x)


def _separable_residual(x, filters: int, name: str):
    y = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    y = keras.layers.BatchNormalization(name=f"{name}_dwbn")(y)
    y = keras.layers.Activation("swish", name=f"{name}_dwact")(y)
    y = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_pwconv")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_pwbn")(y)
    return keras.layers.Add(name=f"{name}_add")([x, y])


def _compact_net(input_shape: tuple, weights: str | None, *, name: str, stem_filters: int,
                 stage_filters: tuple, first_residual_stage: int, top_filters: int) -> keras.Model:
    """Five stride-2 conv-BN-swish stages (``stage{k}``: stride 2**k, with a residual depthwise-separable
    block from ``first_residual_stage`` on), an optional stride-1 stem before them, a 1x1 ``top``."""
    if weights == "imagenet":
        raise ValueError(f"backbone {name} has no ImageNet weights: set model.weights=none (or a local file)")
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    if stem_filters:
        x = _conv_bn(x, stem_filters, 3, 1, "stem")
    for stage, filters in enumerate(stage_filters, start=1):
        x = _conv_bn(x, filters, 3, 2, f"stage{stage}")
        if stage >= first_residual_stage:
            x = _separable_residual(x, filters, f"stage{stage}")
    x = _conv_bn(x, top_filters, 1, 1, "top")
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model


def _compact_cnn(input_shape: tuple, weights: str | None) -> keras.Model:
    """A small CNN for CPUs: five stride-2 stages of conv-BN-swish (+ one depthwise-separable conv).

    About 0.15 M parameters and 0.02 G multiply-adds at 128 px: trains from scratch on two CPU cores in
    minutes. Its BatchNorm layers make freezing behaviour testable like the big backbones'.
    """
    return _compact_net(input_shape, weights, name="compact_cnn", stem_filters=0,
                        stage_filters=(24, 32, 48, 64, 96), first_residual_stage=2, top_filters=192)


def _compact_cnn_wide(input_shape: tuple, weights: str | None) -> keras.Model:
    """compact_cnn for thin, faint lines: a full-resolution stem and about twice the filters per stage.

    A stride-1 3x3 stem (16 filters) looks at every pixel before anything is subsampled, so a line
    1-3 px wide becomes a feature map of its own instead of being averaged into its neighbours by
    the first stride-2 convolution; five stride-2 stages (32, 64, 96, 128, 192 filters), each with a
    residual depthwise-separable block, then a 1x1 convolution to 256 features. About 0.54 M
    parameters and 0.32 G multiply-adds at its default 256 px (compact_cnn: 0.15 M, 0.07 G at 256 px);
    0.08 G at 128 px, 0.72 G at 384 px (``python -m ranzcr_tf.model --summary``).
    """
    return _compact_net(input_shape, weights, name="compact_cnn_wide", stem_filters=16,
                        stage_filters=(32, 64, 96, 128, 192), first_residual_stage=1, top_filters=256)


def _line_cnn(input_shape: tuple, weights: str | None) -> keras.Model:
    """A plain 10-convolution CNN for thin lines: 2x2 max pooling, not strided convolutions, subsamples.

    A stride-1 3x3 stem (16 filters) at full resolution, then five stages, each a 2x2 max pool (so
    stage ``k`` is at stride 2**k) and one (stage 1: 24 filters) or two 3x3 conv-BN-swish layers (32,
    48, 64, 96 filters), then a 1x1 convolution to 192 features. Max pooling keeps a bright line's
    peak where a stride-2 convolution averages a 1-px line into its neighbours; about 0.2 M
    parameters and 0.19 G multiply-adds at 256 px, 0.43 G at 384 px.
    """
    if weights == "imagenet":
        raise ValueError("backbone line_cnn has no ImageNet weights: set model.weights=none (or a local file)")
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = _conv_bn(x, 16, 3, 1, "stem")
    for stage, filters in enumerate((24, 32, 48, 64, 96), start=1):
        x = keras.layers.MaxPooling2D(2, name=f"stage{stage}_pool")(x)
        x = _conv_bn(x, filters, 3, 1, f"stage{stage}a")
        if stage > 1:
            x = _conv_bn(x, filters, 3, 1, f"stage{stage}b")
    x = _conv_bn(x, 192, 1, 1, "top")
    model = keras.Model(inputs, x, name="line_cnn")
    if weights is not None:
        model.load_weights(weights)
    return model


# Keras' EfficientNet (V1 and V2) names its blocks blockNx_*: block2 ends at stride 4, block3 at 8, block5 at 16.
_EFFICIENTNET_STAGES = ("block2", "block3", "block5")
_EFFICIENTNET_SIZES = (224, 240, 260, 300, 380, 456, 528, 600)
# V2-M / V2-L are left out: each takes long to build, and at RANZCR sizes they are slower than B7 on TPUs.
_EFFICIENTNETV2 = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "s": 384}

BACKBONES: dict[str, BackboneSpec] = {}
for _i, _size in enumerate(_EFFICIENTNET_SIZES):
    BACKBONES[f"efficientnet_b{_i}"] = BackboneSpec(
        f"efficientnet_b{_i}", _size, _application(f"efficientnet_b{_i}", f"EfficientNetB{_i}", "efficientnet"), 3,
        f"EfficientNetB{_i}", _EFFICIENTNET_STAGES)
for _variant, _size in _EFFICIENTNETV2.items():
    _ctor = f"EfficientNetV2{_variant.upper()}"
    BACKBONES[f"efficientnetv2_{_variant}"] = BackboneSpec(
        f"efficientnetv2_{_variant}", _size,
        _application(f"efficientnetv2_{_variant}", _ctor, "efficientnet_v2", include_preprocessing=True), 3, _ctor,
        _EFFICIENTNET_STAGES)
BACKBONES["mobilenetv3_small"] = BackboneSpec(
    "mobilenetv3_small", 224,
    _application("mobilenetv3_small", "MobileNetV3Small", "mobilenet_v3", include_preprocessing=True), 3, "MobileNetV3Small")
# Both compact CNNs reach stride 2**k at stage k: stages 2-4 are strides 4, 8 and 16.
BACKBONES["compact_cnn"] = BackboneSpec("compact_cnn", 128, _compact_cnn, None,
                                        feature_stages=("stage2_add", "stage3_add", "stage4_add"))
BACKBONES["compact_cnn_wide"] = BackboneSpec("compact_cnn_wide", 256, _compact_cnn_wide, None,
                                             feature_stages=("stage2_add", "stage3_add", "stage4_add"))
BACKBONES["line_cnn"] = BackboneSpec("line_cnn", 256, _line_cnn, None,
                                     feature_stages=("stage2b_act", "stage3b_act", "stage4b_act"))


def list_backbones() -> list[str]:
    """Registered backbone names, in registry order."""
    return list(BACKBONES)


def get_spec(name: str) -> BackboneSpec:
    """The registry entry of ``name``; a ``ValueError`` listing the valid names otherwise."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; set model.backbone to one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def check_weights(weights: str | None) -> str | None:
    """Normalise ``model.weights``: None/"none" -> None, "imagenet", or an existing local file."""
    if weights is None or str(weights).lower() in ("none", "null", ""):
        return None
    if weights == "imagenet":
        return weights
    path = os.path.expanduser(str(weights))
    if not os.path.isfile(path):
        raise ValueError(
            f"model.weights = {weights!r}: no such file; expected none, imagenet or the path of a weights file")
    return path


def build_backbone(name: str, image_size: int, channels: int = 3, weights: str | None = None) -> keras.Model:
    """Build backbone ``name`` for square ``image_size`` inputs, as a ``keras.Model`` named ``"backbone"``.

    ``channels`` is used only by backbones that take any channel count (``spec.channels is None``);
    the others always take 3. See the module docstring for ``weights``.
    """
    spec = get_spec(name)
    if image_size < 32:
        raise ValueError(f"image size {image_size} is too small for {name}: expected >= 32")
    in_channels = spec.channels or channels
    model = spec.build((image_size, image_size, in_channels), check_weights(weights))
    model.name = BACKBONE_NAME
    return model


def stage_outputs(backbone: keras.Model, name: str) -> list:
    """The symbolic outputs of backbone ``name``'s feature stages (strides 4, 8, 16) inside ``backbone``."""
    spec = get_spec(name)
    if spec.feature_stages is None:
        supported = [n for n, s in BACKBONES.items() if s.feature_stages]
        raise ValueError(f"backbone {name} exposes no encoder stages for a decoder (train.recipe aux_seg): "
                         f"use one of {', '.join(supported)}")
    outputs = []
    for prefix in spec.feature_stages:
        matches = [layer for layer in backbone.layers if layer.name.startswith(prefix)]
        if not matches:
            raise ValueError(f"backbone {name} has no layer named {prefix}*: its registry entry is out of date")
        outputs.append(matches[-1].output)
    return outputs
