"""What the hard phantom style draws over the anatomy: an opacity canvas and the unlabelled distractors.

Lines are not painted at a grey level: each adds *opacity* (0-1) to a float map, and
:meth:`Opacity.compose` brightens the film by ``opacity * (255 - 0.65 * background)``. So two lines
that cross add up, and a line over the heart, the spine or the abdomen (bright background) shows
less contrast than the same line over the lung, as on a real film. Drawing touches only the box
around each shape, which keeps a dozen thin lines on a 2,600 px film cheap.

Distractors (ECG electrodes and leads, oxygen tubing, a pacemaker and its leads, surgical clips and
sternotomy wires, cables outside the body, side markers and text) are never labelled and never
annotated; :func:`draw_distractors` returns them by kind so tests can check exactly that.
"""

from __future__ import annotations

import cv2
import numpy as np

from ranzcr_tf.synth.phantom import add_noise, chaikin


class Opacity:
    """A float32 opacity map the size of the film, drawn into through anti-aliased 8-bit stamps."""

    def __init__(self, height: int, width: int):
        self.map = np.zeros((height, width), np.float32)

    def _stamp(self, bounds: np.ndarray, pad: float, draw, alpha: float) -> None:
        h, w = self.map.shape
        x0, y0 = (int(max(0, np.floor(v - pad))) for v in bounds.min(0))
        x1, y1 = int(min(w, np.ceil(bounds[:, 0].max() + pad))), int(min(h, np.ceil(bounds[:, 1].max() + pad)))
        if x1 <= x0 or y1 <= y0:
            return
        stamp = np.zeros((y1 - y0, x1 - x0), np.uint8)
        draw(stamp, np.array([x0, y0], np.float64))
        roi = self.map[y0:y1, x0:x1]
        roi += stamp.astype(np.float32) * np.float32(alpha / 255.0)

    def line(self, points_px, width_px: float, alpha: float, closed: bool = False) -> None:
        """A polyline ``width_px`` wide (sub-pixel widths thin the opacity instead of the stroke)."""
        pts = np.asarray(points_px, np.float64)
        thickness = max(1, int(round(width_px)))
        strength = alpha * min(1.0, width_px / thickness)

        def draw(stamp, origin):
            fixed = np.round((pts - origin) * 16).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(stamp, [fixed], closed, 255, thickness, cv2.LINE_AA, 4)

        self._stamp(pts, thickness + 2, draw, strength)

    def disc(self, centre_px, radius_px: float, alpha: float, ring_px: float = 0.0) -> None:
        """A filled disc, or a ring ``ring_px`` wide when that is given."""
        centre = np.asarray(centre_px, np.float64).reshape(1, 2)

        def draw(stamp, origin):
            c = np.round((centre[0] - origin) * 16).astype(int)
            thickness = -1 if ring_px <= 0 else max(1, int(round(ring_px)))
            cv2.circle(stamp, (int(c[0]), int(c[1])), int(round(radius_px * 16)), 255, thickness, cv2.LINE_AA, 4)

        self._stamp(centre, radius_px + ring_px + 2, draw, alpha)

    def polygon(self, points_px, alpha: float) -> None:
        pts = np.asarray(points_px, np.float64)

        def draw(stamp, origin):
            cv2.fillPoly(stamp, [np.round((pts - origin) * 16).astype(np.int32).reshape(-1, 1, 2)], 255,
                         cv2.LINE_AA, 4)

        self._stamp(pts, 2, draw, alpha)

    def compose(self, background: np.ndarray, noise_sigma: float, rng: np.random.Generator) -> np.ndarray:
        """uint8 film: background brightened by the opacity (less where it is already bright), plus noise.
        In 8-bit OpenCV arithmetic (saturating), faster than the same sums in float32 (docs/results.md)."""
        opacity = cv2.convertScaleAbs(self.map, alpha=255.0)  # 0-1 -> 0-255, saturating
        headroom = cv2.addWeighted(background, -0.65, background, 0.0, 255.0)  # 255 - 0.65 * background
        image = cv2.add(background, cv2.multiply(opacity, headroom, scale=1 / 255.0))
        return add_noise(image, rng, noise_sigma)


