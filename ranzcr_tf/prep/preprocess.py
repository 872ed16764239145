"""How a source radiograph becomes a stored image: THE single definition (converter and Kaggle kernel).

    stored_jpeg, info = preprocess_file("train/1.2.3.jpg", cfg.preprocess)

Steps, in this order:

1. **Decode to 8-bit grayscale.** JPEG sources (all of the Kaggle data) are decoded by libjpeg-turbo
   through ``simplejpeg``, with the accurate integer IDCT; EXIF orientation is ignored, like
   TensorFlow's decoder, so pixel coordinates match ``train_annotations.csv``. With ``reduced_decode``
   on, libjpeg scales the image in the DCT domain by M/8 (M = 1..8), choosing the **smallest** scale
   that keeps the **short side** of the decoded image at least ``image_size``: the square resize that
   follows shrinks both sides to ``image_size``, so with the short side still >= the target no axis
   is ever upsampled, and the resize is left a factor below 2 on the short side (below 1.5 from
   M = 3 up, which covers every Kaggle film at 768 px; only a source over 16x the target leaves
   more, at M = 1). The scaled IDCT
   is an exact low-pass of each 8x8 block, cheaper than decoding in full, and every later step then
   works on fewer pixels. At M = 8 and M = 4 the pixels are bit-identical to OpenCV's
   ``IMREAD_GRAYSCALE`` and ``IMREAD_REDUCED_GRAYSCALE_2``.
   Other formats (PNG behind a ``.jpg`` name, TIFF, ...) and JPEGs libjpeg-turbo cannot convert to
   gray (CMYK) are decoded in full with OpenCV: 16-bit and float images are scaled to 8 bits by their
   own min..max range (the range actually used, as DICOM exports often hold 10-12 bit data in 16-bit
   containers), colour and CMYK are converted to luminance.
2. **CLAHE** (``cv2.createCLAHE(clip_limit, (tile_grid, tile_grid))``; clip limit 0 disables it) on the
   decoded image, before the resize, as in the public RANZCR notebooks.
3. **Resize** to ``image_size`` x ``image_size`` with the named interpolation. ``auto`` (the default)
   is ``linear`` (OpenCV's bit-exact bilinear ``INTER_LINEAR_EXACT``, the same result on every CPU)
   while neither axis shrinks by 2x or more, which after the DCT scaling is the usual case at
   768 px, where bilinear is as faithful as ``area`` at a third of its cost; beyond 2x it is ``area``,
   as bilinear would skip pixels and thin tubes could vanish (a 128 px target from a 1/8 decode).
   Sources smaller than the target are upscaled and ``info['upscaled']`` says so.
4. **Encode** a single-channel baseline JPEG at ``jpeg_quality``. The stored JPEG is decoded with
   ``records.decode_image`` (libjpeg accurate integer IDCT) or ``records.decode_image_numpy``
   (OpenCV); both give identical pixels.

Unreadable input (missing, zero-byte, truncated, not an image) raises :class:`BadImageError`, a
``ValueError`` whose message names the file and the reason. No TensorFlow here: converter workers
import only this module, OpenCV and NumPy.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

try:
    import simplejpeg
except ImportError as exc:  # a Kaggle image without the bundle's wheels
    raise ImportError("ranzcr_tf needs simplejpeg (libjpeg-turbo with DCT scaling) to decode JPEGs exactly as the "
                      "converter did: `pip install simplejpeg`, or on Kaggle install the wheels of the bundle that "
                      "`python -m ranzcr_tf.serve.package` builds") from exc

from ranzcr_tf import config
from ranzcr_tf.config import PreprocessConfig

CV2_FILTERS = {  # config.INTERPOLATIONS but "auto", which resize_filter resolves to one of these
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR_EXACT,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SOFn markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class BadImageError(ValueError):
    """The input cannot be read as an image (missing, empty, truncated, corrupt, not an image)."""


# --------------------------------------------------------------------------------------------- decoding
def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG's frame header without decoding, or None if it cannot be found."""
    if not data.startswith(_JPEG_SOI):
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # stand-alone markers have no length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF_MARKERS:
            if pos + 9 > end:
                return None
            return int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        pos += 2 + length
    return None


