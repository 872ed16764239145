import fcntl
import json
import os
import shutil

import pytest

# Quiet TensorFlow's start-up chatter and keep tests on the CPU with the TensorFlow backend unless a test says otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# A bare train_tpu.py trains the mission preset (configs/b7_768_tpu.yaml); tests that run it without --config
# mean the library defaults plus their --set overrides. Tests of the bare command itself unset this.
os.environ.setdefault("RANZCR_DEFAULT_PRESET", "none")

# The files that take longest, longest first (measured: docs/results.md#test-suite-time). `make test`
# hands whole files to two xdist workers (--dist loadfile) in collection order; starting these first lets the
# short files fill in around them, so both workers finish together. xdist's own order (files with the most
# tests first) left the long files with few tests, the two end-to-end ones, for the end, one worker running them
# while the other idled. Files not named here follow in their usual order.
LONGEST_FIRST = (
    "test_soft_labels_bench.py",
    "test_three_stage.py",
    "test_ablate.py",
    "test_report.py",
    "test_notebooks.py",
    "test_train_reliability.py",
    "test_auxseg.py",
    "test_train.py",
    "test_distribute.py",
    "test_multihost.py",
    "test_walkthroughs.py",
    "test_kernel.py",
    "test_ich_e2e.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist: keep the order below, not "most tests first"
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests stay together


@pytest.fixture(scope="session")
def shared_build(tmp_path_factory):
    """``shared_build(name, build)`` runs ``build(folder)`` (which returns a JSON-able dict) once per test run
    and returns its dict: for data that several test files only read (the line-mask recipe tests' records).
    Under xdist both workers see their base folders' parent: the first to take the lock builds there, the
    other waits for it and reads the same files."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent

    def build_once(name: str, build) -> dict:
        folder, done = root / name, root / f"{name}.json"
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)  # left by a build that failed half-way
                folder.mkdir()
                done.write_text(json.dumps(build(str(folder))))
            return json.loads(done.read_text())

    return build_once
