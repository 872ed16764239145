"""Issue 27, round two of the fault probe: one writer per output folder, records that match their manifest,
only complete folds served, a resume that says what it does, annotations checked against their images,
divergence and SIGTERM. Real processes for the concurrency cases, real training on tiny records."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers_convert import make_tiny_dataset, read_records
from helpers_train import load_train_tpu, tiny_settings, write_tiny_records

from ranzcr_tf import locks
from ranzcr_tf.config import PreprocessConfig
from ranzcr_tf.labels import ID_COLUMN, LABELS, SUBMISSION_COLUMNS
from ranzcr_tf.prep import records
from ranzcr_tf.prep.convert import ConvertOptions, convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", KERAS_BACKEND="tensorflow",
           PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
ENV.pop("TF_CONFIG", None)


train_tpu = load_train_tpu()
settings = tiny_settings


def start(script, *args, env=None):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line and "warnings.warn" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), err[-3000:]
    return lines[0]


def wait_for(predicate, timeout=120.0, every=0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def lock_holder(path):
    try:
        return json.loads(open(path).read() or "{}").get("pid")
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("records"))
    write_tiny_records(root, num_folds=3, per_fold=16, size=32, shards_per_fold=2)
    return root


# ----------------------------------------------------------------------------------------------- 1: one writer
@pytest.mark.slow
def test_a_second_converter_into_a_busy_folder_is_refused_naming_the_holder(tmp_path):
    """The first converter is stopped (SIGSTOP) while it holds the folder's lock, mid-conversion; a second one
    into the same folder, with other settings, must stop with one line naming the holder, and write nothing.
    (Started together, the race decided nothing the test could check: on a loaded machine the first could finish
    its 40 images between taking the lock and being stopped.)"""
    data = make_tiny_dataset(str(tmp_path / "data"), n_train=40, n_test=4, seed=3)
    out = str(tmp_path / "records")
    common = ["--data-dir", data, "--out-dir", out, "--folds", "3", "--workers", "1", "--shard-records", "4",
              "--no-progress"]
    holder = start("make_tfrecords.py", *common, "--image-size", "64")
    lock_path = os.path.join(out, locks.LOCK_FILE)
    assert wait_for(lambda: lock_holder(lock_path) == holder.pid or holder.poll() is not None), "no lock taken"
    os.kill(holder.pid, signal.SIGSTOP)  # keep the holder mid-conversion while the other one arrives
    try:
        assert lock_holder(lock_path) == holder.pid, "the first converter finished before it could be stopped"
        code, _, err = finish(start("make_tfrecords.py", *common, "--image-size", "48"))
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    line = one_error_line(err, "make_tfrecords.py")
    assert code == 2 and "in use by make_tfrecords.py" in line and f"PID {holder.pid}" in line, line
    code, _, err = finish(holder)
    assert code == 0, err[-3000:]
    manifest = records.read_manifest(out)
    for path in records.list_shards(out, "train") + records.list_shards(out, "test"):
        assert records.first_record_size(path) == (manifest["image_size"],) * 2, path  # one conversion only
    assert open(lock_path).read() == ""  # released cleanly


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_note(tmp_path, capsys):
    folder = str(tmp_path / "out")
    code = ("import os, signal, sys; from ranzcr_tf.locks import FolderLock; "
            "FolderLock(sys.argv[1], 'make_tfrecords.py').__enter__(); os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", code, folder], env=ENV)
    assert killed.returncode == -signal.SIGKILL
    dead_pid = lock_holder(os.path.join(folder, locks.LOCK_FILE))
    with locks.FolderLock(folder, "make_tfrecords.py"):
        assert lock_holder(os.path.join(folder, locks.LOCK_FILE)) == os.getpid()
    err = capsys.readouterr().err
    assert "taking over the lock of make_tfrecords.py (host" in err and f"PID {dead_pid}," in err, err


@pytest.mark.slow
def test_two_trainings_of_one_fold_started_together_then_sigterm(tiny_records, tmp_path):
    """Two processes train fold 0 into one folder: one is refused naming the other; the other, stopped by
    SIGTERM (preemption, docker stop) after its first backup, says so in one line and exits 143."""
    out = str(tmp_path / "run")
    args = ["--fold", "0", "--tfrecords", tiny_records, "--out-dir", out, "--quiet", *settings("train.epochs=40")]
    first, second = start("train_tpu.py", *args), start("train_tpu.py", *args)
    lock = os.path.join(out, ".lock-fold0")
    assert wait_for(lambda: lock_holder(lock) in (first.pid, second.pid), timeout=240, every=0.05)
    winner, loser = (first, second) if lock_holder(lock) == first.pid else (second, first)
    code, _, err = finish(loser)
    line = one_error_line(err, "train_tpu.py")
    assert code == 2 and "in use by train_tpu.py" in line and f"PID {winner.pid}" in line and ".lock-fold0" in line

    meta = os.path.join(out, "fold0", "backup", "stage0", "training_metadata.json")
    assert wait_for(lambda: os.path.exists(meta), timeout=240, every=0.05)
    winner.send_signal(signal.SIGTERM)
    code, _, err = finish(winner)
    line = one_error_line(err, "train_tpu.py")
    assert code == 143 and "terminated (SIGTERM)" in line and "last backup" in line and "rerun" in line, err[-2000:]
    backup = os.path.dirname(meta)
    done = json.load(open(meta))["epoch"]
    assert done >= 1 and os.path.exists(os.path.join(backup, f"epoch{done}.weights.h5"))
    assert not [n for n in os.listdir(backup) if n.startswith(".tmp-")]
    assert open(lock).read() == ""  # released on the way out
    log = open(os.path.join(out, "fold0", "log.csv")).read().splitlines()
    assert sum(row.startswith("epoch") for row in log) == 1  # one writer: one header


def test_a_held_fold_lock_refuses_in_process_and_other_folds_stay_free(tmp_path):
    out = str(tmp_path / "run")
    with locks.FolderLock(out, "train_tpu.py", name=".lock-fold0"):
        with pytest.raises(locks.FolderBusy, match=f"PID {os.getpid()}"):
            with locks.FolderLock(out, "train_tpu.py", name=".lock-fold0"):
                pass
        with locks.FolderLock(out, "train_tpu.py", name=".lock-fold1"):  # another fold: free
            pass
    with locks.FolderLock(str(tmp_path / "gs-like"), "x"):  # taken again after release
        pass


# ----------------------------------------------------------------------------------------------- 2: records
def test_records_mixing_two_resolutions_are_refused_before_any_epoch(tiny_records, tmp_path, capsys):
    mixed = shutil.copytree(tiny_records, str(tmp_path / "mixed"))
    other = str(tmp_path / "other64")
    write_tiny_records(other, num_folds=3, per_fold=16, size=64, shards_per_fold=2)
    for path in records.list_shards(other, "train", [1]):  # same names and counts, 64 px images
        shutil.copy(path, os.path.join(mixed, "train", os.path.basename(path)))
    code = train_tpu.main(["--fold", "0", "--tfrecords", mixed, "--out-dir", str(tmp_path / "run"), "--quiet",
                           *settings("train.epochs=1")])
    line = one_error_line(capsys.readouterr().err, "train_tpu.py")
    assert code == 2 and "mix conversions" in line and "64x64 px images, the manifest says 32 px" in line, line
    assert not os.path.exists(tmp_path / "run" / "fold0")

    # A per-shard settings stamp that disagrees with the manifest is refused too (even on gs://, unread).
    manifest = json.load(open(os.path.join(tiny_records, records.MANIFEST)))
    stamped = {**manifest, "shard_settings": {f"train/{os.path.basename(p)}": "0" * 16
                                              for p in records.list_shards(tiny_records, "train")}}
    with pytest.raises(ValueError, match="written with other settings"):
        records.check_shard_settings(tiny_records, stamped, records.list_shards(tiny_records, "train"))


def test_a_fold_from_another_conversion_is_refused_at_start(tiny_records, tmp_path, capsys):
    out = tmp_path / "run"
    os.makedirs(out / "fold0")
    (out / "fold0" / "identity.json").write_text(json.dumps({"records": {"manifest_sha256": "f" * 64}}))
    code = train_tpu.main(["--fold", "1", "--tfrecords", tiny_records, "--out-dir", str(out), "--quiet",
                           *settings("train.epochs=1")])
    line = one_error_line(capsys.readouterr().err, "train_tpu.py")
    assert code == 2 and "fold0 was trained from other records" in line and "one conversion" in line, line
    assert not os.path.exists(out / "fold1")


# ----------------------------------------------------------------------------------------------- 3 + 4: killed run
@pytest.fixture(scope="module")
def killed_run(tiny_records, tmp_path_factory):
    """A training of fold 0 SIGKILLed after epoch 0 of 2 (a preempted notebook): best.keras, no metrics.json."""
    out = str(tmp_path_factory.mktemp("killed") / "run")
    args = ["--fold", "0", "--tfrecords", tiny_records, "--out-dir", out, "--quiet",
            *settings("train.epochs=2", "infer.tta=[identity]")]
    code, _, err = finish(start("train_tpu.py", *args, env={"RANZCR_TF_KILL_AFTER_EPOCH": "0"}))
    assert code == -signal.SIGKILL, err[-3000:]
    assert os.path.exists(os.path.join(out, "fold0", "best.keras"))
    assert not os.path.exists(os.path.join(out, "fold0", "metrics.json"))
    return out, args


def _test_images(tmp_path, count=3):
    data = tmp_path / "test_data"
    os.makedirs(data / "test")
    ids = [f"1.2.9.{i}" for i in range(count)]
    rng = np.random.default_rng(0)
    for sid in ids:
        cv2.imwrite(str(data / "test" / f"{sid}.jpg"), rng.integers(0, 255, (40, 40), dtype=np.uint8))
    pd.DataFrame({ID_COLUMN: ids, **{label: 0.5 for label in LABELS}})[list(SUBMISSION_COLUMNS)].to_csv(
        data / "sample_submission.csv", index=False)
    return str(data), ids


def test_kernel_and_package_refuse_a_fold_whose_training_never_finished(killed_run, tmp_path, capsys):
    from ranzcr_tf.serve import kernel
    from ranzcr_tf.serve.package import copy_runs

    run, _ = killed_run
    data, ids = _test_images(tmp_path)
    out = str(tmp_path / "submission.csv")
    argv = ["--models", run, "--data-dir", data, "--out", out, "--quiet", "--workers", "1"]
    code = kernel.main(argv)
    line = one_error_line(capsys.readouterr().err, "kaggle_kernel.py")
    assert code == 2 and "fold0 (last epoch 0 of 2)" in line and "--allow-incomplete" in line, line
    assert not os.path.exists(out)

    code = kernel.main([*argv, "--allow-incomplete"])
    err = capsys.readouterr().err
    assert code == 0 and "INCOMPLETE fold(s) used (--allow-incomplete)" in err and "fold0 (last epoch 0 of 2)" in err
    assert list(pd.read_csv(out)[ID_COLUMN]) == ids

    with pytest.raises(ValueError, match=r"fold0 \(last epoch 0 of 2\)"):
        copy_runs([run], str(tmp_path / "bundle"))
    copied, incomplete = copy_runs([run], str(tmp_path / "bundle2"), allow_incomplete=True)
    assert incomplete == ["run/fold0 (last epoch 0 of 2)"] and len(copied) == 1
    # The bundle keeps train_state.json, so the kernel reading the bundle refuses the fold as well.
    assert os.path.exists(os.path.join(tmp_path, "bundle2", copied[0], "train_state.json"))


@pytest.mark.slow
def test_lost_backup_starts_over_says_so_and_archives_the_earlier_training(killed_run, tmp_path, capsys):
    run, args = killed_run
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    fold = os.path.join(copy, "fold0")
    shutil.rmtree(os.path.join(fold, "backup"))
    earlier_best = open(os.path.join(fold, "best.keras"), "rb").read()
    args = [copy if a == run else a for a in args]
    code = train_tpu.main(args)
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert code == 0, err[-3000:]
    notes = [line for line in out.splitlines() if "no backup to continue it from" in line]
    assert len(notes) == 1 and "training from epoch 0" in notes[0] and ".archive" in notes[0], out[-3000:]
    assert "taking over the lock of train_tpu.py" in err  # the killed run's lock, named and taken over
    archived = os.path.join(fold, ".archive", os.listdir(os.path.join(fold, ".archive"))[0])
    assert open(os.path.join(archived, "best.keras"), "rb").read() == earlier_best
    assert list(pd.read_csv(os.path.join(archived, "log.csv"))["epoch"]) == [0]
    log = pd.read_csv(os.path.join(fold, "log.csv"))
    best = json.load(open(os.path.join(fold, "best.json")))
    metrics = json.load(open(os.path.join(fold, "metrics.json")))
    assert list(log["epoch"]) == [0, 1]  # one training: its log, its best, its metrics
    assert best["val_auc"] == pytest.approx(log["val_auc"].max()) and metrics["best_epoch"] == best["epoch"]


# ----------------------------------------------------------------------------------------------- 5: annotations
@pytest.fixture(scope="module")
def resized_dataset(tmp_path_factory):
    """The Kaggle layout with the images resized to a quarter and the original train_annotations.csv."""
    data = make_tiny_dataset(str(tmp_path_factory.mktemp("resized")), n_train=12, n_test=0, seed=1,
                             size_range=(240, 400))
    for name in os.listdir(os.path.join(data, "train")):
        path = os.path.join(data, "train", name)
        image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(path, cv2.resize(image, (image.shape[1] // 4, image.shape[0] // 4)))
    return data


def _convert(data, out, **kwargs):
    return convert(ConvertOptions(data_dir=data, out_dir=str(out), preprocess=PreprocessConfig(image_size=32),
                                  num_folds=2, workers=1, shard_records=8, include_test=False, progress=False,
                                  **kwargs))


def test_annotations_for_the_original_images_stop_the_converter_and_auto_scale_fixes_them(resized_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"study 1\.2\.826\.0\.1\.1\.\d+: .* lies outside its \d+x\d+ image .*"
                                         r"another resolution .*--annotations-scale auto"):
        _convert(resized_dataset, tmp_path / "plain")
    assert not os.path.exists(tmp_path / "plain" / records.MANIFEST)

    manifest = _convert(resized_dataset, tmp_path / "auto", annotations_scale="auto")
    assert manifest["annotations"]["scale"] == 0.25 and manifest["annotations"]["studies_checked"] > 0
    points = [p for item in read_records(str(tmp_path / "auto"), "train") for _, p in item["annotations"]]
    assert points and all(((p >= 0) & (p <= 32)).all() for p in points)  # inside the stored 32 px image


def test_a_wild_row_stops_and_a_point_just_outside_is_clipped_and_counted(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"), n_train=6, n_test=0, seed=2)
    table = pd.read_csv(os.path.join(data, "train_annotations.csv"))
    study = pd.read_csv(os.path.join(data, "train.csv"))[ID_COLUMN][0]
    width = cv2.imread(os.path.join(data, "train", f"{study}.jpg")).shape[1]
    many = [[5 + i, 5 + i] for i in range(40)] + [[width + 2, 10]]  # 1 of 41 points just past the right edge
    rows = [{ID_COLUMN: study, "label": LABELS[0], "data": json.dumps(many)}]
    pd.concat([table, pd.DataFrame(rows)]).to_csv(os.path.join(data, "train_annotations.csv"), index=False)
    manifest = _convert(data, tmp_path / "clipped")
    assert manifest["annotations"]["points_clipped"] == 1 and manifest["annotations"]["scale"] == 1

    wild = [{ID_COLUMN: study, "label": LABELS[0], "data": json.dumps([[20000, 10], [10, 10]])}]
    pd.concat([table, pd.DataFrame(wild)]).to_csv(os.path.join(data, "train_annotations.csv"), index=False)
    with pytest.raises(ValueError, match=rf"study {study}: a point at \(20000, 10\) lies outside"):
        _convert(data, tmp_path / "wild")


# ----------------------------------------------------------------------------------------------- 6: divergence, SIGTERM
@pytest.mark.slow
def test_a_finite_blow_up_is_divergence_with_the_fold_and_learning_rate(tiny_records, tmp_path, capsys):
    code = train_tpu.main(["--fold", "0", "--tfrecords", tiny_records, "--out-dir", str(tmp_path / "run"), "--quiet",
                           *settings("train.epochs=3", "train.learning_rate=1000", "train.warmup_epochs=1")])
    err = capsys.readouterr().err
    line = [row for row in err.splitlines() if row.startswith("train_tpu.py: ")]
    assert code == 3 and len(line) == 1, err[-3000:]
    assert "training diverged: fold 0, peak learning rate 1e+03" in line[0] and "lower learning rate" in line[0]
    assert not os.path.exists(tmp_path / "run" / "fold0" / "metrics.json")


# ----------------------------------------------------------------------------------------------- 7: the small ones
def test_kernel_refusals_no_readable_image_out_as_input_other_task_config_and_forbidden_tta(killed_run, tmp_path,
                                                                                             capsys):
    from ranzcr_tf.serve import kernel

    run, _ = killed_run
    data, ids = _test_images(tmp_path)
    sample = os.path.join(data, "sample_submission.csv")
    before = open(sample).read()
    base = ["--models", run, "--data-dir", data, "--quiet", "--workers", "1", "--allow-incomplete"]

    code = kernel.main([*base, "--out", sample])
    assert code == 2 and "would overwrite the kernel's own input" in capsys.readouterr().err
    code = kernel.main([*base, "--out", str(tmp_path / "s.csv"), "--config", os.path.join(ROOT, "configs",
                                                                                          "rsna_ich_cpu.yaml")])
    assert code == 2 and "but the runs were trained for 'ranzcr'" in capsys.readouterr().err
    assert open(sample).read() == before

    # The run saved infer.tta [identity] (sides matter to it): a flip asked for is dropped with a note.
    code = kernel.main([*base, "--out", str(tmp_path / "s.csv"), "--tta", "identity", "hflip"])
    err = capsys.readouterr().err
    assert code == 0 and "TTA view(s) hflip dropped" in err, err[-2000:]

    for sid in ids:  # no readable test image: exit 2 naming why, not an all-0.5 file blamed on the budget
        open(os.path.join(data, "test", f"{sid}.jpg"), "wb").write(b"not a jpeg")
    out = str(tmp_path / "none.csv")
    code = kernel.main([*base, "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and f"none of the {len(ids)} test images could be read" in err and "budget" not in \
        err.split("no prediction at all")[0], err[-2000:]
    assert not os.path.exists(out)


def test_unscoreable_validation_fold_and_infinite_learning_rate_are_refused_before_training(tiny_records, tmp_path,
                                                                                            capsys):
    code = train_tpu.main(["--fold", "0", "--tfrecords", tiny_records, "--out-dir", str(tmp_path / "a"), "--quiet",
                           *settings("train.epochs=1", "train.learning_rate=inf")])
    assert code == 2 and "train.learning_rate = inf is invalid" in one_error_line(capsys.readouterr().err,
                                                                                   "train_tpu.py")
    flat = shutil.copytree(tiny_records, str(tmp_path / "flat"))
    manifest = json.load(open(os.path.join(flat, records.MANIFEST)))
    manifest["fold_positives"]["0"] = [0] * len(LABELS)  # every label negative in fold 0
    json.dump(manifest, open(os.path.join(flat, records.MANIFEST), "w"))
    code = train_tpu.main(["--fold", "0", "--tfrecords", flat, "--out-dir", str(tmp_path / "b"), "--quiet",
                           *settings("train.epochs=1")])
    line = one_error_line(capsys.readouterr().err, "train_tpu.py")
    assert code == 2 and "one class in every label" in line and not os.path.exists(tmp_path / "b" / "fold0")


def test_json_files_hold_null_for_undefined_values_and_read_back(tmp_path):
    from ranzcr_tf import io_utils

    path = str(tmp_path / "metrics.json")
    io_utils.atomic_write_json(path, {"val_auc": float("nan"), "per_class_auc": {"a": np.float32(0.5), "b": np.inf}})
    text = open(path).read()
    assert "NaN" not in text and "Infinity" not in text

    def strict(name):
        raise ValueError(f"not JSON: {name}")

    assert json.loads(text, parse_constant=strict) == {"val_auc": None, "per_class_auc": {"a": 0.5, "b": None}}


def test_synthetic_ich_without_pydicom_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    from ranzcr_tf.synth import ich

    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if not installed
    code = ich.main(["--out-dir", str(tmp_path / "ich"), "--patients", "4"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "ranzcr-tf[dicom]" in err[0], err
    assert not os.path.exists(tmp_path / "ich")


def test_blend_of_one_fold_runs_does_not_claim_a_nested_cv():
    from ranzcr_tf.serve.blend import fit_blend, format_table

    rng = np.random.default_rng(0)
    targets = (rng.random((30, len(LABELS))) < 0.4).astype(float)
    targets[0], targets[1] = 1, 0
    runs = {"probs": rng.random((2, 30, len(LABELS))), "targets": targets, "folds": np.zeros(30, int),
            "names": ["a", "b"]}
    blend = fit_blend(runs, divisions=4, rank=False)
    assert blend["cv"]["blend_nested"] is None
    table = format_table(blend)
    assert "no nested CV of the blend: the runs' OOF holds one fold" in table and "blend*" not in table
