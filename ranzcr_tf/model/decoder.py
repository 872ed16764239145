"""Segmentation-aided training (``train.recipe: aux_seg``): a light line-mask decoder on the classifier's encoder.

    classifier = build.build_model(cfg.model, image_size)             # the plain image -> 11 model
    model = build_aux_seg_model(classifier, cfg.model.backbone, classification_loss, mask_loss_weight=1.0)
    model.fit(ds)           # ds: (images, {"target": (B, 11), "mask": (B, S/4, S/4, 4), "has_mask": (B,)})
    model.inference_model   # is ``classifier``: shares every weight, holds no decoder weight; save this one

The training model runs the backbone ONCE with extra outputs at strides 4, 8 and 16 (the stage layers named
in the backbone registry, ``backbones.stage_outputs``), feeds the last feature map to the classifier's own
pooling and head layers and the three stages to an FPN-style decoder: 1x1 laterals to ``width`` channels,
top-down nearest upsampling with a 3x3 conv-BN-swish after each merge, and a float32 1x1 conv to the 4
family masks (ETT, NGT, CVC, Swan Ganz; ``labels.FAMILIES``) as logits at 1/4 of the input size.

The loss is Keras' own training logic with one ``compute_loss`` override (GUIDE habit 15), so it runs on
TensorFlow (default, Mirrored, TPU) and on JAX alike: classification loss on every study + ``mask_loss_weight``
x (BCE + soft Dice) on the annotated ones, each term in float32 (the head and the mask logits are float32
under mixed precision). The mask term is a ``keras.losses.Loss`` with ``mean_with_sample_weight`` and
``has_mask`` as the sample weight: a study without annotations is multiplied by exactly 0 (no mask loss,
no mask gradient), the mean is over annotated studies only, and Keras scales it for distribution strategies.

Two options on top (issue 29): ``tip_loss_weight`` > 0 adds a training-only 1x1 head on the decoder's stride-4
features, per-family tip heat maps (``TipHeatmapLoss`` against ``pipeline/tips.py``'s Gaussians, weighted by
``has_mask`` like the mask term); ``seg_attention`` makes the classification see the decoder (the head also
reads the final features pooled under each predicted mask, ``layers.MaskAttentionPooling``), so the served
model then holds the encoder, the decoder and that head. The run report's Grad-CAM does not support such a
model (its backbone layer has four outputs).

keras and keras.ops only (no TensorFlow import): the model code runs wherever Keras does.
"""

from __future__ import annotations

import keras
from keras import ops

from ranzcr_tf.config import ModelConfig
from ranzcr_tf.labels import NUM_FAMILIES
from ranzcr_tf.model.backbones import BACKBONE_NAME, stage_outputs
from ranzcr_tf.model.build import classifier_head
from ranzcr_tf.model.layers import MaskAttentionPooling

TIP_PRIOR_LOGIT = -4.6  # log(0.01 / 0.99): the tip maps' starting probability
TIP_SCALE = 255.0  # pipeline.tips.TIP_SCALE: the batches' uint8 tip maps hold [0, 1] x 255


def _conv_bn_act(x, filters: int, kernel: int, name: str):
    x = keras.layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation("swish", name=f"{name}_act")(x)


def build_decoder(feature_shapes: list[tuple], width: int = 64, name: str = "mask_decoder",
                  with_features: bool = False) -> keras.Model:
    """FPN-style decoder: features at strides 4, 8, 16 (shapes without batch) -> ``(S/4, S/4, 4)`` float32 logits;
    ``with_features``: ``[mask_logits, stride-4 features]`` (what the tip head reads)."""
    if len(feature_shapes) != 3:
        raise ValueError(f"the decoder takes three encoder stages (strides 4, 8, 16), got {len(feature_shapes)}")
    inputs = [keras.Input(shape=tuple(shape), name=f"stride{4 << i}") for i, shape in enumerate(feature_shapes)]
    laterals = [keras.layers.Conv2D(width, 1, name=f"lateral{4 << i}")(x) for i, x in enumerate(inputs)]
    x = laterals[2]
    for i in (1, 0):
        x = keras.layers.UpSampling2D(2, interpolation="nearest", name=f"up{4 << i}")(x)
        x = keras.layers.Add(name=f"merge{4 << i}")([x, laterals[i]])
        x = _conv_bn_act(x, width, 3, name=f"smooth{4 << i}")
    # float32 logits under mixed precision: the mask loss is computed in float32.
    outputs = keras.layers.Conv2D(NUM_FAMILIES, 1, dtype="float32", name="mask_logits")(x)
    return keras.Model(inputs, [outputs, x] if with_features else outputs, name=name)


