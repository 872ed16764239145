"""Chest-radiograph phantom with tubes: the drawing half of :mod:`ranzcr_tf.synth.generate`.

Geometry lives in a *body frame* that depends only on the image size (see :func:`body_frame`):
``s`` runs left to right across a square-ish box (0 = image-left edge of the box), ``t`` runs from
the top edge (0) to the bottom edge (1) of the image. Landmarks and tube paths are placed in
``(s, t)`` with bounded jitter, so each label's rule (module docstring of ``synthetic``) is a
statement about pixels in fixed frame zones. Image-left is the patient's right, as on a real film.

Anatomy is rendered once at a low resolution (long side <= 512 px), blurred and upscaled, which
keeps a 2,600 px image well under 0.2 s; noise and tubes are drawn at full resolution so tubes
stay sharp. Anatomy never exceeds :data:`ANATOMY_MAX` grey levels before noise and tubes are drawn
at :data:`TUBE_MIN` or brighter, so "tube-bright" (>= 215 after JPEG) means "a tube is here".
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

ANATOMY_MAX = 170  # brightest anatomy grey level before noise
TUBE_MIN = 238  # dimmest tube grey level
TRACHEA_S = (0.49, 0.51)
CARINA_T = (0.37, 0.39)
DIAPHRAGM_T = (0.72, 0.76)
_LOWRES = 512


def body_frame(width: int, height: int) -> tuple[float, float, float, float]:
    """``(x0, y0, frame_width, frame_height)`` in pixels: the frame spans the full height and a
    centred box ``min(width, height)`` wide, so landscape films get background/arms at the sides."""
    frame_width = float(min(width, height))
    return (width - frame_width) / 2.0, 0.0, frame_width, float(height)


def chaikin(points: np.ndarray, iterations: int = 4) -> np.ndarray:
    """Corner-cutting smoothing that keeps both end points and stays inside the control polygon's
    hull, so the zone margins worked out on control points still hold for the drawn curve."""
    p = np.asarray(points, dtype=np.float64)
    for _ in range(iterations):
        q = 0.75 * p[:-1] + 0.25 * p[1:]
        r = 0.25 * p[:-1] + 0.75 * p[1:]
        mid = np.empty((2 * len(q), 2))
        mid[0::2], mid[1::2] = q, r
        p = np.vstack([p[:1], mid, p[-1:]])
    return p


@dataclass
class Anatomy:
    """Landmarks in frame units; patient-level values with a little per-study jitter."""

    s_tr: float  # trachea / midline
    t_c: float  # carina
    t_d: float  # diaphragm level at the oesophagus (left dome)
    s_oe: float  # oesophagus (patient's left of the trachea)
    s_svc: float  # superior vena cava (patient's right)
    t_apex: float
    s_lat_r: float  # lateral edge of the right lung (image left)
    s_lat_l: float
    heart_ds: float
    heart_a: float
    heart_b: float
    rib_gap: float


def sample_anatomy(patient_rng: np.random.Generator, rng: np.random.Generator) -> Anatomy:
    """Patient-level body shape plus a per-study jitter, clipped to the documented bounds."""
    p = patient_rng
    base = dict(s_tr=p.uniform(0.493, 0.507), t_c=p.uniform(0.373, 0.387), t_d=p.uniform(0.725, 0.755),
                oe=p.uniform(0.066, 0.074), svc=p.uniform(0.066, 0.074), t_apex=p.uniform(0.11, 0.16),
                s_lat_r=p.uniform(0.07, 0.13), s_lat_l=1 - p.uniform(0.07, 0.13), heart_ds=p.uniform(0.04, 0.08),
                heart_a=p.uniform(0.15, 0.19), heart_b=p.uniform(0.11, 0.14), rib_gap=p.uniform(0.95, 1.1))
    j = lambda v: v + rng.uniform(-0.003, 0.003)  # noqa: E731 - same patient, slightly different positioning
    s_tr = float(np.clip(j(base["s_tr"]), *TRACHEA_S))
    return Anatomy(s_tr=s_tr, t_c=float(np.clip(j(base["t_c"]), *CARINA_T)),
                   t_d=float(np.clip(j(base["t_d"]), *DIAPHRAGM_T)), s_oe=s_tr + base["oe"], s_svc=s_tr - base["svc"],
                   t_apex=j(base["t_apex"]), s_lat_r=j(base["s_lat_r"]), s_lat_l=j(base["s_lat_l"]),
                   heart_ds=base["heart_ds"], heart_a=base["heart_a"], heart_b=base["heart_b"], rib_gap=base["rib_gap"])


def image_size(rng: np.random.Generator, scale: float) -> tuple[int, int]:
    """``(width, height)``: long side 1,500-2,600 px times ``scale``; 70% portrait."""
    long_side = rng.uniform(1500, 2600) * scale
    if rng.random() < 0.7:
        return int(round(long_side * rng.uniform(0.78, 0.95))), int(round(long_side))
    return int(round(long_side)), int(round(long_side / rng.uniform(1.05, 1.25)))


class _Canvas:
    """Maps frame ``(s, t)`` to pixels of an image of ``size`` (which may be a low-res copy)."""

    def __init__(self, width: int, height: int, size: tuple[int, int]):
        x0, y0, fw, fh = body_frame(width, height)
        kx, ky = size[0] / width, size[1] / height
        self.x0, self.fw, self.y0, self.fh, self.kx, self.ky = x0 * kx, fw * kx, y0 * ky, fh * ky, kx, ky
        self.size = size

    def px(self, st) -> np.ndarray:
        st = np.asarray(st, dtype=np.float64)
        return np.stack([self.x0 + st[:, 0] * self.fw, self.y0 + st[:, 1] * self.fh], axis=1)

    def poly(self, st, smooth: int = 0) -> np.ndarray:
        pts = np.asarray(st, dtype=np.float64)
        if smooth:
            pts = chaikin(np.vstack([pts, pts[:1]]), smooth)
        return np.round(self.px(pts)).astype(np.int32).reshape(-1, 1, 2)

    def length(self, frame_length: float) -> int:
        """A length in frame units (of the frame height) as whole pixels, at least 1 so that a
        line or circle drawn with it never disappears on a small canvas."""
        return max(1, int(round(frame_length * self.fh)))


def _lung(a: Anatomy, side: int) -> list[tuple[float, float]]:
    """Right lung outline (side=-1, image left) or left lung (side=+1), base below the dome."""
    lat = a.s_lat_r if side < 0 else a.s_lat_l
    m = lambda d: a.s_tr + side * d  # noqa: E731 - distance from the midline
    return [(m(0.05), a.t_apex + 0.07), (m(0.08), a.t_apex + 0.005), (m(0.13), a.t_apex - 0.02),
            (lat - side * 0.05, a.t_apex + 0.05), (lat - side * 0.01, a.t_apex + 0.17), (lat, 0.50),
            (lat + side * 0.01, a.t_d + 0.12),
            (m(0.05), a.t_d + 0.12), (m(0.05), 0.5), (m(0.045), 0.25)]


def _heart(a: Anatomy) -> list[tuple[float, float]]:
    """Cardiomediastinal silhouette below the carina: right atrial border bulging to image left,
    aortic knob, pulmonary trunk and a left ventricle sweeping down onto the left dome."""
    st, tc, td, w = a.s_tr, a.t_c, a.t_d, a.heart_a
    rb = 0.10 + 0.1 * (a.heart_b - 0.11)  # right heart border, 0.10-0.103 from the midline
    return [(st - 0.06, tc - 0.03), (st + 0.045, tc - 0.10), (st + 0.095, tc - 0.06), (st + 0.08, tc + 0.01),
            (st + 0.11, tc + 0.06), (st + 0.12, tc + 0.11), (st + w, tc + 0.17), (st + w + 0.05, td - 0.14 + a.heart_ds),
            (st + w + 0.06, td - 0.05), (st + w + 0.02, td + 0.03), (st - 0.02, td + 0.04),
            (st - rb - 0.01, td - 0.03), (st - rb - 0.02, tc + 0.2), (st - 0.08, tc + 0.1)]


def _arc(center_s, center_t, ax_s, ax_t, deg0, deg1, n=28):
    th = np.deg2rad(np.linspace(deg0, deg1, n))
    return np.stack([center_s + ax_s * np.cos(th), center_t - ax_t * np.sin(th)], 1)


def _abdomen_outline(a: Anatomy) -> np.ndarray:
    """Diaphragm domes and everything below them: the lower of two curves, right dome higher."""
    s = np.linspace(-0.3, 1.3, 90)
    dome = np.minimum(a.t_d - 0.05 + 1.2 * np.abs(s - 0.30) ** 1.7, a.t_d - 0.02 + 1.2 * np.abs(s - 0.70) ** 1.7)
    return np.vstack([np.stack([s, dome], 1), [(1.3, 1.1), (-0.3, 1.1)]])


def _upper_mediastinum(a: Anatomy) -> list[tuple[float, float]]:
    """The midline column from the top edge down to the carina (trachea and great vessels)."""
    st, tc = a.s_tr, a.t_c
    return [(st - 0.05, 0.0), (st + 0.05, 0.0), (st + 0.05, tc), (st - 0.055, tc)]


def _draw_body(density: np.ndarray, c: _Canvas, a: Anatomy) -> None:
    """Soft tissue of neck and trunk, plus the humeral heads (fully visible on landscape films)."""
    st = a.s_tr
    body = [(st - 0.10, -0.05), (st + 0.10, -0.05), (st + 0.12, 0.08), (1.02, 0.13), (1.25, 0.25), (1.25, 1.05),
            (-0.25, 1.05), (-0.25, 0.25), (-0.02, 0.13), (st - 0.12, 0.08)]
    cv2.fillPoly(density, [c.poly(body, 3)], 0.46)
    for s_head in (-0.05, 1.05):
        h = c.px([(s_head, 0.2)])[0]
        cv2.circle(density, (int(h[0]), int(h[1])), c.length(0.075), 0.62, -1)


def _lung_mask(c: _Canvas, a: Anatomy) -> np.ndarray:
    """1 inside the aerated lungs, 0 elsewhere, with soft edges: both lung outlines less the
    abdomen, the heart and the upper mediastinum, which overlap them on a frontal film."""
    lungs = np.zeros(c.size[::-1], np.float32)
    for side in (-1, 1):
        cv2.fillPoly(lungs, [c.poly(_lung(a, side), 3)], 1.0)
    cv2.fillPoly(lungs, [c.poly(_abdomen_outline(a))], 0.0)
    cv2.fillPoly(lungs, [c.poly(_heart(a), 3)], 0.0)
    cv2.fillPoly(lungs, [c.poly(_upper_mediastinum(a))], 0.0)
    return cv2.GaussianBlur(lungs, (0, 0), 0.004 * c.size[1])


def _vessel_markings(rng: np.random.Generator, c: _Canvas, a: Anatomy) -> np.ndarray:
    """Branching vessel lines fanning out of both hila (random walks of three steps each)."""
    vessels = np.zeros(c.size[::-1], np.float32)
    for side in (-1, 1):
        hilum = np.array([a.s_tr + side * 0.09, a.t_c + 0.07])
        for _ in range(22):
            ang = rng.uniform(-1.3, 1.3) + (0 if side > 0 else np.pi)
            length = rng.uniform(0.08, 0.25)
            pts = [hilum]
            for _ in range(3):
                ang += rng.uniform(-0.35, 0.35)
                pts.append(pts[-1] + length / 3 * np.array([np.cos(ang), np.sin(ang) * 1.2]))
            cv2.polylines(vessels, [c.poly(pts)], False, 0.07, c.length(0.006))
    return vessels


def _draw_lungs(density: np.ndarray, rng: np.random.Generator, c: _Canvas, a: Anatomy) -> None:
    """Darken the lung fields, less toward the bases (more tissue in the way), with fine mottle,
    and add the vessel markings only where there is lung (so they fade at its edges)."""
    lungs = _lung_mask(c, a)
    vessels = _vessel_markings(rng, c, a)
    width, height = c.size
    fine = cv2.resize(rng.standard_normal((height // 6 + 2, width // 6 + 2)).astype(np.float32), c.size,
                      interpolation=cv2.INTER_CUBIC)
    lung_grad = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    density += lungs * (-0.31 + 0.10 * lung_grad + 0.012 * fine) + lungs * vessels


def _draw_abdomen_and_mediastinum(density: np.ndarray, rng: np.random.Generator, c: _Canvas, a: Anatomy) -> None:
    """Dense abdomen under the domes with bowel gas and the gastric bubble, then the upper
    mediastinum and the heart drawn over the lungs (they are denser than aerated lung)."""
    cv2.fillPoly(density, [c.poly(_abdomen_outline(a))], 0.54)
    for _ in range(int(rng.integers(2, 6))):  # bowel gas
        g = c.px([(rng.uniform(0.2, 0.8), rng.uniform(a.t_d + 0.12, 1.0))])[0]
        cv2.ellipse(density, (int(g[0]), int(g[1])),
                    (c.length(rng.uniform(0.02, 0.05)), c.length(rng.uniform(0.01, 0.025))),
                    float(rng.uniform(0, 180)), 0, 360, 0.38, -1)
    bubble = c.px([(a.s_tr + 0.17, a.t_d + 0.06)])[0]  # gastric air under the left dome
    cv2.ellipse(density, (int(bubble[0]), int(bubble[1])), (c.length(0.05 * c.fw / c.fh), c.length(0.028)),
                0, 0, 360, 0.24, -1)
    cv2.fillPoly(density, [c.poly(_upper_mediastinum(a), 2)], 0.74)
    cv2.fillPoly(density, [c.poly(_heart(a), 3)], 0.76)


def _draw_ribs(bones: np.ndarray, c: _Canvas, a: Anatomy) -> None:
    """Nine rib pairs: posterior ribs as arcs dropping laterally, then fainter anterior ribs
    sloping back down toward the midline from near each posterior rib's lateral end."""
    st = a.s_tr
    for i in range(9):
        ti = a.t_apex - 0.01 + i * 0.058 * a.rib_gap
        for side in (-1, 1):
            lat = a.s_lat_r if side < 0 else a.s_lat_l
            ax_s = abs(lat - st) * 1.02
            post = _arc(st, ti + 0.15, ax_s, 0.15, 75, -22)
            post[:, 0] = st + side * (post[:, 0] - st)  # mirror the arc onto the image-left side
            cv2.polylines(bones, [c.poly(post)], False, 0.13, c.length(0.016))
            end = post[-3]
            ant = np.stack([end[0] + (st + side * 0.16 - end[0]) * np.linspace(0, 1, 16),
                            end[1] - 0.03 + 0.11 * np.linspace(0, 1, 16) ** 1.3], 1)
            cv2.polylines(bones, [c.poly(ant)], False, 0.045, c.length(0.012))


