"""Training refuses what it cannot do right, with one line, before any work: missing/extra/truncated/corrupt
shards, a resume with other records or settings, an unknown backbone; a full disk while checkpointing
keeps the previous checkpoint and a rerun resumes from it. Real records, real training, real files."""

import errno
import glob
import json
import math
import os
import shutil

import pandas as pd
import pytest
import yaml
from helpers_train import TINY_SETTINGS, load_train_tpu, tiny_settings, write_tiny_records

from ranzcr_tf.prep import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


train_tpu = load_train_tpu()
settings = tiny_settings


def with_shard_list(root: str) -> str:
    """List the shards in the manifest as the converter does (``shards.train``)."""
    path = os.path.join(root, records.MANIFEST)
    manifest = json.load(open(path))
    manifest["shards"] = {"train": [f"train/{os.path.basename(p)}" for p in records.list_shards(root, "train")],
                          "test": []}
    json.dump(manifest, open(path, "w"))
    return root


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("records"))
    write_tiny_records(root, num_folds=3, per_fold=16, size=32, shards_per_fold=2)
    return with_shard_list(root)


@pytest.fixture
def tiny(pristine, tmp_path):
    """A private copy of the records, free to damage."""
    return shutil.copytree(pristine, str(tmp_path / "records"))


def train(records_dir, out, *extra, capsys=None):
    code = train_tpu.main(["--fold", "0", "--tfrecords", records_dir, "--out-dir", out, "--quiet",
                           *settings("train.epochs=1"), *extra])
    captured = capsys.readouterr() if capsys is not None else None
    return code, captured


def error_line(captured, expected_prog="train_tpu.py") -> str:
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{expected_prog}: error: "), captured.err[-3000:]
    return lines[0]


def shard(root, fold, index):
    return glob.glob(os.path.join(root, "train", f"fold{fold}-{index:03d}-*.tfrec"))[0]


# ----------------------------------------------------------------------------------------------- item 2
def test_missing_and_extra_shards_are_named_before_any_folder(tiny, tmp_path, capsys):
    gone = shard(tiny, 1, 1)
    os.remove(gone)
    code, captured = train(tiny, str(tmp_path / "run"), capsys=capsys)
    line = error_line(captured)
    assert code == 2 and "missing shard(s) train/" + os.path.basename(gone) in line
    assert not os.path.exists(tmp_path / "run" / "fold0")

    shutil.copy(shard(tiny, 1, 0), gone)  # put a file back under the name, plus an unlisted one
    stray = os.path.join(tiny, "train", "fold2-007-3.tfrec")
    shutil.copy(shard(tiny, 2, 0), stray)
    code, captured = train(tiny, str(tmp_path / "run"), capsys=capsys)
    assert code == 2 and "not in the manifest train/fold2-007-3.tfrec" in error_line(captured)


def test_record_counts_are_checked_when_the_manifest_lists_no_shards(tiny, tmp_path, capsys):
    manifest = json.load(open(os.path.join(tiny, records.MANIFEST)))
    del manifest["shards"]
    json.dump(manifest, open(os.path.join(tiny, records.MANIFEST), "w"))
    os.remove(shard(tiny, 2, 0))
    code, captured = train(tiny, str(tmp_path / "run"), capsys=capsys)
    assert code == 2 and "fold 2 has 8 records in its shards but the manifest says 16" in error_line(captured)


# ----------------------------------------------------------------------------------------------- item 6
def test_truncated_shard_is_named(tiny, tmp_path, capsys):
    path = shard(tiny, 1, 0)
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 100)
    code, captured = train(tiny, str(tmp_path / "run"), capsys=capsys)
    line = error_line(captured)
    assert code == 2 and f"shard {path} is truncated" in line
    assert not os.path.exists(tmp_path / "run" / "fold0")


def _corrupt_payload(path):
    """Flip a byte inside the first record's payload: the framing stays intact, the CRC does not match."""
    with open(path, "r+b") as fh:
        fh.seek(12 + 40)
        byte = fh.read(1)
        fh.seek(12 + 40)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_shard_is_named_when_read(tiny, tmp_path, capsys):
    from ranzcr_tf.config import load_config
    from ranzcr_tf.pipeline.data import build_eval_dataset

    validation = shard(tiny, 0, 1)
    _corrupt_payload(validation)
    # The reader used by validation and by the kernel's test records (ids/targets pass).
    ev = build_eval_dataset(load_config(None, TINY_SETTINGS), tiny, "valid", 4, fold=0)
    with pytest.raises(ValueError, match=f"shard {validation} is corrupt"):
        _ = ev.ids
    # A training shard: TensorFlow's DataLossError inside model.fit, turned into one line naming it.
    shutil.copy(shard(tiny, 0, 0), validation)
    training = shard(tiny, 2, 1)
    _corrupt_payload(training)
    code, captured = train(tiny, str(tmp_path / "run"), capsys=capsys)
    assert code == 2 and f"shard {training} is corrupt" in error_line(captured)


