"""Assemble the run report: read the run folders, compute, draw, write ``index.html``.

    python -m ranzcr_tf.report runs/NAME [runs/OTHER ...] --out-dir report/ [--tfrecords DIR] [--max-images 33]

The first run is reported in full (data, training curves, per-column curves and calibration, Grad-CAM,
worst studies); every run given enters the side-by-side cross-validation table. Predictions are the
runs' ``oof.csv`` files (written by the one prediction function, ``model.predict``), so every number
here is the one training reported; only Grad-CAM runs a model again, on at most ``--max-images``
validation studies. Images come from the records the run was trained on (``--tfrecords``, default
the run's ``data.tfrecords``); without them the image sections are left out and the page says so.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ranzcr_tf import io_utils, runs
from ranzcr_tf.labels import GROUPS, ID_COLUMN, LABELS
from ranzcr_tf.report import curves, html
from ranzcr_tf.report.cv import cv_report
from ranzcr_tf.tables import TARGET_COLUMNS, merge_oof

CATEGORIES = ("most confident true positive", "worst false positive", "worst false negative")


@dataclass
class RunData:
    """One run folder as the report reads it."""

    path: str
    name: str
    fold_dirs: dict  # fold -> folder
    metrics: dict  # fold -> metrics.json
    oof: pd.DataFrame
    cv: dict
    logs: dict = field(default_factory=dict)  # fold -> log.csv frame


def read_run(path: str) -> RunData:
    """A run folder with at least one finished fold (``fold*/metrics.json``); ``ValueError`` otherwise."""
    import json

    if not os.path.isdir(path):
        raise ValueError(f"run folder {path} does not exist: pass the --out-dir of train_tpu.py (runs/NAME)")
    fold_dirs, metrics, logs = {}, {}, {}
    for name in sorted(os.listdir(path)):
        folder = os.path.join(path, name)
        if not (runs.is_fold_dir(folder) and os.path.isdir(folder)):
            continue
        metrics_path = os.path.join(folder, runs.METRICS_FILE)
        if not os.path.exists(metrics_path):
            continue  # a fold still training, or one that never finished
        fold = int(name[len("fold"):])
        try:
            metrics[fold] = json.loads(io_utils.read_text(metrics_path))
            if metrics[fold].get("val_auc") is None:  # written as null when undefined (io_utils.json_safe)
                metrics[fold]["val_auc"] = math.nan
        except ValueError:
            raise ValueError(f"{metrics_path} is not valid JSON: the fold's training was cut short; train it again") from None
        fold_dirs[fold] = folder
        log_path = os.path.join(folder, runs.LOG_FILE)
        if os.path.exists(log_path) and os.path.getsize(log_path):
            logs[fold] = pd.read_csv(log_path)
    if not metrics:
        raise ValueError(f"{path} has no fold*/{runs.METRICS_FILE}: no fold of this run has finished training "
                         f"(python train_tpu.py --fold 0 --out-dir {path})")
    oof = merge_oof(path, "the run report (python -m ranzcr_tf.report)")
    oof = oof[oof["fold"].isin(list(metrics))].reset_index(drop=True)
    return RunData(path, os.path.basename(os.path.normpath(path)), fold_dirs, metrics, oof, cv_report(oof), logs)


def run_records(run: RunData, tfrecords: str | None) -> tuple[str | None, str]:
    """The records folder to read images from, and a note when there is none."""
    from ranzcr_tf.config import load_config
    from ranzcr_tf.prep import records

    if tfrecords:
        if not os.path.exists(os.path.join(tfrecords, records.MANIFEST)):
            raise ValueError(f"--tfrecords {tfrecords} holds no {records.MANIFEST}: pass the records folder the run "
                             "was trained on")
        return tfrecords, ""
    fold_dir = next(iter(run.fold_dirs.values()))
    saved = load_config(os.path.join(fold_dir, runs.CONFIG_FILE)).data.tfrecords
    if os.path.exists(os.path.join(saved, records.MANIFEST)):
        return saved, ""
    return None, (f"The run's records ({saved}, its data.tfrecords) are not here, so the data counts come from "
                  "oof.csv and the image sections are left out: pass --tfrecords DIR.")


def targets_and_probs(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return frame[TARGET_COLUMNS].to_numpy(), frame[list(LABELS)].to_numpy()


# ----------------------------------------------------------------------------------------------- sections
def summary_section(page: html.Page, all_runs: list[RunData]) -> None:
    rows = []
    for run in all_runs:
        for fold in sorted(run.metrics):
            m = run.metrics[fold]
            rows.append([run.name, fold, f"{m['val_auc']:.4f}", m.get("best_epoch"), m.get("num_examples")])
        rows.append([run.name, "pooled OOF", f"{run.cv['cv_auc']:.4f}", "", run.cv["num_studies"]])
    page.section("Summary", html.table(["run", "fold", "validation mean AUC", "best epoch", "studies"], rows, 2),
                 '<p class="note">Fold rows: metrics.json of each fold (the reloaded best model). Pooled OOF: the '
                 "competition metric over every fold's oof.csv together (python -m ranzcr_tf.report.cv).</p>")


def data_section(page: html.Page, run: RunData, tfrecords: str | None, note: str) -> None:
    from ranzcr_tf.prep import records
    from ranzcr_tf.report.studies import annotated_counts

    manifest = records.read_manifest(tfrecords) if tfrecords else {}
    if "fold_counts" in manifest and "fold_positives" in manifest:  # converters before the counts: from oof.csv
        folds = sorted(int(f) for f in manifest["fold_counts"])
        studies = {f: int(manifest["fold_counts"][str(f)]) for f in folds}
        positives = {f: manifest["fold_positives"][str(f)] for f in folds}
        annotated = annotated_counts(tfrecords)
        source = f"records {tfrecords} (every fold, trained or not)"
    else:
        folds = sorted(run.metrics)
        parts = {f: run.oof[run.oof["fold"] == f] for f in folds}
        studies = {f: len(parts[f]) for f in folds}
        positives = {f: targets_and_probs(parts[f])[0].sum(axis=0).astype(int).tolist() for f in folds}
        annotated, source = None, f"{run.name}'s oof.csv (trained folds only)"
    header = ["fold", "studies", *(["annotated"] if annotated is not None else []), *LABELS]
    rows = [[f, studies[f], *([annotated.get(f, 0)] if annotated is not None else []), *positives[f]] for f in folds]
    total = np.sum([positives[f] for f in folds], axis=0).astype(int).tolist()
    rows.append(["all", sum(studies.values()), *([sum(annotated.values())] if annotated is not None else []), *total])
    page.section("Data", f"<p>Positive studies per fold and column, from {html.escape(source)}; "
                 "annotated: studies with at least one drawn tube line.</p>",
                 html.table(header, rows), f'<p class="note">{html.escape(note)}</p>' if note else "")


def training_section(page: html.Page, run: RunData) -> None:
    parts = []
    for fold in sorted(run.metrics):
        if fold not in run.logs:
            parts.append(f"<p>fold {fold}: no {runs.LOG_FILE}.</p>")
            continue
        best = run.metrics[fold].get("best_epoch")
        png = curves.training_figure(run.logs[fold], best, f"{run.name} fold {fold}: best epoch {best}")
        parts.append(html.image(png, f"training curves of fold {fold}"))
    page.section("Training curves", *parts)


def column_section(page: html.Page, run: RunData, num_resamples: int, progress) -> dict:
    targets, probs = targets_and_probs(run.oof)
    rows, figures, numbers = [], [], {}
    for c, label in enumerate(LABELS):
        y, p = targets[:, c], probs[:, c]
        interval = curves.bootstrap_auc_interval(y, p, num_resamples=num_resamples, seed=c)
        ece = curves.expected_calibration_error(y, p)
        auc = curves.auc_or_nan(y, p)
        numbers[label] = {"auc": auc, "auc_95_interval": list(interval), "ece": ece, "positives": int(y.sum())}
        rows.append([label, f"{auc:.4f}", f"{interval[0]:.3f} - {interval[1]:.3f}", f"{ece:.3f}", int(y.sum()), len(y)])
        figures.append(html.image(curves.column_figure(y, p, label, interval), f"ROC, PR and reliability of {label}"))
        progress.update(1)
    tables = []
    for group in ("ETT", "NGT"):
        names, counts = curves.argmax_confusion(targets, probs, list(GROUPS[group]))
        tables.append(f"<h3>{group}: true (rows) against predicted at the argmax (columns)</h3>"
                      + html.table(["true \\ predicted", *names], [[n, *row] for n, row in zip(names, counts)]))
    page.section("Per column", html.table(["column", "AUC", "bootstrap 95% interval", "ECE", "positives", "studies"],
                                          rows),
                 f'<p class="note">Pooled out-of-fold predictions. Interval: {num_resamples} bootstrap resamples of the '
                 "studies (percentiles). ECE: expected calibration error over 10 equal-width bins, the bins of the "
                 "reliability diagram. Predicted class of a family: the argmax of its columns, or no tube when even "
                 "that is below 0.5.</p>", *figures, *tables)
    return numbers


def choose_gradcam_studies(oof: pd.DataFrame, max_images: int) -> list[tuple[str, str, int]]:
    """``(column, category, row)`` for at most ``max_images`` studies: per column the most confident true
    positive, the worst false positive and the worst false negative (threshold 0.5), taken category by
    category over the columns, so a small budget still shows every column's best hit first."""
    targets, probs = targets_and_probs(oof)
    picks = []
    for category in CATEGORIES:
        for c, label in enumerate(LABELS):
            y, p = targets[:, c], probs[:, c]
            if category == CATEGORIES[0]:
                candidates, order = np.flatnonzero((y == 1) & (p >= 0.5)), -1
            elif category == CATEGORIES[1]:
                candidates, order = np.flatnonzero((y == 0) & (p >= 0.5)), -1
            else:
                candidates, order = np.flatnonzero((y == 1) & (p < 0.5)), 1
            if len(candidates):
                row = candidates[np.argsort(order * p[candidates], kind="stable")[0]]
                picks.append((label, category, int(row)))
    return picks[:max(0, max_images)]


