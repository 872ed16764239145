"""DICOM slices to Hounsfield units, windows as channels, and the neighbours of a slice in its series.

Self-contained (pydicom, NumPy, pandas; OpenCV when importable): install the ``dicom`` extra,
``pip install 'ranzcr-tf[dicom]'`` (pydicom plus pylibjpeg / python-gdcm, the plugins that decode
compressed transfer syntaxes; uncompressed and RLE files need only pydicom).

How a file becomes HU (:func:`read_hu`), in this order:

1. **Decode** the stored pixels (``ds.pixel_array``) as integers. A file pydicom cannot parse, a
   truncated one, one without a Pixel Data element, one whose compressed pixels no installed plugin
   decodes, and one whose pixels are not a single 2-D frame raise :class:`DicomError`, whose text is
   one line: ``<path>: <what is wrong>``.
2. **MONOCHROME1** (0 = white) as the DICOM standard reads it: a file with a modality rescale
   (``RescaleSlope`` / ``RescaleIntercept``, every CT) holds physical values, and ``HU = stored * slope +
   intercept`` whatever the photometric interpretation, which only says how to *display* them (the windows
   decide brightness here); so a MONOCHROME1 CT reads exactly as the same file marked MONOCHROME2. Only a
   file without a rescale (raw detector values, e.g. a radiograph) is inverted onto MONOCHROME2's sense,
   ``stored = lo + hi - stored`` with ``[lo, hi]`` the stored range (``[0, 2**BitsStored - 1]`` unsigned,
   ``[-2**(BitsStored-1), 2**(BitsStored-1) - 1]`` signed), so that denser is brighter in every window.
3. **The RSNA ICH 12-bit intercept quirk.** Some competition files say ``BitsStored == 12``,
   ``PixelRepresentation == 0`` and a ``RescaleIntercept`` near 0, while their pixels hold HU wrapped
   modulo 4096 (air, -1000 HU, stored as 3096). The competition's widely used fix, followed here as in
   Jeremy Howard's Kaggle notebook "cleaning the data for rapid prototyping (fastai)" (``fix_pxrepr``)
   and the ``correct_dcm`` / ``window_image`` functions of the public Keras baselines (e.g. akensert's
   "InceptionV3 (prev. ResNet50) Keras baseline"): when ``BitsStored == 12 and PixelRepresentation == 0
   and int(RescaleIntercept) > -100``, ``stored = stored + 1000; stored[stored >= 4096] -= 4096`` on
   integers, and the intercept becomes -1000. It recovers HU in [-1000, 3095].
4. **Rescale**: ``HU = stored * RescaleSlope + RescaleIntercept`` in float32 (slope 1 and intercept 0 when
   absent).

:func:`apply_windows` maps HU to ``[0, 1]`` per window ``(center, width)``: linear from
``center - width / 2`` (0) to ``center + width / 2`` (1), clipped outside. :data:`WINDOWS` names the three
windows the strong RSNA ICH solutions stacked as channels.

**Ordering slices.** A slice's position ``z`` is ``ImagePositionPatient[2]`` (the axial position, which the
RSNA solutions sorted by); without it ``SliceLocation``; without that ``InstanceNumber``; without any of
them NaN (such a slice sorts last in its series). :func:`scan_folder` reads the headers of a folder (not
the pixels), ranks slices by ``z`` within their ``SeriesInstanceUID`` (ties by file name; a slice without
a series UID is a series of its own) and names each slice's previous and next neighbour; the ends name
themselves. :func:`neighbour_ids` walks that chain, so at a series end the edge slice repeats.
:func:`slice_channels` stacks the windows of several slices as channels (slice-major).
"""

from __future__ import annotations

import math
import os
import struct
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

WINDOWS: dict[str, tuple[float, float]] = {"brain": (40.0, 80.0), "subdural": (80.0, 200.0), "bone": (600.0, 2800.0)}

