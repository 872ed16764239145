"""Annotation coordinates checked against their images before any image is converted.

``train_annotations.csv`` holds points in the pixels of the original Kaggle images. With a resized copy of
the images (a common way to save disk) the points land outside the stored image and every line mask
(``aux_seg``, teacher, student) is empty or wrong, silently. So, per study, the points are compared with
the image's real size, read from its JPEG header (a few kilobytes per image, no decode):

- more than ``OUTSIDE_SHARE`` of a study's points outside its image, or any point farther than one image
  size outside it (``x < -w`` or ``x > 2w``): the converter stops with one line naming the study and the
  likely cause (annotations for another resolution);
- fewer (a stray point just past the edge): clipped to the image and counted in the manifest
  (``annotations.points_clipped``).

``--annotations-scale FACTOR`` multiplies every point first (0.25 for images resized to a quarter);
``auto`` picks the factor nearest 1 among ``AUTO_FACTORS`` under which at most ``OUTSIDE_SHARE`` of all
points fall outside.
"""

from __future__ import annotations

import math

import numpy as np

from ranzcr_tf.prep.preprocess import jpeg_file_size

OUTSIDE_SHARE = 0.05
AUTO_FACTORS = (1.0, 0.5, 2.0, 1 / 3, 3.0, 0.25, 4.0, 0.2, 5.0, 1 / 6, 0.125, 8.0)  # nearest 1 first


def parse_scale(value) -> str | float:
    """``auto`` or a positive finite factor; a ``ValueError`` naming the flag otherwise."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        factor = float(value)
    except (TypeError, ValueError):
        factor = math.nan
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"--annotations-scale {value!r}: pass auto or a positive factor such as 0.25")
    return factor


def _outside(points: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    width, height = size
    x, y = points[:, 0], points[:, 1]
    outside = (x < 0) | (x > width - 1) | (y < 0) | (y > height - 1)
    far = (x < -width) | (x > 2 * width) | (y < -height) | (y > 2 * height) | ~np.isfinite(points).all(axis=1)
    return outside, far


def _auto_factor(annotations: dict, sizes: dict) -> float:
    for factor in AUTO_FACTORS:
        outside = total = 0
        for sid, lines in annotations.items():
            if sid in sizes:
                for _, points in lines:
                    outside += int(_outside(np.asarray(points, np.float64) * factor, sizes[sid])[0].sum())
                    total += len(points)
        if total == 0 or outside <= OUTSIDE_SHARE * total:
            return factor
    raise ValueError("train_annotations.csv: no scale among "
                     f"{', '.join(f'{f:g}' for f in AUTO_FACTORS)} puts the points inside their images: the "
                     "annotations do not belong to these images")


def check_annotations(annotations: dict, image_path, scale="1", path: str = "train_annotations.csv") -> tuple[dict, dict]:
    """Scale, check and clip ``{study: [(label, points), ...]}`` against each study's JPEG (``image_path(study)``).

    Returns the checked annotations and the manifest's summary (scale, points clipped, studies checked);
    raises one ``ValueError`` line for a study whose points do not fit its image.
    """
    scale = parse_scale(scale)
    sizes = {sid: (size[1], size[0]) for sid in annotations  # (width, height), as the points are (x, y)
             if (size := jpeg_file_size(image_path(sid))) is not None}
    factor = _auto_factor(annotations, sizes) if scale == "auto" else scale
    checked, clipped = {}, 0
    for sid, lines in annotations.items():
        scaled = [(label, np.asarray(points, np.float64) * factor) for label, points in lines]
        if sid not in sizes:
            checked[sid] = scaled
            continue
        size = sizes[sid]
        flags = [_outside(points, size) for _, points in scaled]
        outside = sum(int(o.sum()) for o, _ in flags)
        total = sum(len(points) for _, points in scaled)
        far = [points[f][0] for (_, points), (_, f) in zip(scaled, flags) if f.any()]
        if far or outside > OUTSIDE_SHARE * total:
            detail = (f"a point at ({far[0][0]:g}, {far[0][1]:g})" if far else f"{outside} of its {total} points")
            raise ValueError(
                f"{path}: study {sid}: {detail} lies outside its {size[0]}x{size[1]} image "
                f"({image_path(sid)}) after scaling by {factor:g}: the annotations are probably for another "
                "resolution (a resized copy of the images?): pass --annotations-scale auto (or the factor, e.g. "
                "0.25), or fix the study's rows")
        clipped += outside
        checked[sid] = [(label, np.clip(points, 0, [size[0] - 1, size[1] - 1]).astype(np.float32))
                        for label, points in scaled]
    summary = {"scale": factor, "points_clipped": clipped, "studies_checked": len(sizes),
               "studies_without_readable_image": len(annotations) - len(sizes)}
    return checked, summary
