"""preprocess.py on real image files: reduced decode, unusual formats, bad input, decoder agreement."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from helpers_convert import phantom

from ranzcr_tf.config import PreprocessConfig
from ranzcr_tf.prep import records
from ranzcr_tf.prep.preprocess import (
    BadImageError,
    decode_scale,
    decode_source,
    encode_jpeg,
    jpeg_file_size,
    jpeg_size,
    preprocess_array,
    preprocess_bytes,
    preprocess_file,
    resize_filter,
)

SETTINGS = PreprocessConfig(image_size=64)
# Full-resolution decode: colour conversion is compared without the (tiny-image) DCT reduction in between.
FULL = PreprocessConfig(image_size=64, reduced_decode=False)


def _jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def _decoded(stored: bytes) -> np.ndarray:
    return records.decode_image_numpy(stored).astype(np.int16)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return phantom(np.random.default_rng(1), 300, 260)


def test_decode_scale_is_the_smallest_eighth_that_keeps_the_short_side_at_least_target():
    assert decode_scale(2500, 2000, 768) == 4  # 1000 >= 768, 3/8 -> 750 < 768
    assert decode_scale(3000, 3200, 768) == 3  # 1125; 2/8 -> 750
    assert decode_scale(6200, 7000, 768) == 1  # 775
    assert decode_scale(1600, 1700, 512) == 3  # 600; 2/8 -> 400
    assert decode_scale(1330, 1548, 768) == 5  # 832; 4/8 -> 665
    assert decode_scale(700, 2800, 768) == 8  # short side below target: full decode (then upscaled)
    # libjpeg rounds scaled sizes up: 1535 * 4/8 -> 768 is still enough.
    assert decode_scale(1535, 2000, 768) == 4


@pytest.mark.parametrize("height,width,target", [(300, 260, 64), (301, 263, 100), (517, 389, 150), (260, 300, 250)])
def test_scaled_decode_size_matches_the_chosen_eighth(height, width, target):
    image = phantom(np.random.default_rng(height), height, width)
    gray, info = decode_source(_jpeg(image), PreprocessConfig(image_size=target))
    eighths = decode_scale(height, width, target)
    assert info["decode_scale"] == eighths / 8 and (info["orig_height"], info["orig_width"]) == (height, width)
    assert gray.shape == (-(-height * eighths // 8), -(-width * eighths // 8)) and min(gray.shape) >= target
    assert gray.dtype == np.uint8 and gray.flags.c_contiguous


def test_decoder_is_bit_identical_to_opencv_at_full_and_half_scale(source):
    data = _jpeg(source)
    buffer = np.frombuffer(data, np.uint8)
    full, info = decode_source(data, FULL)
    assert info["decode_scale"] == 1.0
    np.testing.assert_array_equal(full, cv2.imdecode(buffer, cv2.IMREAD_GRAYSCALE))
    half, info = decode_source(data, PreprocessConfig(image_size=130))  # 260 * 4/8 = 130
    assert info["decode_scale"] == 0.5
    np.testing.assert_array_equal(half, cv2.imdecode(buffer, cv2.IMREAD_REDUCED_GRAYSCALE_2))


def test_auto_resize_is_bilinear_below_a_2x_shrink_and_area_beyond(source):
    auto = PreprocessConfig(image_size=100)
    assert [resize_filter(shape, auto) for shape in [(199, 150), (150, 199), (200, 120), (90, 260), (80, 80)]] == \
        ["linear", "linear", "area", "area", "linear"]
    assert resize_filter((400, 400), PreprocessConfig(image_size=100, interpolation="cubic")) == "cubic"
    # What the filters are: bit-exact bilinear and OpenCV's area averaging.
    np.testing.assert_array_equal(preprocess_array(source[:190, :150], PreprocessConfig(image_size=100, clahe_clip_limit=0)),
                                  cv2.resize(source[:190, :150], (100, 100), interpolation=cv2.INTER_LINEAR_EXACT))
    np.testing.assert_array_equal(preprocess_array(source[:200, :150], PreprocessConfig(image_size=100, clahe_clip_limit=0)),
                                  cv2.resize(source[:200, :150], (100, 100), interpolation=cv2.INTER_AREA))


def test_jpeg_header_size_and_reduced_decode(source):
    data = _jpeg(source)
    assert jpeg_size(data) == source.shape
    gray, info = decode_source(data, PreprocessConfig(image_size=64))
    assert info["decode_scale"] == 0.25 and (info["orig_height"], info["orig_width"]) == source.shape
    assert gray.shape == (75, 65)
    gray_full, info_full = decode_source(data, PreprocessConfig(image_size=64, reduced_decode=False))
    assert info_full["decode_scale"] == 1.0 and gray_full.shape == source.shape


def test_jpeg_file_size_reads_the_head_and_past_large_metadata(source, tmp_path):
    """The annotation check reads each image's size from its file: the first 64 KiB, or the whole file when
    metadata segments (two full APP1 segments here, as a large EXIF + XMP would be) push the frame header past them."""
    data = _jpeg(source)
    app1 = b"\xff\xe1" + (65535).to_bytes(2, "big") + bytes(65533)
    padded = data[:2] + app1 + app1 + data[2:]
    for name, content in (("plain.jpg", data), ("padded.jpg", padded)):
        (tmp_path / name).write_bytes(content)
        assert jpeg_file_size(str(tmp_path / name)) == source.shape, name
    assert jpeg_size(padded[:1 << 16]) is None  # the head alone does not reach the frame header
    (tmp_path / "text.jpg").write_bytes(b"not a jpeg" * 10000)
    assert jpeg_file_size(str(tmp_path / "text.jpg")) is None and jpeg_file_size(str(tmp_path / "missing.jpg")) is None


def test_stored_image_is_the_preprocessed_source_and_decoders_agree(source):
    import tensorflow as tf

    data = _jpeg(source)
    stored, info = preprocess_bytes(data, SETTINGS)
    assert (info["height"], info["width"], info["upscaled"]) == (64, 64, False)
    expected = preprocess_array(decode_source(data, SETTINGS)[0], SETTINGS)
    assert expected.shape == (64, 64) and expected.dtype == np.uint8
    assert np.abs(_decoded(stored) - expected).mean() < 2.0  # JPEG quality 95 tolerance
    # Without reduced decode the stored image is CLAHE + resize of the full-resolution decode.
    full_settings = PreprocessConfig(image_size=64, reduced_decode=False)
    stored_full, _ = preprocess_bytes(data, full_settings)
    full = preprocess_array(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE), full_settings)
    assert np.abs(_decoded(stored_full) - full).mean() < 2.0
    # TensorFlow (accurate integer IDCT) and OpenCV decode the stored JPEG to identical pixels.
    tf_pixels = records.decode_image(tf.constant(stored)).numpy()[:, :, 0]
    np.testing.assert_array_equal(tf_pixels, records.decode_image_numpy(stored))
    # Deterministic bytes: the resumable converter relies on it.
    assert preprocess_bytes(data, SETTINGS)[0] == stored


def test_reduced_decode_is_faithful_at_realistic_scale():
    image = phantom(np.random.default_rng(2), 1400, 1200)
    data = _jpeg(image, 95)
    settings = PreprocessConfig(image_size=512)
    reduced = preprocess_array(decode_source(data, settings)[0], settings)
    assert decode_source(data, settings)[1]["decode_scale"] == 0.5
    reference = preprocess_array(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE), settings)
    assert _psnr(reduced, reference) > 30.0


def test_clahe_changes_contrast_and_clip_zero_disables_it(source):
    plain = cv2.resize(source, (64, 64), interpolation=cv2.INTER_AREA)  # "auto" at a 4x shrink
    np.testing.assert_array_equal(preprocess_array(source, PreprocessConfig(image_size=64, clahe_clip_limit=0)), plain)
    assert np.abs(preprocess_array(source, SETTINGS).astype(int) - plain).mean() > 5
    with pytest.raises(ValueError, match="2-D uint8"):
        preprocess_array(source.astype(np.float32), SETTINGS)


@pytest.mark.parametrize("case", ["missing", "zero_byte", "truncated", "truncated_near_end", "random_bytes", "text"])
def test_bad_inputs_raise_bad_image_error_naming_the_file(tmp_path, source, case):
    path = tmp_path / f"{case}.jpg"
    data = _jpeg(source)
    content = {"zero_byte": b"", "truncated": data[: len(data) // 2], "truncated_near_end": data[:-40],
               "random_bytes": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
               "text": b"StudyInstanceUID,ETT - Abnormal\n" * 50}.get(case)
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadImageError, match=str(path).replace(".", r"\.")) as err:
        preprocess_file(str(path), SETTINGS)
    assert isinstance(err.value, ValueError)
    expected_reason = {"missing": "not found", "zero_byte": "empty", "truncated": "truncated",
                       "truncated_near_end": "truncated"}.get(case, "not a readable image")
    assert expected_reason in str(err.value)


def _close_to_gray_pipeline(stored: bytes, gray: np.ndarray, tolerance: float = 2.5) -> None:
    expected = preprocess_array(gray, FULL)
    diff = np.abs(_decoded(stored) - expected).mean()
    assert diff < tolerance, diff


def test_png_bytes_behind_jpg_name(tmp_path, source):
    path = tmp_path / "png_inside.jpg"
    path.write_bytes(cv2.imencode(".png", source)[1].tobytes())
    stored, info = preprocess_file(str(path), SETTINGS)
    assert info["format"] == "png" and "PNG" in info["note"]
    assert (info["orig_height"], info["orig_width"]) == source.shape
    _close_to_gray_pipeline(stored, source, 2.0)


def test_16_bit_png_is_scaled_by_its_range(tmp_path, source):
    twelve_bit = source.astype(np.uint16) * 16  # 12-bit data in a 16-bit container
    path = tmp_path / "sixteen.jpg"
    path.write_bytes(cv2.imencode(".png", twelve_bit)[1].tobytes())
    stored, _ = preprocess_file(str(path), SETTINGS)
    low, high = int(source.min()), int(source.max())
    rescaled = np.clip(np.rint((source.astype(np.float64) - low) * 255.0 / (high - low)), 0, 255).astype(np.uint8)
    _close_to_gray_pipeline(stored, rescaled, 2.0)
    # Not the naive >> 8 (which would leave a nearly black image).
    assert _decoded(stored).mean() > 60


def test_rgb_and_cmyk_become_luminance(tmp_path, source):
    from PIL import Image

    color = np.stack([source, (source * 0.9).astype(np.uint8), (source * 0.8).astype(np.uint8)], axis=-1)
    rgb_path = tmp_path / "rgb.jpg"
    rgb_path.write_bytes(_jpeg(color, 95))
    stored, _ = preprocess_file(str(rgb_path), FULL)
    _close_to_gray_pipeline(stored, cv2.cvtColor(color, cv2.COLOR_BGR2GRAY))

    cmyk = io.BytesIO()
    Image.fromarray(np.stack([source] * 3, axis=-1)).convert("CMYK").save(cmyk, "JPEG", quality=95)
    cmyk_path = tmp_path / "cmyk.jpg"
    cmyk_path.write_bytes(cmyk.getvalue())
    assert Image.open(cmyk_path).mode == "CMYK"
    stored, info = preprocess_file(str(cmyk_path), FULL)
    assert info["format"] == "jpeg"
    gray, _ = decode_source(cmyk_path.read_bytes(), FULL)
    assert np.abs(gray.astype(int) - source).mean() < 2.0  # luminance, not ink (an inverted image is ~100 off)
    # CLAHE amplifies the quality-95 CMYK round trip's noise, which bilinear resizing does not average out.
    _close_to_gray_pipeline(stored, source, 3.5)


def test_small_image_is_upscaled_with_a_note(tmp_path):
    small = phantom(np.random.default_rng(3), 40, 50)
    path = tmp_path / "small.jpg"
    path.write_bytes(_jpeg(small, 95))
    stored, info = preprocess_file(str(path), SETTINGS)
    assert info["upscaled"] and "upscaled from 50x40" in info["note"]
    assert records.decode_image_numpy(stored).shape == (64, 64)
    _close_to_gray_pipeline(stored, cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), 0))


def test_encode_jpeg_is_single_channel(source):
    decoded = cv2.imdecode(np.frombuffer(encode_jpeg(source, 90), np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.ndim == 2 and decoded.shape == source.shape