def _draw_bones(density: np.ndarray, c: _Canvas, a: Anatomy) -> None:
    """Spine (vertebral bodies with darker disc gaps), ribs, clavicles and scapular edges, drawn on
    their own layer and added so overlapping bones sum like real attenuation."""
    st = a.s_tr
    bones = np.zeros_like(density)
    spine_x, half = c.px([(st, 0)])[0][0], 0.033 * c.fw
    for tv in np.arange(0.0, 1.05, 0.036):
        y0, y1 = c.px([(0, tv), (0, tv + 0.029)])[:, 1]
        cv2.rectangle(bones, (int(spine_x - half), int(y0)), (int(spine_x + half), int(y1)), 0.07, -1)
    _draw_ribs(bones, c, a)
    uu = np.linspace(0, 1, 24)
    for side in (-1, 1):
        clav = np.stack([st + side * (0.035 + 0.40 * uu), 0.19 - 0.07 * uu + 0.025 * np.sin(np.pi * uu)], 1)
        cv2.polylines(bones, [c.poly(clav)], False, 0.16, c.length(0.018))
        lat = a.s_lat_r if side < 0 else a.s_lat_l
        scap = [(lat + side * 0.02, 0.16), (lat - side * 0.05, 0.28), (lat - side * 0.01, 0.42)]
        cv2.polylines(bones, [c.poly(scap)], False, 0.05, c.length(0.01))
    density += bones


