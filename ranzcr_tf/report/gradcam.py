"""Grad-CAM and LayerCAM for the RANZCR classifier: where in the film the model looks for one column.

    cam = GradCam(model)                              # a model of ranzcr_tf.model.build (backbone + head)
    maps = cam.heatmaps(images, column=2)             # (batch, H, W) float32 in [0, 1], at the input size
    cam = make_cam(model, "compact_cnn")              # the report's: LayerCAM on the stride-4 stage

Grad-CAM (Selvaraju et al. 2017) on the last convolutional stage, i.e. the backbone's output feature map
``A`` (batch, h, w, k): the gradient of the column's score (the logit, before any sigmoid) with respect
to ``A``, averaged over positions, weighs the k feature maps; their weighted sum through a ReLU,
bilinearly upsampled to the image and divided by its maximum, is the heat map. With the ``avg``
pooling and the single Dense head this equals the original CAM exactly.

A last-stage map is as coarse as that stage (4 x 4 cells of 32 stored px for a 128 px compact_cnn),
so the report's default (``make_cam``) is LayerCAM (Jiang et al. 2021) on the stride-4 stage: each
position's features weighted by its own positive gradient, which stays specific to the column at
early stages and puts the peak on the tube itself.

The maths is ``keras.ops``; only the one gradient is backend code (``tf.GradientTape`` on TensorFlow,
``jax.grad`` on JAX), because Keras 3 has no backend-neutral gradient. Both are tested.

``tube_mask`` rasterises a study's annotation lines of one tube family, widened by a tolerance, with
the same in-graph rasteriser as the ``aux_seg`` masks (``pipeline.masks``), at the stored resolution:
the localisation check (is the heat map's peak on the tube?) and the report's panels use it.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from ranzcr_tf import compat
from ranzcr_tf.model.build import get_backbone

SCORE_LAYERS = ("logits", "probabilities")  # build.assemble_model's last layer; its input is the raw score


def _score_tensor(model: keras.Model):
    for name in SCORE_LAYERS:
        try:
            return model.get_layer(name).input
        except ValueError:
            continue
    return model.outputs[0]


class GradCam:
    """Splits ``model`` at a feature map of its backbone into a feature model and a score model (sharing
    the weights) and computes Grad-CAM heat maps of any output column.

    ``stage=None`` takes the backbone's output (the last stage); ``stage=k`` the k-th of the backbone's
    registered feature stages (``backbones.stage_outputs``: strides 4, 8, 16), which needs ``backbone``,
    the registry name (``model.backbone`` of the run's config). ``weighting="mean"`` is Grad-CAM (one
    weight per feature map, its mean gradient); ``"elementwise"`` is LayerCAM (Jiang et al. 2021: each
    position weighted by its own positive gradient), the variant that stays class-specific on the finer,
    earlier stages, where Grad-CAM's one weight per map spreads over every edge the map responds to.
    """

    def __init__(self, model: keras.Model, stage: int | None = None, backbone: str | None = None,
                 weighting: str = "mean"):
        if weighting not in ("mean", "elementwise"):
            raise ValueError(f"weighting {weighting!r}: expected 'mean' (Grad-CAM) or 'elementwise' (LayerCAM)")
        self.weighting = weighting
        inner = get_backbone(model)
        features = compat.called_output(inner)
        head = keras.Model(features, _score_tensor(model), name="gradcam_head")
        if stage is None:
            self.features_model, self.head_model = keras.Model(model.inputs, features, name="gradcam_features"), head
        else:
            if backbone is None:
                raise ValueError("GradCam(stage=...) needs backbone=<the run's model.backbone> to find its stages")
            from ranzcr_tf.model.backbones import stage_outputs

            tensor = stage_outputs(inner, backbone)[stage]
            to_backbone = keras.Model(model.inputs, compat.called_input(inner), name="gradcam_stem")
            to_stage = keras.Model(inner.inputs[0], tensor, name="gradcam_stage")
            rest = keras.Model(tensor, inner.outputs[0], name="gradcam_rest")
            self.features_model = lambda images, training=False: to_stage(to_backbone(images, training=training),
                                                                          training=training)
            self.head_model = lambda a, training=False: head(rest(a, training=training), training=training)
            features = tensor
        self.input_size = tuple(model.inputs[0].shape[1:3])
        self.feature_size = tuple(features.shape[1:3])  # the heat map's own resolution, before upsampling
        self.name = name = "Grad-CAM" if weighting == "mean" else "LayerCAM"
        stride = self.input_size[0] // self.feature_size[0]
        where = "the last stage (the backbone's output)" if stage is None else f"the backbone's stride-{stride} stage"
        self.description = f"{name} on {where}: a {self.feature_size[0]} x {self.feature_size[1]} map, stride {stride}"

    def _gradient(self, features, column: int):
        """d(sum over the batch of the column's score) / d(features); the one backend-specific step."""
        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                tape.watch(features)
                score = ops.sum(self.head_model(features, training=False)[:, column])
            return tape.gradient(score, features)
        if backend == "jax":
            import jax

            return jax.grad(lambda a: ops.sum(self.head_model(a, training=False)[:, column]))(features)
        raise ValueError(f"Grad-CAM supports the tensorflow and jax backends, not {backend!r}: set KERAS_BACKEND")

    def heatmaps(self, images, column: int, output_size: tuple[int, int] | None = None) -> np.ndarray:
        """Heat maps ``(batch, H, W)`` float32 in [0, 1] of output ``column`` for ``images`` (a batch as the
        model takes it), at ``output_size`` (default: the model's input size). An all-zero map means no
        position raises the score."""
        features = self.features_model(ops.convert_to_tensor(images), training=False)
        gradient = self._gradient(features, column)
        gradient, features = ops.cast(gradient, "float32"), ops.cast(features, "float32")
        if self.weighting == "mean":
            weights = ops.mean(gradient, axis=(1, 2))  # (batch, k): one weight per feature map
            cam = ops.relu(ops.einsum("bhwk,bk->bhw", features, weights))
        else:
            cam = ops.relu(ops.sum(ops.relu(gradient) * features, axis=-1))
        size = tuple(output_size or self.input_size)
        cam = ops.image.resize(cam[..., None], size, interpolation="bilinear")[..., 0]
        peak = ops.max(cam, axis=(1, 2), keepdims=True)
        cam = ops.where(peak > 0, cam / ops.maximum(peak, 1e-12), ops.zeros_like(cam))
        return np.asarray(ops.convert_to_numpy(cam), dtype=np.float32)


CAM_METHODS = ("layercam", "gradcam")


def make_cam(model: keras.Model, backbone: str, method: str = "layercam") -> GradCam:
    """The run report's heat maps. ``layercam``: LayerCAM on the backbone's finest registered stage
    (stride 4), whose peaks land within a couple of stored pixels of the tube (``tests/test_report.py``);
    for a backbone that registers no stages, Grad-CAM on the last stage. ``gradcam``: Grad-CAM on the
    last stage, the original method, as coarse as that stage (stride 32)."""
    from ranzcr_tf.model.backbones import get_spec

    if method not in CAM_METHODS:
        raise ValueError(f"--cam {method!r}: expected one of {', '.join(CAM_METHODS)}")
    if method == "layercam" and get_spec(backbone).feature_stages:
        return GradCam(model, stage=0, backbone=backbone, weighting="elementwise")
    return GradCam(model)


def peak_position(heatmap: np.ndarray) -> tuple[int, int]:
    """``(row, column)`` of the heat map's maximum."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(heatmap)), heatmap.shape))


def tube_mask(parsed: dict, family: int, tolerance: float) -> np.ndarray:
    """``(height, width)`` bool at the stored resolution: pixels within ``tolerance`` stored pixels of one
    of the study's annotation lines of tube ``family`` (an index into ``labels.FAMILIES``).

    ``parsed`` is a record parsed with annotations (``prep.records.parse_example(..., with_annotations=True)``).
    """
    from ranzcr_tf.pipeline import masks

    height, width = int(parsed["height"]), int(parsed["width"])
    if height != width:
        raise ValueError(f"stored image is {height}x{width}; the converter stores square images")
    points = max(len(np.asarray(parsed["ann_xy"]).reshape(-1, 2)), 2)
    # Padding to a power of two bounds the number of rasteriser traces (one per padded size).
    settings = masks.MaskSettings(line_width=2 * tolerance, max_lines=max(len(np.asarray(parsed["ann_label"])), 8),
                                  max_points=int(2 ** np.ceil(np.log2(points))))
    starts, ends, families, valid = masks.padded_segments(parsed["ann_label"], parsed["ann_num_points"],
                                                          parsed["ann_xy"], settings)
    raster = masks.rasterize_segments(starts, ends, families, valid, height, max(float(tolerance), 0.5))
    return np.asarray(raster)[..., family] > 0.5
