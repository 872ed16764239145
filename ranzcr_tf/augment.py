"""In-graph training augmentations for single-channel radiographs (TPU-host safe: no Python functions).

``augment_image(image, aug_cfg, seed)`` takes one ``(S, S, 1)`` image, uint8 or float in 0..255, and
returns the same shape and dtype. Every random draw is a ``tf.random.stateless_*`` op derived from the
``seed`` tensor (shape ``[2]``), so a fixed seed reproduces the same augmentation exactly; the dataset
gives each element its own seed (``data.py`` zips the records with ``Dataset.random``).

Order and cost, in the order applied (each gated by its own ``*_prob``; an op that is not drawn costs
nothing, and with every probability 0 the image comes back bit-identical):

1. horizontal flip (exact mirror);
2. random resized crop *and* the affine (shift, scale, rotate, shear) composed into ONE 3x3 matrix and
   resampled by ONE ``ImageProjectiveTransformV3`` call (bilinear, constant fill 0): one interpolation
   instead of two, and it runs on uint8 directly;
3. brightness, contrast and gamma: all pointwise, so for uint8 they are fused into a 256-entry lookup
   table applied with one gather (floats get the same function elementwise);
4. optional Gaussian noise, optional Gaussian blur (reflect-padded separable convolution);
5. coarse dropout / cutout last, so its holes hold exactly the fill value (0 or the image mean).

Labels are never an input here: none of these ops can change them.
"""

from __future__ import annotations

import math

import tensorflow as tf

from ranzcr_tf.config import AugmentConfig

# Slots of the single uniform draw per image (one stateless op instead of ~20).
(_FLIP, _AFFINE, _CROP, _BC, _GAMMA, _CUTOUT, _NOISE, _BLUR,
 _SHIFT_X, _SHIFT_Y, _SCALE, _ROTATE, _SHEAR,
 _CROP_AREA, _CROP_RATIO, _CROP_X, _CROP_Y,
 _BRIGHTNESS, _CONTRAST, _GAMMA_VALUE, _BLUR_SIGMA, _NUM_DRAWS) = range(22)

# Aspect ratio range of the random resized crop (as torchvision's RandomResizedCrop, narrowed: X-ray
# anatomy should not be squashed much).
_CROP_LOG_RATIO = math.log(1.15)


def _uniform(draws, slot, low, high):
    return low + draws[slot] * (high - low)


def _crop_matrix(draws, size: float, aug: AugmentConfig):
    """Output pixel -> input pixel for a random crop of area share U(crop_scale_min, 1) resized back."""
    area = _uniform(draws, _CROP_AREA, aug.crop_scale_min, 1.0)
    ratio = tf.exp(_uniform(draws, _CROP_RATIO, -_CROP_LOG_RATIO, _CROP_LOG_RATIO))
    # Side shares of the crop; clipped to 1 so the crop never leaves the image (no fill pixels).
    width = tf.minimum(tf.sqrt(area * ratio), 1.0) * size
    height = tf.minimum(tf.sqrt(area / ratio), 1.0) * size
    x0 = draws[_CROP_X] * (size - width)
    y0 = draws[_CROP_Y] * (size - height)
    zero = tf.zeros_like(width)
    one = tf.ones_like(width)
    return tf.stack([[width / size, zero, x0], [zero, height / size, y0], [zero, zero, one]])


def _affine_matrix(draws, size: float, aug: AugmentConfig):
    """Output pixel -> input pixel for the inverse of shift . rotate . shear . scale about the centre."""
    center = (size - 1.0) / 2.0
    shift_x = _uniform(draws, _SHIFT_X, -aug.shift, aug.shift) * size
    shift_y = _uniform(draws, _SHIFT_Y, -aug.shift, aug.shift) * size
    scale = _uniform(draws, _SCALE, 1.0 - aug.scale, 1.0 + aug.scale)
    angle = _uniform(draws, _ROTATE, -aug.rotate_deg, aug.rotate_deg) * (math.pi / 180.0)
    shear = _uniform(draws, _SHEAR, -aug.shear_deg, aug.shear_deg) * (math.pi / 180.0)
    zero = tf.zeros_like(scale)
    one = tf.ones_like(scale)

    def mat(rows):
        return tf.stack([tf.stack(r) for r in rows])

    to_origin = mat([[one, zero, -center * one], [zero, one, -center * one], [zero, zero, one]])
    back = mat([[one, zero, center + shift_x], [zero, one, center + shift_y], [zero, zero, one]])
    rotate = mat([[tf.cos(angle), -tf.sin(angle), zero], [tf.sin(angle), tf.cos(angle), zero], [zero, zero, one]])
    shear_m = mat([[one, tf.tan(shear), zero], [zero, one, zero], [zero, zero, one]])
    scale_m = mat([[scale, zero, zero], [zero, scale, zero], [zero, zero, one]])
    forward = back @ rotate @ shear_m @ scale_m @ to_origin
    return tf.linalg.inv(forward)


