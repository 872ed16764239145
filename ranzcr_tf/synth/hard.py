"""The ``hard`` phantom style: thin, faint, crowded lines on tilted, shifted, varied patients.

The ``easy`` style (:mod:`ranzcr_tf.synth.phantom`) draws thick tubes brighter than any anatomy,
upright, in fixed zones. This style is hard in the ways real films are:

* films 1,400-2,600 px on the long side (times ``scale``), 65% portrait; line widths and opacities
  from realistic ranges at the film's own resolution (``k`` = long side / 2,000 px, about 0.2 mm per
  px on a 40 cm film): guide wires and leads 1-3 px times ``k``; the labelled tubes at their real
  calibre (:data:`FAMILY_STYLE`): NGT 4-10 px (8-16 Fr, 2.7-5.3 mm, seen as its radio-opaque
  part), CVC 3-7 px (4-7 Fr), Swan-Ganz 4-8 px (7-7.5 Fr), the ETT a 3-6 px radio-opaque stripe,
  on 60% of films with the faint 40-55 px tube body (10-11 mm) around it; opacities 0.06-0.25,
  about 10-40 grey levels over the lung, fainter than most ECG leads and cables. Each line adds
  opacity, so crossing lines add up and lines over the heart, spine and abdomen show less contrast
  (down to about 6 grey levels; see :mod:`ranzcr_tf.synth.overlays`); noise (sigma 2-5), exposure,
  gamma and contrast vary per film. (The first version drew every tube at guide-wire width,
  1.5-3.5 px: at 256-384 px stored that is a tenth to a half of a pixel, and no recipe learnt it.)
* the patient is rotated by up to +-10 degrees about the film centre, shifted by up to 8% sideways
  and 5% vertically and scaled by 0.88-1.08 (the *pose*); anatomy varies more than in ``easy``
  (carina, diaphragm height, heart size, lung width and apex);
* unlabelled distractors (ECG electrodes and leads, oxygen tubing, pacemakers, clips, sternotomy
  wires, cables, L/R markers and text) are drawn by :func:`ranzcr_tf.synth.overlays.draw_distractors`.

Label rules. Positions are in the patient's *body frame* ``(s, t)``: the upright frame of the easy
style (``t = y / height``; ``s = (x - x0) / w`` for the centred ``min(width, height)`` box) carried
onto the film by the pose matrix, so every landmark moves with the anatomy and the rotation. Given
the drawn line (its last point is the tip) and the landmarks returned in :class:`Geometry`:

* **ETT**: ``d = t_carina - t_tip``. Normal ``0.07 <= d <= 0.17`` (about 3-6 cm above the carina);
  Borderline ``0.01 <= d <= 0.05`` (just above it); Abnormal ``d <= -0.03`` (in a main bronchus) or
  ``d >= 0.22`` (high, in the neck).
* **NGT**: Incompletely Imaged iff the line leaves the film (its tip lies outside the image).
  Otherwise ``e = t_tip - t_diaphragm`` (the left dome under the oesophagus): Normal ``e >= 0.05``
  (in the stomach); Borderline ``-0.10 <= e <= -0.02`` (distal oesophagus); Abnormal ``e <= -0.13``
  (coiled in the oesophagus, or down a bronchus into the lung).
* **CVC** (one or two lines; entry by the right or left internal jugular or subclavian vein, the
  left ones crossing the mediastinum): ``c = t_tip - t_caj`` (cavo-atrial junction). Normal
  ``-0.08 <= c <= 0`` (lower SVC); Borderline ``-0.21 <= c <= -0.12`` (upper SVC / brachiocephalic);
  Abnormal ``c >= 0.05`` (deep in the right atrium) or ``c <= -0.28`` (turned up into the neck).
* **Swan Ganz** present iff such a line is drawn: through the SVC, atrium, ventricle and pulmonary
  trunk, its tip in a pulmonary artery, ``|s_tip - s_trachea| >= 0.10``.

Every labelled tip lies at least 3% of the short side inside the film (the pose is redrawn, smaller,
until it does) except the Incompletely Imaged NGT's, which the pose always leaves outside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ranzcr_tf.synth import overlays, phantom

TONE = ((0, 30), (150, 220), (0.75, 1.5), 255)  # exposure: black level, white level, gamma, cap
FAMILY_STYLE = {  # (width px at 2,000 px, opacity) ranges per labelled family
    "ETT": ((3.0, 6.0), (0.10, 0.25)), "NGT": ((4.0, 10.0), (0.08, 0.20)),
    "CVC": ((3.0, 7.0), (0.06, 0.15)), "Swan Ganz": ((4.0, 8.0), (0.08, 0.18)),
}


@dataclass
class Geometry:
    """Where everything is on one hard film: ``pose`` maps upright-frame pixels to film pixels."""

    width: int
    height: int
    frame: tuple[float, float, float, float]  # x0, y0, frame width, frame height (upright, pixels)
    pose: np.ndarray  # 2x3
    angle_deg: float
    landmarks: dict[str, tuple[float, float]]  # body-frame (s, t)
    lines: list[tuple[str, np.ndarray]] = field(default_factory=list)  # labelled: (label, film px)
    distractors: dict[str, list[np.ndarray]] = field(default_factory=dict)
    markers: list = field(default_factory=list)

    def to_px(self, st) -> np.ndarray:
        st = np.asarray(st, np.float64).reshape(-1, 2)
        x0, y0, fw, fh = self.frame
        upright = np.stack([x0 + st[:, 0] * fw, y0 + st[:, 1] * fh], 1)
        return upright @ self.pose[:, :2].T + self.pose[:, 2]

    def to_body(self, px) -> np.ndarray:
        """Film pixels -> body frame ``(s, t)`` (the inverse of :meth:`to_px`)."""
        x0, y0, fw, fh = self.frame
        upright = (np.asarray(px, np.float64).reshape(-1, 2) - self.pose[:, 2]) @ np.linalg.inv(self.pose[:, :2]).T
        return np.stack([(upright[:, 0] - x0) / fw, (upright[:, 1] - y0) / fh], 1)


def image_size(rng: np.random.Generator, scale: float) -> tuple[int, int]:
    """``(width, height)``: long side 1,400-2,600 px times ``scale``; 65% portrait."""
    long_side = rng.uniform(1400, 2600) * scale
    if rng.random() < 0.65:
        return int(round(long_side * rng.uniform(0.78, 0.97))), int(round(long_side))
    return int(round(long_side)), int(round(long_side / rng.uniform(1.03, 1.28)))


def sample_anatomy(patient_rng: np.random.Generator, rng: np.random.Generator) -> tuple[phantom.Anatomy, float]:
    """A wider range of bodies than ``easy`` (same patient, same body, a little per-study jitter);
    also returns the cavo-atrial junction ``t_caj``, the CVC landmark."""
    p = patient_rng
    j = lambda v, r=0.004: float(v + rng.uniform(-r, r))  # noqa: E731 - positioning differs per study
    s_tr, t_c = j(p.uniform(0.485, 0.515)), j(p.uniform(0.33, 0.42))
    anatomy = phantom.Anatomy(
        s_tr=s_tr, t_c=t_c, t_d=j(p.uniform(0.66, 0.79)), s_oe=s_tr + p.uniform(0.06, 0.08),
        s_svc=s_tr - p.uniform(0.06, 0.08), t_apex=j(p.uniform(0.09, 0.17)), s_lat_r=j(p.uniform(0.04, 0.15)),
        s_lat_l=j(1 - p.uniform(0.04, 0.15)), heart_ds=p.uniform(0.02, 0.10), heart_a=p.uniform(0.13, 0.24),
        heart_b=p.uniform(0.10, 0.15), rib_gap=p.uniform(0.9, 1.15))
    return anatomy, t_c + p.uniform(0.10, 0.14)


def sample_pose(rng: np.random.Generator, width: int, height: int, shrink: float = 1.0) -> tuple[np.ndarray, float]:
    """Rotation about the film centre (+-10 degrees), zoom 0.88-1.08 and shift, all times ``shrink``."""
    angle = rng.uniform(-10, 10) * shrink
    zoom = 1 + rng.uniform(-0.12, 0.08) * shrink
    shift = np.array([rng.uniform(-0.08, 0.08) * min(width, height), rng.uniform(-0.05, 0.05) * height]) * shrink
    th = np.deg2rad(angle)
    rot = zoom * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    centre = np.array([width / 2, height / 2])
    return np.hstack([rot, (centre - rot @ centre + shift)[:, None]]), float(angle)


def texture(rng: np.random.Generator, a: phantom.Anatomy):
    """What makes the upright phantom less of a cartoon, added to its low-resolution density: the
    body thicker toward the middle, mottle at two scales, and breast shadows over the lower zones."""
    def apply(density: np.ndarray, canvas) -> None:
        h, w = density.shape
        centre = canvas.px([(a.s_tr, 0.55)])[0]
        yy, xx = np.ogrid[0:h, 0:w]
        bump = np.exp(-(((xx - centre[0]) / (0.45 * canvas.fw)) ** 2 + ((yy - centre[1]) / (0.6 * canvas.fh)) ** 2))
        density += np.float32(rng.uniform(0.03, 0.09)) * bump.astype(np.float32)
        for cell, amplitude in ((3, rng.uniform(0.008, 0.02)), (14, rng.uniform(0.01, 0.03))):
            field = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
            density += np.float32(amplitude) * cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC)
        if rng.random() < 0.45:
            shadow = np.zeros_like(density)
            for side in (-1, 1):
                c = canvas.px([(a.s_tr + side * rng.uniform(0.22, 0.3), a.t_d - rng.uniform(0.0, 0.06))])[0]
                axes = (int(rng.uniform(0.15, 0.22) * canvas.fw), int(rng.uniform(0.1, 0.15) * canvas.fh))
                cv2.ellipse(shadow, (int(c[0]), int(c[1])), axes, 0, 0, 360, 1.0, -1)
            density += np.float32(rng.uniform(0.04, 0.09)) * cv2.GaussianBlur(shadow, (0, 0), 0.02 * h)
    return apply


# ----------------------------------------------------------------------------------------------
# Labelled paths in body-frame units; the tip (last point) realises the rules of the docstring.

def ett_path(rng, a: phantom.Anatomy, state: str) -> np.ndarray:
    top = [(a.s_tr + rng.uniform(-0.01, 0.01), -0.15), (a.s_tr + rng.uniform(-0.006, 0.006), 0.12)]
    if state == "Abnormal" and rng.random() < 0.5:  # into the right main bronchus
        dt = rng.uniform(0.03, 0.06)
        return np.array(top + [(a.s_tr, a.t_c - 0.02), (a.s_tr - 0.5 * dt, a.t_c + dt)])
    if state == "Abnormal":
        d = rng.uniform(0.22, min(0.30, a.t_c - 0.08))
    else:
        d = rng.uniform(0.01, 0.05) if state == "Borderline" else rng.uniform(0.07, 0.17)
    tip = a.t_c - d
    return np.array([top[0], (top[1][0], min(top[1][1], tip - 0.03)), (a.s_tr, tip)])


def ngt_path(rng, a: phantom.Anatomy, state: str) -> np.ndarray:
    so = a.s_oe
    top = [(a.s_tr + rng.uniform(-0.03, 0.03), -0.15), (so - 0.02, 0.12), (so, a.t_c)]
    if state == "Normal":  # through the hiatus into the stomach under the left dome
        return np.array(top + [(so + 0.005, a.t_d - 0.03), (so + 0.03, a.t_d + 0.04),
                               (so + rng.uniform(0.06, 0.14), a.t_d + rng.uniform(0.07, 0.12))])
    if state == "Incompletely Imaged":
        return np.array(top + [(so + 0.01, a.t_d), (so + rng.uniform(0, 0.04), 1.35)])
    if state == "Borderline":
        return np.array(top + [(so + rng.uniform(-0.005, 0.005), a.t_d - rng.uniform(0.03, 0.09))])
    if rng.random() < 0.5:  # Abnormal: coiled in the upper oesophagus
        t_loop = rng.uniform(0.20, a.t_c - 0.02)
        theta = np.linspace(np.pi, np.pi + 2.5 * np.pi, 14)
        loop = [(so + 0.015 + 0.02 * np.cos(th), t_loop - 0.025 * np.sin(th)) for th in theta]
        return np.array(top[:2] + [(so, t_loop - 0.06)] + loop + [(so + 0.03, t_loop - 0.05)])
    side = 1 if rng.random() < 0.6 else -1  # Abnormal: down a bronchus into a lower lobe
    tip_t = rng.uniform(a.t_c + 0.07, min(a.t_c + 0.18, a.t_d - 0.14))
    return np.array(top + [(a.s_tr + side * 0.05, a.t_c + 0.05), (a.s_tr + side * rng.uniform(0.14, 0.24), tip_t)])


def _venous_entry(rng, a: phantom.Anatomy) -> list[tuple[float, float]]:
    """Right or left internal jugular / subclavian, ending at the top of the SVC (t_c - 0.13)."""
    route = rng.choice(["rij", "rsc", "lij", "lsc"], p=[0.35, 0.3, 0.2, 0.15])
    end = (a.s_svc - 0.005, a.t_c - 0.13)
    if route == "rij":
        return [(rng.uniform(0.30, 0.38), -0.15), (a.s_svc - 0.035, 0.12), end]
    if route == "rsc":
        te = rng.uniform(0.20, 0.26)
        return [(-0.45, te + 0.03), (0.18, te), (0.30, te + 0.02), end]
    if route == "lij":
        return [(rng.uniform(0.62, 0.70), -0.15), (0.62, 0.18), (a.s_tr + 0.04, a.t_c - 0.15), end]
    te = rng.uniform(0.20, 0.26)
    return [(1.45, te + 0.03), (0.80, te), (0.66, te + 0.03), (a.s_tr + 0.04, a.t_c - 0.15), end]


def cvc_path(rng, a: phantom.Anatomy, t_caj: float, state: str) -> np.ndarray:
    if state == "Abnormal" and rng.random() < 0.35:  # subclavian line turned up into the neck
        te = rng.uniform(0.20, 0.26)
        return np.array([(-0.45, te + 0.03), (0.18, te), (0.30, te + 0.02), (a.s_svc - 0.02, te + 0.02),
                         (a.s_svc - 0.03, rng.uniform(0.05, 0.13))])
    path = _venous_entry(rng, a)
    if state == "Normal":
        tip = t_caj - rng.uniform(0.005, 0.075)
    elif state == "Borderline":
        tip = t_caj - rng.uniform(0.125, 0.205)
    else:
        tip = t_caj + rng.uniform(0.055, 0.12)
    return np.array(path + [(a.s_svc + 0.003, (path[-1][1] + tip) / 2),
                            (a.s_svc + (0.004 if state != "Abnormal" else rng.uniform(0.01, 0.05)), tip)])


def swan_path(rng, a: phantom.Anatomy, t_caj: float) -> np.ndarray:
    st, tc = a.s_tr, a.t_c
    path = _venous_entry(rng, a) + [(a.s_svc, t_caj), (a.s_svc + 0.03, t_caj + 0.07), (st + 0.05, t_caj + 0.11),
                                    (st + 0.06, tc + 0.10), (st + 0.02, tc + 0.04)]
    if rng.random() < 0.7:  # right pulmonary artery
        return np.array(path + [(st - 0.06, tc + 0.06), (st - rng.uniform(0.14, 0.22), tc + rng.uniform(0.05, 0.12))])
    return np.array(path + [(st + 0.08, tc + 0.01), (st + rng.uniform(0.14, 0.2), tc + rng.uniform(0.0, 0.07))])


# ----------------------------------------------------------------------------------------------

def render(rng: np.random.Generator, patient_rng: np.random.Generator, tubes: list[tuple[str, str]],
           scale: float = 1.0, draw_labelled: bool = True) -> tuple[np.ndarray, Geometry]:
    """One hard film: ``(uint8 image, Geometry)``. ``tubes`` are ``(label, state)`` pairs, e.g.
    ``("CVC - Normal", "Normal")``. ``draw_labelled=False`` makes the same film without the labelled
    lines (every random draw still happens), so tests can see exactly what those lines added."""
    width, height = image_size(rng, scale)
    anatomy, t_caj = sample_anatomy(patient_rng, rng)
    k = max(width, height) / 2000.0
    paths = []
    for label, state in tubes:
        family = label.split(" - ")[0] if " - " in label else "Swan Ganz"
        if family == "ETT":
            points = ett_path(rng, anatomy, state)
        elif family == "NGT":
            points = ngt_path(rng, anatomy, state)
        elif family == "CVC":
            points = cvc_path(rng, anatomy, t_caj, state)
        else:
            points = swan_path(rng, anatomy, t_caj)
        paths.append((label, family, state, phantom.chaikin(points, 4)))
    landmarks = {"carina": (anatomy.s_tr, anatomy.t_c), "diaphragm": (anatomy.s_oe, anatomy.t_d),
                 "cavo-atrial junction": (anatomy.s_svc, t_caj), "trachea": (anatomy.s_tr, anatomy.t_c - 0.1)}
    frame = phantom.body_frame(width, height)
    geometry = None
    for attempt in range(13):  # a smaller pose until every tip that must be on the film is well inside it
        pose, angle = sample_pose(rng, width, height, shrink=1.0 - attempt / 12)  # the last is upright
        geometry = Geometry(width, height, frame, pose, angle, landmarks)
        margin = 0.03 * min(width, height)
        ok = True
        for _, _, state, st in paths:
            tip = geometry.to_px(st[-1:])[0]
            inside = margin <= tip[0] <= width - 1 - margin and margin <= tip[1] <= height - 1 - margin
            ok &= (not inside) if state == "Incompletely Imaged" else inside
        if ok:
            break
    background = phantom.render_anatomy(rng, anatomy, width, height, pose=geometry.pose, ecg=False, tone=TONE,
                                        texture=texture(rng, anatomy))
    opacity = overlays.Opacity(height, width)
    for label, family, _, st in paths:
        (w0, w1), (a0, a1) = FAMILY_STYLE[family]
        line = geometry.to_px(st)
        stripe_w, alpha = max(1.0, rng.uniform(w0, w1) * k), rng.uniform(a0, a1)
        body = (rng.uniform(40, 55) * k, rng.uniform(0.02, 0.05)) if family == "ETT" and rng.random() < 0.6 else None
        if draw_labelled:
            if body:
                opacity.line(line, *body)
            opacity.line(line, stripe_w, alpha)
        geometry.lines.append((label, line))
    geometry.distractors = overlays.draw_distractors(rng, opacity, geometry.to_px, width, height, k)
    image = opacity.compose(background, rng.uniform(2.0, 5.0), rng)
    geometry.markers = overlays.burn_markers(rng, image, k)
    return image, geometry
