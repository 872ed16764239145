"""benchmarks/bench_step.py at its smallest setting, as a real subprocess: every available backend trains and
predicts one timed step and lands in the table with positive rates, beside the input pipeline's rate."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_step.py")
TORCH_HERE = all(importlib.util.find_spec(name) is not None for name in ("torch", "timm"))


def _run(*flags, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_smallest_setting_runs_on_every_available_backend(tmp_path):
    # Two warm-up steps: JAX compiles the training step twice (the second time for the trained state's sharding).
    rows = ["keras-tf", "keras-jax"] + (["timm-eager"] if TORCH_HERE else [])
    out = tmp_path / "step.json"
    done = _run("--backbone", "compact_cnn", "--size", "32", "--batch", "2", "--warmup", "2", "--steps", "1",
                "--rows", ",".join(rows), "--timm-model", "tf_mobilenetv3_small_minimal_100",
                "--pipeline-records", "8", "--pipeline-batches", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    number = r"(\d+\.\d+)"
    for name in rows:
        match = re.search(rf"^{name}\s+\S+\s+{number}\s+{number}\s+{number}\s+{number}\s+{number}\s", table, re.M)
        assert match, f"no row {name} with numbers in:\n{table}"
        train, train_x, infer, infer_x, input_over_train = (float(v) for v in match.groups())
        assert train > 0 and infer > 0 and train_x > 0 and infer_x > 0 and input_over_train > 0
    reference = "timm-eager" if TORCH_HERE else "keras-tf"
    assert f"ratios (x) are to the {reference} row" in table
    assert re.search(rf"^{reference}\s+\S+\s+{number}\s+1\.00\s", table, re.M), table
    pipeline = re.search(r"^input pipeline .*: (\d+\.\d+) images/s", table, re.M)
    assert pipeline and float(pipeline.group(1)) > 0, table

    saved = json.loads(out.read_text())
    assert list(saved["rows"]) == rows and saved["reference"] == reference
    for name in rows:
        row = saved["rows"][name]
        assert row["train_images_per_s"] > 0 and row["infer_images_per_s"] > 0 and row["timed_steps"] == 1
    assert saved["rows"]["keras-jax"]["versions"].startswith("keras 3") and "jax" in saved["rows"]["keras-jax"]["versions"]
    assert saved["pipeline"]["images_per_s"] > 0


def test_unknown_row_is_one_line_and_exit_2():
    done = _run("--rows", "keras-tf,keras-pytorch", timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bench_step.py: error: --rows 'keras-tf,keras-pytorch': expected a comma-separated subset of "
        "keras-tf, keras-tf-xla, keras-jax, timm-eager, timm-compile"]


def test_unknown_backbone_stops_the_run_with_the_registry_message():
    done = _run("--backbone", "efficientnet_b9", "--rows", "keras-tf,keras-jax", "--no-pipeline", timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith(("running ", "  "))]
    assert len(lines) == 1 and lines[0].startswith("bench_step.py: error: row keras-tf: unknown backbone 'efficientnet_b9'")
    assert "running keras-jax" not in done.stderr  # every row would fail the same way


@pytest.mark.skipif(TORCH_HERE, reason="torch and timm are importable here")
def test_timm_rows_without_torch_are_skipped_with_a_note():
    done = _run("--rows", "timm-eager", "--no-pipeline", timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^timm-eager .* skipped: (torch|timm) is not importable by .*pip install torch timm",
                     done.stdout, re.M), done.stdout
