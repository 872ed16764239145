"""Synthetic RANZCR CLiP data in the exact Kaggle layout, for demos and tests.

    python -m ranzcr_tf.synth.generate --out-dir data/synthetic --n-train 600 --n-test 200 --seed 0 --preview sheet.png
    python -m ranzcr_tf.synth.generate --style hard --out-dir data/hard --n-train 600 --n-test 200 \
        --preview sheet.png --preview-styles easy,hard --overlay

writes ``train.csv``, ``train/<StudyInstanceUID>.jpg``, ``test/<StudyInstanceUID>.jpg``,
``train_annotations.csv`` (Kaggle's ``[[x, y], ...]`` strings, one row per drawn tube, for
``round(annotated_fraction * n_train)`` train studies, default 30% as in the real data where about
9,000 of 30,083 studies are annotated; drawn among the studies with at least one tube, all of them
when fewer have tubes), ``sample_submission.csv`` (all zeros) and ``test_labels.csv`` (the true test
labels, in submission layout, so a submission can be scored).

Two styles (``--style``). ``hard`` (:mod:`ranzcr_tf.synth.hard`, whose docstring states its label
rules) is written to be hard the way real films are: thin faint lines whose contrast drops over
the heart and spine, crossing lines, unlabelled distractors (ECG leads, oxygen tubing, pacemakers,
clips, cables, L/R markers and text), tilted and shifted patients and varied anatomy and exposure.
``easy`` (the default for now, what the demo preset was tuned on) is described below. A hard
dataset has its own IDs and label draws, so it never collides with an easy one of the same seed.

Easy images are single-channel 8-bit JPEGs of a chest-radiograph phantom (:mod:`ranzcr_tf.synth.phantom`):
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

import json
import math
import os
import sys
import time

import numpy as np
import pandas as pd
from tqdm import tqdm

from ranzcr_tf import cli, io_utils
from ranzcr_tf.labels import (
    ANNOTATION_COLUMNS,
    ID_COLUMN,
    LABELS,
    PATIENT_COLUMN,
    SUBMISSION_COLUMNS,
    TRAIN_COLUMNS,
)
from ranzcr_tf.prep.workers import available_cores, ordered_map, start_pool
from ranzcr_tf.synth import phantom
from ranzcr_tf.synth.preview import make_preview
from ranzcr_tf.synth.studies import SPLITS, render_study, seeded_rng

UID_PREFIX = "1.2.826.0.1.3680043.8.498."
# Real train.csv rates (RANZCR_DATA.md): group-state probabilities, "none" first.
_ETT_P = [0.719, 0.003, 0.038, 0.240]  # none, Abnormal, Borderline, Normal
_NGT_P = [0.723, 0.009, 0.018, 0.090, 0.160]  # none, Abnormal, Borderline, Incompletely Imaged, Normal
_CVC_COUNT_P = [0.08, 0.62, 0.30]  # 0, 1 or 2 lines -> about 69% Normal, 28% Borderline, 10% Abnormal
_CVC_STATE_P = [0.08, 0.24, 0.68]  # Abnormal, Borderline, Normal (per line)
_SWAN_P = 0.028
STYLES = ("easy", "hard")


def positive_floor(n: int) -> int:
    """Minimum positives per label column in a split of ``n`` studies (20 from 300 studies up)."""
    return min(20, math.ceil(n / 15))


# ----------------------------------------------------------------------------------------------
# The label table: decided up front in one process, so floors and IDs never depend on workers.

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
def _work(job) -> tuple[int, list[tuple[str, str]]]:
    seed, split, index, patient, labels, cvc_states, scale, path, annotate, style = job
    data, drawn, (width, height) = render_study(seed, split, index, patient, labels, cvc_states, scale, style)
    io_utils.atomic_write_bytes(path, data)  # a killed run leaves no half-written JPEG behind
    rows = []
    if annotate:
        ann_rng = seeded_rng(seed, SPLITS[split], index, 3)
        for label, line in drawn:
            points = phantom.annotation_points(line, width, height, ann_rng)
            if points:
                rows.append((label, json.dumps(points)))
    return index, rows


# ----------------------------------------------------------------------------------------------
# The dataset.

def _validate(n_train, n_test, seed, workers, scale, annotated_fraction, style) -> None:
    if style not in STYLES:
        raise ValueError(f"style={style!r}: use one of {', '.join(STYLES)} (--style)")
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
    if not 0.0 <= float(annotated_fraction) <= 1.0:
        raise ValueError(f"annotated_fraction={annotated_fraction}: use a share of the train studies in [0, 1] "
                         "(--annotated-fraction; the real data has about 0.3)")


def _table_rng(seed: int, style: str, *keys: int) -> np.random.Generator:
    """Label-table draws; the easy style keeps its original keys, the hard one gets its own stream."""
    return seeded_rng(seed, 99, *keys) if style == "easy" else seeded_rng(seed, 99, *keys, STYLES.index(style))


def _split_table(seed: int, split: str, uids: list[str], style: str = "easy") -> tuple[pd.DataFrame, list[list[int]]]:
    """Labels (floored), patient index and CVC line states of one split."""
    code, n = SPLITS[split], len(uids)
    ett, ngt, cvc, swan = _sample_split(_table_rng(seed, style, code, 0), n)
    _enforce_floor(_table_rng(seed, style, code, 1), ett, ngt, cvc, swan, positive_floor(n))
    frame = pd.DataFrame(_to_labels(ett, ngt, cvc, swan), columns=list(LABELS))
    frame.insert(0, ID_COLUMN, uids)
    frame[PATIENT_COLUMN] = _patients(_table_rng(seed, style, code, 2), n) if split == "train" else np.arange(n)
    return frame, cvc


def annotated_studies(rng: np.random.Generator, has_tube: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask: ``round(fraction * n)`` studies drawn among those with a tube (all of them if fewer)."""
    candidates = np.flatnonzero(has_tube)
    count = min(len(candidates), int(round(float(fraction) * len(has_tube))))
    mask = np.zeros(len(has_tube), bool)
    mask[rng.permutation(candidates)[:count]] = True
    return mask


