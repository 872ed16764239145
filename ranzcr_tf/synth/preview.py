"""Contact sheet of a synthetic dataset, optionally with the same studies drawn in the other styles.

    python -m ranzcr_tf.synth.generate ... --preview sheet.png --preview-styles easy,hard --overlay

The dataset's own style is read from its files (annotation lines from ``train_annotations.csv``,
so only annotated studies show them); other styles are rendered in memory from the same
``train.csv`` label rows (every labelled line is overlaid there), one block of ``rows x cols``
films per style, so the styles can be compared study by study.
"""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pandas as pd

from ranzcr_tf.labels import GROUPS, ID_COLUMN, LABELS, group_of
from ranzcr_tf.synth.studies import render_study

_SHORT = {"Abnormal": "A", "Borderline": "B", "Normal": "N", "Incompletely Imaged": "I"}
_COLOURS = {"ETT": "tab:red", "NGT": "tab:green", "CVC": "tab:cyan", "Swan Ganz": "tab:orange"}


def short_title(row) -> str:
    """``'ETT N | NGT I | CVC B,N | SG'`` for one train.csv row; ``'no tubes'`` when all zero."""
    parts = []
    for group, members in GROUPS.items():
        on = [m for m in members if int(row[m])]
        if on and group == "Swan Ganz":
            parts.append("SG")
        elif on:
            parts.append(f"{group} " + ",".join(_SHORT[m.split(' - ', 1)[1]] for m in on))
    return " | ".join(parts) or "no tubes"


def _from_disk(data_dir: str, rows: pd.DataFrame, overlay: bool):
    ann = pd.read_csv(os.path.join(data_dir, "train_annotations.csv")) if overlay else None
    for _, row in rows.iterrows():
        image = cv2.imread(os.path.join(data_dir, "train", f"{row[ID_COLUMN]}.jpg"), cv2.IMREAD_GRAYSCALE)
        lines = [] if ann is None else [(a["label"], np.array(json.loads(a["data"])))
                                        for _, a in ann[ann[ID_COLUMN] == row[ID_COLUMN]].iterrows()]
        yield row, image, lines


def _rendered(rows: pd.DataFrame, style: str, seed: int, scale: float):
    for index, (_, row) in enumerate(rows.iterrows()):
        labels = tuple(int(row[k]) for k in LABELS)
        cvc_states = tuple(s for s in range(3) if labels[7 + s])
        data, drawn, _ = render_study(seed, "train", index, index, labels, cvc_states, scale, style)
        yield row, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE), drawn


def make_preview(data_dir: str, path: str, rows: int = 4, cols: int = 4, overlay: bool = False,
                 styles=None, data_style: str = "easy", seed: int = 0, scale: float = 1.0) -> str:
    """A PNG contact sheet of the first ``rows x cols`` train studies of ``data_dir`` per style in
    ``styles`` (default: ``data_style``, the style ``data_dir`` was written in), titled with their
    positive labels; ``overlay`` draws the tube lines in their family's colour. A dataset of fewer studies
    gets a smaller grid, so the styles' blocks follow each other without empty rows between them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = list(styles or [data_style])
    train = pd.read_csv(os.path.join(data_dir, "train.csv")).head(rows * cols)
    cols = max(1, min(cols, len(train)))
    rows = max(1, -(-len(train) // cols))  # only the rows the studies fill
    fig, axes = plt.subplots(rows * len(styles), cols, figsize=(3.2 * cols, 3.6 * rows * len(styles)), squeeze=False)
    for block, style in enumerate(styles):
        cells = np.ravel(axes[block * rows:(block + 1) * rows])
        films = _from_disk(data_dir, train, overlay) if style == data_style else _rendered(train, style, seed, scale)
        for ax, (row, image, lines) in zip(cells, films):
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            for label, pts in (lines if overlay else []):
                ax.plot(pts[:, 0], pts[:, 1], "-", lw=1, color=_COLOURS[group_of(label)], alpha=0.8)
            ax.set_xlim(-0.5, image.shape[1] - 0.5)  # drawn lines may run off the film: keep the film's frame
            ax.set_ylim(image.shape[0] - 0.5, -0.5)
            ax.set_title(f"[{style}] {short_title(row)}", fontsize=8)
            ax.set_xlabel(f"{image.shape[1]}x{image.shape[0]}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in cells[len(train):]:
            ax.axis("off")
    fig.suptitle("synthetic RANZCR studies (A abnormal, B borderline, N normal, I incompletely imaged, SG Swan-Ganz)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
