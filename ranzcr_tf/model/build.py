"""The RANZCR model: image -> backbone -> pooling -> dropout -> head -> 11 outputs in ``labels.LABELS`` order.

    model = build_model(cfg.model, image_size=768)     # input "image": (768, 768, channels), uint8 or float
    set_backbone_trainable(model, False)               # staged fine-tuning; recompile afterwards

    python -m ranzcr_tf.model --summary --image-size 768       # the command line: model/__main__.py

Written with ``keras`` / ``keras.ops`` only (no TensorFlow import) so it runs on the TensorFlow and
JAX backends. Every custom layer is registered (``ranzcr_tf.model.layers``), so saved ``.keras`` files load
with ``keras.models.load_model(path, safe_mode=True)`` and no ``custom_objects``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # ``python -m ranzcr_tf.model.build``, the older spelling: the command (model/__main__.py)
    from ranzcr_tf.model.__main__ import main  # parses its arguments before Keras and TensorFlow load

    sys.exit(main(prog="python -m ranzcr_tf.model.build"))

import time

import keras

from ranzcr_tf import labels
from ranzcr_tf.config import ModelConfig
from ranzcr_tf.model.backbones import BACKBONE_NAME, BACKBONES, build_backbone, get_spec, list_backbones  # noqa: F401
from ranzcr_tf.model.layers import CastToComputeDtype, GeMPooling2D, RepeatChannels

INPUT_NAME = "image"


def build_model(model_cfg: ModelConfig, image_size: int, num_classes: int = labels.NUM_CLASSES,
                groups: dict | None = None) -> keras.Model:
    """Build the classifier described by ``model_cfg`` for square ``image_size`` inputs.

    Input ``"image"``: ``(image_size, image_size, model_cfg.input_channels)`` pixels in [0, 255], uint8
    or float (float32 / bfloat16); cast inside the model to the compute dtype of the global dtype policy
    (set it first with ``ranzcr_tf.model.precision.apply_policy``). A 1-channel input is repeated to 3 channels
    for RGB backbones. Output: ``(batch, num_classes)`` float32 even under mixed precision, in
    ``labels.LABELS`` order, logits or sigmoid probabilities per ``model_cfg.output``.

    ``model_cfg.head``: ``"single"`` is one ``Dense(num_classes)``; ``"per_group"`` is one Dense per tube
    family of ``labels.GROUPS`` (ETT 3, NGT 4, CVC 3, Swan Ganz 1), concatenated in label order
    (needs ``num_classes == 11``); another task passes its own ``groups`` (``task.groups``: head name -> labels).
    An input of more channels than an RGB backbone takes (DICOM windows x slices) is mixed down to its 3 by a
    learned 1x1 convolution (``channel_mix``).
    """
    model_cfg.validate()
    get_spec(model_cfg.backbone)
    backbone = build_backbone(model_cfg.backbone, image_size, model_cfg.input_channels, model_cfg.weights)
    return assemble_model(model_cfg, backbone, num_classes, groups)


def assemble_model(model_cfg: ModelConfig, backbone: keras.Model, num_classes: int = labels.NUM_CLASSES,
                   groups: dict | None = None) -> keras.Model:
    """``build_model`` around an already built ``backbone`` (from ``backbones.build_backbone``).

    The input size is the backbone's; a 3-channel backbone serves a 1- or 3-channel model, so one
    backbone build can be wrapped twice (the tests do this to stay fast).
    """
    groups = labels.GROUPS if groups is None else groups
    if model_cfg.head == "per_group" and sum(len(m) for m in groups.values()) != num_classes:
        raise ValueError(f"model.head = per_group needs num_classes = {sum(len(m) for m in groups.values())} "
                         f"(its groups' labels); got {num_classes}")
    image_size = backbone.input.shape[1]

    # float32 at the boundary: Keras converts a uint8 / bfloat16 batch to the Input's dtype exactly (0..255
    # are exact in float32), while a uint8 Input would truncate augmented float pixels.
    inputs = keras.Input(shape=(image_size, image_size, model_cfg.input_channels), dtype="float32", name=INPUT_NAME)
    x = CastToComputeDtype(name="cast")(inputs)
    backbone_channels = backbone.input.shape[-1]
    if backbone_channels != model_cfg.input_channels:
        if model_cfg.input_channels == 1:
            x = RepeatChannels(backbone_channels, name="repeat_channels")(x)
        elif model_cfg.input_channels > backbone_channels:  # windows x slices -> the backbone's RGB
            x = keras.layers.Conv2D(backbone_channels, 1, name="channel_mix")(x)
        else:
            raise ValueError(f"backbone {model_cfg.backbone} takes {backbone_channels} channels; "
                             f"set model.input_channels to 1, {backbone_channels} or more")
    outputs = classifier_head(backbone(x), model_cfg, num_classes, groups)
    return keras.Model(inputs, outputs, name=f"ranzcr_{model_cfg.backbone}")


def classifier_head(features, model_cfg: ModelConfig, num_classes: int = labels.NUM_CLASSES, groups: dict | None = None):
    """Pooling, dropout and the float32 head on the backbone's feature map: the model's outputs (one copy for
    the classifier and the 3-stage teacher)."""
    x = pool_features(features, model_cfg)
    if model_cfg.dropout_rate > 0:
        x = keras.layers.Dropout(model_cfg.dropout_rate, name="head_dropout")(x)

    # The head computes in float32 under mixed precision: its logits feed the loss and the AUC.
    if model_cfg.head == "per_group":
        parts = [keras.layers.Dense(len(members), dtype="float32", name=f"head_{_slug(group)}")(x)
                 for group, members in (labels.GROUPS if groups is None else groups).items()]
        x = keras.layers.Concatenate(axis=-1, dtype="float32", name="head_concat")(parts)
    else:
        x = keras.layers.Dense(num_classes, dtype="float32", name="head")(x)
    if model_cfg.output == "probabilities":
        return keras.layers.Activation("sigmoid", dtype="float32", name="probabilities")(x)
    return keras.layers.Activation("linear", dtype="float32", name="logits")(x)


def pool_features(features, model_cfg: ModelConfig):
    """Global pooling of the backbone's 4-D feature map per ``model_cfg.pooling``, to ``(batch, features)``.

    ``avg``: mean over positions. ``gem``: generalised mean with a learnable exponent (``gem_p`` to
    start). ``max``: maximum over positions, so a feature that fires on a few positions only (a thin,
    faint line in a large map) reaches the head at full strength instead of divided by the map's area.
    ``avgmax``: both concatenated (twice the features), the head weighs extent against peak per feature.
    All are built-in Keras layers or our registered ``GeMPooling2D``, so saved models reload in safe mode.
    """
    if model_cfg.pooling == "gem":
        return GeMPooling2D(p=model_cfg.gem_p, name="gem_pool")(features)
    if model_cfg.pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(features)
    if model_cfg.pooling == "avgmax":
        average = keras.layers.GlobalAveragePooling2D(name="avg_pool")(features)
        maximum = keras.layers.GlobalMaxPooling2D(name="max_pool")(features)
        return keras.layers.Concatenate(axis=-1, name="avgmax_pool")([average, maximum])
    if model_cfg.pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(features)
    raise ValueError(f"model.pooling = {model_cfg.pooling!r}: not implemented here (valid: avg, gem, max, avgmax)")


def load_model(path: str, compile: bool = False) -> keras.Model:
    """Load a saved ``.keras`` model in safe mode; importing this module registers our custom layers.

    ``keras.models.load_model`` only finds registered classes whose module has been imported, so a
    process that loads our models must import ``ranzcr_tf.model.layers`` (done here) first.
    """
    return keras.models.load_model(path, compile=compile, safe_mode=True)


def _slug(group: str) -> str:
    return group.lower().replace(" ", "_")


def get_backbone(model: keras.Model) -> keras.Model:
    """The backbone sub-model (the layer named ``"backbone"``)."""
    try:
        return model.get_layer(BACKBONE_NAME)
    except ValueError:
        raise ValueError(f"model {model.name!r} has no layer named {BACKBONE_NAME!r}: was it built by build_model?") from None


def set_backbone_trainable(model: keras.Model, trainable: bool) -> None:
    """Freeze (``False``) or unfreeze (``True``) the backbone for staged fine-tuning; head and GeM p stay trainable.

    In Keras 3 a non-trainable BatchNormalization runs in inference mode even inside ``fit``, so while
    the backbone is frozen its moving statistics are left exactly as they are. Recompile the model after
    calling this (``model.compile(...)``) so the trainer picks up the new set of trainable weights.
    """
    get_backbone(model).trainable = bool(trainable)


# ------------------------------------------------------------------------------------------------ summary


def count_macs(model: keras.Model) -> int:
    """Multiply-adds per image of the convolution and dense layers, counted analytically from layer shapes.

    Conv2D: ``H_out * W_out * k_h * k_w * C_in / groups * C_out``; DepthwiseConv2D:
    ``H_out * W_out * k_h * k_w * C_in * depth_multiplier``; Dense: ``inputs * units`` per position.
    Nested models are walked. BatchNorm, activations, pooling and element-wise products are not counted
    (they are a few percent of the total for these networks).
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_macs(layer)
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            out_shape = layer.output.shape
            kh, kw = layer.kernel_size
            total += out_shape[1] * out_shape[2] * kh * kw * layer.input.shape[-1] * layer.depth_multiplier
        elif isinstance(layer, keras.layers.Conv2D):
            out_shape = layer.output.shape
            kh, kw = layer.kernel_size
            total += out_shape[1] * out_shape[2] * kh * kw * (layer.input.shape[-1] // layer.groups) * layer.filters
        elif isinstance(layer, keras.layers.Dense):
            in_shape = layer.input.shape
            positions = 1
            for d in in_shape[1:-1]:
                positions *= d
            total += positions * in_shape[-1] * layer.units
    return int(total)


def summarize(backbones: list[str], image_size: int, channels: int = 1) -> list[dict]:
    """Parameters and multiply-adds per image of ``build_model`` for each backbone (weights=None)."""
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional here
        def tqdm(items, **_):
            return items
    for name in tqdm(backbones, desc="building", unit="model"):
        start = time.perf_counter()
        cfg = ModelConfig(backbone=name, weights=None, input_channels=channels)
        model = build_model(cfg, image_size)
        rows.append({"backbone": name, "default_size": BACKBONES[name].default_size, "image_size": image_size,
                     "params": model.count_params(), "macs": count_macs(model),
                     "build_s": time.perf_counter() - start})
        del model
        keras.backend.clear_session()
    return rows


def print_summary(rows: list[dict]) -> None:
    print(f"{'backbone':<20} {'default px':>10} {'params (M)':>11} {'GMACs/image':>12}  (at {rows[0]['image_size']} px)")
    for r in rows:
        print(f"{r['backbone']:<20} {r['default_size']:>10} {r['params'] / 1e6:>11.2f} {r['macs'] / 1e9:>12.2f}")
