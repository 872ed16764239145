"""What soft labels, unlabeled images and blend weights are worth, measured on one synthetic style.

    python -m ranzcr_tf.synth.generate --style hard --out m/data --n-train 600 --n-test 200 --seed 0 --scale 0.3
    python -m ranzcr_tf.synth.generate --style hard --out m/unl --n-train 2000 --n-test 1 --seed 1 --scale 0.3
    python benchmarks/soft_labels.py --data m/data --unlabeled m/unl/train --out-dir m/bench

Every step is the command a user runs (printed as it starts), on the same records and the same epochs:

1. two teachers, ``A`` (the preset) and ``B`` (another seed, ``--b-set``), each trained on all folds;
2. **(a) distillation**: ``pseudo oof A B`` labels every train study with the out-of-fold mean of the
   two teachers; student ``S`` trains fold 0 on ``alpha*soft + (1-alpha)*hard`` (``--alpha``);
   compared with teacher ``A``'s fold 0, the single model it replaces;
3. **(b) unlabeled images**: ``pseudo predict`` labels the unlabeled folder with ``A``'s fold-0 model
   (the first model, trained on the same studies); ``U`` trains fold 0 on the labelled studies'
   hard labels (``soft_alpha 0``) plus those soft-labelled images (``extra_fraction``), compared with ``A``;
4. **(c) blend**: ``serve.blend A B`` prints single, equal-mean and nested blended CV.

``--single-teacher`` leaves B out (half the training): A's fold models make the OOF soft labels, no blend.

Each fold-0 model is also scored on the held-out test set (``kaggle_kernel.py`` on that fold, in this
process, then ``report.score`` against ``test_labels.csv``): the figure that no soft label can leak into (a
student's fold-0 validation can, indirectly: the soft label of a fold-1 study comes from the fold-1 model, which
trained on fold 0). Rerunning skips every step whose output exists. Results: ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DONE = "metrics.json"  # a fold folder's last write (best.json is rewritten during training)


class StepFailed(Exception):
    """A project command exited non-zero."""


def run(argv: list[str], done: str, log: str | None = None) -> None:
    """Run one project command unless its output ``done`` exists already (resume); its output goes to
    ``log`` when given, else to this terminal."""
    if os.path.exists(done):
        return
    print(f"$ python {' '.join(argv)}", flush=True)
    start = time.time()
    with open(log, "w") if log else open(os.devnull, "w") as sink:
        code = subprocess.run([sys.executable, *argv], stdout=sink if log else None, stderr=subprocess.STDOUT).returncode
    if code:
        raise StepFailed(f"that command exited {code}" + (f"; its output is in {log}" if log else ""))
    print(f"  ({time.time() - start:.0f} s)", flush=True)


def script(name: str) -> str:
    return os.path.join(ROOT, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Kaggle-layout folder with test_labels.csv (synth.generate)")
    parser.add_argument("--unlabeled", required=True, help="folder of unlabeled images (e.g. another set's train/)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "cpu_demo.yaml"))
    parser.add_argument("--set", action="append", default=[], help="extra override for every training (repeatable)")
    parser.add_argument("--b-set", action="append",
                        help="what makes teacher B differ from A (repeatable; default train.seed=7)")
    parser.add_argument("--single-teacher", action="store_true",
                        help="teacher A alone (half the training; no blend): its folds' OOF make the soft labels")
    parser.add_argument("--alpha", type=float, default=0.5, help="train.soft_alpha of the student (default 0.5)")
    parser.add_argument("--extra-fraction", type=float, default=0.5, help="train.extra_fraction of U (default 0.5)")
    args = parser.parse_args(argv)
    for path, what in ((os.path.join(args.data, "test_labels.csv"), "--data"), (args.unlabeled, "--unlabeled")):
        if not os.path.exists(path):
            print(f"error: {what}: {path} not found (--data is a Kaggle-layout folder with test_labels.csv, as "
                  "synth.generate writes; --unlabeled a folder of images)", file=sys.stderr)
            return 2
    try:
        print(measure(args))
    except (StepFailed, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def score_models(args, out: str, runs: str, records: str, extra: str, variants: dict) -> list[tuple]:
    """Fold 0 of each teacher, S and U through the kernel and the scorer: (what, validation AUC, test AUC) rows.
    The kernel runs in this process (one framework start for all four, as ``ablate_recipe.py`` does), each
    printed as the ``kaggle_kernel.py`` command it is; ``report.score.score_files`` scores it."""
    from ranzcr_tf import cli
    from ranzcr_tf.report.score import score_files
    from ranzcr_tf.serve import kernel

    rows = []
    teachers = "+".join(variants)
    for name, what in (*((name, f"teacher {name}, fold 0") for name in variants),
                       ("S", f"(a) student on {teachers} OOF soft labels, alpha {args.alpha}"),
                       ("U", f"(b) A's data + {_count(extra)} unlabeled soft-labelled by A fold 0")):
        fold = os.path.join(runs, name, "fold0")
        submission = os.path.join(out, f"test_{name}.csv")
        argv = ["--data-dir", args.data, "--models", fold, "--tfrecords", records, "--out", submission, "--quiet"]
        if not os.path.exists(submission):
            print(f"$ python {script('kaggle_kernel.py')} {' '.join(argv)}", flush=True)
            start = time.time()
            cli.setup([])
            log = os.path.join(out, f"kernel_{name}.log")
            with open(log, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                try:
                    kernel.run(kernel.build_parser().parse_args(argv))
                except Exception as error:  # the kernel's own one-line errors carry an exit code
                    raise StepFailed(f"kaggle_kernel.py on {fold}: {error} (its output: {log})") from error
            print(f"  ({time.time() - start:.0f} s)", flush=True)
        test_auc = float(score_files(submission, os.path.join(args.data, "test_labels.csv"))["mean_auc"])
        with open(os.path.join(fold, "best.json")) as handle:
            rows.append((what, json.load(handle)["val_auc"], test_auc))
    return rows


def results_table(out: str, rows: list[tuple], blended: bool) -> str:
    """The markdown table of ``rows`` and the blend's log, written to ``OUT/results.md`` and returned."""
    blend_text = "(--single-teacher: no blend)"
    if blended:
        with open(os.path.join(out, "blend.log")) as handle:
            blend_text = handle.read()
    table = ["| model | fold-0 validation AUC | test AUC |", "|---|---|---|"]
    table += [f"| {what} | {val:.4f} | {test:.4f} |" for what, val, test in rows]
    text = "\n".join(table) + "\n\n(c) blend (serve.blend):\n\n```\n" + blend_text.strip() + "\n```\n"
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(text)
    return text


