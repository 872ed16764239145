"""In-graph training augmentations for single-channel radiographs (TPU-host safe: no Python functions).

``augment_image(image, aug_cfg, seed)`` takes one ``(S, S, 1)`` image, uint8 or float in 0..255, and
returns the same shape and dtype. Every random draw is a ``tf.random.stateless_*`` op derived from the
``seed`` tensor (shape ``[2]``), so a fixed seed reproduces the same augmentation exactly; the dataset
gives each element its own seed (``data.py`` zips the records with ``Dataset.random``).

Order and cost, in the order applied (each gated by its own ``*_prob``; an op that is not drawn costs
nothing, and with every probability 0 the image comes back bit-identical):

1. horizontal flip (an exact mirror), random resized crop (area share crop_scale_min..1, aspect within
   1/1.15..1.15) and the affine (shift, scale, rotate, shear about the centre) composed into ONE 3x3
   matrix and resampled ONCE (bilinear, constant fill 0) on the uint8 image: one interpolation instead of
   two or three (a flip alone is a plain reverse). ``augment.warp: xla`` (default) runs it as an XLA-fused
   gather, cheaper in CPU than ``augment.warp: projective`` (one ``ImageProjectiveTransformV3`` call; same
   geometry, at most one grey level apart; docs/results.md#speed-measurements-behind-code-choices);
2. one float32 pass for every pixel-value op: brightness (+-brightness x 255) and contrast (x 1+-contrast
   about the image mean), gamma (log-uniform in gamma_min..gamma_max), optional Gaussian noise, optional
   Gaussian blur (reflect-padded separable convolution), then coarse dropout / cutout last so its holes
   hold exactly the fill value (0 or the image mean); rounded back to uint8 once.

Labels are never an input here: none of these ops can change them. Line masks (``train.recipe: aux_seg``) may
be: ``augment_image(image, cfg, seed, mask=mask)`` moves them with the image's geometric matrix.
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


def _flip_matrix(size: float):
    return tf.constant([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _geometric_matrix(size_f: float, draws, do_flip, do_crop, do_affine, aug: AugmentConfig):
    """Output pixel -> input pixel of the drawn flip, crop and affine, as one 3x3 matrix (image pixels)."""
    eye = tf.eye(3)
    flip = tf.where(do_flip, _flip_matrix(size_f), eye)
    crop = tf.cond(do_crop, lambda: _crop_matrix(draws, size_f, aug), lambda: eye)
    affine = tf.cond(do_affine, lambda: _affine_matrix(draws, size_f, aug), lambda: eye)
    # Flip, then crop-and-resize, then the affine: B(p) = A(affine p) = flipped(crop affine p) = I(F C A p).
    # One product, one resampling pass: the flip (an exact integer mirror) rides along for free.
    matrix = flip @ crop @ affine
    return matrix / matrix[2, 2]


def _warp(image, matrix, aug: AugmentConfig):
    """Resample ``(S, S, C)`` ``image`` at ``matrix @ p`` for every output pixel p (bilinear, fill 0)."""
    size = image.shape[0]
    if aug.warp == "xla":
        channels = [_xla_affine_warp(image[..., c:c + 1], matrix) for c in range(image.shape[-1])]
        return tf.ensure_shape(channels[0] if len(channels) == 1 else tf.concat(channels, -1), image.shape)
    transform = tf.reshape(matrix, [9])[:8][tf.newaxis]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis], transforms=transform, output_shape=tf.constant([size, size], tf.int32),
        fill_value=tf.constant(0.0), interpolation="BILINEAR", fill_mode="CONSTANT")
    return tf.ensure_shape(out[0], image.shape)


def rescale_matrix(matrix, from_size: int, to_size: int):
    """The same geometric map expressed on a ``to_size`` grid (pixel centres at integers on both):
    a ``(from_size / 4)`` mask is warped with ``rescale_matrix(matrix, S, S // 4)`` of the image's matrix."""
    f = float(to_size) / float(from_size)
    down = tf.constant([[f, 0.0, 0.5 * f - 0.5], [0.0, f, 0.5 * f - 0.5], [0.0, 0.0, 1.0]])
    up = tf.constant([[1.0 / f, 0.0, 0.5 / f - 0.5], [0.0, 1.0 / f, 0.5 / f - 0.5], [0.0, 0.0, 1.0]])
    return down @ matrix @ up


def warp_mask(mask, matrix, image_size: int, aug: AugmentConfig):
    """Warp ``(M, M, C)`` 0/1 masks with the image's ``matrix`` (bilinear, then thresholded at 0.5)."""
    mask_matrix = rescale_matrix(matrix, image_size, mask.shape[0])
    return tf.cast(_warp(tf.cast(mask, tf.float32), mask_matrix, aug) >= 0.5, mask.dtype)


@tf.function(jit_compile=True)  # one trace per (size, dtype): static shapes for XLA
def _xla_affine_warp(image, matrix):
    """Bilinear affine warp, constant fill 0, as XLA-fused gathers (``augment.warp: xla``).

    Same mapping as ImageProjectiveTransformV3 (output pixel p reads input ``matrix @ p``), but XLA
    fuses the coordinate math and the four taps into one loop, which costs less CPU (docs/results.md). Integer
    source coordinates give exact copies, so flips and zero-parameter affines stay bit-exact.
    """
    size = image.shape[0]
    flat = tf.concat([tf.reshape(tf.cast(image, tf.float32), [-1]), tf.zeros([1])], axis=0)  # last = fill
    ys, xs = tf.meshgrid(tf.range(size, dtype=tf.float32), tf.range(size, dtype=tf.float32), indexing="ij")
    src_x = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
    src_y = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
    x0, y0 = tf.floor(src_x), tf.floor(src_y)
    fx, fy = src_x - x0, src_y - y0
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)

    def tap(y, x):
        inside = (x >= 0) & (x < size) & (y >= 0) & (y < size)
        return tf.gather(flat, tf.where(inside, y * size + x, size * size))

    values = ((tap(y0, x0) * (1.0 - fx) + tap(y0, x0 + 1) * fx) * (1.0 - fy)
              + (tap(y0 + 1, x0) * (1.0 - fx) + tap(y0 + 1, x0 + 1) * fx) * fy)
    if image.dtype.is_integer:
        values = tf.round(values)
    return tf.cast(values, image.dtype)[..., tf.newaxis]


