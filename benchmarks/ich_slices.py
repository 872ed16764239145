#!/usr/bin/env python
"""Does adjacent-slice input beat single-slice input on a set where bleeds span slices? (issue 18)

    python benchmarks/ich_slices.py                          # ~10 min on 2 busy cores
    python benchmarks/ich_slices.py --patients 8 --epochs 3  # a quicker look

One synthetic ICH set (``python -m ranzcr_tf.synth.ich``), converted twice with the same windows
(``task.slice_context`` 0: 3 channels; 1: 9 channels), fold 0 trained at the same budget with
``configs/rsna_ich_cpu.yaml``, plus a control: slice_context 1 with the training labels shuffled (a
model that learns nothing should score near the prior's log loss and an AUC near 0.5). Prints the
fold-0 validation weighted log loss (lower is better) and mean AUC of each.
"""

from __future__ import annotations

import argparse
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


def _shuffle_labels(data_dir: str, out_dir: str, seed: int) -> str:
    """A copy of the set whose stage_2_train.csv has its images' label rows shuffled (files linked, not copied)."""
    import numpy as np
    import pandas as pd

    from ranzcr_tf.config import load_config
    from ranzcr_tf.prep.long_csv import long_to_wide, read_long_csv, wide_to_long

    task = load_config(PRESET).task
    wide = long_to_wide(read_long_csv(os.path.join(data_dir, task.train_csv)), task.labels, task.id_column)
    values = wide[list(task.labels)].to_numpy()[np.random.default_rng(seed).permutation(len(wide))]
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(data_dir):
        if name != task.train_csv:
            os.symlink(os.path.join(data_dir, name), os.path.join(out_dir, name))
    long = wide_to_long(wide[task.id_column].tolist(), values, task.labels)
    long["Label"] = long["Label"].astype(int)
    pd.DataFrame(long).to_csv(os.path.join(out_dir, task.train_csv), index=False)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=16, help="synthetic patients (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="synthetic slice size and stored size (default 64)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per arm (default 8, the preset's)")
    parser.add_argument("--work", help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="ich-slices-")
    data = os.path.join(work, "data")
    start = time.monotonic()
    _run(["-m", "ranzcr_tf.synth.ich", "--out", data, "--patients", str(args.patients), "--seed", str(args.seed),
          "--size", str(args.size)])
    arms = {"single slice (context 0, 3 ch)": (data, ["task.slice_context=0", "model.input_channels=3"]),
            "adjacent slices (context 1, 9 ch)": (data, []),
            "control: shuffled labels (context 1)": (_shuffle_labels(data, os.path.join(work, "shuffled"), args.seed),
                                                     [])}
    rows = []
    for index, (name, (data_dir, overrides)) in enumerate(arms.items()):
        sets = [f"preprocess.image_size={args.size}", f"train.epochs={args.epochs}", *overrides]
        records = os.path.join(work, f"records{index}")
        run_dir = os.path.join(work, f"run{index}")
        flags = [item for s in sets for item in ("--set", s)]
        _run(["make_tfrecords.py", "--config", PRESET, "--data-dir", data_dir, "--out-dir", records, "--no-test",
              "--quiet", *flags])
        _run(["train_tpu.py", "--config", PRESET, "--tfrecords", records, "--out-dir", run_dir, "--fold", "0", *flags])
        with open(os.path.join(run_dir, "fold0", "metrics.json")) as fh:
            metrics = json.load(fh)
        rows.append((name, metrics["val_weighted_log_loss"], metrics["val_auc"], metrics["num_examples"]))
        print(f"{name}: val weighted log loss {rows[-1][1]:.4f}, mean AUC {rows[-1][2]:.4f} "
              f"({rows[-1][3]} validation slices; {(time.monotonic() - start) / 60:.1f} min so far)", flush=True)
    print(f"\nsynthetic ICH set: {args.patients} patients, seed {args.seed}, {args.size} px, {args.epochs} epochs, "
          f"fold 0 of configs/rsna_ich_cpu.yaml; work folder {work}")
    for name, loss, auc, _ in rows:
        print(f"  {name:40s} weighted log loss {loss:.4f}   mean AUC {auc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