def measure(args) -> str:
    """Every step (skipping those done), then the results table, written to ``OUT/results.md`` and returned."""
    out = args.out_dir
    os.makedirs(out, exist_ok=True)
    records, extra = os.path.join(out, "records"), os.path.join(out, "extra_records")
    base = ["--config", args.config] + [item for value in args.set for item in ("--set", value)]
    run([script("make_tfrecords.py"), *base, "--data-dir", args.data, "--out-dir", records],
        os.path.join(records, "manifest.json"))
    run([script("make_tfrecords.py"), *base, "--unlabeled", args.unlabeled, "--out-dir", extra],
        os.path.join(extra, "manifest.json"))

    runs = os.path.join(out, "runs")
    with open(os.path.join(records, "manifest.json")) as handle:
        num_folds = json.load(handle)["num_folds"]
    variants = {"A": [], "B": [item for value in args.b_set or ["train.seed=7"] for item in ("--set", value)]}
    if args.single_teacher:
        del variants["B"]
    for name, overrides in variants.items():
        run([script("train_tpu.py"), *base, *overrides, "--tfrecords", records, "--fold", "all",
             "--out-dir", os.path.join(runs, name), "--quiet"],
            os.path.join(runs, name, f"fold{num_folds - 1}", DONE), os.path.join(out, f"train_{name}.log"))

    soft_train = os.path.join(out, "soft_train.csv")
    run(["-m", "ranzcr_tf.serve.pseudo", "--quiet", "oof", *(os.path.join(runs, name) for name in variants),
         "--tfrecords", records, "--out", soft_train], soft_train)
    run([script("train_tpu.py"), *base, "--tfrecords", records, "--fold", "0", "--out-dir", os.path.join(runs, "S"),
         "--set", f"train.soft_labels={soft_train}", "--set", f"train.soft_alpha={args.alpha}", "--quiet"],
        os.path.join(runs, "S", "fold0", DONE), os.path.join(out, "train_S.log"))

    soft_extra, soft_all = os.path.join(out, "soft_extra.csv"), os.path.join(out, "soft_all.csv")
    run(["-m", "ranzcr_tf.serve.pseudo", "--quiet", "predict", "--models", os.path.join(runs, "A", "fold0"),
         "--tfrecords", extra, "--split", "extra", "--out", soft_extra], soft_extra)
    if not os.path.exists(soft_all):  # the labelled studies need rows too; at soft_alpha 0 they train on hard labels
        pd.concat([pd.read_csv(soft_train), pd.read_csv(soft_extra)]).to_csv(soft_all + ".tmp", index=False)
        os.replace(soft_all + ".tmp", soft_all)
    run([script("train_tpu.py"), *base, "--tfrecords", records, "--fold", "0", "--out-dir", os.path.join(runs, "U"),
         "--set", f"train.soft_labels={soft_all}", "--set", "train.soft_alpha=0",
         "--set", f"train.extra_records={extra}", "--set", f"train.extra_fraction={args.extra_fraction}", "--quiet"],
        os.path.join(runs, "U", "fold0", DONE), os.path.join(out, "train_U.log"))

    blend_json = os.path.join(out, "blend.json")
    if len(variants) > 1:
        run(["-m", "ranzcr_tf.serve.blend", *(os.path.join(runs, name) for name in variants), "--out", blend_json],
            blend_json, os.path.join(out, "blend.log"))

    return results_table(out, score_models(args, out, runs, records, extra, variants), len(variants) > 1)


def _count(extra: str) -> int:
    with open(os.path.join(extra, "manifest.json")) as handle:
        return json.load(handle)["num_extra"]


if __name__ == "__main__":
    sys.exit(main())