def mirror(image):
    """Exact horizontal mirror of an ``(S, S, C)`` image (also the inference ``hflip`` TTA)."""
    if image.shape[-1] == 1:  # reversing the (S, S) view is faster than reversing (S, S, 1) on CPU (docs/results.md)
        return tf.reverse(image[..., 0], axis=[1])[..., tf.newaxis]
    return tf.reverse(image, axis=[1])


def _brightness_contrast(values, draws, aug: AugmentConfig):
    """Contrast about the image mean (so the mean stays put), then a brightness shift; 0..255 floats."""
    brightness = _uniform(draws, _BRIGHTNESS, -aug.brightness, aug.brightness) * 255.0
    contrast = _uniform(draws, _CONTRAST, 1.0 - aug.contrast, 1.0 + aug.contrast)
    mean = tf.reduce_mean(values) if aug.contrast > 0 else 0.0
    return tf.clip_by_value((values - mean) * contrast + mean + brightness, 0.0, 255.0)


def _gamma(values, draws, aug: AugmentConfig):
    # Gamma drawn log-uniformly so that g and 1/g are equally likely when the range is symmetric.
    # exp(g log x) rather than pow: TF's CPU pow is scalar, slower than vectorised exp and log (docs/results.md).
    gamma = tf.exp(_uniform(draws, _GAMMA_VALUE, math.log(aug.gamma_min), math.log(aug.gamma_max)))
    return 255.0 * tf.exp(gamma * tf.math.log(tf.maximum(values, 1e-3) / 255.0))


def _noise(values, seed, aug: AugmentConfig):
    noise = tf.random.stateless_normal(tf.shape(values), seed=seed, stddev=aug.noise_std)
    return tf.clip_by_value(values + noise, 0.0, 255.0)


def _blur_radius(aug: AugmentConfig) -> int:
    return max(1, int(math.ceil(3.0 * aug.blur_sigma)))


