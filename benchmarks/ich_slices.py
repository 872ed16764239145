#!/usr/bin/env python
"""Does adjacent-slice input beat single-slice input on a set where bleeds span slices? (issue 18)

    python benchmarks/ich_slices.py                          # minutes on a CPU: 80 patients, 40 epochs
    python benchmarks/ich_slices.py --seeds 0 1              # two synthetic sets (twice as long)
    python benchmarks/ich_slices.py --patients 16 --epochs 8 # a quick look (too little to learn anything)

One synthetic ICH set per seed (``python -m ranzcr_tf.synth.ich``, 10% of the patients held out as the unused
test split), converted twice with the same windows (``task.slice_context`` 0: 3 channels; 1: 9 channels), fold 0
of 4 (patient-grouped) trained at the same budget with ``configs/rsna_ich_cpu.yaml``, plus a control: slice
context 1 with the training labels shuffled across images (a model that learns nothing scores near the
prior's log loss and an AUC near 0.5). Per arm it prints the fold-0 validation weighted log loss (lower is
better; ``any`` x2), the mean AUC over the six labels, the ``any`` AUC, and the prior's weighted log loss
(predicting each label's positive rate in the training folds) as the reference line. The best epoch is
chosen on the same validation fold (the preset's checkpointing), equally for every arm.

What it measured, with the date, commit and machine: docs/results.md#ich-adjacent-slices.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "configs", "rsna_ich_cpu.yaml")


def _run(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def _task():
    from ranzcr_tf.config import load_config

    return load_config(PRESET).task


def _train_labels(data_dir: str):
    """The set's labels, one row per image (``task.id_column`` + the label columns)."""
    from ranzcr_tf.prep.long_csv import long_to_wide, read_long_csv

    task = _task()
    return long_to_wide(read_long_csv(os.path.join(data_dir, task.train_csv)), task.labels, task.id_column)


def _shuffle_labels(data_dir: str, out_dir: str, seed: int) -> str:
    """A copy of the set whose stage_2_train.csv has its images' label rows shuffled (files linked, not copied)."""
    import numpy as np
    import pandas as pd

    from ranzcr_tf.prep.long_csv import wide_to_long

    task = _task()
    wide = _train_labels(data_dir)
    values = wide[list(task.labels)].to_numpy()[np.random.default_rng(seed).permutation(len(wide))]
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(data_dir):
        if name != task.train_csv:
            os.symlink(os.path.join(data_dir, name), os.path.join(out_dir, name))
    long = wide_to_long(wide[task.id_column].tolist(), values, task.labels)
    long["Label"] = long["Label"].astype(int)
    pd.DataFrame(long).to_csv(os.path.join(out_dir, task.train_csv), index=False)
    return out_dir


def _prior_log_loss(data_dir: str, records: str, run_dir: str) -> float:
    """Weighted log loss on fold 0's validation targets of the constant prediction "each label's positive rate
    in the training folds" (the records' folds.csv says which images trained)."""
    import numpy as np
    import pandas as pd

    from ranzcr_tf.model.metrics import weighted_log_loss

    task = _task()
    folds = pd.read_csv(os.path.join(records, "folds.csv"), dtype={task.id_column: str})
    labels = _train_labels(data_dir).merge(folds[[task.id_column, "fold"]], on=task.id_column)
    rate = labels.loc[labels["fold"] != 0, list(task.labels)].to_numpy(float).mean(axis=0)
    with open(os.path.join(run_dir, "fold0", "oof.csv")) as handle:
        oof = pd.read_csv(io.StringIO(handle.read()))
    targets = oof[[f"target_{label}" for label in task.labels]].to_numpy(float)
    return weighted_log_loss(targets, np.broadcast_to(rate, targets.shape), task.weights())[0]


def run_seed(args, seed: int, work: str, start: float) -> list[dict]:
    data = os.path.join(work, f"data{seed}")
    _run(["-m", "ranzcr_tf.synth.ich", "--out-dir", data, "--patients", str(args.patients), "--seed", str(seed),
          "--size", str(args.size), "--test-fraction", "0.1"])
    arms = {"single slice (context 0, 3 ch)": (data, ["task.slice_context=0", "model.input_channels=3"]),
            "adjacent slices (context 1, 9 ch)": (data, []),
            "control: shuffled labels (context 1)": (_shuffle_labels(data, os.path.join(work, f"shuffled{seed}"), seed),
                                                     [])}
    rows = []
    for index, (name, (data_dir, overrides)) in enumerate(arms.items()):
        sets = [f"preprocess.image_size={args.size}", f"train.epochs={args.epochs}", *overrides]
        records = os.path.join(work, f"records{seed}_{index}")
        run_dir = os.path.join(work, f"run{seed}_{index}")
        flags = [item for s in sets for item in ("--set", s)]
        _run(["make_tfrecords.py", "--config", PRESET, "--data-dir", data_dir, "--out-dir", records, "--no-test",
              "--quiet", *flags])
        _run(["train_tpu.py", "--config", PRESET, "--tfrecords", records, "--out-dir", run_dir, "--fold", "0", *flags])
        with open(os.path.join(run_dir, "fold0", "metrics.json")) as handle:
            metrics = json.load(handle)
        rows.append({"seed": seed, "arm": name, "loss": metrics["val_weighted_log_loss"], "auc": metrics["val_auc"],
                     "any_auc": metrics["per_class_auc"]["any"], "prior": _prior_log_loss(data_dir, records, run_dir),
                     "best_epoch": metrics["best_epoch"], "slices": metrics["num_examples"]})
        row = rows[-1]
        print(f"seed {seed}, {name}: val weighted log loss {row['loss']:.4f} (prior {row['prior']:.4f}), mean AUC "
              f"{row['auc']:.4f}, any AUC {row['any_auc']:.4f}, best epoch {row['best_epoch']} ({row['slices']} "
              f"validation slices; {(time.monotonic() - start) / 60:.1f} min so far)", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=80, help="synthetic patients per set (default 80)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one synthetic set per seed (default 0)")
    parser.add_argument("--size", type=int, default=64, help="synthetic slice size and stored size (default 64)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs per arm (default 40)")
    parser.add_argument("--work", help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="ich-slices-")
    start = time.monotonic()
    rows = [row for seed in args.seeds for row in run_seed(args, seed, work, start)]
    print(f"\nsynthetic ICH sets: {args.patients} patients, seeds {args.seeds}, {args.size} px, {args.epochs} epochs, "
          f"fold 0 of configs/rsna_ich_cpu.yaml; {(time.monotonic() - start) / 60:.1f} min; work folder {work}")
    print(f"  {'seed':4s}  {'arm':38s} {'wLogLoss':>8s} {'prior':>7s} {'meanAUC':>7s} {'anyAUC':>7s} {'best ep':>7s}")
    for row in rows:
        print(f"  {row['seed']:<4d}  {row['arm']:38s} {row['loss']:8.4f} {row['prior']:7.4f} {row['auc']:7.4f} "
              f"{row['any_auc']:7.4f} {row['best_epoch']:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