def fold_spec(run: RunData, fold: int):
    """The fold's model and the settings that feed it (``serve.modelio``: what the kernel uses)."""
    from ranzcr_tf.serve.modelio import discover_models

    return discover_models([run.fold_dirs[fold]])[0].folds[0]


def load_studies(run: RunData, tfrecords: str, rows_by_fold: dict) -> dict:
    """``{study_id: Study}`` for the OOF rows asked for, read fold by fold."""
    from ranzcr_tf.report.studies import read_studies

    found = {}
    for fold, rows in sorted(rows_by_fold.items()):
        spec = fold_spec(run, fold)
        found.update(read_studies(tfrecords, fold, run.oof.loc[sorted(rows), ID_COLUMN], spec.image_size,
                                  spec.cfg.model.input_channels))
    return found


def gradcam_section(page: html.Page, run: RunData, picks: list, studies: dict, progress, method: str) -> dict:
    """Heat-map panels (``method``: ``gradcam.make_cam``), one figure per column; returns how many peaks
    fell on an annotated tube."""
    from ranzcr_tf.report import panels
    from ranzcr_tf.report.gradcam import make_cam, peak_position, tube_mask
    from ranzcr_tf.serve.modelio import load_fold_model

    heatmaps, tolerance = {}, {}
    by_fold: dict = {}
    description, method_name = "", "Grad-CAM"
    for label, category, row in picks:
        by_fold.setdefault(int(run.oof.loc[row, "fold"]), []).append((label, category, row))
    for fold, items in sorted(by_fold.items()):
        spec = fold_spec(run, fold)
        cam = make_cam(load_fold_model(spec), spec.cfg.model.backbone, method)
        description, method_name = cam.description, cam.name
        for label, category, row in items:
            study = studies[run.oof.loc[row, ID_COLUMN]]
            # "On the tube": within half a feature-map cell of a line, the finest the heat map resolves.
            tolerance[(label, category)] = 0.5 * max(study.image.shape) / max(cam.feature_size)
            heatmaps[(label, category)] = cam.heatmaps(study.model_input[None], LABELS.index(label),
                                                       output_size=study.image.shape)[0]
            progress.update(1)
    figures, on_tube = [], {"on": 0, "annotated": 0}
    for label in LABELS:
        rows = []
        for category in CATEGORIES:
            if (label, category) not in heatmaps:
                continue
            row = next(r for lab, cat, r in picks if lab == label and cat == category)
            study = studies[run.oof.loc[row, ID_COLUMN]]
            heatmap = heatmaps[(label, category)]
            hit = None
            family = panels.family_index(label)
            if any(panels.family_index(LABELS[index]) == family for index, _ in study.lines):
                mask = tube_mask(study.parsed, family, tolerance[(label, category)])
                hit = bool(heatmap.max() > 0 and mask[peak_position(heatmap)])
                on_tube["on"] += hit
                on_tube["annotated"] += 1
            probability = run.oof.loc[row, label]
            short_id = study.study_id if len(study.study_id) <= 28 else "..." + study.study_id[-25:]
            rows.append((f"{category}\np = {probability:.3f}, fold {study.fold}, {short_id}", study, heatmap, hit))
        if rows:
            figures.append(html.image(panels.gradcam_figure(label, rows, method_name),
                                      f"Grad-CAM of {label}"))
    if not picks:
        figures.append("<p>No study qualified (or --max-images 0).</p>")
    summary = ""
    if on_tube["annotated"]:
        summary = (f"<p>Heat-map peak on an annotated line of the column's tube family (within half a cell of the "
                   f"feature map, {min(tolerance.values()):.0f} stored pixels here): {on_tube['on']} of "
                   f"{on_tube['annotated']} shown studies that have such a line.</p>")
    page.section("Where the model looks (Grad-CAM)",
                 f"<p>{html.escape(description)} (--cam), per column, on validation studies: the most "
                 f"confident true positive, the worst false positive and the worst false negative (threshold 0.5), "
                 f"{len(picks)} studies in all (--max-images). Left: the stored image with its annotation lines "
                 f"(ETT red, NGT green, CVC blue, Swan Ganz orange); right: the heat map, peak marked x.</p>",
                 summary, '<div class="grid">', *figures, "</div>")
    return on_tube