def _blur(values, draws, aug: AugmentConfig):
    """Gaussian blur with sigma ~ U(blur_sigma / 2, blur_sigma); reflect padding keeps edges unbiased."""
    radius = _blur_radius(aug)
    sigma = _uniform(draws, _BLUR_SIGMA, 0.5 * aug.blur_sigma, aug.blur_sigma)
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(offsets / sigma))
    kernel = kernel / tf.reduce_sum(kernel)
    x = tf.pad(values[tf.newaxis], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    channels = values.shape[-1]
    if channels == 1:
        x = tf.nn.conv2d(x, tf.reshape(kernel, [-1, 1, 1, 1]), strides=1, padding="VALID")
        x = tf.nn.conv2d(x, tf.reshape(kernel, [1, -1, 1, 1]), strides=1, padding="VALID")
    else:  # each channel blurred alone
        for shape in ([-1, 1, 1, 1], [1, -1, 1, 1]):
            x = tf.nn.depthwise_conv2d(x, tf.tile(tf.reshape(kernel, shape), [1, 1, channels, 1]), [1, 1, 1, 1], "VALID")
    return tf.ensure_shape(x[0], values.shape)


def _cutout(values, seed, aug: AugmentConfig):
    """``cutout_holes`` squares of side ``cutout_size * S`` at uniform centres (may overlap the border)."""
    size = values.shape[0]
    side = max(1, int(round(aug.cutout_size * size)))
    centers = tf.random.stateless_uniform([aug.cutout_holes, 2], seed=seed, maxval=size, dtype=tf.int32)
    index = tf.range(size)[:, tf.newaxis]
    top = centers[:, 0] - side // 2
    left = centers[:, 1] - side // 2
    rows = tf.cast((index >= top) & (index < top + side), tf.float32)  # (S, holes)
    cols = tf.cast((index >= left) & (index < left + side), tf.float32)  # (S, holes)
    # Holes covering each pixel, as one small matmul: far cheaper than a (holes, S, S) boolean mask.
    covered = tf.minimum(tf.matmul(rows, cols, transpose_b=True), 1.0)[..., tf.newaxis]
    fill = tf.round(tf.reduce_mean(values)) if aug.cutout_fill == "mean" else 0.0
    return values * (1.0 - covered) + fill * covered


def _photometric(image, draws, seeds, flags, aug: AugmentConfig):
    """Every pixel-value op in one float32 pass: one cast in, one rounding cast out."""
    do_bc, do_gamma, do_noise, do_blur, do_cutout = flags
    values = tf.cast(image, tf.float32)
    if do_bc is not None:
        values = tf.cond(do_bc, lambda: _brightness_contrast(values, draws, aug), lambda: values)
    if do_gamma is not None:
        values = tf.cond(do_gamma, lambda: _gamma(values, draws, aug), lambda: values)
    if do_noise is not None:
        values = tf.cond(do_noise, lambda: _noise(values, seeds[1], aug), lambda: values)
    if do_blur is not None:
        values = tf.cond(do_blur, lambda: _blur(values, draws, aug), lambda: values)
    if do_cutout is not None:
        values = tf.cond(do_cutout, lambda: _cutout(values, seeds[2], aug), lambda: values)
    values = tf.clip_by_value(values, 0.0, 255.0)
    if image.dtype.is_integer:
        values = tf.round(values)
    return tf.cast(values, image.dtype)


def _draw(seed):
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
    return seeds, tf.random.stateless_uniform([_NUM_DRAWS], seed=seeds[0])


def geometric_matrix(aug_cfg: AugmentConfig, seed, size: int):
    """The 3x3 matrix (output pixel -> input pixel) that ``augment_image`` applies to a ``size`` image with
    ``seed``; the identity when no flip, crop or affine is drawn. For checks: a point q of the input lands at
    ``inv(matrix) @ q`` in the output."""
    aug = aug_cfg
    _, draws = _draw(seed)
    no = tf.constant(False)
    do_flip = draws[_FLIP] < aug.hflip_prob if aug.hflip_prob > 0 else no
    do_crop = draws[_CROP] < aug.crop_prob if aug.crop_prob > 0 or aug.affine_prob > 0 else no
    do_affine = draws[_AFFINE] < aug.affine_prob if aug.crop_prob > 0 or aug.affine_prob > 0 else no
    return _geometric_matrix(float(size), draws, do_flip, do_crop, do_affine, aug)


def half_mask(image, right):
    """``image`` ``(S, S, C)`` with its left half (``right`` False) or its right half (True) set to 0; S odd: the
    middle column belongs to the right half."""
    size = image.shape[1]
    columns = tf.range(size)[tf.newaxis, :, tf.newaxis]
    blank = tf.where(right, columns >= size // 2, columns < size // 2)
    return tf.where(blank, tf.zeros_like(image), image)


def _check_image_shape(image, channels: int) -> None:
    """Refuse a non-square image, one without a static size, or one with other than ``channels`` channels."""
    if image.shape.rank != 3 or image.shape[0] is None or image.shape[0] != image.shape[1]:
        raise ValueError(f"augment_image needs a square (S, S, 1) image with a static size, got {image.shape}")
    if image.shape[2] != channels:
        raise ValueError(f"augment_image works on the single grey channel (3x cheaper): augment before "
                         f"expanding to the model's channels (data.expand_channels), got {image.shape}"
                         if channels == 1 else f"augment_image expected {channels} channels, got {image.shape}")


def _geometric_step(pair: tuple, draws, aug: AugmentConfig) -> tuple:
    """Flip, crop and affine of ``(image,)`` or ``(image, mask)``: one matrix moves both; a flip alone mirrors."""
    image = pair[0]
    do_flip = draws[_FLIP] < aug.hflip_prob if aug.hflip_prob > 0 else tf.constant(False)
    size = image.shape[0]
    if aug.crop_prob > 0 or aug.affine_prob > 0:
        do_crop = draws[_CROP] < aug.crop_prob
        do_affine = draws[_AFFINE] < aug.affine_prob
        resample = do_crop | do_affine

        def geometric():
            matrix = _geometric_matrix(float(size), draws, do_flip, do_crop, do_affine, aug)
            warped = _warp(image, matrix, aug)
            return (warped,) if len(pair) == 1 else (warped, warp_mask(pair[1], matrix, size, aug))

        return tf.cond(resample, geometric,
                       lambda: tf.cond(do_flip, lambda: tuple(mirror(x) for x in pair), lambda: pair))
    if aug.hflip_prob > 0:
        return tf.cond(do_flip, lambda: tuple(mirror(x) for x in pair), lambda: pair)
    return pair


def _pixel_value_step(image, seeds, draws, aug: AugmentConfig):
    """Brightness/contrast, gamma, noise, blur and cutout (one ``tf.cond`` around them all), then the half mask."""

    def chance(slot, prob):
        return draws[slot] < prob

    # Each flag is None when its op is configured off (no graph at all), else a boolean tensor.
    flags = (
        chance(_BC, aug.brightness_contrast_prob) if aug.brightness_contrast_prob > 0 else None,
        chance(_GAMMA, aug.gamma_prob) if aug.gamma_prob > 0 else None,
        chance(_NOISE, aug.noise_prob) if aug.noise_prob > 0 and aug.noise_std > 0 else None,
        chance(_BLUR, aug.blur_prob) if aug.blur_prob > 0 and aug.blur_sigma > 0 else None,
        chance(_CUTOUT, aug.cutout_prob) if aug.cutout_prob > 0 and aug.cutout_holes > 0 and aug.cutout_size > 0
        else None,
    )
    active = [flag for flag in flags if flag is not None]
    if active:
        any_active = tf.reduce_any(tf.stack(active))
        image = tf.cond(any_active, lambda: _photometric(image, draws, seeds, flags, aug), lambda: image)
    if aug.half_mask_prob > 0:  # its own draws (not a slot of the shared ones), so other draws stay as they were
        half_draws = tf.random.stateless_uniform([2], seed=tf.random.experimental.stateless_fold_in(seeds[0], 7))
        image = tf.cond(half_draws[0] < aug.half_mask_prob, lambda: half_mask(image, half_draws[1] < 0.5),
                        lambda: image)
    return image


def augment_image(image, aug_cfg: AugmentConfig, seed, mask=None, channels: int = 1):
    """Randomly augment one ``(S, S, channels)`` image (uint8, or float in 0..255); same shape and dtype out.

    ``channels`` is 1 (RANZCR's grey radiographs, augmented before expanding to the model's channels) or the
    records' stored channels (DICOM windows x slices: every channel moves together; brightness, contrast and
    gamma act on all of them alike). ``augment.half_mask_prob`` blanks the left or the right half, last.

    ``seed`` is an int tensor of shape ``[2]`` (as for ``tf.random.stateless_uniform``); the same seed
    gives the same output. Each augmentation is applied with its ``*_prob`` from ``aug_cfg``; with all
    probabilities 0 the output equals the input exactly.

    ``mask``: optional ``(M, M, C)`` 0/1 line masks of the same image at any resolution M (``masks.py``);
    then returns ``(image, mask)``: the flip, crop and affine move the mask with the image's own matrix
    (``warp_mask``), the pixel-value ops leave it alone. The image comes out exactly as without a mask.
    """
    _check_image_shape(image, channels)
    seeds, draws = _draw(seed)
    pair = _geometric_step((image,) if mask is None else (image, mask), draws, aug_cfg)
    image = _pixel_value_step(pair[0], seeds, draws, aug_cfg)
    return image if mask is None else (image, pair[1])
