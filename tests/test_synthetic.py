"""The synthetic dataset: Kaggle layout, determinism, floors, and labels that agree with the pixels.

Easy style: the pixel checks read only the JPEGs and the CSV labels. The zones below are written out
here from the rules in the ``ranzcr_tf.synth.generate`` docstring (not imported from the generator),
so a change in the drawing that breaks a rule, or labels that drift from their images, fails here.

Hard style: tips are measured against the landmarks from the returned geometry with the rules of
the ``ranzcr_tf.synth.hard`` docstring, written out here again; what the labelled lines add to the
pixels is seen by rendering the same film without them.
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
from ranzcr_tf.synth import studies
from ranzcr_tf.synth.preview import make_preview

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


@pytest.fixture(scope="module")
def hard_dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic_hard"))
    summary = synthetic.make_dataset(out, n_train=40, n_test=16, seed=3, workers=1, scale=0.3, style="hard")
    return out, summary


@pytest.fixture(params=["easy", "hard"])
def any_dataset(request):
    return request.getfixturevalue("dataset" if request.param == "easy" else "hard_dataset")


def test_kaggle_columns_and_ids(any_dataset):
    out, summary = any_dataset
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


@pytest.mark.parametrize("style", synthetic.STYLES)
def test_a_few_studies_have_no_tube_as_in_the_real_data(style):
    """About 4% of real studies show no tube at all (0.719 x 0.723 x 0.08 x 0.972 by the group rates); the label
    table alone (no images drawn) of 2,000 studies keeps that share."""
    uids = [str(i) for i in range(2000)]
    table, _ = synthetic._split_table(0, "train", uids, style)
    no_tube = float((table[list(L.LABELS)].sum(axis=1) == 0).mean())
    assert 0.02 < no_tube < 0.07, no_tube


def test_every_row_has_its_image_and_back(any_dataset):
    out, _ = any_dataset
    for split, csv in (("train", "train.csv"), ("test", "sample_submission.csv")):
        rows = {f"{u}.jpg" for u in _read(out, csv)[L.ID_COLUMN]}
        files = set(os.listdir(os.path.join(out, split)))
        assert rows == files, split


def test_annotations_inside_their_image_and_on_a_tube(dataset):
    out, _ = dataset
    train, annotations = _read(out, "train.csv").set_index(L.ID_COLUMN), _read(out, "train_annotations.csv")
    # The default annotated fraction, 0.3 of the 40 train studies, as in the real data.
    assert annotations[L.ID_COLUMN].nunique() == 12
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


@pytest.mark.parametrize("style", ["easy", "hard"])
def test_same_seed_same_bytes_any_worker_count(tmp_path, style):
    kwargs = dict(n_train=10, n_test=4, seed=11, scale=0.1, style=style, annotated_fraction=0.5)
    synthetic.make_dataset(str(tmp_path / "a"), workers=1, **kwargs)
    synthetic.make_dataset(str(tmp_path / "b"), workers=2, **kwargs)
    synthetic.make_dataset(str(tmp_path / "a"), workers=1, **kwargs)  # rerun in place is allowed
    a, b = _digest(str(tmp_path / "a")), _digest(str(tmp_path / "b"))
    assert len(a) == 10 + 4 + 4 and a == b
    synthetic.make_dataset(str(tmp_path / "c"), workers=1, **{**kwargs, "seed": 12})
    assert _digest(str(tmp_path / "c"))["train.csv"] != a["train.csv"]
    assert len(pd.read_csv(tmp_path / "a" / "train_annotations.csv")) > 0


def test_realistic_size_at_scale_one():
    sizes = []
    for index in range(4):
        data, drawn, (w, h) = studies.render_study(0, "train", index, index, (0,) * 10 + (1,), (2,), scale=1.0)
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image.shape == (h, w)
        assert 1500 <= max(w, h) <= 2600 and 0.75 <= w / h <= 1.3
        assert [label for label, _ in drawn] == ["CVC - Normal", "Swan Ganz Catheter Present"]
        sizes.append(w > h)
    more = [studies.render_study(0, "test", i, i, (0,) * 11, (), scale=0.05)[2] for i in range(20)]
    assert any(sizes + [w > h for w, h in more]) and not all(sizes + [w > h for w, h in more]), "both orientations"


def test_bad_input_and_stale_folder(tmp_path):
    with pytest.raises(ValueError, match="n_train"):
        synthetic.make_dataset(str(tmp_path), n_train=0, n_test=1)
    with pytest.raises(ValueError, match="scale"):
        synthetic.make_dataset(str(tmp_path), n_train=2, n_test=1, scale=10)
    with pytest.raises(ValueError, match="style='medium'"):
        synthetic.make_dataset(str(tmp_path), n_train=2, n_test=1, style="medium")
    with pytest.raises(ValueError, match="annotated_fraction=1.5"):
        synthetic.make_dataset(str(tmp_path), n_train=2, n_test=1, annotated_fraction=1.5)
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


def test_cli_and_preview(tmp_path, capsys):
    out = tmp_path / "cli"
    sheet = tmp_path / "sheet.png"
    assert synthetic.main(["--out-dir", str(out), "--n-train", "6", "--n-test", "2", "--seed", "0", "--workers", "1",
                           "--scale", "0.1", "--preview", str(sheet), "--overlay"]) == 0
    assert len(pd.read_csv(out / "train.csv")) == 6
    image = cv2.imread(str(sheet))
    assert image is not None and image.shape[0] > 500 and image.std() > 20
    both = tmp_path / "both.png"
    # --out, the older spelling of --out-dir, still works
    assert synthetic.main(["--out", str(tmp_path / "hard"), "--n-train", "4", "--n-test", "1", "--workers", "1",
                           "--style", "hard", "--scale", "0.1", "--preview", str(both), "--preview-styles", "easy,hard",
                           "--overlay"]) == 0
    one = make_preview(str(tmp_path / "hard"), str(tmp_path / "one.png"), styles=["hard"], data_style="hard", scale=0.1)
    one_height = cv2.imread(one).shape[0]
    assert cv2.imread(str(both)).shape[0] == 2 * one_height, "one block of films per style"
    # 4 studies fill one row of 4 (6 studies: two rows): no empty rows between the styles' blocks
    assert one_height < image.shape[0] <= 2 * one_height
    assert synthetic.main(["--out-dir", str(tmp_path / "x"), "--n-train", "2", "--n-test", "1", "--preview",
                           str(both), "--preview-styles", "easy,medium"]) == 2
    assert "unknown style medium" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Hard style.

def _labels(ett=None, ngt=None, cvc=(), swan=False):
    """A label tuple and CVC line states from ETT / NGT state names, CVC state indices and a Swan flag."""
    y = [0] * len(L.LABELS)
    for name in (ett, ngt):
        if name:
            y[L.LABELS.index(name)] = 1
    for state in cvc:
        y[7 + state] = 1
    y[10] = int(swan)
    return tuple(y), tuple(cvc)


def hard_state(label: str, tip_st, landmarks, tip_inside: bool) -> str:
    """The state a labelled line's tip implies, by the rules of the ``ranzcr_tf.synth.hard`` docstring
    (thresholds at the middle of each gap between the documented ranges)."""
    s, t = tip_st
    if label.startswith("ETT"):
        d = landmarks["carina"][1] - t
        return "Abnormal" if d < -0.01 or d > 0.195 else ("Borderline" if d < 0.06 else "Normal")
    if label.startswith("NGT"):
        if not tip_inside:
            return "Incompletely Imaged"
        e = t - landmarks["diaphragm"][1]
        return "Normal" if e > 0.015 else ("Borderline" if e > -0.115 else "Abnormal")
    if label.startswith("CVC"):
        c = t - landmarks["cavo-atrial junction"][1]
        return "Abnormal" if c > 0.025 or c < -0.245 else ("Normal" if c > -0.10 else "Borderline")
    return "Present" if abs(s - landmarks["carina"][0]) >= 0.10 else "not in a pulmonary artery"


HARD_CASES = [_labels("ETT - Normal", "NGT - Normal", (2,)), _labels("ETT - Borderline", "NGT - Borderline", (1,)),
              _labels("ETT - Abnormal", "NGT - Abnormal", (0,)), _labels(None, "NGT - Incompletely Imaged", (0, 2)),
              _labels("ETT - Abnormal", "NGT - Abnormal", (1, 2), swan=True), _labels(None, None, ())]


@pytest.fixture(scope="module")
def hard_films():
    """48 hard films (every state, several tips each) with the same film drawn without its labelled lines."""
    films = []
    for index in range(48):
        labels, cvc = HARD_CASES[index % len(HARD_CASES)]
        image, geometry = studies.hard_study(5, "train", index, index // 3, labels, cvc, scale=0.25)
        bare, _ = studies.hard_study(5, "train", index, index // 3, labels, cvc, scale=0.25, draw_labelled=False)
        films.append((labels, cvc, image, bare, geometry))
    return films


def test_hard_tips_agree_with_labels_via_landmarks(hard_films):
    seen = set()
    for labels, cvc, image, _, geometry in hard_films:
        expected = sorted([L.LABELS[k] for k in range(7) if labels[k]] + [L.LABELS[7 + c] for c in cvc]
                          + ([L.LABELS[10]] if labels[10] else []))
        assert sorted(label for label, _ in geometry.lines) == expected
        h, w = image.shape
        for label, line in geometry.lines:
            tip = line[-1]
            inside = 0 <= tip[0] < w and 0 <= tip[1] < h
            state = hard_state(label, geometry.to_body(tip)[0], geometry.landmarks, inside)
            assert state == (label.split(" - ")[1] if " - " in label else "Present"), (label, state)
            if label != "NGT - Incompletely Imaged":
                assert inside, f"{label}: its tip must be on the film"
            seen.add(label)
    assert seen == set(L.LABELS), "every label was drawn"


def test_hard_lines_are_the_only_difference_and_are_thin_and_faint(hard_films):
    over_dark, over_bright = [], []
    for _labels, _, image, bare, geometry in hard_films:
        added = image.astype(np.int16) - bare.astype(np.int16)
        near = np.zeros(image.shape, np.uint8)
        reach = int(np.ceil(60 * max(image.shape) / 2000)) + 4  # the ETT's faint body is up to 55 px at 2,000 px
        for label, line in geometry.lines:
            pts = np.round(line * 16).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(near, [pts], False, 1, reach, cv2.LINE_8, 4)
            inside = line[(line[:, 0] >= 0) & (line[:, 0] < image.shape[1] - 1) & (line[:, 1] >= 0)
                          & (line[:, 1] < image.shape[0] - 1)]
            cells = np.round(inside).astype(int)
            hits = [added[max(0, y - 1):y + 2, max(0, x - 1):x + 2].max() > 0 for x, y in cells]
            assert np.mean(hits) >= 0.9, f"{label}: the drawn line is at its geometry"
            for x, y in cells:
                step = int(added[max(0, y - 1):y + 2, max(0, x - 1):x + 2].max())
                (over_bright if bare[y, x] >= 150 else over_dark if bare[y, x] <= 90 else []).append(step)
        assert not added[near == 0].any(), "nothing but the labelled lines depends on the labels"
        if not geometry.lines:
            assert not added.any()
    assert 3 <= np.median(over_dark) <= 60, "faint: a few tens of grey levels over the lung at most"
    assert np.median(over_bright) < np.median(over_dark), "less contrast behind the heart, spine and abdomen"


def test_hard_realistic_size_and_line_width():
    for index in range(3):
        labels, cvc = _labels(None, "NGT - Normal", (2,))
        image, geometry = studies.hard_study(2, "test", index, index, labels, cvc, scale=1.0)
        bare, _ = studies.hard_study(2, "test", index, index, labels, cvc, scale=1.0, draw_labelled=False)
        h, w = image.shape
        assert 1400 <= max(w, h) <= 2600
        added = (image.astype(np.int16) - bare).clip(0)
        length = 0.0
        for _, line in geometry.lines:
            inside = (line[:, 0] >= 0) & (line[:, 0] < w) & (line[:, 1] >= 0) & (line[:, 1] < h)
            length += np.linalg.norm(np.diff(line, axis=0), axis=1)[inside[1:] & inside[:-1]].sum()
        # Equivalent width (added grey levels over length times the line's typical peak), in pixels:
        # 3-10 px at 2,000 px for the NGT and the CVC (their real calibre), give or take the anti-aliasing.
        peak = np.percentile(added[added > 0], 90)
        width = added.sum() / (length * peak)
        assert 2.0 <= width <= 11.0 * max(w, h) / 2000, width


def test_hard_distractors_present_and_never_annotated(hard_films, hard_dataset):
    kinds = [set(geometry.distractors) for *_, geometry in hard_films]
    assert np.mean([bool(k) for k in kinds]) >= 0.6, "most films carry distractors"
    everything = set().union(*kinds)
    assert {"ecg electrode", "ecg lead", "cable"} <= everything and len(everything) >= 5, everything
    assert any(geometry.markers for *_, geometry in hard_films), "side markers and text"
    # A film without any tube still has its distractors, and no labelled line.
    empty = [(image, geometry) for labels, _, image, _, geometry in hard_films if not any(labels)]
    assert empty and all(not g.lines for _, g in empty) and any(g.distractors for _, g in empty)
    out, _ = hard_dataset
    train, annotations = _read(out, "train.csv").set_index(L.ID_COLUMN), _read(out, "train_annotations.csv")
    assert annotations[L.ID_COLUMN].nunique() == 12, "0.3 of 40 studies annotated"
    for uid, rows in annotations.groupby(L.ID_COLUMN):
        positive = [k for k in L.LABELS if train.loc[uid, k] == 1]
        assert set(rows["label"]) == set(positive), "one row per labelled tube, none for a distractor"
        assert len(rows) <= len(positive) + 1  # two CVC lines of one state give two rows
        image = _image(out, "train", uid)
        for data in rows["data"]:
            pts = np.array(json.loads(data))
            # The line is brighter than its surroundings at the clicked points (JPEG and noise allowed).
            lift = [int(image[max(0, y - 1):y + 2, max(0, x - 1):x + 2].max())
                    - float(np.median(image[max(0, y - 6):y + 7, max(0, x - 6):x + 7])) for x, y in pts]
            assert np.mean(lift) > 2, lift


def test_hard_rotation_and_anatomy_move_the_landmarks(hard_films):
    angles = [geometry.angle_deg for *_, geometry in hard_films]
    assert max(angles) - min(angles) > 8 and max(abs(a) for a in angles) <= 10
    carina_px, axis_deg, carina_t = [], [], []
    for *_, geometry in hard_films:
        s, t = geometry.landmarks["carina"]
        top, bottom = geometry.to_px([(s, 0.0), (s, 1.0)])
        carina_px.append(geometry.to_px([(s, t)])[0] / [geometry.width, geometry.height])
        axis_deg.append(np.degrees(np.arctan2(top[0] - bottom[0], bottom[1] - top[1])))
        carina_t.append(t)
        np.testing.assert_allclose(geometry.to_body(geometry.to_px([(s, t)]))[0], (s, t), atol=1e-9)
    np.testing.assert_allclose(axis_deg, angles, atol=1e-6)  # the body axis turns with the pose
    assert np.ptp(np.array(carina_px)[:, 0]) > 0.05 and np.ptp(carina_t) > 0.04, "landmarks move"


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_annotated_fraction(tmp_path, fraction):
    summary = synthetic.make_dataset(str(tmp_path), n_train=60, n_test=2, seed=4, workers=1, scale=0.05,
                                     annotated_fraction=fraction, style="hard")
    train = pd.read_csv(tmp_path / "train.csv")
    with_tube = int((train[list(L.LABELS)].sum(axis=1) > 0).sum())
    assert summary["n_annotated_images"] == min(with_tube, round(fraction * 60))