def jpeg_file_size(path: str, head: int = 1 << 16) -> tuple[int, int] | None:
    """:func:`jpeg_size` of a file, read from its first ``head`` bytes (the whole file when its metadata
    segments push the frame header past them); None when the file is missing or not a readable JPEG, or its
    header gives no size (a zero height is legal there, defined later by a DNL marker)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(head)
            size = jpeg_size(data)
            if size is None and len(data) == head and data.startswith(_JPEG_SOI):
                size = jpeg_size(data + fh.read())
    except OSError:
        return None
    return size if size and all(size) else None


def _jpeg_is_complete(data: bytes) -> bool:
    # libjpeg decodes a truncated file into a partly grey image with only a warning, so truncation is
    # detected here: a complete JPEG ends with the EOI marker (some writers pad a few bytes after it).
    # 0xFF in entropy-coded data is always followed by 0x00 or a restart marker, so FFD9 in the last
    # bytes can only be the EOI marker itself.
    return _JPEG_EOI in data[-64:]


def decode_scale(height: int, width: int, target: int) -> int:
    """M in 1..8: the smallest DCT scale M/8 whose decoded short side is >= ``target`` (8 = full size)."""
    short = min(height, width)
    for eighths in range(1, 8):
        # libjpeg rounds scaled sizes up: the decoded side is ceil(side * M / 8).
        if -(-short * eighths // 8) >= target:
            return eighths
    return 8


def _to_gray_uint8(image: np.ndarray) -> np.ndarray:
    """Any decoded array (gray/BGR/BGRA, 8/16-bit/float) to 2-D uint8 grayscale."""
    if image.ndim == 3:
        channels = image.shape[2]
        if channels == 1:
            image = image[:, :, 0]
        elif channels == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        elif channels == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
        else:
            raise BadImageError(f"unsupported number of channels: {channels}")
    if image.dtype != np.uint8:
        values = image.astype(np.float64)
        if not np.isfinite(values).all():
            values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min()), float(values.max())
        if high > low:
            values = (values - low) * (255.0 / (high - low))
        else:
            values = np.zeros_like(values)
        image = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def decode_source(data: bytes, settings: PreprocessConfig, name: str = "image") -> tuple[np.ndarray, dict]:
    """Decode source bytes to 2-D uint8 grayscale (possibly DCT-reduced), plus info.

    ``info`` holds ``orig_height``, ``orig_width`` (the full source size, whatever the scaling),
    ``format`` ('jpeg', 'png', 'other') and ``decode_scale`` (M/8: 1.0, 0.875, ..., 0.125).
    """
    if len(data) == 0:
        raise BadImageError(f"{name}: empty file (0 bytes)")
    info: dict = {"decode_scale": 1.0}
    if data.startswith(_JPEG_SOI):
        info["format"] = "jpeg"
        if not _jpeg_is_complete(data):
            raise BadImageError(f"{name}: truncated JPEG (no end-of-image marker)")
        size, image = jpeg_size(data), None
        if size is not None:
            eighths = decode_scale(size[0], size[1], settings.image_size) if settings.reduced_decode else 8
            try:
                # simplejpeg picks the smallest libjpeg scale with both sides >= the minimums: exactly M/8.
                image = simplejpeg.decode_jpeg(data, "GRAY", fastdct=False, min_height=-(-size[0] * eighths // 8),
                                               min_width=-(-size[1] * eighths // 8), strict=False)
            except ValueError:
                pass  # e.g. CMYK, which libjpeg-turbo cannot turn into gray: OpenCV below decodes it
        if image is not None:
            info["decode_scale"] = eighths / 8
            info["orig_height"], info["orig_width"] = int(size[0]), int(size[1])
            return np.ascontiguousarray(image[:, :, 0]), info
        return _decode_full_opencv(data, info, f"{name}: corrupt JPEG (libjpeg-turbo and OpenCV could not decode it)")
    info["format"] = "png" if data.startswith(_PNG_SIGNATURE) else "other"
    return _decode_full_opencv(data, info, f"{name}: not a readable image ({len(data)} bytes that OpenCV cannot decode)")


def _decode_full_opencv(data: bytes, info: dict, failure: str) -> tuple[np.ndarray, dict]:
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None or image.size == 0:
        raise BadImageError(failure)
    image = _to_gray_uint8(image)
    info["orig_height"], info["orig_width"] = int(image.shape[0]), int(image.shape[1])
    return image, info


# ----------------------------------------------------------------------------------------- transforming
def apply_clahe(gray: np.ndarray, settings: PreprocessConfig) -> np.ndarray:
    """CLAHE with the configured clip limit and tile grid (a no-op when the clip limit is 0)."""
    if settings.clahe_clip_limit <= 0:
        return gray
    grid = int(settings.clahe_tile_grid)
    clahe = cv2.createCLAHE(clipLimit=float(settings.clahe_clip_limit), tileGridSize=(grid, grid))
    return clahe.apply(gray)


def resize_filter(shape: tuple[int, int], settings: PreprocessConfig) -> str:
    """The interpolation name used to resize an image of ``shape`` to the target square.

    ``auto``: ``linear`` while neither axis shrinks by 2x or more, ``area`` beyond, where bilinear
    would skip source pixels and a 1-2 px line could vanish between samples.
    """
    if settings.interpolation != "auto":
        return settings.interpolation
    return "area" if max(shape[0], shape[1]) >= 2 * int(settings.image_size) else "linear"


def preprocess_array(gray_uint8: np.ndarray, settings: PreprocessConfig) -> np.ndarray:
    """CLAHE then square resize of a 2-D uint8 image: ``(image_size, image_size)`` uint8 (no encoding)."""
    gray = np.asarray(gray_uint8)
    if gray.ndim == 3 and gray.shape[2] == 1:
        gray = gray[:, :, 0]
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"preprocess_array expects a 2-D uint8 array, got shape {gray.shape} dtype {gray.dtype}")
    if settings.interpolation not in config.INTERPOLATIONS:
        raise ValueError(f"interpolation {settings.interpolation!r} unknown; use one of {', '.join(config.INTERPOLATIONS)}")
    image = apply_clahe(np.ascontiguousarray(gray), settings)
    size = int(settings.image_size)
    if image.shape != (size, size):
        image = cv2.resize(image, (size, size), interpolation=CV2_FILTERS[resize_filter(image.shape, settings)])
    return image


def encode_jpeg(array: np.ndarray, quality: int) -> bytes:
    """Single-channel baseline JPEG of a 2-D uint8 array (deterministic bytes for the same input)."""
    ok, buffer = cv2.imencode(".jpg", np.asarray(array, dtype=np.uint8), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("OpenCV failed to encode a JPEG")
    return buffer.tobytes()


def preprocess_bytes(data: bytes, settings: PreprocessConfig, name: str = "image") -> tuple[bytes, dict]:
    """Source image bytes -> (stored JPEG bytes, info).

    ``info``: ``orig_height``, ``orig_width``, ``height``, ``width`` (stored size), ``upscaled`` (bool),
    ``decode_scale``, ``format`` and, when something is worth recording in the manifest, ``note``.
    Raises :class:`BadImageError` for undecodable input.
    """
    gray, info = decode_source(data, settings, name)
    return _store(gray, info, settings)


def _store(gray: np.ndarray, info: dict, settings: PreprocessConfig) -> tuple[bytes, dict]:
    size = int(settings.image_size)
    info["upscaled"] = min(info["orig_height"], info["orig_width"]) < size
    notes = []
    if info["upscaled"]:
        notes.append(f"upscaled from {info['orig_width']}x{info['orig_height']} to {size}x{size}")
    if info["format"] != "jpeg":
        notes.append(f"source is {info['format'].upper()} data, not JPEG")
    if notes:
        info["note"] = "; ".join(notes)
    stored = encode_jpeg(preprocess_array(gray, settings), settings.jpeg_quality)
    info["height"] = info["width"] = size
    return stored, info


def preprocess_file(path: str, settings: PreprocessConfig) -> tuple[bytes, dict]:
    """:func:`preprocess_bytes` on a local file; a missing or unreadable file is a :class:`BadImageError`."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found") from None
    except OSError as exc:
        raise BadImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return preprocess_bytes(data, settings, name=os.fspath(path))


DICOM_SUFFIXES = (".dcm", ".dicom")


def preprocess_dicom_file(path: str, settings: PreprocessConfig) -> tuple[bytes, dict]:
    """:func:`preprocess_bytes` for a DICOM radiograph (``prep.dicom.read_radiograph``, then the same
    8-bit scaling as a 16-bit PNG); a damaged file is a :class:`BadImageError`."""
    from ranzcr_tf.prep.dicom import DicomError, read_radiograph

    try:
        gray = _to_gray_uint8(read_radiograph(path))
    except DicomError as exc:
        raise BadImageError(str(exc)) from None
    return _store(gray, {"decode_scale": 1.0, "format": "dicom", "orig_height": int(gray.shape[0]),
                         "orig_width": int(gray.shape[1])}, settings)
