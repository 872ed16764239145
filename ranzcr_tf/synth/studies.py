"""One synthetic study drawn from its labels: the easy phantom or the hard style, as JPEG bytes.

    data, drawn, (width, height) = render_study(seed, "train", index, patient, labels, cvc_states, 0.2, "hard")

Shared by the dataset writer (:mod:`ranzcr_tf.synth.generate`, in its worker processes) and the contact
sheet (:mod:`ranzcr_tf.synth.preview`, which draws the same label rows in other styles). Every random
choice comes from ``(seed, split, index)`` (body shape from ``(seed, split, patient)``); the label rules
are in the ``generate`` docstring.
"""

from __future__ import annotations

import cv2
import numpy as np

from ranzcr_tf.labels import GROUPS, LABELS
from ranzcr_tf.synth import hard, phantom

JPEG_QUALITY = 90
SPLITS = {"train": 0, "test": 1}
# Tube states in label order, e.g. _NGT[2] == "Incompletely Imaged" is column 3 + 2.
_ETT, _NGT, _CVC = (tuple(x.split(" - ", 1)[1] for x in GROUPS[g]) for g in ("ETT", "NGT", "CVC"))


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """The random stream of ``(seed, *keys)``: the same keys give the same draws in any process."""
    return np.random.default_rng([seed, *keys])


def render_study(seed: int, split: str, index: int, patient: int, labels, cvc_states, scale: float = 1.0,
                 style: str = "easy"):
    """``(jpeg_bytes, [(label, line_px), ...], (width, height))`` for one study. The labels decide
    the drawing; every random choice comes from ``(seed, split, index)`` (body shape from
    ``(seed, split, patient)``)."""
    if style == "hard":
        image, geometry = hard_study(seed, split, index, patient, labels, cvc_states, scale)
        return _encode(image, split, index), geometry.lines, (geometry.width, geometry.height)
    code = SPLITS[split]
    rng, patient_rng = seeded_rng(seed, code, index, 1), seeded_rng(seed, code, patient, 2)
    width, height = phantom.image_size(rng, scale)
    anatomy = phantom.sample_anatomy(patient_rng, rng)
    x0, _, frame_w, _ = phantom.body_frame(width, height)
    s_left, long_side = -x0 / frame_w, max(width, height)
    thin = max(2, round(0.002 * long_side))
    tubes = []  # (label, control points in frame units, thickness in px)
    for k, state in enumerate(_ETT):
        if labels[k]:
            tubes.append((LABELS[k], phantom.ett_path(rng, anatomy, state), max(2, round(0.003 * long_side))))
    for k, state in enumerate(_NGT):
        if labels[3 + k]:
            tubes.append((LABELS[3 + k], phantom.ngt_path(rng, anatomy, state), thin))
    for state in cvc_states:
        tubes.append((LABELS[7 + state], phantom.cvc_path(rng, anatomy, _CVC[state], s_left), thin))
    if labels[10]:
        tubes.append((LABELS[10], phantom.swan_path(rng, anatomy, s_left), max(3, round(0.004 * long_side))))
    lumens = [(points, 0.012) for label, points, _ in tubes if label.startswith("ETT")]  # the tube's body
    image = phantom.add_noise(phantom.render_anatomy(rng, anatomy, width, height, lumens), rng)
    drawn = []
    for label, points, thickness in tubes:
        line = phantom.tube_pixels(points, width, height)
        phantom.draw_tube(image, line, thickness, int(rng.integers(phantom.TUBE_MIN, 256)))
        drawn.append((label, line))
    return _encode(image, split, index), drawn, (width, height)


def hard_study(seed: int, split: str, index: int, patient: int, labels, cvc_states, scale: float = 1.0,
               draw_labelled: bool = True) -> tuple[np.ndarray, hard.Geometry]:
    """The hard style's ``(uint8 image, Geometry)`` of one study (what :func:`render_study` encodes);
    ``draw_labelled=False`` gives the same film without its labelled lines (for tests)."""
    tubes = [(LABELS[k], state) for k, state in enumerate(_ETT) if labels[k]]
    tubes += [(LABELS[3 + k], state) for k, state in enumerate(_NGT) if labels[3 + k]]
    tubes += [(LABELS[7 + state], _CVC[state]) for state in cvc_states]
    tubes += [(LABELS[10], "Present")] if labels[10] else []
    code = SPLITS[split]
    return hard.render(seeded_rng(seed, code, index, 11), seeded_rng(seed, code, patient, 12), tubes, scale,
                       draw_labelled)


def _encode(image: np.ndarray, split: str, index: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {split} study {index}")
    return buf.tobytes()