def worst_section(page: html.Page, run: RunData, rows: list[int], studies: dict | None) -> None:
    from ranzcr_tf.report import panels

    targets, probs = targets_and_probs(run.oof)
    losses = curves.study_losses(targets, probs)
    table_rows = []
    for rank, row in enumerate(rows, start=1):
        study_id = run.oof.loc[row, ID_COLUMN]
        true = ", ".join(LABELS[c] for c in np.flatnonzero(targets[row] > 0.5)) or "no tube"
        top = np.argsort(-probs[row])[:3]
        predicted = ", ".join(f"{LABELS[c]} {probs[row, c]:.2f}" for c in top)
        picture = html.Raw(html.image(panels.thumbnail(studies[study_id]), study_id, "thumb")) if studies else ""
        table_rows.append([rank, picture, study_id, int(run.oof.loc[row, "fold"]), f"{losses[row]:.3f}", true, predicted])
    page.section("Worst studies", "<p>Validation studies with the largest loss (binary cross-entropy averaged over "
                 "the 11 columns).</p>",
                 html.table(["rank", "image", "study", "fold", "loss", "true labels", "highest predictions"],
                            table_rows, name_columns=0))


def worst_rows(run: RunData, count: int) -> list[int]:
    losses = curves.study_losses(*targets_and_probs(run.oof))
    return [int(r) for r in np.argsort(-losses, kind="stable")[:max(0, count)]]


