"""Synthetic RSNA Intracranial Hemorrhage data: real DICOM head-CT slices in the Kaggle layout.

    python -m ranzcr_tf.synth.ich --out-dir data/ich --patients 40 --seed 0 [--size 128] [--test-fraction 0.25]

writes, as the competition's files are laid out:

* ``stage_2_train.csv``: the long label table, columns ``ID,Label``, six rows ``ID_<sop>_<label>`` per train
  image in the order of :data:`ICH_LABELS` (``epidural, intraparenchymal, intraventricular, subarachnoid,
  subdural, any``), images in random order;
* ``stage_2_train/ID_<sop>.dcm`` and ``stage_2_test/ID_<sop>.dcm``: one CT slice per file (CT Image Storage,
  explicit VR little endian, file meta; PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID in the
  competition's ``ID_<hex>`` form, ImagePositionPatient, SliceLocation, InstanceNumber, PixelSpacing,
  RescaleSlope/Intercept, WindowCenter/Width, BitsAllocated/Stored, PixelRepresentation), uint16 or int16
  pixels by "scanner" (per patient: unsigned 12-bit or signed 16-bit, intercept -1024);
* ``stage_2_sample_submission.csv``: ``ID,Label`` rows for the test images, every Label 0.5;
* ``test_labels.csv``: the true test labels in the same long layout (not part of the competition; it lets a
  submission be scored here);
* ``quirks.csv``: ``id,split,quirk`` for the files written with a known problem (below).

Patients are split between train and test (``--test-fraction`` of them, at least one when there are two
or more). Each patient has one study of one series of 8-16 consecutive axial slices 5 mm apart. SOP UIDs
are random, so neither file names nor the CSV order reveal the slice order: only the headers'
``ImagePositionPatient`` do, as in the real data.

**The phantom** (HU): air -1000 outside the head; a skull ring (bone about +1000 HU, 3.5-5% of the image
thick) whose size follows the head's profile from the skull base to the vertex; brain about +30 HU (a
slightly brighter cortex band); a thin CSF rim under the skull and a few sulci (+8 HU); two lateral
ventricles (+5 HU) on the middle slices; Gaussian noise (sigma 4-7 HU). Bleeds are +60..80 HU, only
30-50 HU above the brain: clear in the brain window (40/80), nearly invisible in the bone window, which
is what windowing is for. Where a bleed is depends on its type:

* **epidural**: a biconvex lens against the inner table, over a short arc;
* **subdural**: a thin crescent along the inner table, over a long arc;
* **intraparenchymal**: an elliptic blob inside the brain, away from the ventricles;
* **intraventricular**: the dependent (posterior) part of a ventricle filled with blood (only on slices
  with ventricles);
* **subarachnoid**: the CSF rim and the sulci over an arc filled with blood (thin lines).

**Adjacent slices carry evidence.** Each bleed spans 2-5 consecutive slices (3-4 most often). Along its span
a bleed has a profile ``s = sin(pi * (k + 0.5) / L)`` (slice ``k`` of ``L``): its size scales with ``s``
and its contrast with ``0.15 + 0.85 * s`` (partial volume: the blood fills part of the slice's 5 mm).
At the span's ends (``s`` 0.31-0.71) the bleed is small and faint, hard to call on that slice alone,
while the neighbour inward shows it clearly; every slice of the span is labelled. So a model that
sees a slice's neighbours as extra channels has information a single-slice model lacks (a hand-feature
check and ``benchmarks/ich_slices.py`` confirm it: docs/results.md#ich-adjacent-slices). ``any`` is the
maximum of the five. About 30-40% of slices are positive (a patient has bleeds with probability 0.8,
1-3 of them; types are dealt per split from a shuffled deck that starts with one of each type, then follows
the real data's mix roughly, epidural rarest, so a split with 5 bleeds or more has every type).

**Quirks** (seeded, listed in ``quirks.csv``; their label rows exist as in the real data):

* ``intercept_12bit``: the whole series of one train patient (and one test patient when there are
  two or more test patients) is written as the RSNA files with the wrong intercept: BitsStored 12,
  unsigned, RescaleIntercept 0, stored value ``HU mod 4096`` (HU clipped at -1000 first). The reader's fix
  (:mod:`ranzcr_tf.prep.dicom`) recovers the HU exactly.
* ``monochrome1``: the whole series of another train patient is marked MONOCHROME1 with the same stored
  values and rescale: by the standard its HU are unchanged (a reader that inverts every MONOCHROME1 file
  would turn its skull black and its air white).
* ``truncated``: one negative train slice cut short in its pixel data (a corrupt file).
* ``no_pixel_data``: one negative train slice written without its Pixel Data element.

Everything is a function of the seed; the default 40 patients at 128 px take a few seconds.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import sys
import time

import numpy as np
import pandas as pd

from ranzcr_tf import cli, io_utils

ICH_LABELS = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
BLEED_TYPES = ICH_LABELS[:5]
# One cycle of bleed types, weighted roughly like the real data (epidural rarest); shuffled per dataset.
_TYPE_CYCLE = ("epidural", "intraparenchymal", "intraparenchymal", "intraventricular", "subarachnoid",
               "subarachnoid", "subdural", "subdural", "subdural")
QUIRKS = ("intercept_12bit", "monochrome1", "truncated", "no_pixel_data")
SPACING_MM = 5.0
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# ----------------------------------------------------------------------------------------------
# Writing one slice.

def ct_slice(stored: np.ndarray, *, sop: str, patient: str, study: str, series: str, z: float, instance: int = 1,
             pixel_mm: float = 0.5, slope: float | None = 1.0, intercept: float | None = -1024.0, bits_stored: int = 16,
             signed: bool = True, photometric: str = "MONOCHROME2", window: tuple[float, float] = (40.0, 80.0)):
    """A pydicom CT Image Storage dataset (with file meta) holding ``stored`` (int16 if ``signed`` else uint16).

    ``slope`` / ``intercept`` ``None`` leave the rescale out (raw values, as a radiograph stores them).
    Only builds the dataset: the caller writes it (:func:`dicom_bytes`). UIDs are taken as given
    (the competition's ``ID_<hex>`` form is not a valid UID; pydicom's value check is off while building).
    """
    from pydicom import config
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    stored = np.ascontiguousarray(stored, dtype=np.int16 if signed else np.uint16)
    with config.disable_value_validation():
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.Modality = "CT"
        ds.PatientID = patient
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = int(instance)
        ds.ImagePositionPatient = [-stored.shape[1] * pixel_mm / 2, -stored.shape[0] * pixel_mm / 2, round(float(z), 3)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = round(float(z), 3)
        ds.SliceThickness = SPACING_MM
        ds.PixelSpacing = [pixel_mm, pixel_mm]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.Rows, ds.Columns = (int(v) for v in stored.shape)
        ds.BitsAllocated = 16
        ds.BitsStored = int(bits_stored)
        ds.HighBit = int(bits_stored) - 1
        ds.PixelRepresentation = 1 if signed else 0
        if slope is not None:
            ds.RescaleSlope = slope
        if intercept is not None:
            ds.RescaleIntercept = intercept
        ds.WindowCenter = window[0]
        ds.WindowWidth = window[1]
        ds.PixelData = stored.tobytes()
    return ds


def dicom_bytes(ds) -> bytes:
    """The DICOM file (preamble, file meta, dataset) as bytes."""
    from pydicom import config

    buf = io.BytesIO()
    with config.disable_value_validation():
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def hu_to_stored(hu: np.ndarray, *, scanner: str, quirk_12bit: bool = False, monochrome1: bool = False) -> dict:
    """HU -> stored values and the header fields that map them back (the inverse of the reader's steps)."""
    if quirk_12bit:
        stored = np.mod(np.rint(np.clip(hu, -1000, 3095)).astype(np.int32), 4096)
        fields = {"bits_stored": 12, "signed": False, "intercept": 0.0}
    elif scanner == "u12":
        stored = np.rint(np.clip(hu, -1024, 3071)).astype(np.int32) + 1024
        fields = {"bits_stored": 12, "signed": False, "intercept": -1024.0}
    else:  # "s16"
        stored = np.rint(np.clip(hu, -2048, 30000)).astype(np.int32) + 1024
        fields = {"bits_stored": 16, "signed": True, "intercept": -1024.0}
    fields["photometric"] = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    return {"stored": stored, **fields}


# ----------------------------------------------------------------------------------------------
# The phantom.

def _angle_gap(theta: np.ndarray, theta0: float) -> np.ndarray:
    return np.abs((theta - theta0 + np.pi) % (2 * np.pi) - np.pi)


class _Head:
    """One patient's anatomy: a function of (rng draw, slice fraction t in [0, 1], image size)."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.size = size
        self.a = rng.uniform(0.33, 0.38)                  # left-right semi-axis, in image widths
        self.b = min(0.46, self.a * rng.uniform(1.12, 1.22))  # anterior-posterior semi-axis
        self.cx, self.cy = rng.uniform(-0.03, 0.03, size=2)
        self.tilt = rng.uniform(-0.17, 0.17)              # radians
        self.skull = rng.uniform(0.035, 0.05)
        self.brain_hu = rng.uniform(28, 35)
        self.noise = rng.uniform(4, 7)
        self.sulci = rng.uniform(0, 2 * np.pi, size=int(rng.integers(6, 11)))
        self.vent_dx = rng.uniform(0.045, 0.06)
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        u, v = (x + 0.5) / size - 0.5 - self.cx, (y + 0.5) / size - 0.5 - self.cy
        c, s = math.cos(self.tilt), math.sin(self.tilt)
        self.x, self.y = c * u + s * v, -s * u + c * v     # head frame, image widths

    def profile(self, t: float) -> float:
        return math.sqrt(max(0.2, 1.0 - ((t - 0.42) / 0.85) ** 2))

    def ventricle_scale(self, t: float) -> float:
        return max(0.0, math.sin(math.pi * (t - 0.28) / 0.5)) if 0.28 < t < 0.78 else 0.0

    def geometry(self, t: float) -> dict:
        f = self.profile(t)
        a, b = self.a * f, self.b * f
        ai, bi = a - self.skull, b - self.skull
        rho_out = np.sqrt((self.x / a) ** 2 + (self.y / b) ** 2)
        rho_in = np.sqrt((self.x / ai) ** 2 + (self.y / bi) ** 2)
        theta = np.arctan2(self.y / bi, self.x / ai)
        depth_px = (1.0 - rho_in) * min(ai, bi) * self.size  # distance inward from the inner table, pixels
        vs = self.ventricle_scale(t)
        vents = []
        if vs > 0.15:
            for side in (-1, 1):
                vx, vy, rx, ry = side * self.vent_dx, -0.01, 0.022 * vs + 0.008, 0.085 * vs + 0.01
                vents.append(((self.x - vx) / rx) ** 2 + ((self.y - vy) / ry) ** 2 <= 1.0)
        return {"rho_out": rho_out, "rho_in": rho_in, "theta": theta, "depth_px": depth_px, "vents": vents,
                "inner": (ai, bi)}

    def draw(self, rng: np.random.Generator, t: float, geo: dict) -> np.ndarray:
        hu = np.full((self.size, self.size), -1000.0, np.float32)
        brain = geo["rho_in"] < 1.0
        skull = (geo["rho_out"] < 1.0) & ~brain
        hu[skull] = 1000.0 + 250.0 * rng.standard_normal(int(skull.sum())).astype(np.float32)
        hu[brain] = self.brain_hu
        hu[brain & (geo["depth_px"] < 0.07 * self.size)] += 5.0  # cortex a little brighter than white matter
        csf = self._csf(geo)
        hu[csf] = 8.0
        for vent in geo["vents"]:
            hu[vent & brain] = 5.0
        hu += self.noise * rng.standard_normal(hu.shape).astype(np.float32) * (hu > -900)
        return hu

    def _csf(self, geo: dict) -> np.ndarray:
        brain = geo["rho_in"] < 1.0
        rim = brain & (geo["depth_px"] < max(1.0, 0.012 * self.size))
        sulci = np.zeros_like(brain)
        half_width = 0.6 / (self.size * 0.3)  # about 1 px wide at the cortex
        for angle in self.sulci:
            sulci |= brain & (_angle_gap(geo["theta"], angle) < half_width) & (geo["depth_px"] < 0.08 * self.size)
        return rim | sulci


def _bleed_mask(kind: str, bleed: dict, geo: dict, size: int, s: float, head: _Head) -> np.ndarray:
    """Where a bleed of ``kind`` is on a slice where its profile is ``s`` (0-1], as a boolean mask."""
    brain = geo["rho_in"] < 1.0
    gap = _angle_gap(geo["theta"], bleed["theta"])
    depth = geo["depth_px"]
    if kind == "epidural":
        half = bleed["span"] * (0.55 + 0.45 * s)
        thick = max(1.5, bleed["thick"] * size * s)
        return brain & (gap < half) & (depth < thick * np.sqrt(np.clip(1 - (gap / half) ** 2, 0, 1)))
    if kind == "subdural":
        half = bleed["span"] * (0.5 + 0.5 * s)
        thick = max(1.2, bleed["thick"] * size * s)
        return brain & (gap < half) & (depth < thick * np.clip(1 - (gap / half) ** 6, 0, 1) ** 0.5)
    if kind == "subarachnoid":
        half = bleed["span"] * (0.5 + 0.5 * s)
        return head._csf(geo) & (gap < half)
    if kind == "intraparenchymal":
        ai, bi = geo["inner"]
        px, py = bleed["r"] * ai * math.cos(bleed["theta"]), bleed["r"] * bi * math.sin(bleed["theta"])
        rx = max(1.5 / size, bleed["radius"] * s)
        ry = rx * bleed["aspect"]
        return brain & (((head.x - px) / rx) ** 2 + ((head.y - py) / ry) ** 2 <= 1.0)
    if kind == "intraventricular":
        mask = np.zeros((size, size), bool)
        for i, vent in enumerate(geo["vents"]):
            if i == bleed["side"] or bleed["both"]:
                ys = head.y[vent]
                if ys.size:
                    cut = ys.max() - (ys.max() - ys.min()) * (0.25 + 0.6 * s)  # dependent (posterior) part
                    mask |= vent & (head.y >= cut)
        return mask
    raise ValueError(kind)


def _draw_bleed_params(rng: np.random.Generator, kind: str) -> dict:
    return {"theta": rng.uniform(-np.pi, np.pi), "span": {"epidural": 0.35, "subdural": 0.9,
                                                          "subarachnoid": 0.7}.get(kind, 0.0) * rng.uniform(0.8, 1.2),
            "thick": {"epidural": 0.07, "subdural": 0.025}.get(kind, 0.0) * rng.uniform(0.8, 1.2),
            "r": rng.uniform(0.35, 0.65), "radius": rng.uniform(0.04, 0.07), "aspect": rng.uniform(0.7, 1.3),
            "side": int(rng.integers(0, 2)), "both": bool(rng.random() < 0.3), "hu": rng.uniform(60, 80)}


# ----------------------------------------------------------------------------------------------
# The dataset.

def _hex_ids(rng: np.random.Generator, n: int, digits: int, taken: set) -> list[str]:
    out = []
    while len(out) < n:
        cand = "ID_" + "".join("0123456789abcdef"[v] for v in rng.integers(0, 16, size=digits))
        if cand not in taken:
            taken.add(cand)
            out.append(cand)
    return out


def _plan_patients(rng: np.random.Generator, n_patients: int, test: set) -> list[dict]:
    """Per patient: split, slice count, z, scanner and bleeds (type, first slice, length).

    Bleed types are dealt per split from a shuffled deck that starts with one of each type and goes on
    with :data:`_TYPE_CYCLE` (weighted like the real data), so a split with 5 bleeds or more has every type.
    """
    patients = []
    for i in range(n_patients):
        n = int(rng.integers(8, 17))
        n_bleeds = int(rng.choice([1, 2, 2, 3])) if rng.random() < 0.8 else 0
        patients.append({"split": "test" if i in test else "train", "n": n, "z0": float(rng.uniform(-40.0, 120.0)),
                         "scanner": str(rng.choice(["u12", "s16"])), "n_bleeds": n_bleeds, "bleeds": []})
    for split in ("train", "test"):
        members = [p for p in patients if p["split"] == split]
        total = sum(p["n_bleeds"] for p in members)
        deck = [BLEED_TYPES[j] for j in rng.permutation(len(BLEED_TYPES))]
        while len(deck) < total:
            deck += [_TYPE_CYCLE[j] for j in rng.permutation(len(_TYPE_CYCLE))]
        order = [(p, b) for p in members for b in range(p["n_bleeds"])]
        for (p, _), kind in zip([order[j] for j in rng.permutation(len(order))], deck):
            p["bleeds"].append(_place_bleed(rng, kind, p["n"]))
    return patients


def _place_bleed(rng: np.random.Generator, kind: str, n: int) -> dict:
    length = int(rng.choice([2, 3, 3, 4, 4, 5]))
    if kind == "intraventricular":  # within the ventricle slices (t in [0.33, 0.72])
        lo, hi = math.ceil(0.33 * (n - 1)), math.floor(0.72 * (n - 1))
        length = max(2, min(length, hi - lo + 1))
        start = int(rng.integers(lo, max(lo, hi - length + 1) + 1))
    else:
        start = int(rng.integers(0, n - length + 1))
    return {"kind": kind, "start": start, "length": length, **_draw_bleed_params(rng, kind)}


def _validate(out_dir: str, n_patients: int, seed: int, size: int, test_fraction: float) -> None:
    if int(n_patients) != n_patients or n_patients < 1:
        raise ValueError(f"patients={n_patients}: ask for at least 1 patient (--patients)")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed={seed}: use a non-negative integer seed (--seed)")
    if int(size) != size or not 32 <= size <= 1024:
        raise ValueError(f"size={size}: use an image size in pixels between 32 and 1024 (--size; real slices are 512)")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: use a share of the patients in [0, 1) (--test-fraction)")
    for split in ("stage_2_train", "stage_2_test"):
        folder = os.path.join(out_dir, split)
        if os.path.isdir(folder) and any(n.endswith(".dcm") for n in os.listdir(folder)):
            raise ValueError(f"{folder} already holds DICOM files; write to an empty folder (or delete that one) "
                             "so every file has its CSV rows")


def _long_rows(ids: list[str], labels: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"ID": [f"{i}_{name}" for i in ids for name in ICH_LABELS],
                         "Label": labels.reshape(-1).astype(int)})


def make_dataset(out_dir: str, n_patients: int = 40, seed: int = 0, size: int = 128,
                 test_fraction: float = 0.25) -> dict:
    """Write the dataset (module docstring) and return a summary dict. ValueError for bad arguments or a
    folder that already holds DICOM files."""
    _validate(out_dir, n_patients, seed, size, test_fraction)
    if importlib.util.find_spec("pydicom") is None:  # before any folder is made: nothing left behind
        raise ValueError("writing DICOM files needs pydicom, which is not installed: pip install 'ranzcr-tf[dicom]' "
                         "(or pip install pydicom)")
    rng = np.random.default_rng([int(seed), 1902])
    patients = _plan_series(rng, int(n_patients), test_fraction)
    train_ids = [i for i in range(n_patients) if patients[i]["split"] == "train"]
    test_ids = [i for i in range(n_patients) if patients[i]["split"] == "test"]
    quirks = {"intercept_12bit": {train_ids[0]} | ({test_ids[0]} if len(test_ids) >= 2 else set()),
              "monochrome1": {train_ids[1] if len(train_ids) > 1 else train_ids[0]}}
    records, quirk_rows = [], []  # (split, sop, labels[6]); (sop, split, quirk)
    for i, p in enumerate(patients):
        p["datasets"], labels = _draw_series(p, i, int(seed), size, quirks)
        records += [(p["split"], sop, label_row) for sop, label_row in zip(p["sops"], labels)]
        quirk_rows += [(sop, p["split"], name) for sop in p["sops"] for name, members in quirks.items() if i in members]
    damaged = _pick_damaged(rng, patients, train_ids, quirks["intercept_12bit"] | quirks["monochrome1"])
    quirk_rows += [(patients[i]["sops"][k], "train", name) for (i, k), name in damaged.items()]
    _write_series(out_dir, patients, damaged, size)
    shuffle = rng.permutation(len(records))
    records = [records[j] for j in shuffle]
    train = [(sop, lab) for split, sop, lab in records if split == "train"]
    test = [(sop, lab) for split, sop, lab in records if split == "test"]
    paths = _write_tables(out_dir, train, test, quirk_rows)
    train_labels = np.array([lab for _, lab in train]).reshape(-1, 6)
    return {"out_dir": out_dir, "seed": int(seed), "size": int(size), "n_patients": int(n_patients),
            "n_train_patients": len(train_ids), "n_test_patients": len(test_ids),
            "n_train": len(train), "n_test": len(test),
            "train_positives": {name: int(v) for name, v in zip(ICH_LABELS, train_labels.sum(0))},
            "quirks": {name: sum(1 for row in quirk_rows if row[2] == name) for name in QUIRKS}, "paths": paths}


def _plan_series(rng: np.random.Generator, n_patients: int, test_fraction: float) -> list[dict]:
    """Every patient's series plan (split, slices, bleeds, scanner) with its patient, study, series and SOP IDs."""
    n_test = min(n_patients - 1, max(1, round(test_fraction * n_patients))) if test_fraction > 0 else 0
    patients = _plan_patients(rng, n_patients, set(rng.permutation(n_patients)[:n_test].tolist()))
    taken: set = set()
    for p in patients:
        p["patient"], p["study"], p["series"] = _hex_ids(rng, 1, 8, taken) + _hex_ids(rng, 2, 10, taken)
        p["sops"] = _hex_ids(rng, p["n"], 9, taken)
    return patients


def _draw_series(p: dict, index: int, seed: int, size: int, quirks: dict) -> tuple[list, np.ndarray]:
    """Patient ``index``'s slices as pydicom datasets, and their ``(slices, 6)`` labels (a bleed that leaves
    no blood on a slice, e.g. no ventricle there, labels nothing)."""
    head = _Head(np.random.default_rng([seed, 1903, index]), size)
    draw_rng = np.random.default_rng([seed, 1904, index])
    labels = np.zeros((p["n"], 6), np.int64)
    datasets = []
    for k in range(p["n"]):
        t = k / (p["n"] - 1)
        geo = head.geometry(t)
        hu = head.draw(draw_rng, t, geo)
        for bleed in p["bleeds"]:
            j = k - bleed["start"]
            if not 0 <= j < bleed["length"]:
                continue
            s = math.sin(math.pi * (j + 0.5) / bleed["length"])
            mask = _bleed_mask(bleed["kind"], bleed, geo, size, s, head)
            if not mask.any():
                continue
            contrast = 0.15 + 0.85 * s
            noise = head.noise * draw_rng.standard_normal(int(mask.sum())).astype(np.float32)
            hu[mask] = hu[mask] * (1 - contrast) + (bleed["hu"] + noise) * contrast
            labels[k, BLEED_TYPES.index(bleed["kind"])] = 1
        labels[k, 5] = labels[k, :5].max()
        enc = hu_to_stored(hu, scanner=p["scanner"], quirk_12bit=index in quirks["intercept_12bit"],
                           monochrome1=index in quirks["monochrome1"])
        datasets.append(ct_slice(enc["stored"], sop=p["sops"][k], patient=p["patient"], study=p["study"],
                                 series=p["series"], z=p["z0"] + SPACING_MM * k, instance=k + 1, pixel_mm=256.0 / size,
                                 intercept=enc["intercept"], bits_stored=enc["bits_stored"], signed=enc["signed"],
                                 photometric=enc["photometric"]))
    return datasets, labels


def _pick_damaged(rng: np.random.Generator, patients: list[dict], train_ids: list[int], quirky: set) -> dict:
    """Two damaged train files ``{(patient, slice): "truncated" | "no_pixel_data"}``, drawn among negative slices
    of patients without other quirks."""
    candidates = [(i, k) for i in train_ids if i not in quirky for k in range(patients[i]["n"])
                  if not any(b["start"] <= k < b["start"] + b["length"] for b in patients[i]["bleeds"])]
    if len(candidates) < 2:
        candidates = [(i, k) for i in train_ids for k in range(patients[i]["n"])]
    picks = rng.choice(len(candidates), size=2, replace=False)
    return {candidates[int(picks[0])]: "truncated", candidates[int(picks[1])]: "no_pixel_data"}


def _write_series(out_dir: str, patients: list[dict], damaged: dict, size: int) -> None:
    """Every slice as ``stage_2_{train,test}/<sop>.dcm`` (atomic writes), the damaged ones damaged."""
    for split in ("stage_2_train", "stage_2_test"):
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    for i, p in enumerate(patients):
        folder = os.path.join(out_dir, "stage_2_train" if p["split"] == "train" else "stage_2_test")
        for k, ds in enumerate(p.pop("datasets")):
            quirk = damaged.get((i, k))
            if quirk == "no_pixel_data":
                del ds.PixelData
            data = dicom_bytes(ds)
            if quirk == "truncated":
                data = data[: len(data) - (size * size * 2) // 2]  # half the pixel bytes missing
            io_utils.atomic_write_bytes(os.path.join(folder, f"{p['sops'][k]}.dcm"), data)


def _write_tables(out_dir: str, train: list, test: list, quirk_rows: list) -> dict:
    """The label tables, the sample submission and quirks.csv; returns their paths by name."""
    train_frame = _long_rows([s for s, _ in train], np.array([lab for _, lab in train]).reshape(-1, 6))
    test_frame = _long_rows([s for s, _ in test], np.array([lab for _, lab in test]).reshape(-1, 6))
    paths = {name: os.path.join(out_dir, name) for name in
             ("stage_2_train.csv", "stage_2_sample_submission.csv", "test_labels.csv", "quirks.csv")}
    io_utils.atomic_write_text(paths["stage_2_train.csv"], train_frame.to_csv(index=False))
    io_utils.atomic_write_text(paths["stage_2_sample_submission.csv"], test_frame.assign(Label=0.5).to_csv(index=False))
    io_utils.atomic_write_text(paths["test_labels.csv"], test_frame.to_csv(index=False))
    io_utils.atomic_write_text(paths["quirks.csv"],
                               pd.DataFrame(quirk_rows, columns=["id", "split", "quirk"]).to_csv(index=False))
    return paths


def build_parser():
    parser = cli.build_parser(
        "python -m ranzcr_tf.synth.ich",
        "Write a synthetic RSNA Intracranial Hemorrhage dataset (DICOM head-CT phantoms whose bleeds span "
        "consecutive slices) in the Kaggle layout.",
        epilog="Example: python -m ranzcr_tf.synth.ich --out-dir data/ich --patients 40 --seed 0 --size 128")
    parser.add_argument("--out-dir", help="output folder (required; created; must not hold another dataset)")
    cli.hidden_alias(parser, "--out", "out_dir")
    parser.add_argument("--patients", type=int, default=40, help="number of patients, one series each (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default 0)")
    parser.add_argument("--size", type=int, default=128, help="slice size in pixels (default 128; real slices are 512)")
    parser.add_argument("--test-fraction", type=float, default=0.25,
                        help="share of the patients whose slices go to stage_2_test (default 0.25)")
    return parser


def run(args) -> int:
    cli.require(args, "out_dir", "--out-dir DIR")
    start = time.time()
    summary = make_dataset(args.out_dir, args.patients, seed=args.seed, size=args.size,
                           test_fraction=args.test_fraction)
    n_any = summary["train_positives"]["any"]
    print(f"wrote {summary['n_train']} train + {summary['n_test']} test slices ({summary['n_train_patients']} + "
          f"{summary['n_test_patients']} patients, {args.size} px) to {args.out_dir} in {time.time() - start:.1f} s")
    print(f"train positives: {n_any}/{summary['n_train']} any ({n_any / max(1, summary['n_train']):.0%}); "
          + ", ".join(f"{k}={v}" for k, v in summary["train_positives"].items() if k != "any"))
    print("quirks: " + ", ".join(f"{k}={v}" for k, v in summary["quirks"].items()) + " (listed in quirks.csv)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
