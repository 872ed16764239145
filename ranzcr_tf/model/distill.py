"""The 3-stage recipe's models: a teacher that sees the line masks, a student distilled from its feature maps.

    teacher = build_teacher_model(cfg.model, image_size=768, mask_side=192)   # {"image", "masks"} -> 11
    student = build_student_model(classifier, teacher, classification_loss, layer_name="", distance="mse",
                                  weight=1.0)
    student.fit(ds)         # ds: (images, {"target": (B, 11), "mask": (B, S/4, S/4, 4), "has_mask": (B,)})
    student.inference_model # the plain image -> 11 classifier: save and serve that one

**Teacher** (``train.recipe: teacher``): the classifier's backbone, pooling and head, whose input is the
image plus four per-family line-mask channels (ETT, NGT, CVC, Swan Ganz; ``pipeline.masks``). The masks
arrive at 1/4 of the image size (the pipeline's mask resolution, a sixteenth of the pixels to move to the
device) and are upsampled (nearest) inside the model and scaled to 0/255 like the pixels. A backbone that
takes any channel count (the compact CNNs) gets all 1 + 4 (or 3 + 4) channels; an ImageNet backbone keeps
its 3-channel stem and gets a 1x1 convolution ``backbone_input`` in front, initialised to pass the image
through unchanged and to draw each family's lines in its own colour (red, green, blue, yellow), so
pretrained weights start from a sensible picture and the mixing is learned.

**Student** (``train.recipe: student``): Keras' ``keras.distillation.Distiller`` does not fit here, because
its teacher is called with the student's inputs and this teacher also needs the masks (and it runs the
student a second time to extract features). ``StudentModel`` follows its design instead (GUIDE habit 15):
a ``compute_loss`` override on a ``Model`` whose forward pass is the student only; the frozen teacher runs in
``compute_loss`` on ``{"image": x, "masks": y["mask"]}`` with ``training=False``, ``trainable = False``
(no gradient, BatchNorm statistics untouched) and a ``stop_gradient`` on its features. The loss is
``classification + weight x FeatureDistance(teacher_features, student_features)``, each term in float32
(features are cast before any arithmetic, so a bfloat16 / float16 policy cannot overflow them). The feature
term is weighted by ``has_mask`` (``mean_with_sample_weight``): the student trains on annotated studies
only (the pipeline filters them), and a study without annotations would add exactly 0.

keras and keras.ops only (no TensorFlow import): runs on TensorFlow (default, Mirrored, TPU) and JAX.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from ranzcr_tf.config import ModelConfig
from ranzcr_tf.model.backbones import BACKBONE_NAME, build_backbone, get_spec
from ranzcr_tf.model.build import classifier_head
from ranzcr_tf.model.decoder import NUM_FAMILIES, UntrackedReference, backbone_output_tensor
from ranzcr_tf.model.layers import CastToComputeDtype

MASKS_INPUT = "masks"
ADAPTER_NAME = "backbone_input"
FAMILY_COLOURS = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0))  # ETT, NGT, CVC, Swan Ganz


def _adapter_kernel(image_channels: int, out_channels: int) -> np.ndarray:
    """1x1 kernel that passes the image through and adds each family's mask (0/255) in its colour."""
    kernel = np.zeros((1, 1, image_channels + NUM_FAMILIES, out_channels), np.float32)
    if image_channels == out_channels:
        kernel[0, 0, :image_channels, :] = np.eye(image_channels)
    else:
        kernel[0, 0, :image_channels, :] = 1.0 / image_channels
    for family in range(NUM_FAMILIES):
        colour = FAMILY_COLOURS[family] if out_channels == 3 else (1.0,) * out_channels
        kernel[0, 0, image_channels + family, :] = colour
    return kernel