def _prepare_folders(out_dir: str, train: pd.DataFrame, test: pd.DataFrame) -> None:
    """Make the train/test image folders, drop a killed run's temporary files, refuse another dataset's images."""
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


def _image_jobs(out_dir: str, seed: int, scale: float, style: str, splits, annotate) -> list[tuple]:
    """One ``_work`` argument tuple per image of ``splits`` ((split, table, cvc, patient numbers), ...), in order."""
    jobs = []
    for split, frame, cvc, patients in splits:
        y = frame[list(LABELS)].to_numpy()
        for i, uid in enumerate(frame[ID_COLUMN]):
            jobs.append((seed, split, i, int(patients[i]), tuple(int(v) for v in y[i]), tuple(cvc[i]), float(scale),
                         os.path.join(out_dir, split, f"{uid}.jpg"), bool(split == "train" and annotate[i]), style))
    return jobs


def _draw_images(jobs: list[tuple], workers: int) -> dict[int, list]:
    """Draw and write every image in worker processes; returns each train row's annotations by row index."""
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
    return annotations


def _write_tables(out_dir: str, train: pd.DataFrame, test: pd.DataFrame, ann_rows: list) -> dict[str, str]:
    """Write the four CSVs atomically (test labels kept beside the zeroed sample submission); returns their paths."""
    paths = {name: os.path.join(out_dir, name) for name in
             ("train.csv", "test_labels.csv", "sample_submission.csv", "train_annotations.csv")}
    io_utils.atomic_write_text(paths["train.csv"], train[list(TRAIN_COLUMNS)].to_csv(index=False))
    io_utils.atomic_write_text(paths["test_labels.csv"], test[list(SUBMISSION_COLUMNS)].to_csv(index=False))
    submission = test[list(SUBMISSION_COLUMNS)].copy()
    submission[list(LABELS)] = 0
    io_utils.atomic_write_text(paths["sample_submission.csv"], submission.to_csv(index=False))
    io_utils.atomic_write_text(paths["train_annotations.csv"],
                               pd.DataFrame(ann_rows, columns=list(ANNOTATION_COLUMNS)).to_csv(index=False))
    return paths


