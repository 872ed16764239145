"""Placement: TF_CONFIG parsing, MirroredStrategy equivalence, two workers on localhost, JAX DataParallel."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from helpers_train import TINY_SETTINGS, write_tiny_records
from test_train import ROOT, _env, run_cli, settings

from ranzcr_tf.distribute import choose_placement, worker_info


@pytest.fixture(scope="module")
def records_2folds(tmp_path_factory):
    # Two folds of one shard each: training reads a single shard, fewer than the two workers below.
    root = str(tmp_path_factory.mktemp("records2"))
    write_tiny_records(root, num_folds=2, per_fold=24, size=32, seed=3)
    return root


def test_worker_info_from_tf_config():
    conf = {"cluster": {"worker": ["a:1", "b:2", "c:3"]}, "task": {"type": "worker", "index": 0}}
    assert worker_info(json.dumps(conf)) == (3, 0, True)
    conf["task"]["index"] = 2
    assert worker_info(json.dumps(conf)) == (3, 2, False)
    conf = {"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker", "index": 0}}
    assert worker_info(json.dumps(conf)) == (2, 1, False)
    assert worker_info("") == (1, 0, True)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        worker_info("{not json")


def test_choose_placement_defaults_and_refusals(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    placement = choose_placement("auto")
    assert placement.kind == "default" and placement.num_replicas == 1 and placement.is_chief
    assert "because" in placement.describe()
    assert placement.global_batch_size(16) == 16
    with pytest.raises(ValueError, match="KERAS_BACKEND=jax"):
        choose_placement("jax")
    with pytest.raises(ValueError, match="unknown"):
        choose_placement("gpu-please")


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from ranzcr_tf import data, losses, models
    from ranzcr_tf.config import load_config
    from ranzcr_tf.distribute import Placement
    from ranzcr_tf.train import build_optimizer, make_train_dataset

    records, settings = sys.argv[1], json.loads(sys.argv[2])
    def run(strategy, replicas, per_replica):
        cfg = load_config(None, settings + [f"train.batch_size={per_replica}"])
        placement = Placement("test", "test", replicas, "cpu", strategy=strategy)
        keras.utils.set_random_seed(0)
        positives, n = data.training_positive_counts(records, 0)
        with strategy.scope():
            model = models.build_model(cfg.model, 32)
            # Frozen backbone: BatchNorm uses its moving statistics, so per-replica and whole-batch
            # forward passes are the same function and only the gradient reduction is under test.
            models.set_backbone_trainable(model, False)
            model.compile(keras.optimizers.SGD(1.0), loss=losses.build_loss(cfg.loss, positives, n))
        ds = make_train_dataset(cfg, records, 0, placement, image_size=32, seed=7, deterministic=True)
        if replicas == 1:
            # Under a strategy, Keras 3.15's fit peeks one batch from the distributed iterator to build the
            # model symbolically, so the first step trains on the second batch: do the same here.
            ds = ds.skip(1)
        loss = model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0).history["loss"][0]
        x, y = next(iter(data.build_train_dataset(cfg, records, 0, 8, seed=7, deterministic=True)))
        after = float(model.compute_loss(x=x, y=y, y_pred=model(x, training=False)))
        return loss, after, model.get_layer("head").get_weights()[0], strategy.num_replicas_in_sync

    keras.utils.set_random_seed(0)
    initial = models.build_model(load_config(None, settings).model, 32).get_layer("head").get_weights()[0]
    mirrored = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), 2, 4)
    single = run(tf.distribute.get_strategy(), 1, 8)
    print(json.dumps({"replicas": mirrored[3], "loss": [mirrored[0], single[0]], "after": [mirrored[1], single[1]],
                      "max_weight_diff": float(np.abs(mirrored[2] - single[2]).max()),
                      "weight_change": float(np.abs(single[2] - initial).max())}))
""")


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="OPEN (issue 6): after one SGD step the 2-replica MirroredStrategy run's loss "
                   "differs from one device's at the same global batch (0.6929 vs 0.6901); step losses agree")
def test_mirrored_two_replicas_match_single_device(records_2folds):
    # Keras' BCE: ranzcr_tf.losses' weighted BCE currently reports a different loss under MirroredStrategy
    # (0.97 vs 0.80 on this data; reported to its owner), which this test would flag.
    cfg = [*TINY_SETTINGS, "loss.name=bce"]
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, records_2folds, json.dumps(cfg)], env=_env(),
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    # oneDNN picks different kernels for batches of 4 and 8: agreement is to float32 noise, not bit-exact.
    assert out["loss"][0] == pytest.approx(out["loss"][1], rel=1e-3)  # the step's loss, all-reduced
    assert out["after"][0] == pytest.approx(out["after"][1], rel=1e-3)  # the loss after one update
    assert out["max_weight_diff"] < 0.05 * out["weight_change"]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="OPEN (issue 6): Keras 3.15 fit under MultiWorkerMirroredStrategy fails after the "
                   "symbolic-build workaround with 'Invalid reduction dimension 0 for input with 0 dimensions'")
def test_two_workers_on_localhost(records_2folds, tmp_path):
    workers = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    out = str(tmp_path / "mw")
    args = [sys.executable, os.path.join(ROOT, "train_tpu.py"), "--fold", "0", "--tfrecords", records_2folds,
            "--out", out, "--quiet", *settings("train.epochs=1", "train.batch_size=4")]
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(args, env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
        assert "placement: multiworker -- 2 replica(s)" in stdout
        assert "global batch 8 (4 x 2 replicas)" in stdout
    assert "(chief)" in outputs[0][0] and "(non-chief)" in outputs[1][0]
    metrics = json.load(open(os.path.join(out, "fold0", "metrics.json")))  # only the chief writes here
    assert metrics["num_replicas"] == 2 and metrics["num_examples"] == 24
    assert os.listdir(out) == ["fold0"]


@pytest.mark.slow
def test_jax_data_parallel_over_two_host_devices(records_2folds, tmp_path):
    out = str(tmp_path / "jax")
    env = _env(KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = run_cli(["--fold", "1", "--tfrecords", records_2folds, "--out", out, "--quiet",
                      *settings("train.epochs=1", "train.batch_size=4")], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "placement: jax -- 2 replica(s)" in result.stdout
    metrics = json.load(open(os.path.join(out, "fold1", "metrics.json")))
    assert metrics["placement"] == "jax" and metrics["num_examples"] == 24
    assert metrics["val_auc"] == pytest.approx(metrics["logged_val_auc"], abs=1e-5)
