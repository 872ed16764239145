"""RSNA ICH end to end on a tiny generated DICOM set: convert -> train fold 0 for a few steps -> long
submission; and adjacent-slice records carry their neighbours' pixels. Needs prep/dicom.py, synth/ich.py
and pydicom (the ``dicom`` extra)."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pydicom")
pytest.importorskip("ranzcr_tf.prep.dicom")
pytest.importorskip("ranzcr_tf.synth.ich")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "configs", "rsna_ich_cpu.yaml")
SIZE = 32


@pytest.fixture(scope="module")
def ich_set(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ich") / "data")
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-m", "ranzcr_tf.synth.ich", "--out-dir", out, "--patients", "8", "--seed", "0",
                    "--size", str(SIZE)], check=True, cwd=ROOT, env=env, capture_output=True)
    return out


def _convert(data_dir, out_dir, *sets):
    import make_tfrecords

    flags = [x for s in (f"preprocess.image_size={SIZE}", *sets) for x in ("--set", s)]
    return make_tfrecords.main(["--config", PRESET, "--data-dir", data_dir, "--out-dir", out_dir, "--quiet",
                                "--shard-records", "64", *flags])


def test_convert_train_submit(ich_set, tmp_path, capsys):
    import kaggle_kernel  # noqa: F401  (the stub imports)
    import train_tpu
    from ranzcr_tf.prep import records
    from ranzcr_tf.serve.kernel import main as kernel_main

    records_dir, run_dir = str(tmp_path / "records"), str(tmp_path / "run")
    assert _convert(ich_set, records_dir) == 0
    summary = capsys.readouterr().out
    manifest = records.read_manifest(records_dir)
    assert manifest["image_channels"] == 9 and manifest["labels"][-1] == "any" and manifest["num_test"] > 0
    quirks = pd.read_csv(os.path.join(ich_set, "quirks.csv"))
    skipped = pd.read_csv(os.path.join(records_dir, "skipped.csv"))
    assert len(skipped) >= 1 and "skipped" in summary  # corrupt / pixel-less files are named, not fatal
    assert len(quirks) >= 1
    folds = pd.read_csv(os.path.join(records_dir, "folds.csv"))
    assert folds.groupby("PatientID")["fold"].nunique().max() == 1  # grouped by the DICOM PatientID
    code = train_tpu.main(["--config", PRESET, "--fold", "0", "--tfrecords", records_dir, "--out-dir", run_dir,
                           "--quiet", "--set", "train.epochs=2", "--set", "train.steps_per_epoch=2",
                           "--set", "train.batch_size=8", "--set", "train.warmup_epochs=0"])
    assert code == 0
    metrics = pd.read_json(os.path.join(run_dir, "fold0", "metrics.json"), typ="series")
    assert np.isfinite(metrics["val_weighted_log_loss"]) and metrics["metric"] == "weighted_log_loss"
    oof = pd.read_csv(os.path.join(run_dir, "fold0", "oof.csv"))
    assert list(oof.columns[:2]) == ["ID", "fold"] and "target_any" in oof.columns
    out = str(tmp_path / "submission.csv")
    assert kernel_main(["--data-dir", ich_set, "--tfrecords", records_dir, "--models", run_dir, "--out", out,
                        "--quiet"]) == 0
    sample = pd.read_csv(os.path.join(ich_set, "stage_2_sample_submission.csv"))
    written = pd.read_csv(out)
    assert list(written.columns) == ["ID", "Label"]
    assert written["ID"].tolist() == sample["ID"].tolist() and written["ID"].is_unique
    assert written["Label"].between(0, 1).all()
    # A sample that names an image the records lack is refused (exit 2, one line).
    broken = tmp_path / "broken"
    os.makedirs(broken)
    extra = pd.DataFrame({"ID": [f"ID_missing_{label}" for label in manifest["labels"]], "Label": 0.5})
    pd.concat([sample, extra]).to_csv(broken / "stage_2_sample_submission.csv", index=False)
    assert kernel_main(["--data-dir", str(broken), "--tfrecords", records_dir, "--models", run_dir,
                        "--out", str(tmp_path / "x.csv"), "--quiet"]) == 2


def test_adjacent_slice_records_carry_the_neighbours_pixels(ich_set, tmp_path):
    import tensorflow as tf

    from ranzcr_tf.prep import dicom, records

    records_dir = str(tmp_path / "records")
    assert _convert(ich_set, records_dir, "data.folds=2") == 0
    table = pd.concat([dicom.scan_folder(os.path.join(ich_set, "stage_2_train"))[0]], ignore_index=True)
    paths = dict(zip(table["id"], table["path"]))
    windows = dicom.parse_windows(["brain", "subdural", "bone"])
    layout = records.RecordLayout(num_classes=6, channels=9)
    checked = moved = 0
    for path in records.list_shards(records_dir, "train")[:1]:
        for raw in tf.data.TFRecordDataset(path).take(6):
            parsed = records.parse_example(raw, layout=layout)
            sid = parsed[records.ID].numpy().decode()
            stored = records.decode_stored(parsed, 9).numpy().astype(int)
            below, _, above = dicom.neighbour_ids(table, sid, 1)
            for block, neighbour in ((0, below), (2, above)):
                hu, _ = dicom.read_hu(paths[neighbour])
                expected = np.rint(np.clip(dicom.apply_windows(hu, windows), 0, 1) * 255).astype(int)
                assert np.abs(stored[..., 3 * block:3 * block + 3] - expected).max() <= 1  # generated at SIZE px
            own, _ = dicom.read_hu(paths[sid])
            mine = np.rint(np.clip(dicom.apply_windows(own, windows), 0, 1) * 255).astype(int)
            assert np.abs(stored[..., 3:6] - mine).max() <= 1
            moved += int(below != sid or above != sid)
            checked += 1
    assert checked == 6 and moved >= 1  # at least one slice with a real neighbour (not a series edge alone)


def test_a_busy_out_dir_is_refused_naming_the_holder(ich_set, tmp_path, capsys):
    """The DICOM converter takes the folder's lock like the JPEG one: held by another converter (this process,
    a real flock on the same lock file), it stops with one line naming the holder, exit 2, and writes nothing."""
    from ranzcr_tf import locks

    out = str(tmp_path / "records")
    with locks.FolderLock(out, "make_tfrecords.py"):
        assert _convert(ich_set, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by make_tfrecords.py" in err[0] and f"PID {os.getpid()}" in err[0], err
    assert os.listdir(out) == [locks.LOCK_FILE]


def test_a_killed_dicom_conversion_resumes_and_keeps_its_complete_shards(ich_set, tmp_path, capsys):
    """A real SIGKILL in the middle of a shard, then the same command again: the complete shards are kept as
    they were (same file, same bytes), the rest is written, and the result equals an uninterrupted run."""
    from ranzcr_tf.prep import records
    from ranzcr_tf.prep.shard_plan import KILL_HOOK_ENV

    def shard_bytes(folder):
        found = {}
        for split in ("train", "test"):
            for path in records.list_shards(folder, split):
                with open(path, "rb") as fh:
                    found[os.path.relpath(path, folder)] = fh.read()
        return found

    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    flags = ["--config", PRESET, "--data-dir", ich_set, "--quiet", "--shard-records", "8", "--workers", "1",
             "--set", f"preprocess.image_size={SIZE}", "--set", "data.folds=2"]
    env = {**os.environ, "PYTHONPATH": ROOT, KILL_HOOK_ENV: "20"}  # after 2 complete shards, inside the third
    result = subprocess.run([sys.executable, "make_tfrecords.py", *flags, "--out-dir", killed], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -9, result.stderr[-2000:]
    assert not os.path.exists(os.path.join(killed, records.MANIFEST))
    before = {name: os.stat(os.path.join(killed, name)).st_mtime_ns for name in shard_bytes(killed)}
    assert len(before) == 2, before  # the two complete shards; the third was never renamed from .tmp-
    import make_tfrecords

    assert make_tfrecords.main([*flags, "--out-dir", killed]) == 0
    assert "resuming: 2 of" in capsys.readouterr().err
    assert {name: os.stat(os.path.join(killed, name)).st_mtime_ns for name in before} == before  # not rewritten
    assert make_tfrecords.main([*flags, "--out-dir", clean]) == 0
    assert shard_bytes(killed) == shard_bytes(clean) and len(shard_bytes(clean)) > 2
    resumed, fresh = records.read_manifest(killed), records.read_manifest(clean)
    for key in ("num_train", "num_test", "shards", "skipped", "fold_counts"):
        assert resumed[key] == fresh[key], key
    assert not [n for n in os.listdir(os.path.join(killed, "train")) if n.startswith(".tmp-")]