def _draw_airways(density: np.ndarray, c: _Canvas, a: Anatomy) -> None:
    """Darker trachea column and main bronchi meeting at the carina (the ETT landmark)."""
    st, tc = a.s_tr, a.t_c
    air = np.zeros_like(density)
    cv2.polylines(air, [c.poly([(st, 0.0), (st, tc)])], False, 1.0, c.length(0.03))
    for seg in ([(st, tc), (st - 0.045, tc + 0.07)], [(st, tc), (st + 0.06, tc + 0.08)]):
        cv2.polylines(air, [c.poly(seg)], False, 0.8, c.length(0.02))
    density -= 0.2 * cv2.GaussianBlur(air, (0, 0), 0.003 * c.size[1])


def _draw_faint_devices(density: np.ndarray, rng: np.random.Generator, c: _Canvas, lumens: list | None,
                        ecg: bool) -> None:
    """Things on or in the patient that are part of the background, all below tube brightness:
    the faint tube bodies in ``lumens`` and (if ``ecg``) 0-3 ECG electrodes with their leads."""
    for points, width_frame in lumens or []:
        cv2.polylines(density, [c.poly(chaikin(np.asarray(points), 3))], False, 0.62, c.length(width_frame))
    for _ in range(int(rng.integers(0, 4)) if ecg else 0):
        e = np.array([rng.uniform(0.15, 0.85), rng.uniform(0.12, 0.55)])
        ep = c.px([e])[0]
        cv2.circle(density, (int(ep[0]), int(ep[1])), c.length(0.014), 0.95, c.length(0.004))
        lead = [e, e + rng.uniform(-0.1, 0.1, 2), e + rng.uniform(-0.25, 0.25, 2) + [0, 0.1]]
        cv2.polylines(density, [c.poly(chaikin(np.array(lead), 3))], False, 0.85, c.length(0.003))


