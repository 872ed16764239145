"""Placement: TF_CONFIG parsing, MirroredStrategy equivalence, two workers on localhost, JAX DataParallel."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from helpers_train import TINY_SETTINGS, write_tiny_records
from test_train import ROOT, _env, run_cli, settings

from ranzcr_tf.train.placement import choose_placement, worker_info


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
    tf.config.experimental.enable_op_determinism()  # tf.data element order too: every run trains on the same batch
    import keras, numpy as np
    from ranzcr_tf.pipeline import data
    from ranzcr_tf.model import losses
    from ranzcr_tf.model import build as models
    from ranzcr_tf.train import fit as train
    from ranzcr_tf.config import load_config
    from ranzcr_tf.train.placement import Placement, set_batchnorm_synchronized
    from ranzcr_tf.train.schedules import build_learning_rate

    records, settings, global_batch = sys.argv[1], json.loads(sys.argv[2]), 8
    positives, n = data.training_positive_counts(records, 0)

    def run(placement, synchronized=None):
        # The trainer's own pieces (train_fold builds with these): model (BatchNorm trainable, synchronised
        # where the trainer synchronises it), weighted BCE, Adam + schedule, strategy preparation, dataset.
        cfg = load_config(None, settings + [f"train.batch_size={global_batch // placement.num_replicas}"])
        keras.utils.set_random_seed(0)
        with placement.scope():
            model = models.build_model(cfg.model, 32)
            loss = losses.build_loss(cfg.loss, positives, n)
        train.compile_for_training(model, cfg, loss, build_learning_rate(cfg.train, 1, cfg.train.learning_rate),
                                   placement, 32)
        if synchronized is not None:  # the control: each replica normalises with its own half batch
            set_batchnorm_synchronized(model, synchronized)
        ds = train.make_train_dataset(cfg, records, 0, placement, image_size=32, seed=7, deterministic=True)
        before = [w.copy() for w in model.get_weights()]
        step_loss = model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0).history["loss"][0]
        x, y = next(iter(data.build_train_dataset(cfg, records, 0, global_batch, seed=11, deterministic=True)))
        after = float(loss(y, model(x, training=False)))
        return step_loss, after, before, model.get_weights()

    mirrored = Placement("mirrored", "test", 2, "cpu", strategy=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    single = Placement("default", "test", 1, "cpu", strategy=tf.distribute.get_strategy())
    runs = {"single": run(single), "mirrored": run(mirrored), "per_replica_bn": run(mirrored, synchronized=False)}
    out = {"replicas": mirrored.strategy.num_replicas_in_sync}
    for name, (step_loss, after, before, weights) in runs.items():
        diff = lambda xs, ys: max(float(np.abs(a - b).max()) for a, b in zip(xs, ys))
        out[name] = {"loss": step_loss, "after": after, "initial_diff": diff(before, runs["single"][2]),
                     "weight_diff": diff(weights, runs["single"][3]), "weight_change": diff(weights, before)}

    # The weighted loss alone: each replica's share of one batch, all-reduced, against the whole batch.
    rng = np.random.default_rng(0)
    y = (rng.random((8, 11)) < 0.3).astype("float32")
    z = rng.normal(0, 2, (8, 11)).astype("float32")
    pairs = []
    for kwargs in ({}, {"label_smoothing": 0.1}, {"from_logits": False}):
        pred = z if kwargs.get("from_logits", True) else 1 / (1 + np.exp(-z))
        whole = float(losses.WeightedBinaryCrossentropy(np.linspace(0.5, 8, 11), **kwargs)(y, pred))
        with mirrored.strategy.scope():
            loss = losses.WeightedBinaryCrossentropy(np.linspace(0.5, 8, 11), **kwargs)
        batch = next(iter(mirrored.strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((y, pred)).batch(8))))
        per_replica = mirrored.strategy.run(lambda a, b: loss(a, b), args=batch)
        pairs.append([float(mirrored.strategy.reduce("SUM", per_replica, axis=None)), whole])
    out["weighted_loss_pairs"] = pairs
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_mirrored_two_replicas_match_single_device(records_2folds):
    """Two replicas at global batch 8 take the same training step as one device at batch 8.

    BatchNorm is trainable here (in training mode it normalises with batch statistics): the trainer
    synchronises them across replicas under MirroredStrategy, and the control run without that shows
    that per-replica statistics really do change the step. Dropout is off: its masks are drawn per
    replica, so with dropout the runs legitimately differ.
    """
    cfg = [*TINY_SETTINGS, "loss.name=weighted_bce", "train.schedule=constant"]
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, records_2folds, json.dumps(cfg)], env=_env(),
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    single, mirrored, control = out["single"], out["mirrored"], out["per_replica_bn"]
    assert mirrored["initial_diff"] == 0 and control["initial_diff"] == 0  # same seed, same initial weights
    assert single["weight_change"] > 1e-3  # the step really moved the weights
    # Float noise only (the synchronised BatchNorm sums E[x^2] - E[x]^2 across replicas, TF's own moments
    # differ in the last bits), far below what one step changes.
    assert mirrored["loss"] == pytest.approx(single["loss"], rel=1e-4)  # the step's loss, all-reduced
    assert mirrored["after"] == pytest.approx(single["after"], rel=1e-4)  # the loss after one update
    assert mirrored["weight_diff"] < 0.01 * single["weight_change"]
    # Control: with per-replica BatchNorm statistics the same step differs clearly.
    assert abs(control["loss"] - single["loss"]) > 100 * abs(mirrored["loss"] - single["loss"]) + 1e-3
    assert control["weight_diff"] > 0.2 * single["weight_change"]
    # ranzcr_tf.model.losses' weighted BCE, split over two replicas and summed, equals the whole batch's.
    for replicated, whole in out["weighted_loss_pairs"]:
        assert replicated == pytest.approx(whole, rel=1e-5)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_workers_on_localhost(records_2folds, tmp_path):
    # Training fold 0 reads fold 1's single shard: fewer shards than workers, so the workers split it by record.
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
        assert "global batch 8 (4 x 2 replicas); 3 steps/epoch" in stdout
    assert "(chief)" in outputs[0][0] and "(non-chief)" in outputs[1][0]
    # The step losses are all-reduced across the workers: both log the same epoch loss.
    losses = [re.search(r"epoch 0: loss ([0-9.]+)", stdout).group(1) for stdout, _ in outputs]
    assert losses[0] == losses[1]
    run = os.path.join(out, "fold0")
    metrics = json.load(open(os.path.join(run, "metrics.json")))  # only the chief writes here
    assert metrics["num_replicas"] == 2 and metrics["num_examples"] == 24 and metrics["placement"] == "multiworker"
    assert sorted(os.listdir(out)) == [".lock-fold0", "fold0"]  # the fold and its lock file (locks.py), the chief's
    assert {"best.keras", "log.csv", "oof.csv", "config.yaml", "train_state.json"} <= set(os.listdir(run))
    assert len(pd.read_csv(os.path.join(run, "log.csv"))) == 1  # one writer: one row for the one epoch
    assert len(pd.read_csv(os.path.join(run, "oof.csv"))) == 24
    # The non-chief wrote its copies to a private folder outside the run, and removed it.
    scratch = re.search(r"\(written to (.+)\)", outputs[1][0]).group(1)
    assert not os.path.abspath(scratch).startswith(os.path.abspath(out)) and not os.path.exists(scratch)


NO_AUGMENT = ["augment.hflip_prob=0", "augment.affine_prob=0", "augment.crop_prob=0",
              "augment.brightness_contrast_prob=0", "augment.gamma_prob=0", "augment.cutout_prob=0",
              "augment.noise_prob=0", "augment.blur_prob=0", "data.shuffle_buffer=1"]


@pytest.mark.parametrize("shards_per_fold", [1, 2])
def test_worker_shares_partition_the_training_data(tmp_path, shards_per_fold):
    """Each of two workers reads a disjoint share, together all of it: by record from 1 shard, by file from 2."""
    import tensorflow as tf

    from ranzcr_tf.config import load_config
    from ranzcr_tf.pipeline import data
    from ranzcr_tf.train.fit import worker_dataset_fn
    from ranzcr_tf.train.placement import Placement

    root = str(tmp_path / "records")
    write_tiny_records(root, num_folds=2, per_fold=12, size=32, shards_per_fold=shards_per_fold, seed=5)
    cfg = load_config(None, [*TINY_SETTINGS, *NO_AUGMENT, "train.batch_size=2"])
    placement = Placement("multiworker", "test", 2, "cpu", strategy=tf.distribute.get_strategy(), num_workers=2)
    make = worker_dataset_fn(cfg, root, 0, placement, image_size=32, seed=3, deterministic=True)

    def rows(dataset, n):
        images = np.concatenate([x.numpy() for x, _ in dataset.take(n)])
        return [image.tobytes() for image in images]

    everything = set(rows(data.build_train_dataset(cfg, root, 0, 12, image_size=32, augment=False,
                                                    deterministic=True), 1))
    assert len(everything) == 12  # fold 1's twelve distinct images
    shares = []
    for worker in range(2):
        dataset = make(tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                                  num_replicas_in_sync=2))
        assert dataset.element_spec[0].shape[0] == 2  # per-replica batches: global 4 = 2 x 2 replicas
        shares.append(set(rows(dataset, 6)))  # 12 rows: every record of this worker's share, repeated
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == everything


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