SCAN_COLUMNS = ("id", "path", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "z", "position", "prev_id",
                "next_id")
INSTALL_HINT = "install the DICOM extra (pip install 'ranzcr-tf[dicom]': pydicom, pylibjpeg, python-gdcm)"


class DicomError(ValueError):
    """A DICOM file that cannot give HU; ``str()`` is one line naming the file and what is wrong."""

    def __init__(self, path: str, what: str):
        self.path = str(path)
        self.reason = " ".join(str(what).split())  # one line, whatever the library said
        super().__init__(f"{self.path}: {self.reason}")


@dataclass(frozen=True)
class SliceMeta:
    """Identity and position of one slice. ``z``: ImagePositionPatient[2], else SliceLocation, else
    InstanceNumber, else NaN. Missing UIDs are empty strings."""

    sop_uid: str
    patient_id: str
    study_uid: str
    series_uid: str
    z: float


def _pydicom():
    try:
        import pydicom
    except ImportError as err:  # pragma: no cover - the extra is installed wherever the tests run
        raise ImportError(f"reading DICOM needs pydicom: {INSTALL_HINT}") from err
    return pydicom


def _text(ds, keyword: str) -> str:
    """An element's text without pydicom's value validation: the RSNA files carry UIDs like
    ``ID_12cadc6af`` that are not valid UIDs, and validating them warns once per file read."""
    elem = ds.get_item(keyword)
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip("\x00 ")


def _number(ds, keyword: str, default: float) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    if not isinstance(value, (int, float)) and hasattr(value, "__len__") and not isinstance(value, str):
        value = value[0]  # a multi-valued entry (seen in WindowCenter-like fields): take the first
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _z(ds) -> float:
    position = ds.get("ImagePositionPatient")
    try:
        if position is not None and len(position) >= 3:
            return float(position[2])
    except (TypeError, ValueError):
        pass
    for keyword in ("SliceLocation", "InstanceNumber"):
        value = _number(ds, keyword, math.nan)
        if not math.isnan(value):
            return value
    return math.nan


def _meta(ds) -> SliceMeta:
    return SliceMeta(sop_uid=_text(ds, "SOPInstanceUID"), patient_id=_text(ds, "PatientID"),
                     study_uid=_text(ds, "StudyInstanceUID"), series_uid=_text(ds, "SeriesInstanceUID"), z=_z(ds))


def _read(path: str, **kwargs):
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, **kwargs)
    except FileNotFoundError:
        raise DicomError(path, "no such file") from None
    except Exception as err:  # pydicom raises many types on damaged files; all mean "not readable"
        raise DicomError(path, f"not a readable DICOM file ({type(err).__name__}: {err})") from None