def tip_head(features):
    """Per-family tip heat-map logits (float32) from the decoder's stride-4 features: one 1x1 conv.

    Its bias starts at a 1 % prior (as CenterNet's heat maps): at 0 every background pixel would start at
    p = 0.5 and the tip term would open about 50x the classification loss."""
    prior = keras.initializers.Constant(TIP_PRIOR_LOGIT)
    return keras.layers.Conv2D(NUM_FAMILIES, 1, dtype="float32", bias_initializer=prior, name="tip_logits")(features)


class _AnnotatedStudiesLoss(keras.losses.Loss):
    """A per-study loss averaged over the studies with annotations: ``mean_with_sample_weight``, ``has_mask``
    as the sample weight (a study without annotations is multiplied by exactly 0), computed in float32."""

    def __init__(self, name: str, **kwargs):
        kwargs.setdefault("reduction", "mean_with_sample_weight")
        super().__init__(name=name, dtype="float32", **kwargs)


class LineMaskLoss(_AnnotatedStudiesLoss):
    """BCE + soft Dice of per-family mask logits, per study; mean over studies weighted by ``has_mask``.

    Call as ``loss(mask_true, mask_logits, sample_weight=has_mask)``. ``mask_true`` may be uint8 0/1.
    Soft Dice uses +1 smoothing per channel, so an empty family with an empty prediction scores 0 loss.
    """

    def __init__(self, name: str = "line_mask_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        bce = ops.mean(ops.binary_crossentropy(y_true, y_pred, from_logits=True), axis=(1, 2, 3))
        probs = ops.sigmoid(y_pred)
        intersection = ops.sum(probs * y_true, axis=(1, 2))
        total = ops.sum(probs, axis=(1, 2)) + ops.sum(y_true, axis=(1, 2))
        dice = 1.0 - ops.mean((2.0 * intersection + 1.0) / (total + 1.0), axis=-1)
        return bce + dice


class TipHeatmapLoss(_AnnotatedStudiesLoss):
    """Focal BCE of per-family tip heat-map logits against Gaussian targets, per study; mean weighted by ``has_mask``.

    Per pixel ``|t - p|^2 x BCE(t, p)`` (the quality focal loss, Li et al. 2020, for soft targets: the many
    background pixels a model already gets near 0 fade out), summed over the map and divided by the
    target's mass + 1, so a study counts about the same whatever its number of tubes. Call as
    ``loss(tip_true, tip_logits, sample_weight=has_mask)``: a study without annotations is multiplied by 0.
    """

    def __init__(self, name: str = "tip_heatmap_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        focal = ops.square(y_true - ops.sigmoid(y_pred))
        per_pixel = focal * ops.binary_crossentropy(y_true, y_pred, from_logits=True)
        return ops.sum(per_pixel, axis=(1, 2, 3)) / (ops.sum(y_true, axis=(1, 2, 3)) + 1.0)


class UntrackedReference:
    """Holds a model without Keras tracking it (so its weights are not a second time in the checkpoints)."""

    def __init__(self, model):
        self.model = model


class AuxSegModel(keras.Model):
    """Training model of the aux_seg recipe: outputs ``{"logits": (B, 11), "masks": (B, S/4, S/4, 4)}``.

    Build it with ``build_aux_seg_model``. ``compute_loss`` expects ``y`` as the dict of the aux_seg
    dataset (``target``, ``mask``, ``has_mask``) and logs ``classification_loss`` and ``mask_loss``.
    ``inference_model`` is the plain classifier (same weights, no decoder): save and serve that one.
    """

    def __init__(self, inputs, outputs, *, classifier, classification_loss, mask_loss_weight: float = 1.0,
                 tip_loss_weight: float = 0.0, name: str = "aux_seg", **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        self._classifier = UntrackedReference(classifier)
        self.classification_loss = classification_loss
        self.mask_loss = LineMaskLoss()
        self.mask_loss_weight = float(mask_loss_weight)
        self.classification_loss_tracker = keras.metrics.Mean(name="classification_loss")
        self.mask_loss_tracker = keras.metrics.Mean(name="mask_loss")
        self.tip_loss_weight = float(tip_loss_weight)
        if self.tip_loss_weight > 0:  # only then: the logs of a run without tips stay as they were
            self.tip_loss = TipHeatmapLoss()
            self.tip_loss_tracker = keras.metrics.Mean(name="tip_loss")

    @property
    def inference_model(self) -> keras.Model:
        """The image -> 11 classifier sharing this model's encoder and head (no decoder weights)."""
        return self._classifier.model

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not isinstance(y, dict) or not {"target", "mask", "has_mask"} <= set(y):
            raise ValueError("the aux_seg model trains on targets {'target', 'mask', 'has_mask'} "
                             "(data.build_train_dataset with train.recipe=aux_seg)")
        classification = ops.cast(self.classification_loss(y["target"], y_pred["logits"], sample_weight=sample_weight),
                                  "float32")
        mask = self.mask_loss(y["mask"], y_pred["masks"], sample_weight=ops.cast(y["has_mask"], "float32"))
        total = classification + self.mask_loss_weight * mask
        if self.tip_loss_weight > 0:
            if "tip" not in y:
                raise ValueError("train.tip_loss_weight > 0 trains on a 'tip' target: build the data with the same "
                                 "config (data.build_train_dataset)")
            tip_true = ops.cast(y["tip"], "float32") / TIP_SCALE  # uint8 maps from the pipeline (pipeline/tips.py)
            tip = self.tip_loss(tip_true, y_pred["tips"], sample_weight=ops.cast(y["has_mask"], "float32"))
            total = total + self.tip_loss_weight * tip
            self.tip_loss_tracker.update_state(tip)
        for extra in self.losses:  # regularisers, as Keras' own compute_loss adds them
            total = total + ops.cast(ops.sum(extra), "float32")
        self.classification_loss_tracker.update_state(classification)
        self.mask_loss_tracker.update_state(mask)
        return total


def build_aux_seg_model(classifier: keras.Model, backbone_name: str, classification_loss,
                        mask_loss_weight: float = 1.0, decoder_width: int = 64,
                        tip_loss_weight: float = 0.0, seg_attention: ModelConfig | None = None) -> AuxSegModel:
    """The aux_seg training model around ``classifier`` (from ``build.build_model``): shares all its layers.

    The classifier's backbone gets a multi-output twin (same layers: strides 4, 8, 16 and the final map)
    named like it, so ``build.set_backbone_trainable`` freezes and unfreezes the shared encoder as usual.

    ``seg_attention`` (``model.seg_attention``: the run's ``cfg.model``): the classification sees the decoder.
    Its head reads the configured pooling of the final map concatenated with ``MaskAttentionPooling`` of
    that map under the predicted masks (one feature vector per tube family), so the served model is
    encoder + decoder + this head (a new head: ``classifier``'s own head layers are not used); the tip
    head stays training-only either way.
    """
    backbone = classifier.get_layer(BACKBONE_NAME)
    stages = stage_outputs(backbone, backbone_name)
    encoder = keras.Model(backbone.input, [*stages, backbone.output], name=BACKBONE_NAME)
    # The classifier's layers after the backbone (pooling, dropout, head), as one callable on the final map.
    head = keras.Model(backbone_output_tensor(classifier, backbone), classifier.output, name="classifier_head")
    tips = tip_loss_weight > 0
    decoder = build_decoder([tuple(s.shape[1:]) for s in stages], width=decoder_width, with_features=tips)

    image = keras.Input(shape=classifier.input.shape[1:], dtype=classifier.input.dtype, name="image")
    x = image
    for layer in classifier.layers[1:classifier.layers.index(backbone)]:  # cast (+ channel repeat): no weights
        x = layer(x)
    *features, final = encoder(x)
    masks, stride4 = decoder(features) if tips else (decoder(features), None)
    if seg_attention is None:
        logits = head(final)
    else:  # the served classifier: image -> encoder -> decoder -> mask-attention head
        attended = MaskAttentionPooling(name="mask_attention")([final, masks])
        logits = classifier_head(final, seg_attention, classifier.output.shape[-1], extra_features=attended)
        classifier = keras.Model(image, logits, name=f"{classifier.name}_segcls")
    outputs = {"logits": logits, "masks": masks}
    if tips:  # training only: the classifier (inference_model) never sees the tip head
        outputs["tips"] = tip_head(stride4)
    return AuxSegModel(image, outputs, classifier=classifier, classification_loss=classification_loss,
                       mask_loss_weight=mask_loss_weight, tip_loss_weight=tip_loss_weight)


def backbone_output_tensor(classifier: keras.Model, backbone: keras.Model):
    """The backbone's output tensor in the classifier's graph: the input of the layer that follows it
    (``backbone.output`` is the nested model's own tensor, not connected to the classifier's input)."""
    following = classifier.layers[classifier.layers.index(backbone) + 1]
    return following.input
