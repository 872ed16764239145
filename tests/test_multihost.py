"""Several JAX processes training one model (``train.multihost``): when a process joins others, which share
of the records each reads, and two real processes on localhost (``jax.distributed`` with Gloo collectives
on the CPU) against one process at the same global batch, straight through and across a kill and resume."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers_train import TINY_SETTINGS, write_tiny_records
from test_distribute import NO_AUGMENT, _free_port
from test_train import ROOT, _env, run_cli, settings

from ranzcr_tf.config import load_config
from ranzcr_tf.labels import ID_COLUMN, LABELS
from ranzcr_tf.train import multihost
from ranzcr_tf.train.placement import choose_placement


def test_when_a_jax_process_joins_others(monkeypatch):
    for name in (*multihost.CLUSTER_VARIABLES, *multihost.TPU_HOST_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    distribute = load_config(None, []).distribute
    assert multihost.multi_process_reason(distribute) is None and multihost.multi_process_reason(None) is None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-w-0")  # a single-host TPU VM: alone
    assert multihost.multi_process_reason(distribute) is None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3")  # a v4-32 slice
    assert multihost.multi_process_reason(distribute) == "TPU_WORKER_HOSTNAMES names 4 TPU hosts"
    distribute.multi_process = "off"
    assert multihost.multi_process_reason(distribute) is None
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    distribute.multi_process = "on"  # JAX finds the cluster (TPU metadata, SLURM, ...)
    assert "multi_process = on" in multihost.multi_process_reason(distribute)
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "10.0.0.1:1234,10.0.0.2:1234")
    assert multihost.multi_process_reason(load_config(None, []).distribute) == "KERAS_DISTRIBUTION_JOB_ADDRESSES is set"
    explicit = load_config(None, ["distribute.coordinator=10.0.0.1:1234", "distribute.num_processes=2",
                                  "distribute.process_id=1"]).distribute
    assert multihost.multi_process_reason(explicit) == "distribute.coordinator = 10.0.0.1:1234 (process 1 of 2)"


def test_multi_process_settings_refused_on_tensorflow_and_unequal_devices(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    explicit = load_config(None, ["distribute.coordinator=10.0.0.1:1234", "distribute.num_processes=2",
                                  "distribute.process_id=0"]).distribute
    with pytest.raises(ValueError, match="distribute.* settings are for the JAX backend"):
        choose_placement("auto", explicit)
    multihost.check_device_counts(8, 4, 2)
    with pytest.raises(ValueError, match="same number of devices"):
        multihost.check_device_counts(6, 4, 2)


@pytest.mark.parametrize("shards_per_fold", [1, 2])
def test_jax_processes_read_their_own_shares(tmp_path, shards_per_fold):
    """Two JAX processes: each reads a disjoint half in batches of global / 2 (by record from 1 shard, by file
    from 2); together all of it. The validation shares: every record once, equal numbers of batches."""
    from ranzcr_tf.pipeline import data
    from ranzcr_tf.train.fit import make_eval_data, make_train_dataset
    from ranzcr_tf.train.placement import Placement

    root = str(tmp_path / "records")
    write_tiny_records(root, num_folds=2, per_fold=11, size=32, shards_per_fold=shards_per_fold, seed=5)
    cfg = load_config(None, [*TINY_SETTINGS, *NO_AUGMENT, "train.batch_size=2", "infer.batch_size=2"])
    everything = data.build_train_dataset(cfg, root, 0, 11, image_size=32, augment=False, deterministic=True)
    everything = {image.tobytes() for image in next(iter(everything))[0].numpy()}
    assert len(everything) == 11  # fold 1's eleven distinct images
    shares, valid_rows, batch_counts = [], [], []
    for process in range(2):
        placement = Placement("jax", "test", 2, "cpu", num_workers=2, worker_index=process, is_chief=process == 0)
        dataset = make_train_dataset(cfg, root, 0, placement, image_size=32, seed=3, deterministic=True)
        assert dataset.element_spec[0].shape[0] == 2  # global batch 4 = 2 replicas x 2; half of it per process
        shares.append({image.tobytes() for images, _ in dataset.take(6) for image in images.numpy()})
        valid = make_eval_data(cfg, root, 0, placement, image_size=32)
        assert (valid.num_shards, valid.shard_index, valid.local_batch_size) == (2, process, 2)
        batches = [images.numpy() for images in valid.dataset]
        batch_counts.append(len(batches))
        rows = np.concatenate(batches)
        for position, image in enumerate(rows):
            valid_rows.append((valid.record_index(position), image.tobytes(), bool(image.any())))
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == everything
    # 11 validation records, global batch 4: 3 batches on each process, 12 rows, the 12th (index 11) padding.
    assert batch_counts == [3, 3] == [valid.num_batches] * 2
    real = sorted(index for index, _, _ in valid_rows if index < valid.num_examples)
    assert real == list(range(11))  # every validation record once, over both processes
    assert [filled for index, _, filled in valid_rows if index >= valid.num_examples] == [False]
    alone = data.build_eval_dataset(cfg, root, "valid", 4, fold=0, image_size=32, with_targets=False)
    in_order = alone.unpad(np.concatenate([x.numpy() for x in alone.dataset]))
    assert all(in_order[index].tobytes() == image for index, image, _ in valid_rows if index < 11)
    with pytest.raises(ValueError, match="one share of several processes"):
        valid.unpad(rows)


# Global batch 24 (12 per device x 2 devices) = the 24 training studies of fold 1, with no shuffling, no
# augmentation and no dropout: every step trains on all of them in whatever order the processes' shares
# arrive, so one process and two compute the same mean loss, BatchNorm statistics and gradient.
JAX_SETTINGS = [*NO_AUGMENT, "train.batch_size=12", "train.epochs=2", "train.schedule=constant"]
PROCESS_TIMEOUT = 480  # seconds; a loaded 2-core machine, not the expected ~30 s


def _jax_env(tmp_path, **extra):
    # TF_DETERMINISTIC_OPS: tf.data keeps the element order although the trainer asks for speed over order
    # (a parallel map could otherwise hand over record 0 of the second pass before record 23 of the first,
    # and a step would train on another set of studies). TMPDIR: the non-chief's scratch folder lands in the
    # test's folder, where the test can look for it.
    return _env(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_DETERMINISTIC_OPS="1", TMPDIR=str(tmp_path), **extra)


def _two_processes(records, out, tmp_path, **extra_env) -> list[tuple[int, str, str]]:
    """Run train_tpu.py as processes 0 and 1 of a two-process JAX run on localhost: (returncode, out, err)."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = []
    for process in range(2):
        args = [sys.executable, os.path.join(ROOT, "train_tpu.py"), "--fold", "0", "--tfrecords", records,
                "--out", out, "--quiet",
                *settings(*JAX_SETTINGS, f"distribute.coordinator={coordinator}", "distribute.num_processes=2",
                          f"distribute.process_id={process}")]
        procs.append(subprocess.Popen(args, env=_jax_env(tmp_path, **extra_env), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT))
    try:
        outputs = [proc.communicate(timeout=PROCESS_TIMEOUT) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [(proc.returncode, stdout, stderr) for proc, (stdout, stderr) in zip(procs, outputs)]


@pytest.fixture(scope="module")
def records_2folds(tmp_path_factory):
    # Two folds of 24 studies in one shard each: training fold 0 reads fold 1's single shard, fewer shards
    # than processes, so the two processes split it by record (even and odd).
    root = str(tmp_path_factory.mktemp("records2"))
    write_tiny_records(root, num_folds=2, per_fold=24, size=32, seed=3)
    return root


@pytest.fixture(scope="module")
def one_process(records_2folds, tmp_path_factory):
    """The reference: the same settings in ONE process with 2 CPU devices (the same global batch 24)."""
    tmp = tmp_path_factory.mktemp("one_process")
    out = str(tmp / "run")
    result = run_cli(["--fold", "0", "--tfrecords", records_2folds, "--out", out, "--quiet", *settings(*JAX_SETTINGS)],
                     env=_jax_env(tmp, XLA_FLAGS="--xla_force_host_platform_device_count=2"), timeout=PROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "placement: jax -- 2 replica(s) on cpu;" in result.stdout
    run = os.path.join(out, "fold0")
    return pd.read_csv(os.path.join(run, "log.csv")), pd.read_csv(os.path.join(run, "oof.csv"))


def _check_like_one_process(run, one_process, records):
    """The two-process run folder holds what the one-process run holds: the same losses, every validation
    study exactly once with the same predictions, the same metric."""
    reference_log, reference_oof = one_process
    log = pd.read_csv(os.path.join(run, "log.csv"))
    assert list(log["epoch"]) == [0, 1]  # one writer: each epoch once
    print(f"\nepoch losses, one process: {list(reference_log['loss'])}; two processes: {list(log['loss'])}")
    np.testing.assert_allclose(log["loss"], reference_log["loss"], rtol=1e-5)
    np.testing.assert_allclose(log["val_auc"], reference_log["val_auc"], rtol=1e-5)
    assert abs(log["loss"][1] - log["loss"][0]) > 0.01  # the first step really changed the weights
    oof = pd.read_csv(os.path.join(run, "oof.csv"))
    valid_ids = pd.read_csv(os.path.join(records, "train.csv"))[ID_COLUMN].iloc[:24]  # fold 0's 24 studies
    assert len(oof) == 24 and oof[ID_COLUMN].is_unique and set(oof[ID_COLUMN]) == set(valid_ids)
    assert list(oof[ID_COLUMN]) == list(reference_oof[ID_COLUMN])
    np.testing.assert_allclose(oof[list(LABELS)], reference_oof[list(LABELS)], rtol=1e-4, atol=1e-6)
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["placement"] == "jax" and metrics["num_replicas"] == 2 and metrics["num_examples"] == 24
    assert metrics["val_auc"] == pytest.approx(reference_log["val_auc"].max(), rel=1e-5)


@pytest.mark.slow
def test_two_jax_processes_train_like_one(records_2folds, one_process, tmp_path):
    out = str(tmp_path / "run")
    results = _two_processes(records_2folds, out, tmp_path)
    for process, (returncode, stdout, stderr) in enumerate(results):
        assert returncode == 0, stderr[-3000:]
        role = "chief" if process == 0 else "non-chief"
        assert f"placement: jax -- 2 replica(s) on cpu, worker {process} of 2 ({role})" in stdout
        assert "in 2 processes joined because distribute.coordinator = 127.0.0.1:" in stdout
        assert "global batch 24 (12 x 2 replicas); 1 steps/epoch" in stdout
    # Both processes computed the same validation metric from the gathered predictions.
    epochs = [re.findall(r"epoch \d: loss [0-9.]+  val_auc [0-9.]+", stdout) for _, stdout, _ in results]
    assert len(epochs[0]) == 2 and epochs[0] == epochs[1]
    _check_like_one_process(os.path.join(out, "fold0"), one_process, records_2folds)
    assert sorted(os.listdir(out)) == [".lock-fold0", "fold0"]  # one run folder and its fold lock, the chief's
    scratch = re.search(r"\(written to (.+)\)", results[1][1]).group(1)  # the non-chief's copies: removed
    assert scratch.startswith(str(tmp_path)) and not os.path.exists(scratch)


@pytest.mark.slow
def test_two_jax_processes_resume_from_the_chiefs_backup(records_2folds, one_process, tmp_path):
    out = str(tmp_path / "run")
    run = os.path.join(out, "fold0")
    killed = _two_processes(records_2folds, out, tmp_path, RANZCR_TF_KILL_AFTER_EPOCH="0")
    assert [returncode for returncode, _, _ in killed] == [-9, -9], killed[0][2][-3000:]  # both after epoch 0
    assert list(pd.read_csv(os.path.join(run, "log.csv"))["epoch"]) == [0]
    assert not os.path.exists(os.path.join(run, "oof.csv"))

    resumed = _two_processes(records_2folds, out, tmp_path)
    for returncode, stdout, stderr in resumed:
        assert returncode == 0, stderr[-3000:]
        # Both processes continue from the chief's backup (the non-chief reads the chief's folder).
        assert f"resumed from {run}/backup/stage0: 1 epoch(s) already done, optimizer step 1" in stdout
        assert "after epoch 1: optimizer step 2" in stdout
    _check_like_one_process(run, one_process, records_2folds)
