"""Fold-0 ablation of the training recipe on one or more phantom styles: which settings hold on all of them.

    python benchmarks/ablate_recipe.py --data easy=demo_easy/data --data hard=demo/data --out-dir ablate \\
        --config configs/cpu_demo.yaml --vary model.pooling=avg,max,avgmax --vary preprocess.image_size=128,256 \\
        --control --minutes-per-cell 4

Each *cell* is the base config (``--config`` preset <- ``--base`` overrides) with some settings changed.
One factor at a time (default ``--design ofat``): the base cell, then one cell per ``--vary`` value that
differs from the base (each changes only that key). ``--design factorial`` crosses every ``--vary`` axis.
``--control`` adds the base with shuffled training labels (train.csv's label rows permuted, the images
unchanged): its AUCs must stay near 0.5, or the scores come from something other than the images.

For every cell and style (``--data STYLE=DIR``: a folder in the Kaggle layout with ``test_labels.csv``,
e.g. from ``python -m ranzcr_tf.synth.generate``) the script runs the project's own stages, in process:

1. ``prep.convert.convert`` at the cell's ``preprocess`` settings into ``OUT/records/<style>-<size>px-<hash>``,
   shared by every cell with the same settings (and resumed, like ``make_tfrecords.py``);
2. ``train.run.train`` (what ``train_tpu.py --fold 0`` runs; ``--recipe 3stage`` too) into ``OUT/cells/<cell>/<style>/run``;
3. ``serve.kernel.run`` (``kaggle_kernel.py``) on the records' test shards -> ``submission.csv``;
4. ``report.score.score_files`` against the style's ``test_labels.csv``.

``--minutes-per-cell M`` caps training time: two real one-epoch ``train_fold`` probes are timed first,
a full epoch (``t_full``: build, one epoch, validation, reload) and one of two steps (``t_fixed``: the
same one-off costs, next to no training); the cell then trains the most epochs ``E`` (at least 1, at most
``train.epochs``) with ``t_fixed + E x (t_full - t_fixed) <= M`` minutes. The full probe runs first, so
the process's one-time warm-ups make the epoch estimate err on the long side (fewer epochs, not a
blown budget). The control reuses the base cell's epochs so that it differs from it in the labels only.

Resumable: a cell whose ``result.json`` exists is not trained again (a killed training resumes from its
backup); rerunning the same command only prints the table. A cell folder trained with other settings
is an error, never overwritten. Output: ``OUT/results.csv`` (one row per cell and style) and
``OUT/results.md`` (one row per cell: validation and test mean AUC and minutes per style, and the minimum
test AUC over styles, the number to choose by: a recipe must hold on every style).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass

from ranzcr_tf import cli, io_utils  # noqa: F401

cli.setup()  # before TensorFlow loads (train.fit imports Keras): quiets its start-up lines

from ranzcr_tf.config import load_config  # noqa: E402
from ranzcr_tf.train.fit import TrainingDiverged  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "cpu_demo.yaml")
FOLD = 0
CONTROL = "control (shuffled labels)"
NEEDED_FILES = ("train.csv", "test_labels.csv", "sample_submission.csv", "train", "test")


@dataclass
class Cell:
    """One point of the grid: its name (what differs from the base) and the overrides that make it."""

    name: str
    overrides: list
    shuffled: bool = False

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.name.replace(", ", "+")).strip("_")


# ------------------------------------------------------------------------------------------------ arguments
def parse_data(items: list[str]) -> dict[str, str]:
    """``["easy=DIR", ...]`` -> ``{"easy": DIR}``; each DIR must be a Kaggle-layout folder with test labels."""
    styles: dict[str, str] = {}
    for item in items:
        style, sep, folder = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", style) or not folder:
            raise ValueError(f"--data {item!r}: expected STYLE=DIR with a style name of letters, digits, _ or -")
        if style in styles:
            raise ValueError(f"--data: style {style!r} is given twice")
        missing = [name for name in NEEDED_FILES if not os.path.exists(os.path.join(folder, name))]
        if missing:
            raise ValueError(f"--data {item}: {folder} lacks {', '.join(missing)} (make one with `python -m "
                             f"ranzcr_tf.synth.generate --out-dir {folder} --n-train 600 --n-test 200`)")
        styles[style] = os.path.abspath(folder)
    if not styles:
        raise ValueError("give at least one --data STYLE=DIR")
    return styles


def parse_vary(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["model.pooling=avg,max"]`` -> ``[("model.pooling", ["avg", "max"])]``."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not choices:
            raise ValueError(f"--vary {item!r}: expected section.key=value1,value2 (e.g. model.pooling=avg,max)")
        if key.strip() in [k for k, _ in axes]:
            raise ValueError(f"--vary {key.strip()} is given twice: list all its values in one --vary")
        axes.append((key.strip(), choices))
    return axes


def plan_cells(config: str, base: list[str], axes, design: str, control: bool) -> list[Cell]:
    """The cells to run, base first; a value equal to the base's (after resolution) is the base cell itself."""
    base_values = load_config(config, base).to_dict()
    cells = [Cell("base", list(base))]
    if design == "factorial":
        combos = [list(zip([k for k, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]
    else:
        combos = [[(key, value)] for key, values in axes for value in values]
    for combo in combos:
        overrides = [f"{key}={value}" for key, value in combo]
        resolved = load_config(config, base + overrides).to_dict()  # ValueError names a bad key or value
        changed = [o for o, (key, _) in zip(overrides, combo) if _lookup(resolved, key) != _lookup(base_values, key)]
        if changed and all(c.name != ", ".join(changed) for c in cells):
            cells.append(Cell(", ".join(changed), base + changed))
    if control:
        cells.append(Cell(CONTROL, list(base), shuffled=True))
    return cells


def _lookup(values: dict, dotted: str):
    for part in dotted.split("."):
        values = values[part]
    return values


# ------------------------------------------------------------------------------------------------ stages
def shuffled_copy(style: str, data_dir: str, out_dir: str, seed: int = 0) -> str:
    """``OUT/data/<style>-shuffled``: the same images and test files, train.csv's label rows permuted.

    The permutation is the one ``train_tpu.py --help`` documents for the label-shuffle control. The
    annotations are left out (they would still describe each image's own tubes).
    """
    import numpy as np
    import pandas as pd

    from ranzcr_tf.labels import ID_COLUMN, LABELS

    folder = os.path.join(out_dir, "data", f"{style}-shuffled")
    os.makedirs(folder, exist_ok=True)
    for name in ("train", "test", "test_labels.csv", "sample_submission.csv"):
        link = os.path.join(folder, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(data_dir, name), link)
    table = pd.read_csv(os.path.join(data_dir, "train.csv"), dtype={ID_COLUMN: str})
    table[list(LABELS)] = table[list(LABELS)].values[np.random.default_rng(seed).permutation(len(table))]
    io_utils.atomic_write_text(os.path.join(folder, "train.csv"), table.to_csv(index=False))
    return folder


def convert_records(cfg, style: str, data_dir: str, out_dir: str) -> str:
    """Convert ``data_dir`` at ``cfg.preprocess`` (resumes; returns at once when already complete)."""
    from ranzcr_tf.prep.convert import ConvertOptions, convert

    settings = json.dumps({"preprocess": cfg.to_dict()["preprocess"], "folds": cfg.data.folds,
                           "fold_seed": cfg.data.fold_seed, "data": data_dir}, sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:8]
    folder = os.path.join(out_dir, "records", f"{style}-{cfg.preprocess.image_size}px-{digest}")
    if os.path.exists(os.path.join(folder, "manifest.json")):
        return folder
    start = time.monotonic()
    convert(ConvertOptions(data_dir=data_dir, out_dir=folder, preprocess=cfg.preprocess, num_folds=cfg.data.folds,
                           fold_seed=cfg.data.fold_seed, shard_mb=float(cfg.data.shard_mb), progress=False))
    print(f"  converted {style} at {cfg.preprocess.image_size} px -> {folder} in {time.monotonic() - start:.0f} s",
          flush=True)
    return folder


def capped_epochs(configured: int, minutes: float, fixed_seconds: float, epoch_seconds: float) -> int:
    """The most epochs ``E`` in ``1..configured`` with ``fixed_seconds + E * epoch_seconds <= minutes``."""
    room = minutes * 60.0 - max(fixed_seconds, 0.0)
    return max(1, min(int(configured), math.floor(room / max(epoch_seconds, 1e-3))))


def probe_seconds(cell: Cell, args, records: str, folder: str, placement) -> tuple[float, float]:
    """``(t_full, t_fixed)``: seconds of a one-epoch training and of a two-step one (see the module docstring)."""
    times = []
    for name, extra in (("probe-full", []), ("probe-fixed", ["train.steps_per_epoch=2"])):
        probe = load_config(args.config, cell.overrides + ["train.epochs=1"] + extra)
        probe.train.frozen_epochs = min(probe.train.frozen_epochs, 1)
        probe_dir = os.path.join(folder, name)
        shutil.rmtree(probe_dir, ignore_errors=True)  # a killed probe would resume and time too little
        start = time.monotonic()
        _train(probe, records, probe_dir, placement, verbose=0)
        times.append(time.monotonic() - start)
        shutil.rmtree(probe_dir, ignore_errors=True)  # only its time is needed
    return times[0], times[1]


def _train(cfg, records: str, run_dir: str, placement, verbose: int) -> dict:
    import keras

    from ranzcr_tf.train.run import train

    try:  # what train_tpu.py --fold 0 runs: one fold, or 3stage's three stages of it
        return train(cfg, records, [FOLD], run_dir, placement, verbose=verbose)[0]
    finally:
        keras.backend.clear_session()


def run_cell(cell: Cell, style: str, data_dir: str, args, placement, base_epochs: dict) -> dict:
    """Train, predict and score one cell on one style; reuse its result.json when it exists."""
    folder = os.path.join(args.out_dir, "cells", cell.folder, style)
    result_path = os.path.join(folder, "result.json")
    cfg = load_config(args.config, cell.overrides)
    settings = json.loads(json.dumps({"cell": cell.name, "style": style, "data": data_dir, "shuffled": cell.shuffled,
                                      "config": cfg.to_dict(), "minutes_per_cell": args.minutes_per_cell}))
    saved = _read_json(os.path.join(folder, "cell.json"))
    if saved and saved.get("settings") != settings:
        raise ValueError(f"{folder} holds cell {cell.name!r} on {style} trained with other settings (config, data "
                         f"or --minutes-per-cell): use another --out-dir, or delete that folder to redo it")
    if os.path.exists(result_path):
        return {**_read_json(result_path), "reused": True}
    os.makedirs(folder, exist_ok=True)
    source = shuffled_copy(style, data_dir, args.out_dir) if cell.shuffled else data_dir
    records = convert_records(cfg, style + ("-shuffled" if cell.shuffled else ""), source, args.out_dir)

    epochs = (saved or {}).get("epochs")
    probes = (saved or {}).get("probe_seconds")
    if epochs is None and args.minutes_per_cell:
        if cell.shuffled and base_epochs.get(style):
            epochs = base_epochs[style]  # same schedule as the base: the labels are the only difference
        else:
            probes = probe_seconds(cell, args, records, folder, placement)
            full, fixed = probes
            epochs = capped_epochs(cfg.train.epochs, args.minutes_per_cell, fixed, full - fixed)
            print(f"  probes: one epoch {full:.0f} s, fixed costs {fixed:.0f} s -> {epochs} of {cfg.train.epochs} "
                  f"epochs fit {args.minutes_per_cell:g} min", flush=True)
    epochs = int(epochs or cfg.train.epochs)
    io_utils.atomic_write_json(os.path.join(folder, "cell.json"),
                               {"settings": settings, "epochs": epochs, "probe_seconds": probes})
    cfg.train.epochs = epochs
    cfg.train.frozen_epochs = min(cfg.train.frozen_epochs, epochs)

    start = time.monotonic()
    metrics = _train(cfg, records, os.path.join(folder, "run"), placement, verbose=2 if args.epoch_lines else 0)
    train_seconds = time.monotonic() - start

    from ranzcr_tf.report.score import score_files
    from ranzcr_tf.serve import kernel

    start = time.monotonic()
    submission = os.path.join(folder, "submission.csv")
    kernel.run(kernel.build_parser().parse_args(
        ["--data-dir", source, "--tfrecords", records, "--models", os.path.join(folder, "run"),
         "--out", submission, "--max-minutes", "0", "--no-progress"]))
    score = score_files(submission, os.path.join(data_dir, "test_labels.csv"))
    predict_seconds = time.monotonic() - start
    result = {"cell": cell.name, "style": style, "overrides": cell.overrides, "shuffled": cell.shuffled,
              "val_auc": float(metrics["val_auc"]), "test_auc": float(score["mean_auc"]), "epochs": epochs,
              "best_epoch": metrics.get("best_epoch"), "train_minutes": train_seconds / 60.0,
              "predict_minutes": predict_seconds / 60.0, "probe_minutes": sum(probes or ()) / 60.0,
              "minutes": (train_seconds + predict_seconds) / 60.0, "records": records,
              "test_per_class": score["per_class"]}
    io_utils.atomic_write_json(result_path, result)
    return result


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


# ------------------------------------------------------------------------------------------------ table
def write_tables(results: list[dict], cells: list[Cell], styles: list[str], out_dir: str, header: str) -> str:
    """Write results.csv (long) and results.md (wide, README-ready); return the markdown."""
    import pandas as pd

    columns = ["cell", "style", "val_auc", "test_auc", "minutes", "train_minutes", "predict_minutes",
               "probe_minutes", "epochs", "best_epoch", "overrides"]
    frame = pd.DataFrame([{**r, "overrides": " ".join(r["overrides"])} for r in results])[columns]
    io_utils.atomic_write_text(os.path.join(out_dir, "results.csv"), frame.to_csv(index=False, float_format="%.4f"))
    by_key = {(r["cell"], r["style"]): r for r in results}
    head = ["cell (change from base)"]
    for style in styles:
        head += [f"{style} val AUC", f"{style} test AUC", f"{style} min"]
    head.append("min test AUC over styles")
    lines = [header, "", "| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
    for cell in cells:
        row, tests = [cell.name], []
        for style in styles:
            r = by_key.get((cell.name, style))
            if r is None:
                row += ["–", "–", "–"]
                continue
            tests.append(r["test_auc"])
            row += [f"{r['val_auc']:.3f}", f"{r['test_auc']:.3f}", f"{r['minutes']:.1f}"]
        row.append(f"{min(tests):.3f}" if len(tests) == len(styles) else "–")
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    io_utils.atomic_write_text(os.path.join(out_dir, "results.md"), text)
    return text


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/ablate_recipe.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", default=[], metavar="STYLE=DIR", required=True,
                        help="a phantom style and its Kaggle-layout folder with test_labels.csv (repeatable)")
    parser.add_argument("--out-dir", required=True, help="records, runs, results.csv and results.md go here")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="base preset (default configs/cpu_demo.yaml)")
    parser.add_argument("--base", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every cell, e.g. --base train.epochs=20 model.pooling=max")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="one more base override (repeatable), e.g. --set train.epochs=10")
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                        help="an axis of the grid (repeatable), e.g. --vary model.pooling=avg,max,avgmax")
    parser.add_argument("--design", choices=("ofat", "factorial"), default="ofat",
                        help="ofat: the base plus one cell per changed value (default); factorial: every combination")
    parser.add_argument("--control", action="store_true", help="add the base trained on shuffled labels")
    parser.add_argument("--minutes-per-cell", type=float, default=0.0,
                        help="cap the training epochs so that a cell trains in about this many minutes (0 = no cap)")
    parser.add_argument("--epoch-lines", action="store_true", help="print one line per training epoch")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.minutes_per_cell < 0:
            raise ValueError(f"--minutes-per-cell {args.minutes_per_cell:g}: expected >= 0")
        styles = parse_data(args.data)
        base = list(args.base) + list(args.sets)
        cells = plan_cells(args.config, base, parse_vary(args.vary), args.design, args.control)
        args.out_dir = os.path.abspath(args.out_dir)
        os.makedirs(args.out_dir, exist_ok=True)
        from ranzcr_tf.train.placement import choose_placement

        placement = choose_placement(load_config(args.config, base).train.strategy)
        total = len(cells) * len(styles)
        print(f"{len(cells)} cell(s) x {len(styles)} style(s) = {total} fold-0 trainings; base: "
              f"{os.path.relpath(args.config, ROOT)} {' '.join(base)}", flush=True)
        results, base_epochs, done = [], {}, 0
        for cell in cells:
            for style, data_dir in styles.items():
                done += 1
                print(f"[{done}/{total}] {cell.name} on {style} ...", flush=True)
                result = run_cell(cell, style, data_dir, args, placement, base_epochs)
                if cell.name == "base":
                    base_epochs[style] = result["epochs"]
                results.append(result)
                when = "done earlier" if result.get("reused") else f"{result['minutes']:.1f} min"
                print(f"[{done}/{total}] {cell.name} on {style}: val AUC {result['val_auc']:.4f}, test AUC "
                      f"{result['test_auc']:.4f}, {result['epochs']} epochs ({when})", flush=True)
        command = "python benchmarks/ablate_recipe.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = (f"Fold-0 validation and test mean AUC per phantom style; min = minutes of training + prediction on "
                  f"this machine (the shared conversion and the --minutes-per-cell probes are not counted: see "
                  f"probe_minutes in results.csv). Command: `{command}`")
        print("\n" + write_tables(results, cells, list(styles), args.out_dir, header), flush=True)
        print(f"wrote {os.path.join(args.out_dir, 'results.csv')} and results.md", flush=True)
    except (ValueError, FileNotFoundError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"ablate_recipe.py: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:  # the finished cells keep their result.json; rerun after changing the grid
        print(f"ablate_recipe.py: training diverged: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":  # the guard matters: the converter's and kernel's workers may re-import this file
    sys.exit(main())