def _walk(rng, start, heading, steps, step_len, bend):
    """A smooth random curve from ``start``: the shape of a cable or a lead lying on the patient."""
    pts, ang = [np.asarray(start, np.float64)], heading
    for _ in range(steps):
        ang += rng.uniform(-bend, bend)
        pts.append(pts[-1] + step_len * np.array([np.cos(ang), np.sin(ang)]))
    return chaikin(np.array(pts), 3)


def _to_edge(rng, start, width, height, k):
    """A lead from ``start`` wandering out to the nearest film edge (and beyond it)."""
    x, y = start
    edges = [(x, np.pi), (width - x, 0.0), (y, -np.pi / 2), (height - y, np.pi / 2)]
    dist, heading = min(edges)
    steps = int(dist / (120 * k)) + 4
    return _walk(rng, start, heading + rng.uniform(-0.5, 0.5), steps, 130 * k, 0.5)


def draw_distractors(rng: np.random.Generator, opacity: Opacity, to_px, width: int, height: int,
                     k: float) -> dict[str, list[np.ndarray]]:
    """Unlabelled look-alikes drawn into ``opacity``; ``to_px`` maps body-frame ``(s, t)`` points to
    film pixels (so electrodes and the pacemaker move with the patient); ``k`` = long side / 2,000.
    Returns ``{kind: [points_px, ...]}`` of the lines and shapes drawn."""
    out: dict[str, list[np.ndarray]] = {}
    add = lambda kind, pts: out.setdefault(kind, []).append(np.asarray(pts, np.float64))  # noqa: E731
    for _ in range(int(rng.choice(6, p=[0.2, 0.1, 0.2, 0.25, 0.15, 0.1]))):  # ECG electrodes with leads
        centre = to_px([(rng.uniform(0.08, 0.92), rng.uniform(0.08, 0.62))])[0]
        radius = rng.uniform(9, 16) * k
        opacity.disc(centre, radius, rng.uniform(0.12, 0.3), ring_px=max(1.0, rng.uniform(1.5, 3) * k))
        opacity.disc(centre, max(1.5, rng.uniform(2.5, 4.5) * k), rng.uniform(0.5, 0.9))
        add("ecg electrode", [centre])
        lead = _to_edge(rng, centre, width, height, k)
        opacity.line(lead, max(1.0, rng.uniform(1, 3) * k), rng.uniform(0.12, 0.35))
        add("ecg lead", lead)
    if rng.random() < 0.3:  # oxygen tubing: a wide, faint, two-walled tube looping over the upper film
        start = np.array([rng.uniform(0, width), 0.0])
        path = _walk(rng, start, np.pi / 2 + rng.uniform(-1, 1), 12, 150 * k, 0.45)
        tube_w = rng.uniform(14, 24) * k
        opacity.line(path, tube_w, rng.uniform(0.02, 0.04))
        normal = np.gradient(path, axis=0)[:, ::-1] * [1, -1]
        normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-9
        for side in (-0.5, 0.5):
            opacity.line(path + side * tube_w * normal, max(1.0, 2 * k), rng.uniform(0.04, 0.08))
        add("oxygen tubing", path)
    if rng.random() < 0.08:  # pacemaker: a dense box under the left clavicle, leads down into the right heart
        box_c = to_px([(rng.uniform(0.72, 0.84), rng.uniform(0.15, 0.22))])[0]
        half = np.array([rng.uniform(35, 50), rng.uniform(25, 35)]) * k
        corners = box_c + np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
        opacity.polygon(corners, rng.uniform(0.7, 0.9))
        for lead_index in range(int(rng.integers(1, 3))):  # atrial and ventricular leads, apart
            o = 0.02 * lead_index
            lead = to_px(chaikin(np.array([(0.76, 0.2), (0.62, 0.24 + o), (0.45 - o, 0.30 + o), (0.44 - o, 0.42),
                                           (0.47 + o, 0.50), (0.55 + 2 * o, 0.62 + 3 * o)]), 4))
            lead[0] = box_c
            opacity.line(lead, max(1.0, rng.uniform(2.5, 4) * k), rng.uniform(0.15, 0.3))
            opacity.disc(lead[-1], max(1.5, 4 * k), 0.7)
            add("pacemaker lead", lead)
        add("pacemaker", corners)
    if rng.random() < 0.2:  # surgical clips: short dense bars and V shapes
        for _ in range(int(rng.integers(2, 7))):
            c = to_px([(rng.uniform(0.35, 0.7), rng.uniform(0.3, 0.85))])[0]
            ang, length = rng.uniform(0, np.pi), rng.uniform(10, 20) * k
            d = length / 2 * np.array([np.cos(ang), np.sin(ang)])
            clip = [c - d, c + d] if rng.random() < 0.5 else [c - d, c + np.array([d[1], -d[0]]) * 0.4, c + d]
            opacity.line(clip, max(1.0, rng.uniform(2, 3) * k), rng.uniform(0.5, 0.85))
            add("surgical clip", clip)
    if rng.random() < 0.1:  # sternotomy wires: small dense loops down the midline
        for t in np.linspace(0.22, 0.5, int(rng.integers(4, 7))):
            c = to_px([(0.5 + rng.uniform(-0.01, 0.01), t)])[0]
            loop = c + np.stack([np.cos(th := np.linspace(0, 2 * np.pi, 20)) * 14 * k, np.sin(th) * 7 * k], 1)
            opacity.line(loop, max(1.0, 2.5 * k), 0.7, closed=True)
            add("sternotomy wire", loop)
    for _ in range(int(rng.choice(4, p=[0.4, 0.3, 0.2, 0.1]))):  # cables lying beside the patient
        corner = np.array([rng.choice([0.0, width]), rng.uniform(0, 0.35) * height])
        heading = (0.0 if corner[0] == 0 else np.pi) + rng.uniform(-0.8, 0.8)
        cable = _walk(rng, corner, heading, int(rng.integers(3, 8)), 90 * k, 0.6)
        opacity.line(cable, max(1.0, rng.uniform(2, 4) * k), rng.uniform(0.15, 0.45))
        add("cable", cable)
    return out