# ----------------------------------------------------------------------------------------------- item 8
def test_unknown_backbone_leaves_no_fold_folder(tiny, tmp_path, capsys):
    code, captured = train(tiny, str(tmp_path / "run"), "--set", "model.backbone=resnet9000", capsys=capsys)
    assert code == 2 and "unknown backbone 'resnet9000'" in error_line(captured)
    assert not os.path.exists(tmp_path / "run" / "fold0")


# ----------------------------------------------------------------------------------------------- item 4
@pytest.mark.slow
def test_resume_refuses_other_records_or_settings_and_restart_starts_over(pristine, tmp_path, capsys):
    out = str(tmp_path / "run")
    fold = os.path.join(out, "fold0")
    code, captured = train(pristine, out, capsys=capsys)
    assert code == 0, captured.err[-3000:]
    trained_config = open(os.path.join(fold, "config.yaml")).read()

    code, captured = train(pristine, out, "--set", "model.dropout_rate=0.5", "--set", "train.learning_rate=0.01",
                           capsys=capsys)
    line = error_line(captured)
    assert code == 2 and "model.dropout_rate 0.0 -> 0.5" in line and "train.learning_rate 0.003 -> 0.01" in line
    assert "--restart" in line and "--out-dir" in line
    assert open(os.path.join(fold, "config.yaml")).read() == trained_config  # never records untrained values

    other = str(tmp_path / "records64")
    write_tiny_records(other, num_folds=3, per_fold=16, size=64, shards_per_fold=2)
    code, captured = train(other, out, capsys=capsys)
    assert code == 2 and "records (manifest hash" in error_line(captured)
    assert json.load(open(os.path.join(fold, "preprocess.json")))["stored_image_size"] == 32

    # Settings that may change: the validation batch size, the placement's speed knobs.
    code, captured = train(pristine, out, "--set", "infer.batch_size=4", "--set", "train.steps_per_execution=2",
                           capsys=capsys)
    assert code == 0 and "already finished" in captured.out, captured.err[-2000:]

    code, captured = train(pristine, out, "--set", "model.dropout_rate=0.5", "--restart", capsys=capsys)
    assert code == 0, captured.err[-3000:]
    assert yaml.safe_load(open(os.path.join(fold, "config.yaml")))["model"]["dropout_rate"] == 0.5
    assert list(pd.read_csv(os.path.join(fold, "log.csv"))["epoch"]) == [0]


# ----------------------------------------------------------------------------------------------- item 5
def full_disk_for(monkeypatch, name_part: str) -> None:
    """Files whose name holds ``name_part`` hit a full disk when flushed: a real partial file is on disk then."""
    real_fsync = os.fsync

    def fsync(fd):
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.slow
def test_disk_full_during_backup_keeps_the_last_good_one_and_a_rerun_resumes(pristine, tmp_path, capsys,
                                                                             monkeypatch):
    out = str(tmp_path / "run")
    backup = os.path.join(out, "fold0", "backup", "stage0")
    full_disk_for(monkeypatch, "epoch2.weights.h5")  # the backup after the second epoch
    code = train_tpu.main(["--fold", "0", "--tfrecords", pristine, "--out-dir", out, "--quiet",
                           *settings("train.epochs=3")])
    captured = capsys.readouterr()
    line = error_line(captured)
    assert code == 1 and "could not write the backup" in line and "No space left on device" in line
    assert "the backup of epoch 1 is intact" in line and "rerun" in line
    assert json.load(open(os.path.join(backup, "training_metadata.json")))["epoch"] == 1
    assert sorted(os.listdir(backup)) == ["epoch1.weights.h5", "training_metadata.json"]  # no partial file left

    monkeypatch.undo()
    code = train_tpu.main(["--fold", "0", "--tfrecords", pristine, "--out-dir", out, "--quiet",
                           *settings("train.epochs=3")])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "1 epoch(s) already done" in captured.out
    assert list(pd.read_csv(os.path.join(out, "fold0", "log.csv"))["epoch"]) == [0, 1, 2]


