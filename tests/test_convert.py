"""The converter end to end on real files in temp folders: records, folds, annotations, resume, bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers_convert import (
    REPO,
    load_cli_module,
    make_dataset,
    mismatched_targets,
    phantom,
    read_records,
    run_cli,
    shard_bytes,
)

from ranzcr_tf.config import PreprocessConfig
from ranzcr_tf.labels import ID_COLUMN, LABELS, PATIENT_COLUMN
from ranzcr_tf.prep import records
from ranzcr_tf.prep.convert import ConvertOptions, convert
from ranzcr_tf.prep.csv_checks import read_train_csv
from ranzcr_tf.prep.preprocess import BadImageError, decode_source, preprocess_array
from ranzcr_tf.prep.shard_plan import KILL_HOOK_ENV

SIZE = 64
SHARD_RECORDS = 3
CLI_ARGS = ["--image-size", str(SIZE), "--shard-records", str(SHARD_RECORDS), "--folds", "3", "--seed", "5",
            "--no-progress"]
MANIFEST_KEYS = {"schema_version", "preprocess", "image_size", "num_folds", "fold_seed", "labels", "num_train",
                 "num_test", "fold_counts", "fold_positives", "shards", "skipped", "notes", "_meta"}


def _options(data_dir, out_dir, **kwargs) -> ConvertOptions:
    values = dict(preprocess=PreprocessConfig(image_size=SIZE), num_folds=3, fold_seed=5, workers=1,
                  shard_records=SHARD_RECORDS, progress=False)
    values.update(kwargs)
    return ConvertOptions(data_dir=str(data_dir), out_dir=str(out_dir), **values)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")), n_train=21, n_test=5, seed=0)


@pytest.fixture(scope="module")
def clean_run(dataset, tmp_path_factory):
    """An uninterrupted, single-process conversion: the reference every other run must reproduce."""
    out = str(tmp_path_factory.mktemp("clean"))
    manifest = convert(_options(dataset, out))
    return out, manifest


def test_records_decode_to_the_preprocessed_source(dataset, clean_run):
    out, manifest = clean_run
    settings = PreprocessConfig(image_size=SIZE)
    items = read_records(out, "train") + read_records(out, "test")
    assert len(items) == manifest["num_train"] + manifest["num_test"] == 21 + 5
    for item in items:
        split = "train" if item[records.HAS_TARGET] else "test"
        with open(os.path.join(dataset, split, item[ID_COLUMN] + ".jpg"), "rb") as fh:
            data = fh.read()
        gray, info = decode_source(data, settings)
        expected = preprocess_array(gray, settings)
        stored = records.decode_image_numpy(item[records.IMAGE])
        assert stored.shape == (SIZE, SIZE) == (item[records.HEIGHT], item[records.WIDTH])
        assert np.abs(stored.astype(int) - expected).mean() < 2.0, item[ID_COLUMN]
        full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert (item[records.ORIG_HEIGHT], item[records.ORIG_WIDTH]) == full.shape


def test_targets_match_train_csv_per_id_and_a_shuffled_column_fails(dataset, clean_run):
    out, _ = clean_run
    train_df = read_train_csv(os.path.join(dataset, "train.csv"))
    targets = {item[ID_COLUMN]: item[records.TARGET] for item in read_records(out, "train")}
    assert sorted(targets) == sorted(train_df[ID_COLUMN])
    assert mismatched_targets(targets, train_df) == []
    # The check itself must catch a label column shuffled across rows.
    shuffled = train_df.copy()
    column = max(LABELS, key=lambda c: min(shuffled[c].sum(), len(shuffled) - shuffled[c].sum()))
    shuffled[column] = np.roll(shuffled[column].to_numpy(), 1)
    assert not np.array_equal(shuffled[column], train_df[column])
    assert mismatched_targets(targets, shuffled) != []


def test_folds_are_patient_disjoint_and_match_records_and_manifest(dataset, clean_run):
    out, manifest = clean_run
    train_df = read_train_csv(os.path.join(dataset, "train.csv"))
    folds_csv = pd.read_csv(os.path.join(out, records.FOLDS_CSV), dtype={ID_COLUMN: str, PATIENT_COLUMN: str})
    assert list(folds_csv.columns) == [ID_COLUMN, PATIENT_COLUMN, "fold"]
    assert sorted(folds_csv[ID_COLUMN]) == sorted(train_df[ID_COLUMN])  # every row exactly once
    assert (folds_csv.groupby(PATIENT_COLUMN)["fold"].nunique() == 1).all()
    fold_of = dict(zip(folds_csv[ID_COLUMN], folds_csv["fold"]))
    items = read_records(out, "train")
    for item in items:
        assert item[records.FOLD] == fold_of[item[ID_COLUMN]]
        assert item["shard"].startswith(f"fold{item[records.FOLD]}-")
    assert set(MANIFEST_KEYS) <= set(manifest)
    assert manifest["fold_counts"] == {str(k): int((folds_csv["fold"] == k).sum()) for k in range(3)}
    for k in range(3):
        expected = np.sum([item[records.TARGET] for item in items if item[records.FOLD] == k], axis=0)
        assert manifest["fold_positives"][str(k)] == expected.astype(int).tolist()
    names = manifest["shards"]["train"]
    assert len(names) > 3 and all(records.parse_shard_name(n)["count"] <= SHARD_RECORDS for n in names)
    assert records.count_records(names) == 21
    assert manifest["preprocess"]["decoder"] == records.SOURCE_DECODER
    assert manifest["preprocess"]["stored_dct_method"] == "INTEGER_ACCURATE"
    assert records.read_manifest(out)["labels"] == list(LABELS)


def test_annotation_points_match_the_csv_after_scaling(dataset, clean_run):
    out, _ = clean_run
    annotations = pd.read_csv(os.path.join(dataset, "train_annotations.csv"))
    assert len(annotations) > 0
    by_id = {item[ID_COLUMN]: item for item in read_records(out, "train")}
    for study, rows in annotations.groupby(ID_COLUMN, sort=False):
        item = by_id[study]
        got = item["annotations"]
        assert [label for label, _ in got] == [LABELS.index(name) for name in rows["label"]]
        scale = np.array([SIZE / item[records.ORIG_WIDTH], SIZE / item[records.ORIG_HEIGHT]])
        for (_, points), data in zip(got, rows["data"]):
            np.testing.assert_allclose(points, np.asarray(json.loads(data), float) * scale, rtol=1e-5, atol=1e-4)
    unannotated = set(by_id) - set(annotations[ID_COLUMN])
    assert all(len(by_id[s]["annotations"]) == 0 for s in unannotated)


def test_test_shards_hold_every_test_id_once(dataset, clean_run):
    out, manifest = clean_run
    expected = pd.read_csv(os.path.join(dataset, "sample_submission.csv"), dtype={ID_COLUMN: str})[ID_COLUMN]
    items = read_records(out, "test")
    assert sorted(item[ID_COLUMN] for item in items) == sorted(expected)
    assert all(item[records.HAS_TARGET] == 0 and item[records.FOLD] == -1 for item in items)
    assert manifest["num_test"] == len(expected) and all(n.startswith("test/test-") for n in manifest["shards"]["test"])
    assert "test_count" not in manifest  # one name: num_test (readers still accept test_count from old manifests)


def test_kernel_test_images_use_the_converters_shard_and_manifest_writer(dataset, clean_run, tmp_path):
    # The kernel's raw-JPEG path writes the same shard bytes and the same manifest fields as the converter.
    from ranzcr_tf.prep.records import manifest_num_test
    from ranzcr_tf.prep.testimages import preprocess_test_images

    out, manifest = clean_run
    ids = [item[ID_COLUMN] for item in read_records(out, "test")]
    folder, skipped = preprocess_test_images(dataset, ids, PreprocessConfig(image_size=SIZE), str(tmp_path / "t"),
                                             workers=1, progress=False, shard_index=4)
    assert skipped == [] and os.listdir(tmp_path / "t" / "test") == [records.shard_name(None, 4, len(ids))]
    kernel_manifest = json.load(open(tmp_path / "t" / records.MANIFEST))
    common = {"schema_version", "preprocess", "image_size", "num_folds", "labels", "num_train", "num_test", "shards",
              "skipped"}
    assert common <= set(kernel_manifest) and common <= set(manifest)
    assert kernel_manifest["num_folds"] == 0 and kernel_manifest["num_train"] == 0  # no made-up folds
    assert kernel_manifest["preprocess"] == manifest["preprocess"] and manifest_num_test(kernel_manifest) == len(ids)
    by_id = {item[ID_COLUMN]: item[records.IMAGE] for item in read_records(out, "test")}
    kernel_items = read_records(str(tmp_path / "t"), "test")
    assert [item[ID_COLUMN] for item in kernel_items] == ids
    assert all(item[records.IMAGE] == by_id[item[ID_COLUMN]] for item in kernel_items)  # same stored bytes
    assert manifest_num_test({"test_count": 7}) == 7  # manifests written before num_test was the one name


def test_worker_threads_run_in_parallel_in_order_and_restore_opencv():
    import threading
    import time

    from ranzcr_tf.prep.workers import ordered_map, start_threads

    before = cv2.getNumThreads()

    def slow_first(item):  # the first task finishes last: results must still come back in order
        time.sleep(0.2 if item[0] == 0 else 0.0)
        return item[0], threading.current_thread().name

    with start_threads(2) as pool:
        assert cv2.getNumThreads() == 1  # no OpenCV thread pool on top of the workers
        results = list(ordered_map(slow_first, [(i,) for i in range(6)], pool, window=4))
    assert [index for index, _ in results] == list(range(6))
    assert len({name for _, name in results}) == 2 and all(n.startswith("preprocess") for _, n in results)
    assert cv2.getNumThreads() == before

    def crash(item):  # anything but a BadImageError is a bug: it reaches the caller, and the pool still closes
        raise RuntimeError(f"decoder crashed on {item[0]}")

    with pytest.raises(RuntimeError, match="decoder crashed on 0"):
        with start_threads(2) as pool:
            list(ordered_map(crash, [(i,) for i in range(4)], pool, window=2))
    assert cv2.getNumThreads() == before
    with start_threads(1) as pool:
        assert pool is None and list(ordered_map(slow_first, [(1,)], pool, window=2))[0][0] == 1


@pytest.mark.slow
def test_two_workers_and_a_killed_then_resumed_run_are_byte_identical(dataset, clean_run, tmp_path):
    reference = shard_bytes(clean_run[0])
    # 1 vs 2 workers (the CLI, real worker threads).
    two = tmp_path / "two"
    result = run_cli(["--data-dir", dataset, "--out-dir", str(two), "--workers", "2", *CLI_ARGS])
    assert result.returncode == 0, result.stderr
    assert shard_bytes(str(two)) == reference
    # SIGKILL in the middle of a shard (after 7 records: the 3rd shard holds one), then rerun.
    killed = tmp_path / "killed"
    result = run_cli(["--data-dir", dataset, "--out-dir", str(killed), "--workers", "2", *CLI_ARGS],
                     env={KILL_HOOK_ENV: "7"})
    assert result.returncode == -signal.SIGKILL
    leftovers = os.listdir(killed / "train")
    assert any(name.startswith(".tmp-") for name in leftovers)  # a shard was being written
    finished = records.list_shards(str(killed), "train")  # shards completed before the kill keep their names
    assert 1 <= len(finished) <= 7 // SHARD_RECORDS
    result = run_cli(["--data-dir", dataset, "--out-dir", str(killed), "--workers", "2", *CLI_ARGS])
    assert result.returncode == 0, result.stderr
    assert f"resuming: {len(finished)} of" in result.stderr
    assert shard_bytes(str(killed)) == reference
    assert not [n for n in os.listdir(killed / "train") if n.startswith(".tmp-")]
    with open(killed / records.FOLDS_CSV) as a, open(os.path.join(clean_run[0], records.FOLDS_CSV)) as b:
        assert a.read() == b.read()


def test_changed_settings_need_overwrite(dataset, tmp_path):
    out = tmp_path / "out"
    convert(_options(dataset, out, limit=6, include_test=False))
    with pytest.raises(ValueError, match="--overwrite"):
        convert(_options(dataset, out, limit=6, include_test=False, preprocess=PreprocessConfig(image_size=48)))
    manifest = convert(_options(dataset, out, limit=6, include_test=False, overwrite=True,
                                preprocess=PreprocessConfig(image_size=48)))
    assert manifest["image_size"] == 48 and manifest["num_train"] == 6
    assert all(records.decode_image_numpy(i[records.IMAGE]).shape == (48, 48) for i in read_records(str(out), "train"))


# ----------------------------------------------------------------------------------------- bad input
def _write_unusual_and_bad(data_dir: str) -> dict[str, str]:
    """Replace some train images with each unusual and each bad case; returns {case: study_id}."""
    from PIL import Image

    ids = read_train_csv(os.path.join(data_dir, "train.csv"))[ID_COLUMN].tolist()
    cases = ["missing", "zero_byte", "truncated", "random_bytes", "png_as_jpg", "png16", "rgb", "cmyk", "small"]
    chosen = dict(zip(cases, ids))
    rng = np.random.default_rng(0)
    image = phantom(rng, 200, 180)

    def path(case):
        return os.path.join(data_dir, "train", chosen[case] + ".jpg")

    os.remove(path("missing"))
    open(path("zero_byte"), "wb").close()
    with open(path("truncated"), "rb") as fh:
        data = fh.read()
    with open(path("truncated"), "wb") as fh:
        fh.write(data[: len(data) * 2 // 3])
    with open(path("random_bytes"), "wb") as fh:
        fh.write(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with open(path("png_as_jpg"), "wb") as fh:
        fh.write(cv2.imencode(".png", image)[1].tobytes())
    with open(path("png16"), "wb") as fh:
        fh.write(cv2.imencode(".png", image.astype(np.uint16) * 200)[1].tobytes())
    cv2.imwrite(path("rgb"), np.stack([image, image // 2, image // 3], -1))
    buffer = io.BytesIO()
    Image.fromarray(np.stack([image] * 3, -1)).convert("CMYK").save(buffer, "JPEG", quality=95)
    with open(path("cmyk"), "wb") as fh:
        fh.write(buffer.getvalue())
    cv2.imwrite(path("small"), phantom(rng, 30, 40))
    return chosen


def test_bad_images_are_skipped_and_listed_unusual_ones_converted(dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    chosen = _write_unusual_and_bad(str(data))
    manifest = convert(_options(data, tmp_path / "out", include_test=False))
    bad = {"missing", "zero_byte", "truncated", "random_bytes"}
    skipped = {entry["id"]: entry for entry in manifest["skipped"]}
    assert set(skipped) == {chosen[c] for c in bad}
    assert "not found" in skipped[chosen["missing"]]["reason"] and "empty" in skipped[chosen["zero_byte"]]["reason"]
    assert "truncated" in skipped[chosen["truncated"]]["reason"]
    assert skipped[chosen["truncated"]]["path"].endswith(chosen["truncated"] + ".jpg")
    err = capsys.readouterr().err
    assert all(chosen[c] in err for c in bad)
    items = {i[ID_COLUMN]: i for i in read_records(str(tmp_path / "out"), "train")}
    assert len(items) == manifest["num_train"] == 21 - len(bad)
    for case in ("png_as_jpg", "png16", "rgb", "cmyk", "small"):
        item = items[chosen[case]]
        pixels = records.decode_image_numpy(item[records.IMAGE])
        assert pixels.shape == (SIZE, SIZE) and pixels.std() > 10, case  # real content, not a blank
    notes = {entry["id"]: entry["note"] for entry in manifest["notes"]}
    assert "upscaled" in notes[chosen["small"]] and "PNG" in notes[chosen["png_as_jpg"]]
    folds_csv = pd.read_csv(tmp_path / "out" / records.FOLDS_CSV, dtype={ID_COLUMN: str})
    assert sorted(folds_csv[ID_COLUMN]) == sorted(items)  # every good row exactly once, no bad ones
    # --strict: the first bad image stops the run, naming the file, and leaves no temporary shard behind.
    with pytest.raises(BadImageError, match="--strict"):
        convert(_options(data, tmp_path / "strict", include_test=False, strict=True))
    for split in ("train", "test"):
        folder = tmp_path / "strict" / split
        assert not folder.exists() or not [n for n in os.listdir(folder) if n.startswith(".tmp-")]


CSV_CASES = {
    "missing_column": (lambda df: df.drop(columns=["NGT - Normal"]), "missing column 'NGT - Normal'"),
    "unexpected_column": (lambda df: df.assign(Extra=1), "unexpected column 'Extra'"),
    "nan_label": (lambda df: df.assign(**{"CVC - Normal": df["CVC - Normal"].astype(object).where(df.index != 4, "")}),
                  r"line 6 .*'CVC - Normal' is NaN"),
    "non_binary_label": (lambda df: df.assign(**{"ETT - Normal": df["ETT - Normal"].where(df.index != 2, 2)}),
                         r"line 4 .*'ETT - Normal' is '2'"),
    "duplicate_id": (lambda df: df.assign(**{ID_COLUMN: df[ID_COLUMN].where(df.index != 7, df[ID_COLUMN][3])}),
                     r"duplicate StudyInstanceUID .* lines \[5, 9\]"),
    "path_separator": (lambda df: df.assign(**{ID_COLUMN: df[ID_COLUMN].where(df.index != 1, "a/b")}),
                       r"line 3: column 'StudyInstanceUID' value 'a/b' contains a path separator"),
    "dot_dot": (lambda df: df.assign(**{ID_COLUMN: df[ID_COLUMN].where(df.index != 0, "..")}),
                r"line 2: column 'StudyInstanceUID' value '\.\.'"),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_csv_problems_stop_before_any_work(dataset, tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(os.path.join(dataset, "train"), data / "train")
    shutil.copy(os.path.join(dataset, "train_annotations.csv"), data)
    frame = pd.read_csv(os.path.join(dataset, "train.csv"), dtype={ID_COLUMN: str, PATIENT_COLUMN: str})
    change, message = CSV_CASES[case]
    change(frame).to_csv(data / "train.csv", index=False)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        convert(_options(data, out, include_test=False))
    assert not out.exists()  # nothing written: the check ran first


def test_annotation_with_unknown_label_names_the_line(dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    annotations = pd.read_csv(data / "train_annotations.csv")
    annotations.loc[1, "label"] = "ETT - Misplaced"
    annotations.to_csv(data / "train_annotations.csv", index=False)
    with pytest.raises(ValueError, match=r"train_annotations.csv line 3: column 'label' value 'ETT - Misplaced'"):
        convert(_options(data, tmp_path / "out"))


def test_cli_config_preset_and_missing_data_dir(dataset, tmp_path, capsys):
    make_tfrecords = load_cli_module()
    code = make_tfrecords.main(["--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--data-dir" in err and "ranzcr_tf.synth.generate" in err
    # Preset gives the defaults (cpu_demo: 128 px), explicit flags override them (folds).
    out = tmp_path / "preset"
    code = make_tfrecords.main(["--config", os.path.join(REPO, "configs", "cpu_demo.yaml"), "--data-dir", dataset,
                                "--out-dir", str(out), "--folds", "3", "--limit", "9", "--workers", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    manifest = records.read_manifest(str(out))
    assert manifest["image_size"] == 128 and manifest["num_folds"] == 3 and manifest["num_train"] == 9
    assert manifest["preprocess"]["jpeg_quality"] == 95


def test_remote_out_dir_goes_through_gfile_with_the_same_bytes(dataset, clean_run):
    """``--out-dir gs://...`` is written through ``tf.io.gfile``; TensorFlow's in-memory ``ram://``
    filesystem takes exactly that path (temporary names, renames, listing) without a network."""
    import tensorflow as tf

    out, manifest = clean_run
    remote = f"ram://convert-test-{os.getpid()}/records"
    remote_manifest = convert(_options(dataset, remote))
    assert remote_manifest["shards"] == manifest["shards"]
    for rel in [*manifest["shards"]["train"], *manifest["shards"]["test"], records.FOLDS_CSV]:
        with tf.io.gfile.GFile(f"{remote}/{rel}", "rb") as fh, open(os.path.join(out, rel), "rb") as local:
            assert fh.read() == local.read(), rel
    for split in ("train", "test"):
        assert not [n for n in tf.io.gfile.listdir(f"{remote}/{split}") if n.startswith(".tmp-")]
    assert len(read_records(remote, "train")) == manifest["num_train"]
    assert convert(_options(dataset, remote))["shards"] == manifest["shards"]  # a rerun resumes
