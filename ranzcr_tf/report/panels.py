"""Images of studies for the run report: Grad-CAM panels beside the annotation lines, and thumbnails.

    png = gradcam_figure("ETT - Normal", rows)    # rows: [(title, Study, heatmap, on_tube or None)]
    png = thumbnail(study)                        # 96 px PNG, annotation lines drawn
"""

from __future__ import annotations

import cv2
import numpy as np

from ranzcr_tf.labels import FAMILIES, LABELS, group_of
from ranzcr_tf.report.curves import _plt, figure_png

FAMILY_COLOURS = {"ETT": "#e6194b", "NGT": "#3cb44b", "CVC": "#4363d8", "Swan Ganz": "#f58231"}


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def draw_lines(ax, study) -> None:
    """The study's annotation lines on a matplotlib axis, coloured by tube family."""
    for label_index, points in study.lines:
        if len(points):
            family = group_of(LABELS[label_index])
            ax.plot(points[:, 0], points[:, 1], color=FAMILY_COLOURS[family], linewidth=1.2, label=LABELS[label_index])


def gradcam_figure(column: str, rows: list, method: str = "Grad-CAM") -> bytes:
    """One row per study: the stored image with its annotation lines, and the heat map (``method``) over it
    with the peak marked; ``rows`` are ``(title, study, heatmap, on_tube)`` where ``on_tube`` says
    whether the peak lies on an annotated line of the column's family (``None``: no such line)."""
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 2, figsize=(6.4, 3.3 * len(rows)), squeeze=False)
    for (title, study, heatmap, on_tube), (left, right) in zip(rows, axes):
        left.imshow(study.image, cmap="gray", vmin=0, vmax=255)
        draw_lines(left, study)
        left.set_title(f"{title}\nannotation lines" + ("" if study.lines else ": none"), fontsize=7)
        right.imshow(study.image, cmap="gray", vmin=0, vmax=255)
        right.imshow(heatmap, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        if heatmap.max() > 0:
            peak_row, peak_column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            right.plot([peak_column], [peak_row], marker="x", color="white", markersize=9, markeredgewidth=2)
            where = "" if on_tube is None else ("; peak on the tube" if on_tube else "; peak off the tube")
        else:  # every position lowers the score: the heat map has nothing to show
            where = ": empty (no position raises this column)"
        right.set_title(f"{method}{where}", fontsize=8)
        for ax in (left, right):
            ax.set_axis_off()
    fig.suptitle(column, fontsize=10)
    fig.tight_layout()
    return figure_png(fig, dpi=72)


def thumbnail(study, size: int = 96) -> bytes:
    """A small PNG of the stored image with its annotation lines."""
    image = cv2.cvtColor(study.image, cv2.COLOR_GRAY2BGR)
    scale = size / max(image.shape[:2])
    image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA)
    for label_index, points in study.lines:
        red, green, blue = _rgb(FAMILY_COLOURS[group_of(LABELS[label_index])])
        scaled = np.round((points + 0.5) * scale - 0.5).astype(np.int32)
        cv2.polylines(image, [scaled], False, (blue, green, red), 1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("OpenCV could not encode a thumbnail")
    return png.tobytes()


def family_index(column: str) -> int:
    """Index into ``labels.FAMILIES`` of a label's tube family."""
    return FAMILIES.index(group_of(column))
