"""Each in-graph augmentation: exact identities where promised, stated bounds where at work."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import tensorflow as tf

from ranzcr_tf.config import AugmentConfig
from ranzcr_tf.pipeline.augment import augment_image

SIZE = 64
PROBS = [f.name for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_prob")]


def only(**settings) -> AugmentConfig:
    """Every probability 0 except those given (and the given parameters)."""
    cfg = AugmentConfig(**{name: 0.0 for name in PROBS})
    for key, value in settings.items():
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


def radiograph(seed=0, low=40, high=215, size=SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(low, high, (6, 6)).astype(np.float32)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 4, (size, size))
    return np.clip(image, low, high).astype(np.uint8)[..., None]


def run(image, cfg, seed=(1, 2)):
    """Through tf.function, as tf.data runs it (graph mode, static shapes)."""
    fn = tf.function(lambda x, s: augment_image(x, cfg, s))
    return fn(tf.constant(image), tf.constant(seed, tf.int64)).numpy()


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_all_probabilities_zero_is_exact_identity(dtype):
    image = radiograph().astype(dtype)
    out = run(image, only())
    assert out.dtype == dtype and out.shape == image.shape
    np.testing.assert_array_equal(out, image)


def test_same_seed_reproduces_and_seeds_differ():
    image = radiograph()
    cfg = AugmentConfig(noise_prob=0.5, blur_prob=0.5)
    np.testing.assert_array_equal(run(image, cfg, (3, 4)), run(image, cfg, (3, 4)))
    outs = [run(image, cfg, (3, s)) for s in range(6)]
    assert len({o.tobytes() for o in outs}) > 1


def test_full_default_augmentation_keeps_shape_dtype_and_range():
    for dtype in (np.uint8, np.float32):
        image = radiograph().astype(dtype)
        for s in range(4):
            out = run(image, AugmentConfig(noise_prob=1.0, blur_prob=1.0), (s, 0))
            assert out.shape == image.shape and out.dtype == dtype
            assert not np.array_equal(out, image), "every transform at probability 1 left the image unchanged"
            if dtype == np.float32:  # uint8 cannot leave 0..255; float32 can, and must not
                assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 255
                # noise and blur at probability 1 move values off the integer grid the input sits on
                assert not np.array_equal(out, np.round(out))


def test_flip_at_probability_one_is_exact_mirror():
    image = radiograph()
    np.testing.assert_array_equal(run(image, only(hflip_prob=1.0)), image[:, ::-1])


@pytest.mark.parametrize("warp", ["projective", "xla"])
def test_flip_folded_into_the_resampling_is_still_an_exact_mirror(warp):
    image = radiograph()
    cfg = only(hflip_prob=1.0, affine_prob=1.0, shift=0.0, scale=0.0, rotate_deg=0.0, shear_deg=0.0, warp=warp)
    np.testing.assert_array_equal(run(image, cfg), image[:, ::-1])


@pytest.mark.parametrize("warp", ["projective", "xla"])
def test_affine_with_zero_parameters_is_identity(warp):
    image = radiograph()
    cfg = only(affine_prob=1.0, shift=0.0, scale=0.0, rotate_deg=0.0, shear_deg=0.0, warp=warp)
    for s in range(3):
        np.testing.assert_array_equal(run(image, cfg, (s, 9)), image)


def test_xla_warp_matches_the_projective_transform_op():
    image = radiograph(low=0, high=255)
    settings = dict(hflip_prob=0.5, affine_prob=1.0, crop_prob=0.5, rotate_deg=20.0, shear_deg=5.0)
    for s in range(3):
        projective = run(image, only(**settings), (s, 7)).astype(int)
        xla = run(image, only(warp="xla", **settings), (s, 7)).astype(int)
        assert not np.array_equal(projective, image)
        # Same geometry; the op truncates to uint8 where the XLA warp rounds: at most one grey level apart.
        assert np.abs(projective - xla).max() <= 1


def test_affine_at_work_stays_within_bounds():
    image = radiograph(low=100, high=200)
    cfg = only(affine_prob=1.0, shift=0.1, scale=0.1, rotate_deg=20.0, shear_deg=5.0)
    for s in range(4):
        out = run(image, cfg, (s, 1))
        assert not np.array_equal(out, image)
        # Bilinear resampling mixes input pixels: never above their maximum; below their minimum only at
        # the fill (0) and on the one-pixel seam blending into it.
        assert out.max() <= image.max() and (out == 0).any()
        interior = cv2.erode((out[..., 0] > 0).astype(np.uint8), np.ones((5, 5), np.uint8),
                             borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
        assert interior.sum() > SIZE * SIZE // 2 and out[..., 0][interior].min() >= image.min() - 1
        # |shift| <= 10%, |rotation| <= 20 degrees and zoom >= 0.9: the centre pixel comes from the middle.
        center = out[SIZE // 2, SIZE // 2, 0]
        assert center > 0


def test_random_resized_crop_stays_inside_the_image():
    image = radiograph()
    cfg = only(crop_prob=1.0, crop_scale_min=0.5)
    for s in range(4):
        out = run(image, cfg, (s, 2))
        assert not np.array_equal(out, image)
        # The crop never leaves the image: no fill pixels, values within the input range.
        assert out.min() >= image.min() and out.max() <= image.max()


def test_brightness_shifts_every_pixel_by_one_bounded_amount():
    image = radiograph(low=60, high=190)  # away from 0 and 255: no clipping at a 0.2 bound
    cfg = only(brightness_contrast_prob=1.0, brightness=0.2, contrast=0.0)
    shifts = []
    for s in range(6):
        delta = run(image, cfg, (s, 3)).astype(int) - image.astype(int)
        assert delta.max() - delta.min() <= 1  # one shift for the whole image (rounding aside)
        assert abs(delta.mean()) <= 0.2 * 255 + 0.5
        shifts.append(delta.mean())
    assert np.ptp(shifts) > 1


def test_contrast_scales_spread_about_the_mean():
    image = radiograph(low=60, high=190)
    cfg = only(brightness_contrast_prob=1.0, brightness=0.0, contrast=0.2)
    ratios = []
    for s in range(6):
        out = run(image, cfg, (s, 4)).astype(float)
        assert abs(out.mean() - image.mean()) <= 0.6
        ratio = out.std() / image.std()
        assert 0.8 - 0.02 <= ratio <= 1.2 + 0.02
        ratios.append(ratio)
    assert np.ptp(ratios) > 0.01


def test_gamma_is_monotone_between_its_bounds():
    image = radiograph(low=0, high=255)
    cfg = only(gamma_prob=1.0, gamma_min=0.7, gamma_max=1.4)
    x = image.astype(float) / 255
    for s in range(4):
        out = run(image, cfg, (s, 5)).astype(float)
        assert np.all(out >= np.floor(255 * x ** 1.4) - 0.5) and np.all(out <= np.ceil(255 * x ** 0.7) + 0.5)
        order = np.argsort(image.ravel(), kind="stable")
        assert np.all(np.diff(out.ravel()[order]) >= 0)  # monotone: darker stays darker


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_cutout_changes_at_most_holes_times_area(fill):
    image = radiograph(low=50, high=200)
    cfg = only(cutout_prob=1.0, cutout_holes=3, cutout_size=0.125, cutout_fill=fill)
    side = int(round(0.125 * SIZE))
    fill_value = 0 if fill == "zero" else int(round(image.mean()))
    for s in range(5):
        out = run(image, cfg, (s, 6))
        changed = out != image
        assert 0 < changed.sum() <= 3 * side * side
        assert np.all(out[changed] == fill_value)


def test_noise_has_the_configured_spread():
    image = radiograph(low=60, high=190)
    out = run(image, only(noise_prob=1.0, noise_std=8.0)).astype(float)
    delta = out - image
    assert 6.5 < delta.std() < 9.5 and abs(delta.mean()) < 1.0


def test_blur_stays_within_input_range_and_smooths():
    image = radiograph(low=30, high=220)
    out = run(image, only(blur_prob=1.0, blur_sigma=1.5))
    assert out.min() >= image.min() and out.max() <= image.max()
    roughness = lambda a: np.abs(np.diff(a.astype(float), axis=1)).mean()  # noqa: E731
    assert roughness(out) < 0.8 * roughness(image)


def test_non_square_or_dynamic_images_are_rejected():
    with pytest.raises(ValueError, match="square"):
        augment_image(tf.zeros([32, 48, 1], tf.uint8), AugmentConfig(), tf.constant([1, 2]))
    with pytest.raises(ValueError, match="grey channel"):
        augment_image(tf.zeros([32, 32, 3], tf.uint8), AugmentConfig(), tf.constant([1, 2]))
