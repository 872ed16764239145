"""The synthetic dataset: Kaggle layout, determinism, floors, and labels that agree with the pixels.

The pixel checks read only the JPEGs and the CSV labels. The zones below are written out here from
the rules in the ``ranzcr_tf.synth.generate`` docstring (not imported from the generator), so a change in
the drawing that breaks a rule, or labels that drift from their images, fails here.
"""

from __future__ import annotations

import hashlib
import json
import os

import cv2
import numpy as np
import pandas as pd
import pytest

from ranzcr_tf import labels as L
from ranzcr_tf.synth import generate as synthetic

BRIGHT = 215  # tubes are drawn >= 238, anatomy <= 170 plus noise


def frame_zone(image: np.ndarray, s0: float, s1: float, t0: float, t1: float) -> np.ndarray:
    """Tube-bright mask of a zone given in body-frame units (frame = centred min(w, h) box, full height)."""
    h, w = image.shape
    fw = min(w, h)
    x0 = (w - fw) / 2
    xa, xb = int(np.floor(max(0, x0 + s0 * fw))), int(np.ceil(min(w, x0 + s1 * fw)))
    ya, yb = int(np.floor(max(0, t0 * h))), int(np.ceil(min(h, t1 * h)))
    out = np.zeros_like(image, dtype=bool)
    out[ya:yb, xa:xb] = image[ya:yb, xa:xb] >= BRIGHT
    return out


def bright(image, s0, s1, t0, t1, min_pixels: int = 3) -> bool:
    return int(frame_zone(image, s0, s1, t0, t1).sum()) >= min_pixels


def lowest_t(image, s0, s1, t0, t1) -> float | None:
    mask = frame_zone(image, s0, s1, t0, t1)
    rows = np.flatnonzero(mask.sum(axis=1) >= 1)
    return None if len(rows) == 0 else (rows[-1] + 0.5) / image.shape[0]


def ett_from_pixels(image) -> str | None:
    tip = lowest_t(image, 0.47, 0.53, 0.0, 0.46)
    if tip is None:
        return None
    if tip < 0.17 or tip > 0.385:
        return "ETT - Abnormal"
    return "ETT - Normal" if tip < 0.315 else "ETT - Borderline"


def ngt_from_pixels(image) -> str | None:
    if not bright(image, 0.54, 0.63, 0.03, 0.20):
        return None
    if bright(image, -1.0, 2.0, 0.975, 1.0):
        return "NGT - Incompletely Imaged"
    if bright(image, 0.62, 0.85, 0.79, 0.95):
        return "NGT - Normal"
    tip = lowest_t(image, 0.54, 0.63, 0.0, 0.79)
    return "NGT - Borderline" if tip >= 0.57 else "NGT - Abnormal"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    summary = synthetic.make_dataset(out, n_train=40, n_test=16, seed=3, workers=1, scale=0.3)
    return out, summary


def _read(out, name):
    return pd.read_csv(os.path.join(out, name))


