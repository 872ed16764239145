"""The end-to-end demo behind ``make demo``: every stage on a fresh synthetic dataset.

Each stage is the same command a user runs by hand; the demo only chains them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from ranzcr_tf import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "configs", "cpu_lines.yaml")


class StepFailed(Exception):
    """A stage's command failed: the demo stops with that command's exit code (its error is already printed)."""

    def __init__(self, step: str, code: int):
        super().__init__(f"the {step} step failed (exit code {code}); its error is printed above")
        self.exit_code = code


def _run(step: str, argv: list[str]) -> None:
    print(f"\n=== {step}: {' '.join(argv)}", flush=True)
    start = time.time()
    code = subprocess.run([sys.executable, *argv]).returncode
    if code:
        raise StepFailed(step, code)
    print(f"=== {step} done in {time.time() - start:.0f} s", flush=True)


def build_parser():
    parser = cli.build_parser("python -m ranzcr_tf.demo", __doc__)
    parser.add_argument("--out-dir", default="demo", help="folder for the data, records, run and submission (default: demo)")
    cli.hidden_alias(parser, "--out", "out_dir")
    parser.add_argument("--n-train", type=int, default=600, help="synthetic training studies (default: 600)")
    parser.add_argument("--n-test", type=int, default=200, help="synthetic test studies (default: 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", choices=("easy", "hard"), default="hard",
                        help="phantom style (default: hard, thin faint crowded lines; `make demo-easy` runs easy)")
    cli.add_config_flags(parser, default=PRESET, help_text="training preset (default: configs/cpu_lines.yaml)",
                         overrides=False)
    return parser


def run(args) -> int:
    preset = args.config
    data = os.path.join(args.out_dir, "data")
    start = time.time()
    _run("synthetic data", ["-m", "ranzcr_tf.synth.generate", "--out-dir", data, "--n-train", str(args.n_train),
                            "--n-test", str(args.n_test), "--seed", str(args.seed), "--style", args.style,
                            "--preview", os.path.join(data, "preview.png")])
    records = os.path.join(args.out_dir, "tfrecords")
    run = os.path.join(args.out_dir, "runs", os.path.splitext(os.path.basename(preset))[0])
    submission = os.path.join(args.out_dir, "submission.csv")
    script = lambda name: os.path.join(ROOT, name)  # noqa: E731
    _run("convert to TFRecords",
         [script("make_tfrecords.py"), "--config", preset, "--data-dir", data, "--out-dir", records])
    _run("train fold 0",
         [script("train_tpu.py"), "--config", preset, "--tfrecords", records, "--fold", "0", "--out-dir", run, "--quiet"])
    _run("submission",
         [script("kaggle_kernel.py"), "--data-dir", data, "--models", run, "--out", submission, "--max-minutes", "10"])
    _run("score against the synthetic test labels",
         ["-m", "ranzcr_tf.report.score", submission, os.path.join(data, "test_labels.csv")])
    report = os.path.join(args.out_dir, "report")
    # A bounded Grad-CAM budget (one study per column) keeps the report to seconds on a CPU.
    _run("run report", ["-m", "ranzcr_tf.report", run, "--tfrecords", records, "--out-dir", report,
                        "--max-images", "11", "--quiet"])
    print(f"\ndemo finished in {time.time() - start:.0f} s; outputs under {args.out_dir}/")
    print(f"run report: {os.path.join(report, 'index.html')} (open it in a browser)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