_TEXTS = ("PORTABLE", "AP", "SUPINE", "ERECT", "SEMI ERECT", "ICU", "MOBILE", "AP SITTING")


def burn_markers(rng: np.random.Generator, image: np.ndarray, k: float) -> list[tuple[str, tuple[int, int]]]:
    """Side marker (R on image-left, the patient's right, as radiographers place it; sometimes L on
    the other side) and a text label, burned in upright: they sit on the detector, not on the patient."""
    h, w = image.shape
    font = cv2.FONT_HERSHEY_SIMPLEX
    out = []
    marks = [("R", rng.uniform(0.03, 0.2) * w)] if rng.random() < 0.8 else [("L", rng.uniform(0.75, 0.9) * w)]
    for text, x in marks:
        y, scale = rng.uniform(0.06, 0.3) * h, rng.uniform(1.8, 3.2) * k
        cv2.putText(image, text, (int(x), int(y)), font, scale, int(rng.integers(215, 256)),
                    max(2, int(round(4 * k))), cv2.LINE_AA)
        out.append((text, (int(x), int(y))))
    if rng.random() < 0.6:
        text = str(rng.choice(_TEXTS))
        x, y = int(rng.uniform(0.55, 0.8) * w), int(rng.uniform(0.03, 0.08) * h)
        cv2.putText(image, text, (x, y), font, rng.uniform(1.0, 1.6) * k, int(rng.integers(190, 256)),
                    max(1, int(round(3 * k))), cv2.LINE_AA)
        out.append((text, (x, y)))
    return out
