"""Unlabeled images -> extra/ records (make_tfrecords.py --unlabeled), mixed into training only (train.extra_records)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers_convert import phantom, read_records, run_cli
from helpers_train import TINY_SETTINGS, write_tiny_records

from ranzcr_tf.config import PreprocessConfig, load_config
from ranzcr_tf.labels import ID_COLUMN, LABELS
from ranzcr_tf.prep import records
from ranzcr_tf.prep.preprocess import preprocess_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PREPROCESS = PreprocessConfig(image_size=32, interpolation="linear")  # what write_tiny_records' manifest says


def dicom_radiograph(path) -> None:
    """A 12-bit MONOCHROME1 radiograph with a window: the 20 x 20 square is stored low, so it displays bright."""
    from ranzcr_tf.synth.ich import ct_slice, dicom_bytes

    stored = np.full((80, 70), 3000, np.uint16)
    stored[20:40, 30:50] = 500
    ds = ct_slice(stored, sop="1.2.826.0.1.3680043.8.498.1", patient="p0", study="1.2.3", series="1.2.3.4", z=0.0,
                  slope=None, intercept=None, bits_stored=12, signed=False, photometric="MONOCHROME1",
                  window=(1750.0, 3000.0))
    with open(path, "wb") as fh:
        fh.write(dicom_bytes(ds))


def mixed_folder(folder, rng, size_range=(60, 90)) -> dict:
    """JPEGs, an 8-bit and a 16-bit PNG, a DICOM radiograph, a corrupt JPEG, a damaged DICOM and a text file."""
    os.makedirs(folder, exist_ok=True)
    shape = lambda: tuple(int(v) for v in rng.integers(*size_range, size=2))  # noqa: E731
    cv2.imwrite(os.path.join(folder, "img_a.jpg"), phantom(rng, *shape()))
    cv2.imwrite(os.path.join(folder, "img_b.JPEG"), phantom(rng, *shape()))
    cv2.imwrite(os.path.join(folder, "img_c.png"), phantom(rng, *shape()))
    sixteen = (phantom(rng, *shape()).astype(np.uint16) * 64 + 1000).astype(np.uint16)
    cv2.imwrite(os.path.join(folder, "img_d16.png"), sixteen)
    with open(os.path.join(folder, "broken.jpg"), "wb") as fh:
        fh.write(b"\xff\xd8\xff not a jpeg")
    with open(os.path.join(folder, "scan.dcm"), "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
    with open(os.path.join(folder, "notes.txt"), "w") as fh:
        fh.write("hello")
    dicom_radiograph(os.path.join(folder, "img_e_dx.dcm"))
    return {"good": ["img_a", "img_b", "img_c", "img_d16", "img_e_dx"], "bad": ["broken", "scan", "notes"]}


def test_unlabeled_folder_keeps_every_readable_file_and_names_the_rest(tmp_path):
    rng = np.random.default_rng(0)
    files = mixed_folder(str(tmp_path / "images"), rng)
    out = str(tmp_path / "extra_records")
    result = run_cli(["--unlabeled", str(tmp_path / "images"), "--out-dir", out, "--image-size", "32",
                      "--interpolation", "linear", "--shard-records", "3", "--workers", "2", "--quiet"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote 5 unlabeled records in 2 shards" in result.stdout
    stored = read_records(out, records.EXTRA_DIR)
    assert sorted(r[ID_COLUMN] for r in stored) == files["good"]
    assert all(r[records.HAS_TARGET] == 0 and r[records.FOLD] == -1 and not r[records.TARGET].any() for r in stored)
    manifest = json.load(open(os.path.join(out, records.MANIFEST)))
    assert manifest["num_extra"] == 5 and manifest["num_folds"] == 0 and manifest["num_train"] == 0
    reasons = {entry["id"]: entry["reason"] for entry in manifest["skipped"]}
    assert sorted(reasons) == sorted(files["bad"])
    assert "pixel data cannot be decoded" in reasons["scan"] and "not an image file" in reasons["notes"]
    for name in ("broken.jpg", "scan.dcm", "notes.txt"):
        assert name in result.stderr  # each skipped file named as it is skipped
    # The 16-bit PNG went through the converter's own preprocessing (its full range, not truncated to 8 bits).
    d16 = next(r for r in stored if r[ID_COLUMN] == "img_d16")
    expected = preprocess_file(str(tmp_path / "images" / "img_d16.png"), PreprocessConfig(image_size=32,
                                                                                            interpolation="linear"))[0]
    assert d16[records.IMAGE] == expected
    assert records.decode_image_numpy(expected).std() > 5
    # The DICOM radiograph is read as displayed: MONOCHROME1's low stored square is the bright one.
    dx = records.decode_image_numpy(next(r for r in stored if r[ID_COLUMN] == "img_e_dx")[records.IMAGE])
    assert dx.shape[:2] == (32, 32) and dx[10:14, 16:20].mean() > dx[:5, :5].mean() + 100
    # Same settings, same bytes: the unlabeled path is the converter's preprocessing.
    again = run_cli(["--unlabeled", str(tmp_path / "images"), "--out-dir", out, "--image-size", "32"])
    assert again.returncode == 2 and "already holds converted records" in again.stderr.strip().splitlines()[-1]


def test_a_busy_out_dir_is_refused_naming_the_holder_and_nothing_is_written(tmp_path, capsys):
    """A converter holding --out-dir (this process, through the same real flock lock file): the unlabeled
    converter stops with one line naming it, exit 2, and writes no shard."""
    from helpers_convert import load_cli_module

    from ranzcr_tf import locks

    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.jpg"), phantom(np.random.default_rng(2), 64, 64))
    out = str(tmp_path / "out")
    with locks.FolderLock(out, "make_tfrecords.py"):
        code = load_cli_module().main(["--unlabeled", str(folder), "--out-dir", out, "--image-size", "32", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "in use by make_tfrecords.py" in err[0] and f"PID {os.getpid()}" in err[0], err
    assert os.listdir(out) == [locks.LOCK_FILE]


def test_two_files_with_one_id_are_refused(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    cv2.imwrite(str(folder / "same.jpg"), phantom(rng, 64, 64))
    cv2.imwrite(str(folder / "same.png"), phantom(rng, 64, 64))
    result = run_cli(["--unlabeled", str(folder), "--out-dir", str(tmp_path / "out"), "--image-size", "32"])
    assert result.returncode == 2
    assert "same.jpg and same.png would both be study 'same'" in result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Tiny labelled records, 12 unlabeled records made by the real converter, and soft labels for all."""
    from ranzcr_tf.prep.unlabeled import convert_unlabeled

    root = tmp_path_factory.mktemp("mix")
    table = write_tiny_records(str(root / "records"), num_folds=3, per_fold=8, size=32)
    rng = np.random.default_rng(2)
    folder = root / "images"
    folder.mkdir()
    extra_ids = [f"extra_{i:02d}" for i in range(12)]
    for sid in extra_ids:
        cv2.imwrite(str(folder / f"{sid}.png"), phantom(rng, 48, 48))
    convert_unlabeled(str(folder), str(root / "extra"), TINY_PREPROCESS, workers=1, progress=False)
    ids = [*table[ID_COLUMN], *extra_ids]
    soft = pd.DataFrame(rng.uniform(0.05, 0.95, (len(ids), 11)).round(6), columns=list(LABELS))
    soft.insert(0, ID_COLUMN, ids)
    soft.to_csv(root / "soft.csv", index=False)
    return {"root": root, "table": table, "extra_ids": extra_ids, "soft": soft, "records": str(root / "records"),
            "extra": str(root / "extra"), "soft_path": str(root / "soft.csv")}


