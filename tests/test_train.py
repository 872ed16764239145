"""Real training runs of train_tpu.py on tiny learnable records: resume after SIGKILL, OOF, reload, NaN stop."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers_train import TINY_SETTINGS, write_tiny_records

from ranzcr_tf.labels import ID_COLUMN, LABELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", KERAS_BACKEND="tensorflow",
               PYTHONUNBUFFERED="1")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def run_cli(args, env=None, timeout=300):
    cmd = [sys.executable, os.path.join(ROOT, "train_tpu.py"), *args]
    return subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def settings(*extra):
    return [a for s in (*TINY_SETTINGS, *extra) for a in ("--set", s)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("records"))
    table = write_tiny_records(root, num_folds=3, per_fold=24, size=32)
    return root, table


def _log(run):
    return pd.read_csv(os.path.join(run, "log.csv"))


@pytest.mark.slow
def test_killed_run_resumes_with_unbroken_log_and_never_worse_best(tiny, tmp_path):
    records_dir, table = tiny
    out = str(tmp_path / "run")
    args = ["--fold", "0", "--tfrecords", records_dir, "--out", out, "--quiet",
            *settings("train.epochs=3", "train.frozen_epochs=1", "train.early_stopping_patience=5",
                      "train.use_ema=true", "train.ema_momentum=0.5")]
    run = os.path.join(out, "fold0")

    killed = run_cli(args, env=_env(RANZCR_TF_KILL_AFTER_EPOCH="1"))
    assert killed.returncode == -9, killed.stderr[-3000:]  # a real SIGKILL after epoch 1's backup
    assert list(_log(run)["epoch"]) == [0, 1]
    best_before = json.load(open(os.path.join(run, "best.json")))["val_auc"]
    assert not os.path.exists(os.path.join(run, "oof.csv"))

    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = 48 // 8
    # The restart continues stage 1 (backbone trainable) from its backup: epoch 2 only, step count continued.
    assert f"2 epoch(s) already done, optimizer step {2 * steps}" in resumed.stdout, resumed.stdout[-3000:]
    assert f"after epoch 2: optimizer step {3 * steps}" in resumed.stdout
    log = _log(run)
    assert list(log["epoch"]) == [0, 1, 2]  # every epoch once, none lost, none repeated
    best = json.load(open(os.path.join(run, "best.json")))
    assert best["val_auc"] >= best_before
    assert math.isclose(best["val_auc"], log["val_auc"].max(), rel_tol=1e-9)
    assert best["epoch"] == int(log["val_auc"].idxmax())
    # Early stopping's patience counter survived the restart: it equals epochs since the best.
    state = json.load(open(os.path.join(run, "train_state.json")))
    assert state["completed"] is True
    assert state["snapshots"]["2"]["early_stopping"]["wait"] == 2 - best["epoch"]

    # OOF: every fold-0 study once, labels equal to train.csv.
    oof = pd.read_csv(os.path.join(run, "oof.csv"))
    fold0 = table[table[ID_COLUMN].str.split(".").str[4] == "0"].set_index(ID_COLUMN)
    assert sorted(oof[ID_COLUMN]) == sorted(fold0.index) and oof[ID_COLUMN].is_unique
    truth = fold0.loc[oof[ID_COLUMN], list(LABELS)].to_numpy()
    assert np.array_equal(oof[[f"target_{label}" for label in LABELS]].to_numpy(), truth)
    probs = oof[list(LABELS)].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()

    # The saved best model reloads in safe mode and reproduces the OOF predictions through a separate
    # path (plain model.predict of logits, another batch size). Predictions are compared, not AUCs: on a
    # 24-image fold one near-tied pair flipped by float rounding moves the mean AUC by 3e-4.
    import keras

    import ranzcr_tf.model.layers  # noqa: F401  (registers the model's custom layers, as any loader must)
    from ranzcr_tf.config import load_config
    from ranzcr_tf.model.metrics import competition_metric
    from ranzcr_tf.pipeline.data import build_eval_dataset

    model = keras.saving.load_model(os.path.join(run, "best.keras"), compile=False, safe_mode=True)
    cfg = load_config(os.path.join(run, "config.yaml"))
    ev = build_eval_dataset(cfg, records_dir, "valid", 16, fold=0, with_targets=False)
    logits = ev.unpad(model.predict(ev.dataset, steps=ev.num_batches, verbose=0))
    reloaded = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    saved = oof.set_index(ID_COLUMN).loc[list(ev.ids), list(LABELS)].to_numpy()
    np.testing.assert_allclose(reloaded, saved, atol=2e-5)
    assert np.array_equal(ev.targets, truth[[list(oof[ID_COLUMN]).index(i) for i in ev.ids]])
    assert competition_metric(ev.targets, saved)[0] == pytest.approx(best["val_auc"], abs=1e-9)
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["val_auc"] == pytest.approx(best["val_auc"], abs=1e-5) and metrics["best_epoch"] == best["epoch"]
    assert set(metrics["per_class_auc"]) == set(LABELS)
    for name in ("config.yaml", "preprocess.json"):
        assert os.path.getsize(os.path.join(run, name)) > 0
    assert json.load(open(os.path.join(run, "preprocess.json")))["clahe_clip_limit"] == 2.0

    again = run_cli(args)  # a finished fold is not trained again
    assert again.returncode == 0 and "already finished" in again.stdout
    assert list(_log(run)["epoch"]) == [0, 1, 2]


@pytest.mark.slow
def test_nan_loss_stops_with_advice(tiny, tmp_path):
    records_dir, _ = tiny
    out = str(tmp_path / "nan")
    result = run_cli(["--fold", "1", "--tfrecords", records_dir, "--out", out, "--quiet",
                      *settings("train.epochs=3", "train.learning_rate=1e30")])
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    assert "lower learning rate" in result.stderr and "float32" in result.stderr
    run = os.path.join(out, "fold1")
    assert not os.path.exists(os.path.join(run, "backup", "stage0", "training_metadata.json"))  # NaN weights not kept
    assert not os.path.exists(os.path.join(run, "oof.csv"))


def test_bad_fold_and_bad_strategy_are_clear_errors(tiny, tmp_path):
    records_dir, _ = tiny
    result = run_cli(["--fold", "7", "--tfrecords", records_dir, "--out", str(tmp_path)])
    assert result.returncode == 2 and "folds 0..2" in result.stderr
    result = run_cli(["--fold", "0", "--tfrecords", records_dir, "--strategy", "tpu", "--out", str(tmp_path)])
    assert result.returncode == 2 and "no TPU" in result.stderr


def test_image_size_mismatch_is_announced(tiny):
    from ranzcr_tf.config import load_config
    from ranzcr_tf.prep.records import read_manifest
    from ranzcr_tf.train.fit import resolve_image_size

    manifest = read_manifest(tiny[0])
    assert resolve_image_size(load_config(None, ["data.image_size=0"]), manifest)[0] == 32
    size, note = resolve_image_size(load_config(None, ["data.image_size=48"]), manifest)
    assert size == 48 and "resized to 48 px" in note and "32 px" in note


def test_schedules_warmup_cosine_exponential_and_scaling():
    import keras

    import ranzcr_tf.model.layers  # noqa: F401  (registers the model's custom layers, as any loader must)
    from ranzcr_tf.config import load_config
    from ranzcr_tf.train.schedules import build_learning_rate, scaled_learning_rate

    def lr(schedule, step):
        return float(keras.ops.convert_to_numpy(schedule(step)))

    cfg = load_config(None, ["train.epochs=10", "train.warmup_epochs=1", "train.learning_rate=0.01"]).train
    cosine = build_learning_rate(cfg, 100, 0.01)
    assert lr(cosine, 0) < 0.001 and lr(cosine, 100) == pytest.approx(0.01, rel=1e-4)
    assert lr(cosine, 550) == pytest.approx(0.01 * (0.5 + 0.5 * math.cos(math.pi * 0.5)), rel=0.02)
    assert lr(cosine, 1000) == pytest.approx(cfg.min_learning_rate, rel=1e-3)
    cfg.schedule, cfg.warmup_epochs = "exponential", 0
    expo = build_learning_rate(cfg, 100, 0.01)
    assert lr(expo, 0) == pytest.approx(0.01) and lr(expo, 99) == pytest.approx(0.01)
    assert lr(expo, 300) == pytest.approx(0.01 * math.exp(-0.3), rel=1e-5)
    assert lr(expo, 10**6) == pytest.approx(1e-6)  # the floor
    cfg.schedule = "plateau"
    assert build_learning_rate(cfg, 100, 0.01) == 0.01
    cfg.lr_reference_batch = 16
    assert scaled_learning_rate(cfg, 64) == pytest.approx(0.04)


def test_plateau_counters_survive_a_restart_and_follow_the_config():
    import keras

    from ranzcr_tf.config import load_config
    from ranzcr_tf.train import callbacks as cbs

    cfg = load_config(None, ["train.schedule=plateau", "train.plateau_factor=0.25", "train.plateau_patience=2"])
    with pytest.raises(ValueError, match="train.plateau_factor"):
        load_config(None, ["train.plateau_factor=1.5"])

    def fresh(pending=None):
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
        cb = cbs.ResumablePlateau(monitor="val_auc", mode="max", factor=cfg.train.plateau_factor,
                                  patience=cfg.train.plateau_patience, min_lr=1e-6)
        cb.pending_state = pending
        cb.set_model(model)
        cb.on_train_begin()
        return cb, lambda: float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))

    before, _ = fresh()
    before.on_epoch_end(0, {"val_auc": 0.7})
    before.on_epoch_end(1, {"val_auc": 0.6})  # one epoch without improvement: patience 2 not reached
    state = json.loads(json.dumps(before.get_state()))  # as train_state.json stores it
    assert state["wait"] == 1 and state["best"] == pytest.approx(0.7)

    resumed, lr = fresh(state)
    resumed.on_epoch_end(2, {"val_auc": 0.65})  # the second epoch without improvement, counted across the restart
    assert lr() == pytest.approx(0.1 * 0.25)
    forgetful, lr = fresh(None)
    forgetful.on_epoch_end(2, {"val_auc": 0.65})  # without the carried state it would wait longer
    assert lr() == pytest.approx(0.1)


@pytest.mark.slow
def test_run_folder_on_a_remote_filesystem(tiny):
    """``--out gs://...``: every file of the run folder goes through tf.io.gfile (TensorFlow's in-memory
    ram:// filesystem takes the same path here); a rerun of the finished fold trains nothing more."""
    import tensorflow as tf

    from ranzcr_tf.config import load_config
    from ranzcr_tf.train import fit as train
    from ranzcr_tf.train import placement as distribute

    records_dir, table = tiny
    cfg = load_config(None, [*TINY_SETTINGS, "train.epochs=2"])
    out = f"ram://train-test-{os.getpid()}/run"
    result = train.train_fold(cfg, records_dir, 0, out, distribute.choose_placement("default"), verbose=0)
    run = f"{out}/fold0"
    assert {"best.keras", "best.json", "log.csv", "oof.csv", "metrics.json", "config.yaml",
            "preprocess.json"} <= set(tf.io.gfile.listdir(run))
    with tf.io.gfile.GFile(f"{run}/log.csv") as fh:
        log = pd.read_csv(fh)
    assert list(log["epoch"]) == [0, 1] and result["val_auc"] == pytest.approx(log["val_auc"].max())
    with tf.io.gfile.GFile(f"{run}/oof.csv") as fh:
        assert len(pd.read_csv(fh)) == result["num_examples"]
    again = train.train_fold(cfg, records_dir, 0, out, distribute.choose_placement("default"), verbose=0)
    assert again["val_auc"] == pytest.approx(result["val_auc"])
    with tf.io.gfile.GFile(f"{run}/log.csv") as fh:
        assert list(pd.read_csv(fh)["epoch"]) == [0, 1]