def _geometric(image, draws, do_crop, do_affine, aug: AugmentConfig):
    size = image.shape[0]
    size_f = float(size)
    eye = tf.eye(3)
    crop = tf.cond(do_crop, lambda: _crop_matrix(draws, size_f, aug), lambda: eye)
    affine = tf.cond(do_affine, lambda: _affine_matrix(draws, size_f, aug), lambda: eye)
    # First crop-and-resize (image A = crop(I)), then the affine on A: B(p) = I(crop @ affine @ p).
    matrix = crop @ affine
    matrix = matrix / matrix[2, 2]
    transform = tf.reshape(matrix, [9])[:8][tf.newaxis]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis], transforms=transform, output_shape=tf.constant([size, size], tf.int32),
        fill_value=tf.constant(0.0), interpolation="BILINEAR", fill_mode="CONSTANT")
    return tf.ensure_shape(out[0], image.shape)


def _pointwise(values, draws, do_bc, do_gamma, mean, aug: AugmentConfig):
    """Brightness, contrast (about the image mean) and gamma on float pixel values in 0..255."""
    brightness = tf.where(do_bc, _uniform(draws, _BRIGHTNESS, -aug.brightness, aug.brightness) * 255.0, 0.0)
    contrast = tf.where(do_bc, _uniform(draws, _CONTRAST, 1.0 - aug.contrast, 1.0 + aug.contrast), 1.0)
    values = tf.clip_by_value((values - mean) * contrast + mean + brightness, 0.0, 255.0)
    # Gamma drawn log-uniformly so that g and 1/g are equally likely when the range is symmetric.
    log_gamma = _uniform(draws, _GAMMA_VALUE, math.log(aug.gamma_min), math.log(aug.gamma_max))
    gamma = tf.where(do_gamma, tf.exp(log_gamma), 1.0)
    return 255.0 * tf.pow(values / 255.0, gamma)


def _intensity(image, draws, do_bc, do_gamma, aug: AugmentConfig):
    if aug.contrast > 0:
        mean = tf.cond(do_bc, lambda: tf.reduce_mean(tf.cast(image, tf.float32)), lambda: tf.constant(0.0))
    else:
        mean = tf.constant(0.0)
    if image.dtype == tf.uint8:
        # Every op here is a function of the pixel value alone: evaluate it once per grey level (256
        # values) and look the image up, instead of ~8 float passes over 590k pixels at 768 px.
        lut = _pointwise(tf.range(256, dtype=tf.float32), draws, do_bc, do_gamma, mean, aug)
        lut = tf.cast(tf.clip_by_value(tf.round(lut), 0.0, 255.0), tf.uint8)
        return tf.gather(lut, tf.cast(image, tf.int32))
    return tf.cast(_pointwise(tf.cast(image, tf.float32), draws, do_bc, do_gamma, mean, aug), image.dtype)


def _to_dtype(values, dtype):
    if dtype == tf.uint8:
        return tf.cast(tf.clip_by_value(tf.round(values), 0.0, 255.0), tf.uint8)
    return tf.cast(tf.clip_by_value(values, 0.0, 255.0), dtype)


def _noise(image, seed, aug: AugmentConfig):
    noise = tf.random.stateless_normal(tf.shape(image), seed=seed, stddev=aug.noise_std)
    return _to_dtype(tf.cast(image, tf.float32) + noise, image.dtype)


def _blur_radius(aug: AugmentConfig) -> int:
    return max(1, int(math.ceil(3.0 * aug.blur_sigma)))


