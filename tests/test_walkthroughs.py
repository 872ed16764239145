"""docs/walkthroughs.md: every command in it is run by a test here or in tests/test_notebooks.py, or says why it
cannot run on a CPU-only machine without accounts (a TPU, a GPU, a Kaggle account, a cloud project, PyPI).

Which test runs which command (a command the tables below do not know fails the first test):

- the laptop smoke block (``synth.generate``, ``make_tfrecords.py``, ``train_tpu.py``, ``kaggle_kernel.py``,
  ``report.score``): ``test_laptop_smoke_block_runs_as_written``, literally, in a temporary folder;
- ``python -m ranzcr_tf.serve.package ... --kaggle-user NAME``: ``tests/test_notebooks.py``
  (``test_notebooks_records_train_resume_package_and_submit_offline`` builds the bundle with it; the user-name
  sources: ``test_kaggle_user_comes_from_the_flag_then_the_environment_then_kaggle_json``);
- the notebooks' commands (``make_tfrecords.py``, ``train_tpu.py`` resumed across sessions, ``pip install
  --no-index --find-links .../wheels ranzcr-tf``, ``python -m ranzcr_tf.serve.kernel``): ``tests/test_notebooks.py``;
- the ``tf-cpu`` extra's choice of wheel per platform: ``test_tf_cpu_extra_picks_a_wheel_pypi_has``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WALKTHROUGHS = os.path.join(REPO, "docs", "walkthroughs.md")
SMOKE = "test_laptop_smoke_block_runs_as_written"
NOTEBOOKS = "tests/test_notebooks.py::test_notebooks_records_train_resume_package_and_submit_offline"
# (pattern, the test that runs it)
RUN_HERE = [
    (r"^python -m ranzcr_tf\.synth\.generate --out-dir data/synthetic ", SMOKE),
    (r"^python make_tfrecords\.py --config configs/cpu_demo\.yaml ", SMOKE),
    (r"^python train_tpu\.py --config configs/cpu_demo\.yaml ", SMOKE),
    (r"^python kaggle_kernel\.py --data-dir data/synthetic ", SMOKE),
    (r"^python -m ranzcr_tf\.report\.score ", SMOKE),
    (r"^python -m ranzcr_tf\.serve\.package --models \S+ --out-dir \S+ --kaggle-user \S+$", NOTEBOOKS),
]
# (pattern, why no test here runs it)
NOT_HERE = [
    (r"^make demo$", "minutes on 2 cores (docs/results.md#make-demo); its steps are the smoke block's commands at full size"),
    (r"^pip install ", "installs from PyPI (network); the tf-cpu extra's markers are checked by "
                       "test_tf_cpu_extra_picks_a_wheel_pypi_has, TPU/GPU wheels need that hardware"),
    (r"^kaggle (datasets|kernels) ", "needs a Kaggle account and its API token"),
    (r"^gcloud ", "needs a Google Cloud project with TPU quota"),
    (r"^git clone https://github\.com/YOUR/", "a placeholder for your fork"),
    (r"^python make_tfrecords\.py --config configs/b7_768_tpu\.yaml .*gs://", "the real data and a GCS bucket"),
    (r"^(KERAS_BACKEND=jax )?python train_tpu\.py --config configs/(b7_768_tpu|b5_512_gpu)\.yaml ",
     "the mission presets need a TPU or GPU (and the real records)"),
]


def walkthrough_commands() -> list[tuple[str, str]]:
    """``(section, command)`` for every line of every ```bash block (comments and blank lines left out)."""
    commands, section, in_block = [], "", False
    for line in open(WALKTHROUGHS).read().splitlines():
        stripped = line.strip()
        if stripped.startswith("## "):
            section = stripped[3:]
        elif stripped.startswith("```"):
            in_block = stripped == "```bash" and not in_block
        elif in_block and stripped and not stripped.startswith("#"):
            commands.append((section, stripped))
    return commands


def test_every_command_is_run_by_a_test_or_says_why_not():
    commands = walkthrough_commands()
    sections = {section for section, _ in commands}
    assert {"Laptop (CPU)", "Kaggle", "GCP TPU VM", "GPU box"} <= sections, sections
    unknown = [command for _, command in commands
               if not any(re.search(pattern, command) for pattern, _ in RUN_HERE + NOT_HERE)]
    assert not unknown, f"commands no test runs and no reason covers: {unknown}"
    used = {pattern for pattern, _ in RUN_HERE if any(re.search(pattern, c) for _, c in commands)}
    assert used == {pattern for pattern, _ in RUN_HERE}, "a RUN_HERE entry matches no command: drop it"


@pytest.mark.slow
def test_laptop_smoke_block_runs_as_written(tmp_path):
    """The laptop's smoke block, command by command as the page prints it, in a fresh folder holding what a
    checkout holds (configs/, the three scripts)."""
    for item in ("configs", "make_tfrecords.py", "train_tpu.py", "kaggle_kernel.py"):
        os.symlink(os.path.join(REPO, item), tmp_path / item)
    block = [command for section, command in walkthrough_commands()
             if section == "Laptop (CPU)" and any(re.search(p, command) for p, where in RUN_HERE if where == SMOKE)]
    assert len(block) == 5
    env = {**os.environ, "PYTHONPATH": REPO, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""}
    for command in block:
        argv = shlex.split(command)
        done = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
    assert "mean AUC" in done.stdout  # the score of the submission against the phantoms' labels
    assert (tmp_path / "runs" / "smoke" / "fold0" / "metrics.json").is_file()


@pytest.mark.parametrize("system, machine, wheel", [
    ("Linux", "x86_64", "tensorflow-cpu"), ("Windows", "AMD64", "tensorflow-cpu"),
    ("Darwin", "arm64", "tensorflow"), ("Linux", "aarch64", "tensorflow")])
def test_tf_cpu_extra_picks_a_wheel_pypi_has(system, machine, wheel):
    """PyPI (2.21): tensorflow-cpu has win_amd64 and manylinux x86_64 wheels only; tensorflow also has manylinux
    aarch64 and macosx arm64 ones, CPU builds. The extra must name exactly one of them on each platform."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        extra = tomllib.load(fh)["project"]["optional-dependencies"]["tf-cpu"]
    environment = {"platform_system": system, "platform_machine": machine, "extra": "tf-cpu"}
    chosen = [req.name for req in map(Requirement, extra) if req.marker is None or req.marker.evaluate(environment)]
    assert sorted(chosen) == sorted([wheel, "tensorboard"])