def cv_section(page: html.Page, all_runs: list[RunData]) -> None:
    header = ["column", *(run.name for run in all_runs)]
    rows = []
    for label in [*LABELS, "mean (CV)"]:
        values = [run.cv["cv_auc"] if label == "mean (CV)" else run.cv["per_class_auc"][label] for run in all_runs]
        finite = [v for v in values if np.isfinite(v)]
        best = max(finite) if finite and len(all_runs) > 1 else None
        rows.append([label, *(html.Raw(f"{v:.4f}", ' class="best"') if best is not None and v == best else f"{v:.4f}"
                              for v in values)])
    page.section("Cross-validation by run", "<p>Pooled out-of-fold AUC per column; the best run of each row in "
                 "bold.</p>", html.table(header, rows))


# ----------------------------------------------------------------------------------------------- the page
def build_report(run_dirs: list[str], out_dir: str, *, tfrecords: str | None = None, max_images: int = 33,
                 worst: int = 12, num_resamples: int = 1000, quiet: bool = False, cam: str = "layercam") -> str:
    """Write ``out_dir/index.html`` (and ``summary.json``, the numbers) for ``run_dirs``; returns the page's
    path. Bad input (a missing run folder, a run without a finished fold, records that do not hold the
    run's studies) is a ``ValueError`` before anything is written."""
    from tqdm import tqdm

    if max_images < 0 or worst < 0 or num_resamples < 10:
        raise ValueError("--max-images and --worst must be >= 0 and --bootstrap >= 10")
    from ranzcr_tf.report.gradcam import CAM_METHODS

    if cam not in CAM_METHODS:
        raise ValueError(f"--cam {cam!r}: expected one of {', '.join(CAM_METHODS)}")
    all_runs = [read_run(path) for path in run_dirs]
    run = all_runs[0]
    records_dir, note = run_records(run, tfrecords)
    picks = choose_gradcam_studies(run.oof, max_images) if records_dir else []
    worst_list = worst_rows(run, worst)
    steps = 3 + len(LABELS) + len(picks) + 2
    with tqdm(total=steps, desc="report", unit="step", disable=quiet, file=sys.stderr, leave=False) as progress:
        studies = None
        if records_dir:
            rows_by_fold: dict = {}
            for row in [r for _, _, r in picks] + worst_list:
                rows_by_fold.setdefault(int(run.oof.loc[row, "fold"]), set()).add(row)
            studies = load_studies(run, records_dir, rows_by_fold)
        progress.update(1)
        names = ", ".join(r.name for r in all_runs)
        page = html.Page(f"Run report: {names}", f"runs: {', '.join(os.path.abspath(p) for p in run_dirs)}")
        summary_section(page, all_runs)
        data_section(page, run, records_dir, note)
        progress.update(1)
        training_section(page, run)
        progress.update(1)
        numbers = column_section(page, run, num_resamples, progress)
        on_tube = gradcam_section(page, run, picks, studies, progress, cam) if records_dir else None
        if not records_dir:
            page.section("Where the model looks (Grad-CAM)", f"<p>{html.escape(note)}</p>")
        worst_section(page, run, worst_list, studies)
        progress.update(1)
        cv_section(page, all_runs)
        io_utils.makedirs(out_dir)
        path = os.path.join(out_dir, "index.html")
        io_utils.atomic_write_text(path, page.render())
        io_utils.atomic_write_json(os.path.join(out_dir, "summary.json"), {
            "runs": {r.name: {"path": os.path.abspath(r.path), "cv_auc": r.cv["cv_auc"],
                              "per_class_auc": r.cv["per_class_auc"],
                              "fold_val_auc": {str(f): m["val_auc"] for f, m in r.metrics.items()}} for r in all_runs},
            "columns": numbers, "gradcam_studies": len(picks), "gradcam_peaks_on_tube": on_tube})
        progress.update(1)
    return path
