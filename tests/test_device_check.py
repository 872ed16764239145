"""benchmarks/device_check.py where the accelerator box's Python is: Keras on JAX, no TensorFlow (.venv-notf,
``make notf-venv``). The smoke run is a real subprocess; the JSON must name every row and every reason."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.py")
NOTF_PYTHON = os.path.join(ROOT, os.environ.get("NOTF_VENV", ".venv-notf"), "bin", "python")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_step  # noqa: E402
import device_check  # noqa: E402


def _notf_python() -> str:
    if not os.path.exists(NOTF_PYTHON):
        pytest.skip(f"{NOTF_PYTHON} does not exist: `make notf-venv` builds it (Keras, JAX and the package's "
                    "dependencies from PyPI, no TensorFlow); it could not be built here")
    has_tf = subprocess.run([NOTF_PYTHON, "-c", "import importlib.util, sys; "
                             "sys.exit(importlib.util.find_spec('tensorflow') is not None)"], timeout=60)
    assert has_tf.returncode == 0, f"{NOTF_PYTHON} can import tensorflow: the check would prove nothing"
    return NOTF_PYTHON


@pytest.mark.slow
def test_smoke_run_without_tensorflow(tmp_path):
    out = tmp_path / "device.json"
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT)
    # Unloaded, about a minute; the budget leaves room for a CPU shared with other jobs.
    done = subprocess.run([_notf_python(), SCRIPT, "--smoke", "--out", str(out), "--budget-s", "780"],
                          capture_output=True, text=True, env=env, timeout=840)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tensorflow_imported"] is False

    rows = report["rows"]
    assert list(rows) == ["keras-jax", "timm-compile", "timm-eager"] and set(rows) <= set(bench_step.ROWS)
    keras_row = rows["keras-jax"]
    assert keras_row["train_images_per_s"] > 0 and keras_row["infer_images_per_s"] > 0
    assert keras_row["tensorflow_imported"] is False and keras_row["versions"].startswith("keras 3")
    # One device: the training step compiles once per fit (over a one-device DataParallel mesh it compiled twice).
    assert len(keras_row["compile_s"]["train_step"]) == 1 and len(keras_row["compile_s"]["predict_step"]) == 1
    assert report["reference"] == "keras-jax" and report["ratios"]["keras-jax"] == {"train": 1.0, "infer": 1.0}
    for name in ("timm-compile", "timm-eager"):  # no torch in this venv: a reason, never a gap
        assert re.match(r"(torch|timm) is not importable by ", rows[name]["skipped"]), rows[name]
        assert any(line.startswith(f"{name}: ") for line in report["not_done"])

    for recipe in ("plain", "aux_seg"):
        search = report["max_batch"][recipe]
        assert search["recipe"] == recipe and search["largest_fit"] >= 2 and search["stopped"]
        assert search["probes"][0] == {**search["probes"][0], "batch": 2, "fits": True, "tensorflow_imported": False}
    kernel = report["kernel"]
    assert kernel["images_per_s_tta2"] == pytest.approx(keras_row["infer_images_per_s"] / 2)
    assert kernel["hours"] == pytest.approx(3582 * 5 * 2 / keras_row["infer_images_per_s"] / 3600)
    assert re.search(r"^keras-jax\s+cpu\s+\d+\.\d+\s+1\.00\s+\d+\.\d+\s+1\.00\s", done.stdout, re.M), done.stdout
    assert "tensorflow imported: False" in done.stdout


def _search(fits_up_to: int, start: int) -> tuple[int, int | None, list[int]]:
    """The search's batch sequence against a device on which batches up to ``fits_up_to`` fit."""
    lo, hi, tried = 0, None, []
    while (batch := device_check.next_batch(lo, hi, start, None)) is not None:
        tried.append(batch)
        if batch <= fits_up_to:
            lo = batch
        else:
            hi = batch
    return lo, hi, tried


def test_search_doubles_then_bisects_to_the_exact_largest_batch():
    assert _search(13, start=8) == (13, 14, [8, 16, 12, 14, 13])
    assert _search(3, start=8) == (3, 4, [8, 4, 2, 3])
    assert _search(0, start=2) == (0, 1, [2, 1])
    # Upwards, a memory estimate replaces the doubling (never below one more image).
    assert device_check.next_batch(8, None, 8, 23) == 23 and device_check.next_batch(8, None, 8, 5) == 9


def test_memory_estimate_is_linear_in_the_batch_and_stays_below_the_limit():
    gib = 2**30
    # 10 GiB fixed + 2 GiB per image on an 80 GiB device: 97 % of 80 GiB is reached at 33.8 images.
    assert device_check.memory_estimate([(4, 18 * gib), (8, 26 * gib)], 80 * gib) == 33
    assert device_check.memory_estimate([(8, 26 * gib)], 80 * gib) == 23  # through zero: an underestimate
    assert device_check.memory_estimate([], 80 * gib) is None and device_check.memory_estimate([(8, 1.0)], None) is None


def test_search_stops_say_why():
    stop = device_check._search_stop
    assert stop(13, 14, [{}] * 5, 6, 0, [{"fits": False}], 60, "") == "exact: one more image did not fit"
    assert stop(0, 1, [{}] * 2, 6, 0, [{"fits": False}], 60, "") == "batch 1 did not fit"
    assert stop(8, 16, [{}] * 2, 6, 0, [{"fits": False}], 60, "") is None  # out of memory: a fresh process
    assert stop(8, None, [{}] * 2, 2, 0, [{"fits": True}], 60, "") == "probe limit of 2 reached"
    assert stop(8, None, [{}], 6, None, [], 60, "") == "time cap of 60 s reached"
    assert stop(0, None, [], 6, 1, [], 60, "x\nImportError: no keras\n") == "probe process exit 1: ImportError: no keras"


def test_out_is_required_with_one_line():
    done = subprocess.run([sys.executable, SCRIPT, "--smoke"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["device_check.py: error: --out FILE.json is required: the JSON that "
                                                "keeps every figure and every reason"]
