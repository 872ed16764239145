"""Synthetic RANZCR CLiP data in the exact Kaggle layout, for demos and tests.

    python -m ranzcr_tf.synth.generate --out data/synthetic --n-train 600 --n-test 200 --seed 0 --preview sheet.png

writes ``train.csv``, ``train/<StudyInstanceUID>.jpg``, ``test/<StudyInstanceUID>.jpg``,
``train_annotations.csv`` (Kaggle's ``[[x, y], ...]`` strings, for about ``annotate_share`` of the
train images that have tubes), ``sample_submission.csv`` (all zeros) and ``test_labels.csv`` (the
true test labels, in submission layout, so a submission can be scored).

Images are single-channel 8-bit JPEGs of a chest-radiograph phantom (:mod:`ranzcr_tf.synth.phantom`):
soft tissue, lungs, mediastinum, heart, spine, ribs, clavicles, diaphragm domes, a gastric bubble,
airways with a visible carina, exposure/gamma/noise variation; long side 1,500-2,600 px times
``scale``, 70% portrait. Studies of one patient share the body shape.

How each label is drawn (frame units: ``t = y / height``; ``s = (x - x0) / w`` with the frame
``x0, w`` from :func:`ranzcr_tf.synth.phantom.body_frame`, i.e. a centred box ``min(width, height)``
wide; image-left is the patient's right). Tubes are at least 238 grey levels, anatomy at most 170
plus noise, so "tube-bright" (>= 215 even after JPEG) means a tube; the zones below hold for every
seed and are what ``tests/test_synthetic.py`` checks on the pixels:

* **ETT** runs down the trachea (s in [0.484, 0.516]); the carina is at t in [0.37, 0.39]. Band
  s in [0.47, 0.53], t <= 0.46 is tube-bright iff the study has an ETT label, and its lowest
  bright pixel (the tip) decides it: t < 0.17 Abnormal (in the neck), 0.17-0.315 Normal (well above
  the carina), 0.315-0.385 Borderline (just above it), > 0.385 Abnormal (in the right main bronchus).
* **NGT** runs down the oesophagus (s in [0.555, 0.585]). The neck zone s in [0.54, 0.63],
  t in [0.03, 0.20] is bright iff an NGT label. Incompletely Imaged: it leaves through the bottom edge
  (rows t >= 0.975 bright). Normal: it curves under the left dome into the stomach (zone s in
  [0.62, 0.85], t in [0.79, 0.95] bright). Otherwise the lowest bright pixel of the column s in
  [0.54, 0.63], t <= 0.79 decides: >= 0.57 Borderline (tip in the distal oesophagus, above the
  diaphragm), < 0.57 Abnormal (coiled in the upper oesophagus, or down a bronchus into the lung).
* **CVC** (one or two lines, so labels overlap) enter on the patient's right, by the internal
  jugular (top edge) or subclavian (left edge), and run down the SVC (s in [0.415, 0.445]). Zone
  s <= 0.46, t <= 0.30 is bright iff a CVC or a Swan-Ganz is present. Normal: tip in the lower SVC,
  t in [0.42, 0.49]; Borderline: tip in the upper SVC, t in [0.30, 0.37]; Abnormal: tip deep in the
  right atrium (t in [0.56, 0.64]) or turned up into the neck. So the lower-SVC zone s in [0.38, 0.46],
  t in [0.40, 0.50] is bright with a Normal line and dark without Normal or Abnormal, and the atrium
  zone s in [0.38, 0.48], t in [0.52, 0.67] is bright only with an Abnormal line (or a Swan-Ganz).
* **Swan Ganz** is a thicker line through the SVC, atrium, ventricle and pulmonary trunk out into
  the right lung: zone s in [0.20, 0.36], t in [0.42, 0.56] is bright iff Swan Ganz is present.

Label frequencies follow the real ``train.csv`` roughly, with a floor of ``min(20, ceil(n / 15))``
positives per column in each split, so column-wise AUC is defined even on a few hundred images.
Everything is a function of ``(seed, split, index)``: the output is byte-identical for any worker
count. The zone rules hold exactly from ``scale=0.1`` (long side >= 150 px) up; smaller images are
fine for smoke tests, but a 2-px tube tip may then land on the wrong side of a band edge.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ranzcr_tf import io_utils
from ranzcr_tf.synth import phantom
from ranzcr_tf.prep.workers import available_cores, ordered_map, start_pool
from ranzcr_tf.labels import ANNOTATION_COLUMNS, GROUPS, ID_COLUMN, LABELS, PATIENT_COLUMN, SUBMISSION_COLUMNS, TRAIN_COLUMNS

UID_PREFIX = "1.2.826.0.1.3680043.8.498."
JPEG_QUALITY = 90
_SPLITS = {"train": 0, "test": 1}
# Tube states in label order, e.g. _NGT[2] == "Incompletely Imaged" is column 3 + 2.
_ETT, _NGT, _CVC = (tuple(x.split(" - ", 1)[1] for x in GROUPS[g]) for g in ("ETT", "NGT", "CVC"))
# Real train.csv rates (RANZCR_DATA.md): group-state probabilities, "none" first.
_ETT_P = [0.719, 0.003, 0.038, 0.240]  # none, Abnormal, Borderline, Normal
_NGT_P = [0.723, 0.009, 0.018, 0.090, 0.160]  # none, Abnormal, Borderline, Incompletely Imaged, Normal
_CVC_COUNT_P = [0.08, 0.62, 0.30]  # 0, 1 or 2 lines -> about 69% Normal, 28% Borderline, 10% Abnormal
_CVC_STATE_P = [0.08, 0.24, 0.68]  # Abnormal, Borderline, Normal (per line)
_SWAN_P = 0.028


def positive_floor(n: int) -> int:
    """Minimum positives per label column in a split of ``n`` studies (20 from 300 studies up)."""
    return min(20, math.ceil(n / 15))


# ----------------------------------------------------------------------------------------------
# The label table: decided up front in one process, so floors and IDs never depend on workers.

def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _sample_split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, list[list[int]], np.ndarray]:
    """Per-study ETT / NGT state (-1 none, else index into the group), CVC line states, Swan flag."""
    ett = rng.choice(4, size=n, p=_ETT_P) - 1
    ngt = rng.choice(5, size=n, p=_NGT_P) - 1
    counts = rng.choice(3, size=n, p=_CVC_COUNT_P)
    cvc = [sorted(rng.choice(3, size=k, p=_CVC_STATE_P).tolist()) for k in counts]
    swan = rng.random(n) < _SWAN_P
    return ett, ngt, cvc, swan


def _to_labels(ett, ngt, cvc, swan) -> np.ndarray:
    y = np.zeros((len(ett), len(LABELS)), np.int64)
    for i in range(len(ett)):
        if ett[i] >= 0:
            y[i, ett[i]] = 1
        if ngt[i] >= 0:
            y[i, 3 + ngt[i]] = 1
        for state in cvc[i]:
            y[i, 7 + state] = 1
        y[i, 10] = int(swan[i])
    return y


def _enforce_floor(rng: np.random.Generator, ett, ngt, cvc, swan, floor: int) -> None:
    """Raise every column to ``floor`` positives in place, never taking a study's tube from a column
    that would drop below the floor; keeps <= 1 ETT, <= 1 NGT and <= 2 CVC lines per study."""
    y = _to_labels(ett, ngt, cvc, swan)
    for col in range(len(LABELS)):
        need = floor - int(y[:, col].sum())
        for i in (rng.permutation(len(ett)) if need > 0 else ()):
            if need <= 0:
                break
            if col < 7:  # ETT / NGT: one state per study, so this may replace another state
                states, offset = (ett, 0) if col < 3 else (ngt, 3)
                current = states[i]
                if current == col - offset or (current >= 0 and y[:, offset + current].sum() <= floor):
                    continue
                if current >= 0:
                    y[i, offset + current] = 0
                states[i] = col - offset
            elif col < 10:
                if col - 7 in cvc[i] or len(cvc[i]) >= 2:
                    continue
                cvc[i] = sorted(cvc[i] + [col - 7])
            elif swan[i]:
                continue
            else:
                swan[i] = True
            y[i, col] = 1
            need -= 1


def _unique_ids(rng: np.random.Generator, n: int, make) -> list[str]:
    out, seen = [], set()
    while len(out) < n:
        for cand in make(rng, n - len(out)):
            if cand not in seen:
                seen.add(cand)
                out.append(cand)
    return out


def _uids(rng, k):
    digits = rng.integers(0, 10, size=(k, 38))
    digits[:, 0] = rng.integers(1, 10, size=k)
    return [UID_PREFIX + "".join(map(str, row)) for row in digits]


def _patient_ids(rng, k):
    return ["".join("0123456789abcdef"[v] for v in row) for row in rng.integers(0, 16, size=(k, 9))]


def _patients(rng: np.random.Generator, n: int) -> np.ndarray:
    """Patient index per study: a few studies per patient on small sets, about 9 on the full size."""
    mean = min(9.2, max(1.5, math.sqrt(n) / 6))
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(min(rng.geometric(1 / mean), 5 * mean)))
    sizes[-1] -= sum(sizes) - n
    owner = np.repeat(np.arange(len(sizes)), sizes)
    return owner[rng.permutation(n)]


# ----------------------------------------------------------------------------------------------
# Rendering one study (runs in the workers).

def render_study(seed: int, split: str, index: int, patient: int, labels, cvc_states, scale: float = 1.0):
    """``(jpeg_bytes, [(label, line_px), ...], (width, height))`` for one study. The labels decide
    the drawing; every random choice comes from ``(seed, split, index)`` (body shape from
    ``(seed, split, patient)``)."""
    code = _SPLITS[split]
    rng, patient_rng = _rng(seed, code, index, 1), _rng(seed, code, patient, 2)
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
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {split} study {index}")
    return buf.tobytes(), drawn, (width, height)


def _work(job) -> tuple[int, list[tuple[str, str]]]:
    seed, split, index, patient, labels, cvc_states, scale, path, annotate = job
    data, drawn, (width, height) = render_study(seed, split, index, patient, labels, cvc_states, scale)
    io_utils.atomic_write_bytes(path, data)  # a killed run leaves no half-written JPEG behind
    rows = []
    if annotate:
        ann_rng = _rng(seed, _SPLITS[split], index, 3)
        for label, line in drawn:
            points = phantom.annotation_points(line, width, height, ann_rng)
            if points:
                rows.append((label, json.dumps(points)))
    return index, rows


# ----------------------------------------------------------------------------------------------
# The dataset.

def _validate(n_train, n_test, seed, workers, scale, annotate_share) -> None:
    if int(n_train) < 1:
        raise ValueError(f"n_train={n_train}: ask for at least 1 training study (--n-train)")
    if int(n_test) < 1:
        raise ValueError(f"n_test={n_test}: ask for at least 1 test study (--n-test)")
    if int(seed) < 0:
        raise ValueError(f"seed={seed}: use a non-negative integer seed")
    if int(workers) < 0:
        raise ValueError(f"workers={workers}: use 0 (all cores) or a positive number of processes")
    if not 0.05 <= float(scale) <= 2.0:
        raise ValueError(f"scale={scale}: use a size factor in [0.05, 2] (1 = realistic 1,500-2,600 px films)")
    if not 0.0 <= float(annotate_share) <= 1.0:
        raise ValueError(f"annotate_share={annotate_share}: use a share in [0, 1]")


def _split_table(seed: int, split: str, uids: list[str]) -> tuple[pd.DataFrame, list[list[int]]]:
    """Labels (floored), patient index and CVC line states of one split."""
    code, n = _SPLITS[split], len(uids)
    ett, ngt, cvc, swan = _sample_split(_rng(seed, 99, code, 0), n)
    _enforce_floor(_rng(seed, 99, code, 1), ett, ngt, cvc, swan, positive_floor(n))
    frame = pd.DataFrame(_to_labels(ett, ngt, cvc, swan), columns=list(LABELS))
    frame.insert(0, ID_COLUMN, uids)
    frame[PATIENT_COLUMN] = _patients(_rng(seed, 99, code, 2), n) if split == "train" else np.arange(n)
    return frame, cvc


def make_dataset(out_dir: str, n_train: int, n_test: int, seed: int = 0, workers: int = 0, scale: float = 1.0,
                 annotate_share: float = 0.5) -> dict:
    """Write a synthetic RANZCR CLiP dataset in Kaggle's layout to ``out_dir`` and return a summary.

    ``workers=0`` uses every core; the files are byte-identical for any worker count. ``scale``
    multiplies the image size (1 = long side 1,500-2,600 px; tests use 0.1-0.3). ``annotate_share``
    is the share of train studies with tubes that get rows in ``train_annotations.csv``. Refuses
    (ValueError) to write into a folder holding images of another dataset.
    """
    _validate(n_train, n_test, seed, workers, scale, annotate_share)
    n_train, n_test, seed = int(n_train), int(n_test), int(seed)
    uids = _unique_ids(_rng(seed, 99, 7), n_train + n_test, _uids)
    train, train_cvc = _split_table(seed, "train", uids[:n_train])
    test, test_cvc = _split_table(seed, "test", uids[n_train:])
    patient_names = _unique_ids(_rng(seed, 99, 8), int(train[PATIENT_COLUMN].max()) + 1, _patient_ids)
    train_patients = train[PATIENT_COLUMN].to_numpy()
    train[PATIENT_COLUMN] = [patient_names[p] for p in train_patients]
    has_tube = train[list(LABELS)].to_numpy().sum(1) > 0
    annotate = has_tube & (_rng(seed, 99, 9).random(n_train) < annotate_share)

    for split, frame in (("train", train), ("test", test)):
        folder = os.path.join(out_dir, split)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # a killed run's unfinished temporary files
            if name.startswith(".tmp-"):
                os.remove(os.path.join(folder, name))
        foreign = set(f for f in os.listdir(folder) if f.endswith(".jpg")) - {f"{u}.jpg" for u in frame[ID_COLUMN]}
        if foreign:
            raise ValueError(f"{folder} already holds {len(foreign)} images of another dataset; "
                             "write to an empty folder (or delete that one) so every image has its CSV row")

    jobs = []
    for split, frame, cvc, patients in (("train", train, train_cvc, train_patients),
                                        ("test", test, test_cvc, test[PATIENT_COLUMN].to_numpy())):
        y = frame[list(LABELS)].to_numpy()
        for i, uid in enumerate(frame[ID_COLUMN]):
            jobs.append((seed, split, i, int(patients[i]), tuple(int(v) for v in y[i]), tuple(cvc[i]), float(scale),
                         os.path.join(out_dir, split, f"{uid}.jpg"), bool(split == "train" and annotate[i])))
    workers = min(workers or available_cores(), len(jobs))
    annotations: dict[int, list] = {}
    bar = tqdm(total=len(jobs), desc="synthetic studies", unit="img")
    # Worker processes (convert_worker.start_pool) forked from a fork server (a forked TensorFlow or OpenCV
    # thread pool would deadlock), results in job order, a dead worker an error instead of a hang.
    # A calling script needs the `if __name__ == "__main__":` guard, as workers re-import it.
    with start_pool(workers) as pool:
        for index_rows, job in zip(ordered_map(_work, jobs, pool, 4 * workers), jobs):
            if job[1] == "train":
                annotations[index_rows[0]] = index_rows[1]
            bar.update()
    bar.close()

    ann_rows = [(train[ID_COLUMN].iat[i], label, data) for i in range(n_train) for label, data in annotations[i]]
    paths = {name: os.path.join(out_dir, name) for name in
             ("train.csv", "test_labels.csv", "sample_submission.csv", "train_annotations.csv")}
    io_utils.atomic_write_text(paths["train.csv"], train[list(TRAIN_COLUMNS)].to_csv(index=False))
    io_utils.atomic_write_text(paths["test_labels.csv"], test[list(SUBMISSION_COLUMNS)].to_csv(index=False))
    submission = test[list(SUBMISSION_COLUMNS)].copy()
    submission[list(LABELS)] = 0
    io_utils.atomic_write_text(paths["sample_submission.csv"], submission.to_csv(index=False))
    io_utils.atomic_write_text(paths["train_annotations.csv"],
                               pd.DataFrame(ann_rows, columns=list(ANNOTATION_COLUMNS)).to_csv(index=False))
    return {
        "out_dir": out_dir, "n_train": n_train, "n_test": n_test, "n_patients": len(patient_names),
        "n_annotations": len(ann_rows), "n_annotated_images": int(sum(1 for i in annotations if annotations[i])),
        "train_positives": {k: int(v) for k, v in train[list(LABELS)].sum().items()},
        "test_positives": {k: int(v) for k, v in test[list(LABELS)].sum().items()},
        "paths": {**paths, "train": os.path.join(out_dir, "train"), "test": os.path.join(out_dir, "test")},
    }


# ----------------------------------------------------------------------------------------------
# Contact sheet and CLI.

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


def make_preview(data_dir: str, path: str, rows: int = 4, cols: int = 4, overlay: bool = False) -> str:
    """A ``rows x cols`` PNG contact sheet of the first train images, titled with their positive
    labels; ``overlay`` draws the annotated tube lines in their family's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ranzcr_tf.labels import group_of

    train = pd.read_csv(os.path.join(data_dir, "train.csv"))
    ann = pd.read_csv(os.path.join(data_dir, "train_annotations.csv")) if overlay else None
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows))
    for ax, (_, row) in zip(np.ravel(axes), train.head(rows * cols).iterrows()):
        image = cv2.imread(os.path.join(data_dir, "train", f"{row[ID_COLUMN]}.jpg"), cv2.IMREAD_GRAYSCALE)
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        if ann is not None:
            for _, a in ann[ann[ID_COLUMN] == row[ID_COLUMN]].iterrows():
                pts = np.array(json.loads(a["data"]))
                ax.plot(pts[:, 0], pts[:, 1], "-", lw=1, color=_COLOURS[group_of(a["label"])], alpha=0.8)
        ax.set_title(short_title(row), fontsize=8)
        ax.set_xlabel(f"{image.shape[1]}x{image.shape[0]}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in np.ravel(axes)[len(train.head(rows * cols)):]:
        ax.axis("off")
    fig.suptitle("synthetic RANZCR studies (A abnormal, B borderline, N normal, I incompletely imaged, SG Swan-Ganz)",
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m ranzcr_tf.synth.generate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a synthetic RANZCR CLiP dataset (chest-radiograph phantoms with tubes whose "
                    "placement decides the 11 labels) in the exact Kaggle layout.",
        epilog="Example: python -m ranzcr_tf.synth.generate --out data/synthetic --n-train 600 --n-test 200 "
               "--seed 0 --preview data/synthetic/preview.png")
    parser.add_argument("--out", required=True, help="output folder (created; must not hold another dataset)")
    parser.add_argument("--n-train", type=int, required=True, help="number of training studies")
    parser.add_argument("--n-test", type=int, required=True, help="number of test studies")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument("--workers", type=int, default=0, help="processes; 0 = all cores (default)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="image size factor: 1 = long side 1,500-2,600 px (default); 0.2 for quick tests")
    parser.add_argument("--annotate-share", type=float, default=0.5,
                        help="share of train studies with tubes that get train_annotations.csv rows (default 0.5)")
    parser.add_argument("--preview", metavar="PNG", help="also write a 4x4 contact sheet of train images")
    parser.add_argument("--overlay", action="store_true", help="draw the annotated tube lines on the preview")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        summary = make_dataset(args.out, args.n_train, args.n_test, seed=args.seed, workers=args.workers,
                               scale=args.scale, annotate_share=args.annotate_share)
    except ValueError as err:
        parser.error(str(err))
    seconds = time.time() - start
    print(f"wrote {summary['n_train']} train + {summary['n_test']} test studies "
          f"({summary['n_patients']} patients, {summary['n_annotations']} annotation rows) to {args.out} "
          f"in {seconds:.1f} s")
    print("train positives: " + ", ".join(f"{k}={v}" for k, v in summary["train_positives"].items()))
    if args.preview:
        print(f"preview: {make_preview(args.out, args.preview, overlay=args.overlay)}")
    return summary


if __name__ == "__main__":
    main()
