"""Per-family line masks rasterised in the graph from a record's annotation polylines (``train.recipe: aux_seg``).

    mask, has_mask = line_masks(parsed, image_size=768, settings=MaskSettings.from_config(cfg.train))
    # mask: (192, 192, 4) float32 in {0, 1}, channels FAMILIES = ETT, NGT, CVC, Swan Ganz; has_mask: float32 0/1

Why in the graph and not stored by the converter:

* no schema change: the records (schema version 1) already carry every polyline scaled into the stored
  image (``ann_label``, ``ann_num_points``, ``ann_xy``), so old records serve the recipe as they are;
* the line width and the mask resolution are settings, changeable without reconverting 30,000 studies;
* the geometric augmentation (``augment.augment_image(..., mask=...)``) warps the mask with the very
  matrix it applies to the image.

TPU-host safe: fixed shapes (the polylines are padded to ``max_lines`` lines and ``max_points`` points in
all; points past that are dropped), TensorFlow ops only, no ``py_function``. The raster is a distance
test, vectorised over the padded segment list: a mask pixel of family f is on when its centre lies within
``width / 2`` of a segment of a family-f line. Cost: ``M^2 x max_points`` distances per study (M = mask side),
run as one XLA-fused loop, many times faster than without XLA (timings:
docs/results.md#speed-measurements-behind-code-choices).

Coordinates: stored pixel centres are integers (x = 0 is the centre of the first column); a stored point
x maps to ``(x + 0.5) * M / W - 0.5`` at mask resolution, the same pixel-centre convention the augmentation
warp uses. The half width is at least half a mask pixel, so a line never breaks into dots.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from ranzcr_tf.labels import FAMILIES, LABELS, NUM_FAMILIES, group_of, mask_size  # the geometry: model's too
from ranzcr_tf.prep import records

# Family index of each of the 11 labels (LABELS order).
LABEL_FAMILY: tuple[int, ...] = tuple(FAMILIES.index(group_of(label)) for label in LABELS)


@dataclass(frozen=True)
class MaskSettings:
    """Line width in stored pixels and the fixed padding sizes of the polyline tensors."""

    line_width: float = 8.0
    max_lines: int = 8
    max_points: int = 256

    @classmethod
    def from_config(cls, train_cfg) -> MaskSettings:
        return cls(float(train_cfg.mask_line_width), int(train_cfg.mask_max_lines), int(train_cfg.mask_max_points))


@dataclass(frozen=True)
class RecipeData:
    """What a recipe's batches hold: only annotated studies or all, and where the line masks go.

    ``masks``: ``None`` (image, target); ``"target"``: (image, {target, mask, has_mask}); ``"input"``:
    ({image, masks}, target), the teacher's input. Validation of an ``"input"`` recipe also needs masks,
    so it runs on the annotated validation studies only.
    """

    annotated_only: bool = False
    masks: str | None = None


RECIPE_DATA = {"plain": RecipeData(), "finetune": RecipeData(), "aux_seg": RecipeData(masks="target"),
               "teacher": RecipeData(annotated_only=True, masks="input"),
               "student": RecipeData(annotated_only=True, masks="target")}


def recipe_data(recipe: str) -> RecipeData:
    """The ``RecipeData`` of ``train.recipe`` (3stage is not a fold recipe: it runs three of them)."""
    if recipe not in RECIPE_DATA:
        raise ValueError(f"train.recipe {recipe!r} has no training data of its own; expected one of "
                         f"{', '.join(RECIPE_DATA)}")
    return RECIPE_DATA[recipe]


def is_annotated(serialized):
    """True for a serialized record with at least one annotation line (parses that one feature only)."""
    parsed = tf.io.parse_single_example(serialized, {records.ANN_LABEL: tf.io.VarLenFeature(tf.int64)})
    return tf.size(parsed[records.ANN_LABEL].values) > 0


def _pad(values, length: int, fill):
    values = values[:length]
    return tf.pad(values, [[0, length - tf.shape(values)[0]]], constant_values=fill)


def padded_segments(ann_label, ann_num_points, ann_xy, settings: MaskSettings):
    """Fixed-shape segment list of a study's polylines: ``(starts (P-1, 2), ends (P-1, 2), family (P-1,),
    valid (P-1,))`` with P = ``settings.max_points``; coordinates as given (stored pixels)."""
    num_lines = tf.minimum(tf.shape(ann_label)[0], settings.max_lines)
    counts = _pad(tf.cast(ann_num_points, tf.int32), settings.max_lines, 0)
    counts = tf.where(tf.range(settings.max_lines) < num_lines, counts, 0)
    labels = _pad(tf.cast(ann_label, tf.int32), settings.max_lines, 0)
    total = tf.minimum(tf.reduce_sum(counts), settings.max_points)
    xy = tf.reshape(tf.cast(ann_xy, tf.float32), [-1, 2])[:settings.max_points]
    xy = tf.pad(xy, [[0, settings.max_points - tf.shape(xy)[0]], [0, 0]])
    xy = tf.ensure_shape(xy, [settings.max_points, 2])
    # Line of each point: how many line ends lie at or before it.
    ends = tf.cumsum(counts)
    point_line = tf.reduce_sum(tf.cast(tf.range(settings.max_points)[:, None] >= ends[None, :], tf.int32), axis=1)
    point_line = tf.minimum(point_line, settings.max_lines - 1)
    index = tf.range(settings.max_points - 1)
    valid = (point_line[:-1] == point_line[1:]) & (index + 1 < total)
    family = tf.gather(tf.constant(LABEL_FAMILY, tf.int32), tf.clip_by_value(tf.gather(labels, point_line[:-1]),
                                                                             0, len(LABELS) - 1))
    return xy[:-1], xy[1:], family, valid


def rasterize_segments(starts, ends, family, valid, size: int, half_width):
    """``(size, size, 4)`` float32 masks: 1 where a pixel centre is within ``half_width`` of a valid segment
    of that family. Coordinates are in mask pixels (pixel centres at integers)."""
    return _rasterize(starts, ends, family, valid, tf.cast(half_width, tf.float32), size)


@tf.function(jit_compile=True)  # XLA fuses the (M, M, S) distance math into one loop; one trace per size
def _rasterize(starts, ends, family, valid, half_width, size: int):
    coords = tf.range(size, dtype=tf.float32)
    direction = ends - starts  # (S, 2)
    length2 = tf.maximum(tf.reduce_sum(direction * direction, axis=1), 1e-12)  # (S,)
    # The grid is separable: x - sx depends on the column only, y - sy on the row only.
    rel_x = coords[:, None] - starts[None, :, 0]  # (M, S)
    rel_y = coords[:, None] - starts[None, :, 1]  # (M, S)
    rel_x, rel_y = rel_x[None, :, :], rel_y[:, None, :]  # (1, M, S) columns, (M, 1, S) rows
    t = tf.clip_by_value((rel_x * direction[:, 0] + rel_y * direction[:, 1]) / length2, 0.0, 1.0)  # (M, M, S)
    dx = rel_x - t * direction[:, 0]
    dy = rel_y - t * direction[:, 1]
    hits = tf.cast((dx * dx + dy * dy <= half_width * half_width) & valid, tf.float32)  # (M, M, S)
    # Hits per family as one small matmul with the segments' one-hot families.
    per_family = tf.einsum("yxs,sf->yxf", hits, tf.one_hot(family, NUM_FAMILIES, dtype=tf.float32))
    return tf.minimum(per_family, 1.0)


def line_masks(parsed: dict, image_size: int, settings: MaskSettings):
    """Masks ``(image_size / 4,) * 2 + (4,)`` float32 of one parsed record and its ``has_mask`` (float32 0/1).

    ``parsed`` comes from ``records.parse_example(..., with_annotations=True)``. A study without annotation
    lines has an all-zero mask and ``has_mask = 0`` (the loss then ignores its mask entirely).
    """
    size = mask_size(image_size)
    starts, ends, family, valid = padded_segments(parsed[records.ANN_LABEL], parsed[records.ANN_NUM_POINTS],
                                                  parsed[records.ANN_XY], settings)
    width = tf.cast(parsed[records.WIDTH], tf.float32)
    height = tf.cast(parsed[records.HEIGHT], tf.float32)
    scale = tf.stack([size / width, size / height])
    starts = (starts + 0.5) * scale - 0.5
    ends = (ends + 0.5) * scale - 0.5
    half_width = tf.maximum(0.5 * settings.line_width * size / tf.maximum(width, height), 0.5)
    mask = rasterize_segments(starts, ends, family, valid, size, half_width)
    has_mask = tf.cast(tf.size(parsed[records.ANN_LABEL]) > 0, tf.float32)
    return mask, has_mask