def _pose_density(density: np.ndarray, pose: np.ndarray, width: int, height: int) -> np.ndarray:
    """Tilt and shift the low-resolution density by ``pose`` (given in full-resolution pixels):
    the patient moves, the detector (and the gain field applied after this) does not."""
    size = density.shape[::-1]
    kx, ky = size[0] / width, size[1] / height
    low_pose = np.array([[kx, 0, 0], [0, ky, 0]]) @ np.vstack([pose, [0, 0, 1]]) @ np.diag([1 / kx, 1 / ky, 1])
    return cv2.warpAffine(density, low_pose, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _expose(density: np.ndarray, rng: np.random.Generator, tone: tuple | None) -> np.ndarray:
    """Density -> uint8 grey levels: a tilted gain field, gamma and a level that tops out at or
    below the tone's cap (:data:`ANATOMY_MAX` by default), so anatomy stays darker than tubes."""
    height, width = density.shape
    gx, gy = np.meshgrid(np.linspace(-1, 1, width, dtype=np.float32), np.linspace(-1, 1, height, dtype=np.float32))
    density *= 1 + rng.uniform(-0.06, 0.06) * gx + rng.uniform(-0.06, 0.06) * gy
    low_range, high_range, gamma_range, cap = tone or ((0, 12), (145, ANATOMY_MAX), (0.8, 1.3), ANATOMY_MAX)
    low, high = rng.uniform(*low_range), rng.uniform(*high_range)
    levels = low + (high - low) * np.clip(density, 0, 1) ** rng.uniform(*gamma_range)
    return np.clip(levels, 0, cap).astype(np.uint8)


def render_anatomy(rng: np.random.Generator, a: Anatomy, width: int, height: int, lumens: list | None = None,
                   pose: np.ndarray | None = None, ecg: bool = True, tone: tuple | None = None,
                   texture=None) -> np.ndarray:
    """The uint8 phantom (no noise, no tubes) at ``(height, width)``; ``lumens`` are
    ``(points_st, width_frame)`` faint tube bodies (the ETT's), drawn into the anatomy.

    ``pose`` (2x3 affine, full-resolution pixels of the upright frame -> film pixels) tilts and
    shifts the patient; ``ecg=False`` leaves out the built-in electrodes (the hard style draws its
    own); ``tone`` is ``((low_min, low_max), (high_min, high_max), (gamma_min, gamma_max), cap)``
    for the exposure mapping (default: the easy style's, capped at :data:`ANATOMY_MAX`);
    ``texture(density, canvas)`` may add to the low-resolution density map before it is blurred."""
    # Drawn at low resolution (long side <= _LOWRES) and upscaled at the end: see the module docstring.
    f = max(1.0, max(width, height) / _LOWRES)
    size = (max(8, int(round(width / f))), max(8, int(round(height / f))))
    c = _Canvas(width, height, size)
    density = np.full(size[::-1], 0.03, np.float32)  # air around the patient
    # The order matters twice over: later layers paint over earlier ones, and the helpers that
    # draw from ``rng`` must keep their turn so a seed keeps giving the same film.
    _draw_body(density, c, a)
    _draw_lungs(density, rng, c, a)
    _draw_abdomen_and_mediastinum(density, rng, c, a)
    _draw_bones(density, c, a)
    _draw_airways(density, c, a)
    _draw_faint_devices(density, rng, c, lumens, ecg)
    if texture is not None:
        texture(density, c)
    density = cv2.GaussianBlur(density, (0, 0), 0.0025 * size[1])
    if pose is not None:
        density = _pose_density(density, pose, width, height)
    return cv2.resize(_expose(density, rng, tone), (width, height), interpolation=cv2.INTER_LINEAR)


def add_noise(image: np.ndarray, rng: np.random.Generator, sigma: float | None = None) -> np.ndarray:
    """Quantum-like Gaussian noise (``sigma`` grey levels, default drawn from 1.5-4); cv2's generator,
    seeded from ``rng``, is faster than numpy's (docs/results.md)."""
    cv2.setRNGSeed(int(rng.integers(1, 2**31 - 1)))
    noise = np.empty(image.shape, np.int16)
    cv2.randn(noise, 0, float(rng.uniform(1.5, 4.0) if sigma is None else sigma))
    return cv2.add(image, noise, dtype=cv2.CV_8U)


# ----------------------------------------------------------------------------------------------
# Tubes. Each function returns control points in frame units; the margins in the comments are what
# keep every family out of the other families' test zones (see the synthetic module docstring).

def _entry(rng: np.random.Generator, a: Anatomy, route: str, s_left: float) -> list[tuple[float, float]]:
    """Venous access on the patient's right (image left): internal jugular from the top edge, or
    subclavian from the left edge; both end at the top of the SVC (s <= s_svc, t <= t_c - 0.08)."""
    if route == "ij":
        return [(rng.uniform(0.30, 0.36), -0.02), (a.s_svc - 0.03, 0.12), (a.s_svc - 0.005, a.t_c - 0.12)]
    te = rng.uniform(0.20, 0.26)
    return [(s_left - 0.02, te), (0.16, te + 0.005), (0.30, te + 0.02), (a.s_svc - 0.03, a.t_c - 0.11),
            (a.s_svc - 0.005, a.t_c - 0.08)]


def ett_path(rng: np.random.Generator, a: Anatomy, state: str) -> list[tuple[float, float]]:
    """Down the trachea (|s - s_tr| <= 0.006); the tip height versus the carina decides the state."""
    sway = rng.uniform(-0.006, 0.006)
    if state == "Abnormal" and rng.random() < 0.5:  # into the right main bronchus, tip below the carina
        dt = rng.uniform(0.03, 0.055)
        return [(a.s_tr + sway, -0.02), (a.s_tr + sway / 2, 0.15), (a.s_tr, a.t_c - 0.01),
                (a.s_tr - 0.3 * dt, a.t_c + dt)]
    if state == "Abnormal":  # far too high, in the neck
        tip = rng.uniform(0.08, 0.14)
    elif state == "Borderline":
        tip = a.t_c - rng.uniform(0.015, 0.04)
    else:
        tip = a.t_c - rng.uniform(0.09, 0.16)
    return [(a.s_tr + sway, -0.02), (a.s_tr + sway / 2, tip / 2), (a.s_tr, tip)]


def ngt_path(rng: np.random.Generator, a: Anatomy, state: str) -> list[tuple[float, float]]:
    """Down the oesophagus (s_oe in [0.555, 0.585]); where it goes after that decides the state."""
    so = a.s_oe
    top = [(so + rng.uniform(-0.008, 0.008), -0.02), (so, 0.15)]
    if state == "Normal":  # through the hiatus, curving into the stomach under the left dome
        return top + [(so, a.t_c), (so, a.t_d - 0.03), (so + 0.035, a.t_d + 0.05),
                      (rng.uniform(0.64, 0.70), a.t_d + rng.uniform(0.10, 0.14))]
    if state == "Incompletely Imaged":  # straight on and out through the bottom edge
        return top + [(so, a.t_c), (so + rng.uniform(0, 0.01), a.t_d), (so + rng.uniform(0, 0.02), 1.05)]
    if state == "Borderline":  # tip in the distal oesophagus, above the diaphragm
        return top + [(so, a.t_c), (so + rng.uniform(-0.004, 0.004), a.t_d - rng.uniform(0.03, 0.10))]
    if rng.random() < 0.5:  # Abnormal: coiled in the upper oesophagus
        t_loop = rng.uniform(0.24, 0.31)
        theta = np.linspace(np.pi, np.pi + 2.5 * np.pi, 14)
        loop = [(so + 0.012 + 0.013 * np.cos(th), t_loop - 0.018 * np.sin(th)) for th in theta]
        return [top[0], (so, t_loop - 0.06)] + loop + [(so + 0.02, t_loop - 0.05)]
    # Abnormal: down the left main bronchus into the left lower lobe
    return top + [(so, a.t_c + rng.uniform(0, 0.02)), (so + 0.05, a.t_c + 0.08),
                  (rng.uniform(0.66, 0.72), a.t_c + rng.uniform(0.14, 0.20))]


def cvc_path(rng: np.random.Generator, a: Anatomy, state: str, s_left: float) -> list[tuple[float, float]]:
    """Right IJ or subclavian line; the tip along the SVC decides the state."""
    if state == "Abnormal" and rng.random() < 0.4:  # subclavian line turned up into the neck
        return _entry(rng, a, "sc", s_left)[:-1] + [(a.s_svc - 0.012, a.t_c - 0.13), (a.s_svc - 0.015, a.t_c - 0.2),
                                                     (a.s_svc - 0.02, rng.uniform(0.07, 0.13))]
    path = _entry(rng, a, "ij" if rng.random() < 0.5 else "sc", s_left)
    if state == "Normal":  # lower SVC / cavo-atrial junction
        return path + [(a.s_svc, a.t_c - 0.02), (a.s_svc + 0.003, a.t_c + rng.uniform(0.05, 0.10))]
    if state == "Borderline":  # upper SVC / brachiocephalic: too proximal
        return path + [(a.s_svc, a.t_c - rng.uniform(0.02, 0.07))]
    return path + [(a.s_svc, a.t_c + 0.08), (a.s_svc + 0.012, a.t_c + rng.uniform(0.19, 0.25))]  # deep in the RA


def swan_path(rng: np.random.Generator, a: Anatomy, s_left: float) -> list[tuple[float, float]]:
    """SVC -> right atrium -> right ventricle -> pulmonary trunk -> out into the right lung field.
    Stays at s <= s_tr + 0.01 and, within 0.04 of the midline, at t >= t_c + 0.11."""
    path = _entry(rng, a, "ij" if rng.random() < 0.5 else "sc", s_left)
    st, tc = a.s_tr, a.t_c
    return path + [(a.s_svc, tc + 0.06), (a.s_svc + 0.015, tc + 0.17), (st, tc + 0.25), (st + 0.01, tc + 0.18),
                   (st, tc + 0.13), (st - 0.08, tc + 0.10), (rng.uniform(0.26, 0.32), tc + rng.uniform(0.09, 0.12))]


def tube_pixels(points_st, width: int, height: int, samples: int = 4) -> np.ndarray:
    """Smoothed tube centre line in full-resolution pixel coordinates (float, N x 2)."""
    return _Canvas(width, height, (width, height)).px(chaikin(np.asarray(points_st), samples))


def draw_tube(image: np.ndarray, line_px: np.ndarray, thickness: int, value: int) -> None:
    """Anti-aliased polyline at sub-pixel precision (shift=4), drawn in place."""
    pts = np.round(line_px * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(image, [pts], False, int(value), int(thickness), cv2.LINE_AA, 4)


def annotation_points(line_px: np.ndarray, width: int, height: int, rng: np.random.Generator) -> list[list[int]]:
    """Kaggle-style clicked points along the visible part of a tube: integers inside the image."""
    inside = (line_px[:, 0] >= 0) & (line_px[:, 0] <= width - 1) & (line_px[:, 1] >= 0) & (line_px[:, 1] <= height - 1)
    visible = line_px[inside]
    if len(visible) < 2:
        return []
    count = int(rng.integers(8, 25))
    idx = np.unique(np.round(np.linspace(0, len(visible) - 1, count)).astype(int))
    pts = np.round(visible[idx]).astype(int)
    pts[:, 0] = np.clip(pts[:, 0], 0, width - 1)
    pts[:, 1] = np.clip(pts[:, 1], 0, height - 1)
    return pts.tolist()