def stored_to_hu(stored: np.ndarray, ds) -> np.ndarray:
    """Steps 2-4 of the module docstring on decoded stored values: MONOCHROME1, the 12-bit quirk, rescale."""
    pixels = stored.astype(np.int32)
    bits_stored = int(_number(ds, "BitsStored", 16))
    signed = int(_number(ds, "PixelRepresentation", 0)) == 1
    rescaled = "RescaleSlope" in ds or "RescaleIntercept" in ds
    if _text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1" and not rescaled:
        lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
        pixels = lo + hi - pixels
    slope = _number(ds, "RescaleSlope", 1.0)
    intercept = _number(ds, "RescaleIntercept", 0.0)
    if bits_stored == 12 and not signed and int(intercept) > -100:
        # The RSNA ICH fix (module docstring, step 3), as in fix_pxrepr / correct_dcm.
        pixels = pixels + 1000
        pixels[pixels >= 4096] -= 4096
        intercept = -1000.0
    return (pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def read_radiograph(path: str) -> np.ndarray:
    """A DICOM radiograph (CR/DX, e.g. VinBigData's) as it is displayed, float32 2-D: pixel data -> the
    modality LUT (rescale) -> the file's VOI LUT or first window (pydicom's ``apply_voi_lut``, as the
    VinBigData kernels read them) -> MONOCHROME1 flipped so that bone is bright, as in the competition JPEGs.
    The converter then scales it to 8 bits like any 16-bit PNG. A damaged file is a :class:`DicomError`."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _read(path)
    try:
        pixels = ds.pixel_array
    except Exception as err:  # a missing decoder plugin or damaged pixel data
        raise DicomError(path, f"pixel data cannot be decoded ({type(err).__name__}: {err})") from None
    if pixels.ndim != 2:
        raise DicomError(path, f"pixel data of shape {pixels.shape}: expected one grayscale frame")
    image = np.asarray(apply_voi_lut(apply_modality_lut(pixels, ds), ds), dtype=np.float32)
    if _text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":
        image = image.max() + image.min() - image
    return image


def read_hu(path: str) -> tuple[np.ndarray, SliceMeta]:
    """One DICOM slice as float32 HU ``(H, W)`` and its :class:`SliceMeta` (module docstring for the steps).

    Raises :class:`DicomError` (one line naming the file) for an unreadable, truncated or pixel-less
    file, undecodable compressed pixels (saying which extra to install) and anything but one 2-D frame.
    """
    path = str(path)
    ds = _read(path)
    if "PixelData" not in ds:
        raise DicomError(path, "no pixel data (the file has no Pixel Data element)")
    try:
        stored = ds.pixel_array
    except Exception as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = ""
        if syntax is not None and getattr(syntax, "is_compressed", False):
            hint = f" (transfer syntax {syntax.name}; if a plugin is missing, {INSTALL_HINT})"
        raise DicomError(path, f"pixel data cannot be decoded ({type(err).__name__}: {err}){hint}") from None
    if stored.ndim != 2:
        raise DicomError(path, f"pixel array has shape {tuple(stored.shape)}; expected one 2-D greyscale frame "
                               "(multi-frame and colour images are not CT slices)")
    return stored_to_hu(stored, ds), _meta(ds)


def parse_windows(spec: Sequence[str | Sequence[float]]) -> list[tuple[float, float]]:
    """Window names from :data:`WINDOWS` or ``[center, width]`` pairs (HU) -> ``[(center, width), ...]``."""
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or len(spec) == 0:
        raise ValueError(f"windows={spec!r}: give a non-empty list of window names ({', '.join(WINDOWS)}) "
                         "or [center, width] pairs in HU")
    windows = []
    for i, entry in enumerate(spec):
        if isinstance(entry, str):
            if entry.lower() not in WINDOWS:
                raise ValueError(f"windows[{i}]={entry!r}: unknown window name; use one of {', '.join(WINDOWS)} "
                                 "or a [center, width] pair in HU")
            windows.append(WINDOWS[entry.lower()])
            continue
        try:
            center, width = (float(v) for v in entry)
        except (TypeError, ValueError):
            raise ValueError(f"windows[{i}]={entry!r}: expected a window name ({', '.join(WINDOWS)}) "
                             "or a [center, width] pair of numbers in HU") from None
        if not (math.isfinite(center) and math.isfinite(width) and width > 0):
            raise ValueError(f"windows[{i}]={entry!r}: center must be finite and width a positive number of HU")
        windows.append((center, width))
    return windows


def apply_windows(hu: np.ndarray, windows: Sequence[tuple[float, float]]) -> np.ndarray:
    """HU ``(H, W)`` -> float32 ``(H, W, len(windows))`` in [0, 1]: 0 at ``center - width/2``, 1 at
    ``center + width/2``, linear between, clipped outside."""
    hu = np.asarray(hu, dtype=np.float32)
    channels = []
    for center, width in windows:
        low = np.float32(center - width / 2.0)
        channels.append(np.clip((hu - low) / np.float32(width), 0.0, 1.0))
    return np.stack(channels, axis=-1).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# Scanning a folder: headers only, neighbours by z within a series.

def _pixel_data_problem(path: str, ds, pixel_tell: int) -> str | None:
    """Why a header-only read shows the pixels are unusable (missing or cut short), or None.

    ``pixel_tell`` is where pydicom stopped reading, i.e. the Pixel Data element's tag when there is
    one; its length field tells how many bytes must follow (undefined for encapsulated pixels, then
    only their presence is checked).
    """
    size = os.path.getsize(path)
    if pixel_tell >= size:
        return "no pixel data (the file has no Pixel Data element)"
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    implicit = bool(getattr(syntax, "is_implicit_VR", False))
    with open(path, "rb") as fh:
        fh.seek(pixel_tell)
        header = fh.read(8 if implicit else 12)
    if len(header) < (8 if implicit else 12):
        return "truncated in the Pixel Data element's header"
    group, element = struct.unpack("<HH", header[:4])
    if (group, element) != (0x7FE0, 0x0010):
        return None  # a float pixel element or something unusual: leave it to read_hu
    length = struct.unpack("<I", header[4:8] if implicit else header[8:12])[0]
    if length == 0xFFFFFFFF:
        return None
    if pixel_tell + len(header) + length > size:
        return f"truncated: Pixel Data says {length} bytes, the file holds {size - pixel_tell - len(header)}"
    return None


def _scan_one(path: str) -> tuple[str, object]:
    pydicom = _pydicom()
    try:
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            pixel_tell = fh.tell()
        problem = _pixel_data_problem(path, ds, pixel_tell)
        if problem:
            return "bad", problem
        if _number(ds, "Rows", 0) <= 0 or _number(ds, "Columns", 0) <= 0:
            return "bad", "no Rows/Columns in the header"
        return "ok", _meta(ds)
    except Exception as err:
        return "bad", DicomError(path, f"not a readable DICOM file ({type(err).__name__}: {err})").reason


def scan_folder(folder: str, ext: str = ".dcm", workers: int = 0) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Headers of every ``*ext`` file in ``folder`` (not recursive) -> (table, skipped).

    The table has one row per readable file, columns :data:`SCAN_COLUMNS`: ``id`` (file name without
    ``ext``), ``path``, ``PatientID``, ``StudyInstanceUID``, ``SeriesInstanceUID``, ``z``, ``position``
    (0-based rank of ``z`` in its series), ``prev_id`` / ``next_id`` (the neighbours by ``z``; the slice
    itself at the ends). Rows are sorted by series, then position. ``skipped`` lists
    ``(path, one-line reason)`` for unreadable files, files without pixel data and files whose pixel data
    is cut short (checked from the header and the file size, without decoding; a compressed stream that
    is damaged inside is found later by :func:`read_hu`). ``workers`` > 1 reads headers on that many
    threads; 0 or 1 reads them here. A missing folder raises ``ValueError``.
    """
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a folder of DICOM files")
    names = sorted(n for n in os.listdir(folder) if n.endswith(ext) and not n.startswith("."))
    paths = [os.path.join(folder, n) for n in names]
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="dicom-scan") as pool:
            results = list(pool.map(_scan_one, paths))
    else:
        results = [_scan_one(p) for p in paths]
    rows, skipped = [], []
    for name, path, (status, value) in zip(names, paths, results):
        if status == "bad":
            skipped.append((path, value))
            continue
        rows.append({"id": name[: len(name) - len(ext)] if ext else name, "path": path, "PatientID": value.patient_id,
                     "StudyInstanceUID": value.study_uid, "SeriesInstanceUID": value.series_uid, "z": value.z})
    table = pd.DataFrame(rows, columns=["id", "path", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "z"])
    return _link_neighbours(table), skipped