def make_dataset(out_dir: str, n_train: int, n_test: int, seed: int = 0, workers: int = 0, scale: float = 1.0,
                 annotated_fraction: float = 0.3, style: str = "easy") -> dict:
    """Write a synthetic RANZCR CLiP dataset in Kaggle's layout to ``out_dir`` and return a summary.

    ``workers=0`` uses every core; the files are byte-identical for any worker count. ``scale``
    multiplies the image size (1 = realistic films, long side 1,500-2,600 px easy, 1,400-2,600 px hard;
    tests use 0.1-0.3).
    ``annotated_fraction`` is the share of train studies with rows in ``train_annotations.csv``
    (drawn among those with a tube; 0.3 as in the real data, 1.0 for every study with a tube).
    ``style`` is ``"easy"`` or ``"hard"`` (module docstring). Refuses (ValueError) to write into a
    folder holding images of another dataset.
    """
    _validate(n_train, n_test, seed, workers, scale, annotated_fraction, style)
    n_train, n_test, seed = int(n_train), int(n_test), int(seed)
    uids = _unique_ids(_table_rng(seed, style, 7), n_train + n_test, _uids)
    train, train_cvc = _split_table(seed, "train", uids[:n_train], style)
    test, test_cvc = _split_table(seed, "test", uids[n_train:], style)
    patient_names = _unique_ids(_table_rng(seed, style, 8), int(train[PATIENT_COLUMN].max()) + 1, _patient_ids)
    train_patients = train[PATIENT_COLUMN].to_numpy()
    train[PATIENT_COLUMN] = [patient_names[p] for p in train_patients]
    has_tube = train[list(LABELS)].to_numpy().sum(1) > 0
    annotate = annotated_studies(_table_rng(seed, style, 9), has_tube, annotated_fraction)

    _prepare_folders(out_dir, train, test)
    splits = (("train", train, train_cvc, train_patients), ("test", test, test_cvc, test[PATIENT_COLUMN].to_numpy()))
    jobs = _image_jobs(out_dir, seed, scale, style, splits, annotate)
    annotations = _draw_images(jobs, workers)
    ann_rows = [(train[ID_COLUMN].iat[i], label, data) for i in range(n_train) for label, data in annotations[i]]
    paths = _write_tables(out_dir, train, test, ann_rows)
    return {
        "out_dir": out_dir, "style": style, "seed": seed, "scale": float(scale), "n_train": n_train, "n_test": n_test,
        "n_patients": len(patient_names),
        "n_annotations": len(ann_rows), "n_annotated_images": int(sum(1 for i in annotations if annotations[i])),
        "train_positives": {k: int(v) for k, v in train[list(LABELS)].sum().items()},
        "test_positives": {k: int(v) for k, v in test[list(LABELS)].sum().items()},
        "paths": {**paths, "train": os.path.join(out_dir, "train"), "test": os.path.join(out_dir, "test")},
    }


# ----------------------------------------------------------------------------------------------
# CLI.

def build_parser():
    parser = cli.build_parser(
        "python -m ranzcr_tf.synth.generate",
        "Write a synthetic RANZCR CLiP dataset (chest-radiograph phantoms with tubes whose placement decides the "
        "11 labels) in the exact Kaggle layout.",
        epilog="Example: python -m ranzcr_tf.synth.generate --style hard --out-dir data/hard --n-train 600 "
               "--n-test 200 --seed 0 --preview data/hard/preview.png --preview-styles easy,hard --overlay")
    parser.add_argument("--out-dir", help="output folder (required; created; must not hold another dataset)")
    cli.hidden_alias(parser, "--out", "out_dir")
    parser.add_argument("--n-train", type=int, required=True, help="number of training studies")
    parser.add_argument("--n-test", type=int, required=True, help="number of test studies")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument("--style", default="easy", choices=STYLES,
                        help="easy: thick bright upright tubes (default); hard: thin faint crowded lines, "
                             "distractors, tilted patients (see ranzcr_tf.synth.hard)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes (a worker pool) drawing the images; 0 = one per available core (default)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="image size factor: 1 = realistic films, long side 1,500-2,600 px (easy) or 1,400-2,600 "
                             "px (hard) (default); 0.2 for quick tests")
    parser.add_argument("--annotated-fraction", type=float, default=0.3,
                        help="share of train studies with train_annotations.csv rows, drawn among those with "
                             "a tube (default 0.3, as in the real data)")
    parser.add_argument("--preview", metavar="PNG", help="also write a 4x4 contact sheet of train images")
    parser.add_argument("--preview-styles", metavar="LIST",
                        help="comma-separated styles for the contact sheet, e.g. easy,hard: 4x4 films per style "
                             "with the same labels (default: this dataset's style only)")
    parser.add_argument("--overlay", action="store_true", help="draw the annotated tube lines on the preview")
    return parser


def run(args) -> int:
    cli.require(args, "out_dir", "--out-dir DIR")
    styles = [s.strip() for s in (args.preview_styles or args.style).split(",") if s.strip()]
    unknown = sorted(set(styles) - set(STYLES))
    if unknown:
        raise ValueError(f"--preview-styles: unknown style {', '.join(unknown)}; use a comma-separated list of "
                         f"{', '.join(STYLES)}")
    start = time.time()
    summary = make_dataset(args.out_dir, args.n_train, args.n_test, seed=args.seed, workers=args.workers,
                           scale=args.scale, annotated_fraction=args.annotated_fraction, style=args.style)
    print(f"wrote {summary['n_train']} {args.style} train + {summary['n_test']} test studies "
          f"({summary['n_patients']} patients, {summary['n_annotations']} annotation rows on "
          f"{summary['n_annotated_images']} studies) to {args.out_dir} in {time.time() - start:.1f} s")
    print("train positives: " + ", ".join(f"{k}={v}" for k, v in summary["train_positives"].items()))
    if args.preview:
        sheet = make_preview(args.out_dir, args.preview, overlay=args.overlay, styles=styles, data_style=args.style,
                             seed=args.seed, scale=args.scale)
        print(f"preview: {sheet}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