def _blur(image, draws, aug: AugmentConfig):
    """Gaussian blur with sigma ~ U(blur_sigma / 2, blur_sigma); reflect padding keeps edges unbiased."""
    radius = _blur_radius(aug)
    sigma = _uniform(draws, _BLUR_SIGMA, 0.5 * aug.blur_sigma, aug.blur_sigma)
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(offsets / sigma))
    kernel = kernel / tf.reduce_sum(kernel)
    x = tf.cast(image, tf.float32)[tf.newaxis]
    x = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    x = tf.nn.conv2d(x, tf.reshape(kernel, [-1, 1, 1, 1]), strides=1, padding="VALID")
    x = tf.nn.conv2d(x, tf.reshape(kernel, [1, -1, 1, 1]), strides=1, padding="VALID")
    return tf.ensure_shape(_to_dtype(x[0], image.dtype), image.shape)


def _cutout(image, seed, aug: AugmentConfig):
    """``cutout_holes`` squares of side ``cutout_size * S`` at uniform centres (may overlap the border)."""
    size = image.shape[0]
    side = max(1, int(round(aug.cutout_size * size)))
    centers = tf.random.stateless_uniform([aug.cutout_holes, 2], seed=seed, maxval=size, dtype=tf.int32)
    top = centers[:, 0] - side // 2
    left = centers[:, 1] - side // 2
    index = tf.range(size)
    rows = (index[tf.newaxis, :] >= top[:, tf.newaxis]) & (index[tf.newaxis, :] < top[:, tf.newaxis] + side)
    cols = (index[tf.newaxis, :] >= left[:, tf.newaxis]) & (index[tf.newaxis, :] < left[:, tf.newaxis] + side)
    holes = tf.reduce_any(rows[:, :, tf.newaxis] & cols[:, tf.newaxis, :], axis=0)[:, :, tf.newaxis]
    if aug.cutout_fill == "mean":
        fill = tf.cast(tf.round(tf.reduce_mean(tf.cast(image, tf.float32))), image.dtype)
    else:
        fill = tf.zeros([], image.dtype)
    return tf.where(holes, fill, image)


def augment_image(image, aug_cfg: AugmentConfig, seed):
    """Randomly augment one ``(S, S, 1)`` image (uint8, or float in 0..255); same shape and dtype out.

    ``seed`` is an int tensor of shape ``[2]`` (as for ``tf.random.stateless_uniform``); the same seed
    gives the same output. Each augmentation is applied with its ``*_prob`` from ``aug_cfg``; with all
    probabilities 0 the output equals the input exactly.
    """
    aug = aug_cfg
    if image.shape.rank != 3 or image.shape[0] is None or image.shape[0] != image.shape[1]:
        raise ValueError(f"augment_image needs a square (S, S, C) image with a static size, got {image.shape}")
    seed = tf.cast(seed, tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    draws = tf.random.stateless_uniform([_NUM_DRAWS], seed=seeds[0])

    def chance(slot, prob):
        return draws[slot] < prob

    if aug.hflip_prob > 0:
        image = tf.cond(chance(_FLIP, aug.hflip_prob), lambda: tf.reverse(image, axis=[1]), lambda: image)

    if aug.crop_prob > 0 or aug.affine_prob > 0:
        do_crop = chance(_CROP, aug.crop_prob)
        do_affine = chance(_AFFINE, aug.affine_prob)
        image = tf.cond(do_crop | do_affine, lambda: _geometric(image, draws, do_crop, do_affine, aug),
                        lambda: image)

    if aug.brightness_contrast_prob > 0 or aug.gamma_prob > 0:
        do_bc = chance(_BC, aug.brightness_contrast_prob)
        do_gamma = chance(_GAMMA, aug.gamma_prob)
        image = tf.cond(do_bc | do_gamma, lambda: _intensity(image, draws, do_bc, do_gamma, aug), lambda: image)

    if aug.noise_prob > 0 and aug.noise_std > 0:
        image = tf.cond(chance(_NOISE, aug.noise_prob), lambda: _noise(image, seeds[1], aug), lambda: image)

    if aug.blur_prob > 0 and aug.blur_sigma > 0:
        image = tf.cond(chance(_BLUR, aug.blur_prob), lambda: _blur(image, draws, aug), lambda: image)

    if aug.cutout_prob > 0 and aug.cutout_holes > 0 and aug.cutout_size > 0:
        image = tf.cond(chance(_CUTOUT, aug.cutout_prob), lambda: _cutout(image, seeds[2], aug), lambda: image)
    return image