def _link_neighbours(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    table["z"] = table["z"].astype(float)
    # A slice without a series UID cannot be placed among others: it is a series of its own.
    series_key = table["SeriesInstanceUID"].where(table["SeriesInstanceUID"] != "", "\x00" + table["id"])
    table["_series"] = series_key
    table = table.sort_values(["_series", "z", "id"], na_position="last", kind="mergesort").reset_index(drop=True)
    table["position"] = table.groupby("_series", sort=False).cumcount().astype(int)
    grouped = table.groupby("_series", sort=False)["id"]
    table["prev_id"] = grouped.shift(1).fillna(table["id"])
    table["next_id"] = grouped.shift(-1).fillna(table["id"])
    return table.drop(columns="_series")[list(SCAN_COLUMNS)]


# neighbour_ids is called once per slice by a converter: the id -> (prev, next) lookup is built once per table
# object (kept while that object lives) rather than searched for every call.
_LOOKUPS: dict[int, tuple[weakref.ref, dict[str, tuple[str, str]]]] = {}


def _chain(table: pd.DataFrame) -> dict[str, tuple[str, str]]:
    key = id(table)
    hit = _LOOKUPS.get(key)
    if hit is not None and hit[0]() is table and len(hit[1]) == len(table):
        return hit[1]
    lookup = dict(zip(table["id"], zip(table["prev_id"], table["next_id"])))
    _LOOKUPS[key] = (weakref.ref(table), lookup)
    weakref.finalize(table, _LOOKUPS.pop, key, None)
    return lookup


def neighbour_ids(table: pd.DataFrame, slice_id: str, context: int) -> list[str]:
    """``2 * context + 1`` ids ordered by z with ``slice_id`` in the middle; at a series end the edge repeats.

    ``table`` is :func:`scan_folder`'s (treated as read-only: its lookup is built once per table object).
    """
    if context < 0:
        raise ValueError(f"context={context}: use 0 (the slice alone) or a positive number of neighbours per side")
    chain = _chain(table)
    if slice_id not in chain:
        raise ValueError(f"{slice_id}: not in the scanned table (skipped as unreadable, or from another folder)")
    before, after = [], []
    current = slice_id
    for _ in range(context):
        current = chain[current][0]
        before.append(current)
    current = slice_id
    for _ in range(context):
        current = chain[current][1]
        after.append(current)
    return before[::-1] + [slice_id] + after


def resize_nearest(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize in NumPy (the fallback without OpenCV): output pixel ``(i, j)`` takes input
    ``(i * H_in // H_out, j * W_in // W_out)``."""
    rows = np.arange(shape[0]) * image.shape[0] // shape[0]
    cols = np.arange(shape[1]) * image.shape[1] // shape[1]
    return image[rows[:, None], cols[None, :]]


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if image.shape == shape:
        return image
    try:
        import cv2
    except ImportError:
        return resize_nearest(image, shape)
    return cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def slice_channels(paths_by_id: Mapping[str, str], ids: Sequence[str], windows) -> np.ndarray:
    """Windows of several slices stacked: float32 ``(H, W, len(ids) * len(windows))`` in [0, 1].

    Channel order is slice-major: every window of ``ids[0]``, then of ``ids[1]``, ... The centre slice
    ``ids[len(ids) // 2]`` sets ``(H, W)``; a neighbour of another shape is resized to it (OpenCV bilinear,
    or nearest-neighbour in NumPy without OpenCV). ``windows``: anything :func:`parse_windows` accepts.
    Each distinct id is read once. Raises :class:`DicomError` for an unreadable slice.
    """
    if len(ids) == 0:
        raise ValueError("ids is empty: give at least the slice itself")
    windows = parse_windows(windows)
    missing = [i for i in ids if i not in paths_by_id]
    if missing:
        raise ValueError(f"no path for slice id {missing[0]!r} ({len(missing)} ids missing from paths_by_id)")
    hu = {}
    for slice_id in dict.fromkeys(ids):
        hu[slice_id] = read_hu(paths_by_id[slice_id])[0]
    shape = hu[ids[len(ids) // 2]].shape
    return np.concatenate([apply_windows(_resize(hu[i], shape), windows) for i in ids], axis=-1)
