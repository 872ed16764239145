"""Tip heat maps from a record's annotation polylines (``train.tip_loss_weight`` > 0 with ``train.recipe: aux_seg``).

    settings = TipSettings.from_config(cfg.train)       # None when the tip term is off
    heat = tip_heatmaps(parsed, image_size=256, settings=settings, aug_cfg=cfg.augment, seed=element_seed)
    # heat: (64, 64, 4) float32 in [0, 1]: one Gaussian per annotated tube at its tip, channels masks.FAMILIES
    batch_target = to_uint8(heat)   # what the training batches carry (TIP_SCALE = 255 is 1.0)

Which end is the tip: the last point of each polyline. The real annotations run from where the tube enters
the film to its tip, and both phantom styles write theirs the same way (``synth/phantom.py`` and
``synth/hard.py`` build every path insertion first, tip last; ``phantom.annotation_points`` keeps that order).
A tube that leaves the film (NGT Incompletely Imaged) ends at its last visible point, as an annotator draws it.

The tip is not rasterised and then warped (a bilinear warp thresholded like the line masks would erase a
Gaussian): the point itself is moved with the augmentation's own matrix (``augment.geometric_matrix``,
the exact matrix ``augment_image`` applies for the same seed) and the Gaussian is drawn afterwards, so it
sits where the warped polyline ends. Coordinates follow ``masks.py``: pixel centres at integers on every grid.
A study without annotations gets an all-zero map; the loss ignores it through ``has_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from ranzcr_tf.config import AugmentConfig
from ranzcr_tf.labels import LABELS
from ranzcr_tf.pipeline.augment import geometric_matrix
from ranzcr_tf.pipeline.masks import LABEL_FAMILY, NUM_FAMILIES, MaskSettings, mask_size
from ranzcr_tf.prep import records


@dataclass(frozen=True)
class TipSettings:
    """Gaussian width (sigma, stored pixels); the polyline padding (``max_lines``, ``max_points``) is the masks'."""

    sigma: float = 8.0
    padding: MaskSettings = MaskSettings()

    @classmethod
    def from_config(cls, train_cfg) -> TipSettings | None:
        """The settings of ``train.*``, or None when the tip term is off (``tip_loss_weight`` 0 or not aux_seg)."""
        if float(train_cfg.tip_loss_weight) <= 0 or train_cfg.recipe != "aux_seg":
            return None
        return cls(float(train_cfg.tip_sigma), MaskSettings.from_config(train_cfg))


def polyline_tips(ann_label, ann_num_points, ann_xy, settings: MaskSettings):
    """``(tips (L, 2), family (L,), valid (L,))`` with L = ``settings.max_lines``: each line's last point in
    stored pixels. A line cut by ``max_lines`` or ``max_points`` (its last point not kept) is not valid."""
    num_lines = tf.minimum(tf.shape(ann_label)[0], settings.max_lines)
    keep = tf.range(settings.max_lines) < num_lines
    counts = tf.cast(ann_num_points, tf.int32)[:settings.max_lines]
    counts = tf.pad(counts, [[0, settings.max_lines - tf.shape(counts)[0]]])
    last = tf.cumsum(counts) - 1  # index of each line's last point in the flat point list
    xy = tf.reshape(tf.cast(ann_xy, tf.float32), [-1, 2])
    num_points = tf.shape(xy)[0]
    valid = keep & (counts > 0) & (last < settings.max_points) & (last < num_points)
    # One padding row, so that a study without points still gathers (its lines are all invalid).
    tips = tf.gather(tf.concat([xy, tf.zeros([1, 2])], 0), tf.where(valid, last, num_points))
    labels = tf.clip_by_value(tf.pad(tf.cast(ann_label, tf.int32)[:settings.max_lines],
                                     [[0, settings.max_lines - num_lines]]), 0, len(LABELS) - 1)
    family = tf.gather(tf.constant(LABEL_FAMILY, tf.int32), labels)
    return tf.ensure_shape(tips, [settings.max_lines, 2]), family, valid


def render_tips(points, family, valid, size: int, sigma):
    """``(size, size, 4)`` float32: per family the maximum over its valid points of ``exp(-d^2 / 2 sigma^2)``;
    points in ``size``-grid pixels (centres at integers)."""
    coords = tf.range(size, dtype=tf.float32)
    dx2 = tf.square(coords[None, :, None] - points[None, None, :, 0])  # (1, M, L)
    dy2 = tf.square(coords[:, None, None] - points[None, None, :, 1])  # (M, 1, L)
    heat = tf.exp(-(dx2 + dy2) / (2.0 * sigma * sigma)) * tf.cast(valid, tf.float32)  # (M, M, L)
    one_hot = tf.one_hot(family, NUM_FAMILIES, dtype=tf.float32)  # (L, F)
    return tf.reduce_max(heat[..., None] * one_hot, axis=2)  # (M, M, F)


TIP_SCALE = 255.0  # the batches carry tip maps as uint8 (a quarter of float32's host-to-device bytes, as the masks)


def to_uint8(heat):
    """``[0, 1]`` float maps -> uint8 (1.0 is ``TIP_SCALE``); the training model divides them back."""
    return tf.cast(tf.round(heat * TIP_SCALE), tf.uint8)


def tip_heatmaps(parsed: dict, image_size: int, settings: TipSettings, aug_cfg: AugmentConfig | None = None,
                 seed=None):
    """Tip maps ``(image_size / 4,) * 2 + (4,)`` float32 of one parsed record (``with_annotations=True``).

    ``aug_cfg`` and ``seed``: the augmentation ``augment_image`` applies to this image with this seed; the
    tips move with its geometry. None: the stored geometry (no augmentation).
    """
    side = mask_size(image_size)
    tips, family, valid = polyline_tips(parsed[records.ANN_LABEL], parsed[records.ANN_NUM_POINTS],
                                        parsed[records.ANN_XY], settings.padding)
    width = tf.cast(parsed[records.WIDTH], tf.float32)
    height = tf.cast(parsed[records.HEIGHT], tf.float32)
    points = (tips + 0.5) * tf.stack([image_size / width, image_size / height]) - 0.5  # model-input pixels
    if aug_cfg is not None:
        # augment_image reads output pixel p from input matrix @ p: an input point q lands at inv(matrix) @ q.
        inverse = tf.linalg.inv(geometric_matrix(aug_cfg, seed, image_size))
        moved = tf.concat([points, tf.ones_like(points[:, :1])], axis=1) @ tf.transpose(inverse)
        points = moved[:, :2] / moved[:, 2:]
    points = (points + 0.5) * (side / image_size) - 0.5
    sigma = tf.maximum(settings.sigma * side / tf.maximum(width, height), 0.5)
    return render_tips(points, family, valid, side, sigma)