def test_extra_records_join_the_training_stream_at_the_set_fraction_and_never_validation(mixed):
    from ranzcr_tf.pipeline.data import build_eval_dataset, build_train_dataset

    cfg = load_config(None, [*TINY_SETTINGS, f"train.soft_labels={mixed['soft_path']}", "train.soft_alpha=0.5",
                             f"train.extra_records={mixed['extra']}", "train.extra_fraction=0.25"])
    ds = build_train_dataset(cfg, mixed["records"], fold=0, global_batch_size=8, seed=5, augment=False,
                             deterministic=True)
    targets = np.concatenate([t.numpy() for _, t in ds.take(40)])  # 320 examples
    soft = mixed["soft"].set_index(ID_COLUMN)
    extra_rows = soft.loc[mixed["extra_ids"], list(LABELS)].to_numpy()
    is_extra = np.array([np.abs(extra_rows - row).max(axis=1).min() < 1e-5 for row in targets])
    assert 0.15 < is_extra.mean() < 0.35  # the set fraction, 0.25
    # Extra records train on their soft label alone (no hard label to mix with).
    assert len({tuple(np.round(row, 5)) for row in targets[is_extra]}) == 12

    valid = build_eval_dataset(cfg, mixed["records"], "valid", 8, fold=0)
    assert not set(valid.ids) & set(mixed["extra_ids"])
    assert sorted(valid.ids) == sorted(s for s in mixed["table"][ID_COLUMN] if s.split(".")[-2] == "0")


def test_extra_records_need_soft_labels_for_each_record_and_the_same_preprocessing(mixed, tmp_path):
    with pytest.raises(ValueError, match="train.extra_records .* to come with train.soft_labels"):
        load_config(None, [f"train.extra_records={mixed['extra']}"]).validate()
    from ranzcr_tf.pipeline.soft import SoftLabels
    from ranzcr_tf.train.fit import check_extra_records

    manifest = records.read_manifest(mixed["records"])
    short = mixed["soft"][~mixed["soft"][ID_COLUMN].isin(mixed["extra_ids"][:2])]
    short.to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ValueError, match=r"no row for 2 of the 12 studies in train.extra_records .* extra_00, extra_01"):
        check_extra_records(mixed["extra"], manifest, SoftLabels.read(str(tmp_path / "short.csv")))
    other = dict(manifest, preprocess={**manifest["preprocess"], "clahe_clip_limit": 3.0})
    with pytest.raises(ValueError, match="preprocessed with"):
        check_extra_records(mixed["extra"], other, SoftLabels.read(mixed["soft_path"]))


@pytest.mark.slow
def test_a_real_fit_with_extra_records_writes_oof_for_its_validation_fold_only(mixed, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", KERAS_BACKEND="tensorflow")
    args = [sys.executable, os.path.join(ROOT, "train_tpu.py"), "--fold", "0", "--tfrecords", mixed["records"],
            "--out", str(tmp_path / "run"), "--quiet"]
    for setting in (*TINY_SETTINGS, f"train.soft_labels={mixed['soft_path']}", f"train.extra_records={mixed['extra']}",
                    "train.epochs=1"):
        args += ["--set", setting]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    oof = pd.read_csv(tmp_path / "run" / "fold0" / "oof.csv", dtype={ID_COLUMN: str})
    assert sorted(oof[ID_COLUMN]) == sorted(s for s in mixed["table"][ID_COLUMN] if s.split(".")[-2] == "0")