def test_disk_full_while_saving_best_keeps_the_previous_best(tmp_path, monkeypatch):
    import keras

    from ranzcr_tf.train.callbacks import BestCheckpoint, CheckpointWriteError

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = str(tmp_path / "best.keras")
    checkpoint = BestCheckpoint(path)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_auc": 0.6})
    before, info_before = open(path, "rb").read(), open(tmp_path / "best.json").read()

    full_disk_for(monkeypatch, "best.keras")
    with pytest.raises(CheckpointWriteError, match="previous best.keras is intact"):
        checkpoint.on_epoch_end(1, {"val_auc": 0.7})
    assert open(path, "rb").read() == before and open(tmp_path / "best.json").read() == info_before
    assert sorted(os.listdir(tmp_path)) == ["best.json", "best.keras"]
    assert math.isclose(checkpoint.best, 0.6)  # the failed epoch did not become the best
    keras.saving.load_model(path)  # still a complete model


@pytest.mark.slow
def test_real_full_disk_is_one_line_and_the_rerun_resumes(pristine, tmp_path):
    """A real full filesystem (a 5 MB tmpfs: room for one epoch's best.keras and backup, not for the next
    epoch's temporary copies) under a real train_tpu.py process: one line, no h5py output, no crash."""
    import subprocess
    import sys

    mount_point = str(tmp_path / "small_disk")
    os.makedirs(mount_point)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", mount_point],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs (the injected-ENOSPC tests cover the logic)")
    try:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", KERAS_BACKEND="tensorflow", PYTHONPATH=ROOT)
        cmd = [sys.executable, os.path.join(ROOT, "train_tpu.py"), "--fold", "0", "--tfrecords", pristine,
               "--out-dir", os.path.join(mount_point, "run"), "--quiet", *settings("train.epochs=3")]
        full = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-2000:]
        lines = [line for line in full.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "No space left on device" in lines[0] and "rerun" in lines[0], full.stderr[-3000:]
        backup = os.path.join(mount_point, "run", "fold0", "backup", "stage0")
        done = json.load(open(os.path.join(backup, "training_metadata.json")))["epoch"]
        assert done >= 1 and not [n for n in os.listdir(backup) if n.startswith(".tmp-")]

        subprocess.run(["mount", "-o", "remount,size=64m", mount_point], check=True)
        resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"{done} epoch(s) already done" in resumed.stdout
    finally:
        subprocess.run(["umount", mount_point], check=False)


def test_which_settings_may_change_on_resume(pristine, tmp_path):
    from ranzcr_tf.config import load_config, save_config
    from ranzcr_tf.train import identity

    manifest = records.read_manifest(pristine)
    derived = {"global_batch": 8, "steps_per_epoch": 4, "image_size": 32}

    def current(*overrides):
        return identity.run_identity(load_config(None, [*TINY_SETTINGS, *overrides]), pristine, manifest, derived)

    fold = str(tmp_path / "fold0")
    os.makedirs(fold)
    identity.write_identity(fold, current("train.schedule=constant"))
    free = ["infer.batch_size=3", "infer.tta=[identity]", "data.cache=true", "data.image_dtype=float32",
            "train.strategy=default", "train.steps_per_execution=4", "train.jit_compile=true",
            "train.early_stopping_patience=2", "train.epochs=30", "data.tfrecords=elsewhere", "train.max_minutes=5"]
    assert identity.check_resumable(fold, current("train.schedule=constant", *free), 0) is None
    for changed in ["train.batch_size=4", "augment.hflip_prob=0.1", "loss.name=focal", "model.pooling=gem",
                    "preprocess.image_size=64", "train.seed=5", "train.warmup_epochs=2"]:
        with pytest.raises(ValueError, match=changed.split("=")[0]):
            identity.check_resumable(fold, current("train.schedule=constant", changed), 0)
    with pytest.raises(ValueError, match="global_batch 8 -> 16"):
        identity.check_resumable(fold, {**current("train.schedule=constant"), "derived": {**derived, "global_batch": 16}}, 0)
    # The cosine curve spreads over train.epochs: a changed count is refused there.
    identity.write_identity(fold, current())
    with pytest.raises(ValueError, match="train.epochs 10 -> 30"):
        identity.check_resumable(fold, current("train.epochs=30"), 0)
    # A run folder from before identity.json: config.yaml's settings are still compared.
    os.remove(os.path.join(fold, identity.IDENTITY_FILE))
    save_config(load_config(None, TINY_SETTINGS), os.path.join(fold, "config.yaml"))
    assert "records could not be" in identity.check_resumable(fold, current(), 0)
    with pytest.raises(ValueError, match="model.dropout_rate"):
        identity.check_resumable(fold, current("model.dropout_rate=0.3"), 0)