def _image(out, split, uid):
    image = cv2.imread(os.path.join(out, split, f"{uid}.jpg"), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.ndim == 2 and image.dtype == np.uint8, "single-channel 8-bit JPEG"
    return image


def test_kaggle_columns_and_ids(dataset):
    out, summary = dataset
    train, test_labels = _read(out, "train.csv"), _read(out, "test_labels.csv")
    submission, annotations = _read(out, "sample_submission.csv"), _read(out, "train_annotations.csv")
    assert list(train.columns) == list(L.TRAIN_COLUMNS)
    assert list(submission.columns) == list(L.SUBMISSION_COLUMNS)
    assert list(test_labels.columns) == list(L.SUBMISSION_COLUMNS)
    assert list(annotations.columns) == list(L.ANNOTATION_COLUMNS)
    assert len(train) == 40 and len(submission) == 16 and summary["n_train"] == 40
    assert (submission[list(L.LABELS)] == 0).all().all()
    assert list(submission[L.ID_COLUMN]) == list(test_labels[L.ID_COLUMN])
    ids = list(train[L.ID_COLUMN]) + list(submission[L.ID_COLUMN])
    assert len(set(ids)) == len(ids)
    assert all(u.startswith("1.2.826.0.1.3680043.8.498.") and u[26:].isdigit() for u in ids)
    assert train[L.PATIENT_COLUMN].str.fullmatch(r"[0-9a-f]{9}").all()
    per_patient = train.groupby(L.PATIENT_COLUMN).size()
    assert per_patient.max() >= 2 and per_patient.nunique() >= 2, "some patients have several studies"
    values = pd.concat([train[list(L.LABELS)], test_labels[list(L.LABELS)]])
    assert set(np.unique(values.to_numpy())) <= {0, 1}
    for group in ("ETT", "NGT"):  # one tube per family
        assert (values[list(L.GROUPS[group])].sum(axis=1) <= 1).all()
    assert (values.sum(axis=1) == 0).any() or len(values) < 100


def test_every_row_has_its_image_and_back(dataset):
    out, _ = dataset
    for split, csv in (("train", "train.csv"), ("test", "sample_submission.csv")):
        rows = {f"{u}.jpg" for u in _read(out, csv)[L.ID_COLUMN]}
        files = set(os.listdir(os.path.join(out, split)))
        assert rows == files, split


def test_annotations_inside_their_image_and_on_a_tube(dataset):
    out, _ = dataset
    train, annotations = _read(out, "train.csv").set_index(L.ID_COLUMN), _read(out, "train_annotations.csv")
    assert 0 < annotations[L.ID_COLUMN].nunique() < len(train), "a share of the images is annotated"
    assert annotations["data"].str.match(r"^\[\[\d+, \d+\](, \[\d+, \d+\])*\]$").all(), "Kaggle's data format"
    for uid, group in annotations.groupby(L.ID_COLUMN):
        image = _image(out, "train", uid)
        h, w = image.shape
        for _, row in group.iterrows():
            assert train.loc[uid, row["label"]] == 1, "an annotation names a positive label of its image"
            pts = np.array(json.loads(row["data"]))
            assert pts.shape[1] == 2 and len(pts) >= 2
            assert (pts[:, 0] >= 0).all() and (pts[:, 0] < w).all() and (pts[:, 1] >= 0).all() and (pts[:, 1] < h).all()
            # The points sit on the drawn line: most have a tube-bright pixel within 2 px.
            near = [image[max(0, y - 2):y + 3, max(0, x - 2):x + 3].max() >= BRIGHT for x, y in pts]
            assert np.mean(near) >= 0.8


@pytest.mark.parametrize("split", ["train", "test"])
def test_labels_agree_with_pixels(dataset, split):
    out, _ = dataset
    frame = _read(out, "train.csv" if split == "train" else "test_labels.csv")
    for _, row in frame.iterrows():
        image = _image(out, split, row[L.ID_COLUMN])
        uid = row[L.ID_COLUMN][-6:]
        on = {k for k in L.LABELS if row[k] == 1}
        ett = [k for k in L.GROUPS["ETT"] if k in on]
        ngt = [k for k in L.GROUPS["NGT"] if k in on]
        assert ett_from_pixels(image) == (ett[0] if ett else None), uid
        assert ngt_from_pixels(image) == (ngt[0] if ngt else None), uid
        swan = "Swan Ganz Catheter Present" in on
        assert bright(image, 0.20, 0.36, 0.42, 0.56) == swan, uid
        cvc = {k.split(" - ")[1] for k in L.GROUPS["CVC"] if k in on}
        if swan:
            continue  # the Swan-Ganz enters like a CVC and crosses the CVC zones
        assert bright(image, -1.0, 0.46, 0.0, 0.30) == bool(cvc), uid
        lower_svc = bright(image, 0.38, 0.46, 0.40, 0.50)
        if "Normal" in cvc:
            assert lower_svc, uid
        if not cvc & {"Normal", "Abnormal"}:
            assert not lower_svc, uid
        if bright(image, 0.38, 0.48, 0.52, 0.67):
            assert "Abnormal" in cvc, uid
        if "Abnormal" not in cvc:
            assert not bright(image, 0.38, 0.48, 0.52, 0.67), uid
        if not on:
            assert not (image >= BRIGHT).any(), f"{uid}: no tube, yet tube-bright pixels"


def test_positive_floor_and_rates(tmp_path):
    # Floors are decided on the label table alone; tiny images keep this fast.
    summary = synthetic.make_dataset(str(tmp_path), n_train=300, n_test=100, seed=1, workers=2, scale=0.05)
    assert min(summary["train_positives"].values()) >= 20
    assert min(summary["test_positives"].values()) >= 3
    train = pd.read_csv(tmp_path / "train.csv")
    rates = train[list(L.LABELS)].mean()
    assert rates["CVC - Normal"] > 0.5 and rates["ETT - Normal"] > 0.15 and rates["ETT - Abnormal"] < 0.1
    assert 2 <= train[L.PATIENT_COLUMN].value_counts().mean() <= 9, "several studies per patient"


def _digest(folder: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    kwargs = dict(n_train=10, n_test=4, seed=11, scale=0.1)
    synthetic.make_dataset(str(tmp_path / "a"), workers=1, **kwargs)
    synthetic.make_dataset(str(tmp_path / "b"), workers=2, **kwargs)
    synthetic.make_dataset(str(tmp_path / "a"), workers=1, **kwargs)  # rerun in place is allowed
    a, b = _digest(str(tmp_path / "a")), _digest(str(tmp_path / "b"))
    assert len(a) == 10 + 4 + 4 and a == b
    synthetic.make_dataset(str(tmp_path / "c"), workers=1, **{**kwargs, "seed": 12})
    assert _digest(str(tmp_path / "c"))["train.csv"] != a["train.csv"]


def test_realistic_size_at_scale_one():
    sizes = []
    for index in range(4):
        data, drawn, (w, h) = synthetic.render_study(0, "train", index, index, (0,) * 10 + (1,), (2,), scale=1.0)
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image.shape == (h, w)
        assert 1500 <= max(w, h) <= 2600 and 0.75 <= w / h <= 1.3
        assert [label for label, _ in drawn] == ["CVC - Normal", "Swan Ganz Catheter Present"]
        sizes.append(w > h)
    more = [synthetic.render_study(0, "test", i, i, (0,) * 11, (), scale=0.05)[2] for i in range(20)]
    assert any(sizes + [w > h for w, h in more]) and not all(sizes + [w > h for w, h in more]), "both orientations"


def test_bad_input_and_stale_folder(tmp_path):
    with pytest.raises(ValueError, match="n_train"):
        synthetic.make_dataset(str(tmp_path), n_train=0, n_test=1)
    with pytest.raises(ValueError, match="scale"):
        synthetic.make_dataset(str(tmp_path), n_train=2, n_test=1, scale=10)
    synthetic.make_dataset(str(tmp_path), n_train=3, n_test=2, seed=0, workers=1, scale=0.05)
    # A killed run's temporary file (images are written to a temporary name, then renamed) does not
    # block the rerun, which removes it and writes the same dataset again.
    stray = tmp_path / "train" / ".tmp-0123abcd-1.2.3.jpg"
    stray.write_bytes(b"\xff\xd8 half an image")
    before = {p.name: p.read_bytes() for p in (tmp_path / "train").iterdir() if p.name != stray.name}
    synthetic.make_dataset(str(tmp_path), n_train=3, n_test=2, seed=0, workers=2, scale=0.05)
    assert {p.name: p.read_bytes() for p in (tmp_path / "train").iterdir()} == before
    with pytest.raises(ValueError, match="another dataset"):
        synthetic.make_dataset(str(tmp_path), n_train=3, n_test=2, seed=1, workers=1, scale=0.05)


def test_cli_and_preview(tmp_path):
    out = tmp_path / "cli"
    sheet = tmp_path / "sheet.png"
    summary = synthetic.main(["--out", str(out), "--n-train", "6", "--n-test", "2", "--seed", "0", "--workers", "1",
                              "--scale", "0.1", "--preview", str(sheet), "--overlay"])
    assert summary["n_train"] == 6 and (out / "train.csv").exists()
    image = cv2.imread(str(sheet))
    assert image is not None and image.shape[0] > 500 and image.std() > 20