def build_teacher_model(model_cfg: ModelConfig, image_size: int, mask_side: int) -> keras.Model:
    """The teacher: ``{"image": (S, S, C), "masks": (M, M, 4)}`` -> 11 outputs (see the module docstring).

    ``image`` as in ``build.build_model`` (pixels in [0, 255]); ``masks``: 0/1 per family at ``M = mask_side``
    (``S`` a multiple of ``M``). Same backbone, pooling and head as the classifier of ``model_cfg``.
    """
    model_cfg.validate()
    get_spec(model_cfg.backbone)
    if mask_side < 1 or image_size % mask_side:
        raise ValueError(f"the teacher's masks ({mask_side} px) must divide its image size ({image_size} px)")
    channels = int(model_cfg.input_channels)
    backbone = build_backbone(model_cfg.backbone, image_size, channels + NUM_FAMILIES, model_cfg.weights)
    backbone_channels = backbone.input.shape[-1]
    image = keras.Input(shape=(image_size, image_size, channels), dtype="float32", name="image")
    masks = keras.Input(shape=(mask_side, mask_side, NUM_FAMILIES), dtype="float32", name=MASKS_INPUT)
    lines = CastToComputeDtype(name="cast_masks")(masks)
    lines = keras.layers.UpSampling2D(image_size // mask_side, interpolation="nearest", name="masks_upsample")(lines)
    lines = keras.layers.Rescaling(255.0, name="masks_to_pixels")(lines)
    x = keras.layers.Concatenate(axis=-1, name="image_and_masks")([CastToComputeDtype(name="cast")(image), lines])
    if backbone_channels == channels + NUM_FAMILIES:
        adapter = keras.layers.Identity(name=ADAPTER_NAME)
    else:
        adapter = keras.layers.Conv2D(backbone_channels, 1, name=ADAPTER_NAME)
    x = adapter(x)
    if adapter.weights:
        adapter.set_weights([_adapter_kernel(channels, backbone_channels), np.zeros(backbone_channels, np.float32)])
    outputs = classifier_head(backbone(x), model_cfg)
    return keras.Model({"image": image, MASKS_INPUT: masks}, outputs, name=f"teacher_{model_cfg.backbone}")


def _backbone_layer(backbone: keras.Model, layer_name: str):
    try:
        return backbone.get_layer(layer_name)
    except ValueError:
        raise ValueError(f"train.distill_layer = {layer_name!r}: the backbone has no such layer (leave it empty for "
                         f"the backbone's output, or name one of its layers, e.g. {backbone.layers[-1].name!r})") from None


def feature_extractor(model: keras.Model, layer_name: str = "", name: str = "teacher_features") -> keras.Model:
    """``model``'s inputs -> the feature map of its backbone layer ``layer_name`` ('' = the backbone's output),
    sharing ``model``'s weights (the layers after that point are not run)."""
    backbone = model.get_layer(BACKBONE_NAME)
    feeding = model.layers[model.layers.index(backbone) - 1]
    if feeding.name not in (ADAPTER_NAME, "cast", "repeat_channels"):
        raise ValueError(f"model {model.name!r}: expected the layer before its backbone to be {ADAPTER_NAME}, cast or "
                         f"repeat_channels, found {feeding.name!r}: was it built by ranzcr_tf?")
    target = backbone.output if not layer_name else _backbone_layer(backbone, layer_name).output
    inner = keras.Model(backbone.input, target, name=f"{name}_backbone")
    return keras.Model(model.input, inner(feeding.output), name=name)


class FeatureDistance(keras.losses.Loss):
    """Per-study distance between two feature maps ``(B, ..., C)``, mean over studies weighted by ``has_mask``.

    ``mse``: mean squared difference over all positions and channels. ``cosine``: ``1 - cos`` between the
    channel vectors at each position, averaged over positions (scale-free). Computed in float32.
    Call as ``loss(teacher_features, student_features, sample_weight=has_mask)``.
    """

    def __init__(self, distance: str = "mse", name: str = "feature_distance", **kwargs):
        if distance not in ("mse", "cosine"):
            raise ValueError(f"train.distill_loss = {distance!r}: expected mse or cosine")
        kwargs.setdefault("reduction", "mean_with_sample_weight")
        super().__init__(name=name, dtype="float32", **kwargs)
        self.distance = distance

    def call(self, y_true, y_pred):
        teacher = ops.cast(y_true, "float32")
        student = ops.cast(y_pred, "float32")
        if self.distance == "mse":
            return ops.mean(ops.square(student - teacher), axis=tuple(range(1, len(student.shape))))
        teacher = teacher / ops.sqrt(ops.sum(ops.square(teacher), axis=-1, keepdims=True) + 1e-12)
        student = student / ops.sqrt(ops.sum(ops.square(student), axis=-1, keepdims=True) + 1e-12)
        cosine = ops.sum(teacher * student, axis=-1)
        return ops.mean(1.0 - cosine, axis=tuple(range(1, len(cosine.shape))))


class StudentModel(keras.Model):
    """Training model of the student: outputs ``{"logits": (B, 11), "features": student feature map}``.

    Build it with ``build_student_model``. ``compute_loss`` expects ``y`` as the dict of the student dataset
    (``target``, ``mask``, ``has_mask``) and logs ``classification_loss`` and ``feature_loss``.
    ``inference_model`` is the plain classifier (same weights, no teacher): save and serve that one.
    """

    def __init__(self, inputs, outputs, *, classifier, teacher_features, classification_loss, distance: str = "mse",
                 weight: float = 1.0, name: str = "student", **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        self._classifier = UntrackedReference(classifier)
        self.teacher_features = teacher_features  # tracked: its (frozen) weights are state of this model
        self.classification_loss = classification_loss
        self.feature_loss = FeatureDistance(distance)
        self.distill_weight = float(weight)
        self.classification_loss_tracker = keras.metrics.Mean(name="classification_loss")
        self.feature_loss_tracker = keras.metrics.Mean(name="feature_loss")

    @property
    def inference_model(self) -> keras.Model:
        """The image -> 11 classifier sharing this model's weights (no teacher)."""
        return self._classifier.model

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not isinstance(y, dict) or not {"target", "mask", "has_mask"} <= set(y):
            raise ValueError("the student trains on targets {'target', 'mask', 'has_mask'} "
                             "(data.build_train_dataset with train.recipe=student)")
        if y_pred is None:
            y_pred = self(x, training=training)
        classification = ops.cast(self.classification_loss(y["target"], y_pred["logits"], sample_weight=sample_weight),
                                  "float32")
        teacher = self.teacher_features({"image": x, MASKS_INPUT: y["mask"]}, training=False)
        teacher = ops.stop_gradient(ops.cast(teacher, "float32"))
        feature = self.feature_loss(teacher, y_pred["features"], sample_weight=ops.cast(y["has_mask"], "float32"))
        total = classification + self.distill_weight * feature
        for extra in self.losses:  # regularisers, as Keras' own compute_loss adds them
            total = total + ops.cast(ops.sum(extra), "float32")
        self.classification_loss_tracker.update_state(classification)
        self.feature_loss_tracker.update_state(feature)
        return total


def build_student_model(classifier: keras.Model, teacher: keras.Model, classification_loss, *, layer_name: str = "",
                        distance: str = "mse", weight: float = 1.0) -> StudentModel:
    """The student's training model around ``classifier`` (from ``build.build_model``) and a trained ``teacher``
    (``build_teacher_model``, same backbone): the student runs once, giving logits and the feature map of its
    backbone layer ``layer_name`` ('' = the backbone's output); the teacher is frozen here for good."""
    teacher.trainable = False
    teacher_features = feature_extractor(teacher, layer_name)
    backbone = classifier.get_layer(BACKBONE_NAME)
    image = keras.Input(shape=classifier.input.shape[1:], dtype=classifier.input.dtype, name="image")
    x = image
    for layer in classifier.layers[1:classifier.layers.index(backbone)]:  # cast (+ channel repeat): no weights
        x = layer(x)
    if layer_name:  # a twin of the backbone (same layers) with that layer's output as a second output
        encoder = keras.Model(backbone.input, [_backbone_layer(backbone, layer_name).output, backbone.output],
                              name=BACKBONE_NAME)
        features, final = encoder(x)
    else:
        features = final = backbone(x)
    head = keras.Model(backbone_output_tensor(classifier, backbone), classifier.output, name="classifier_head")
    expected, got = tuple(teacher_features.output.shape[1:]), tuple(features.shape[1:])
    if expected != got:
        raise ValueError(f"the teacher's features at {layer_name or 'the backbone output'} are {expected} but the "
                         f"student's are {got}: train the teacher with the same model.backbone and image size")
    return StudentModel(image, {"logits": head(final), "features": features}, classifier=classifier,
                        teacher_features=teacher_features, classification_loss=classification_loss,
                        distance=distance, weight=weight)
