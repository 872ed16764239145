"""kaggle_kernel.py end to end on a tiny converted dataset with models of known outputs.

The dataset is converted once by the real converter (``make_tfrecords.py``) with non-default
preprocessing; the run folders record those settings, and the kernel must find them there.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers_convert import make_tiny_dataset, run_cli
from helpers_infer import (
    BIASES,
    SLOPES,
    asymmetry,
    asymmetry_model,
    constant_model,
    expected_asymmetry_probs,
    sigmoid,
    stored_pixels,
    write_run,
)
from scipy.stats import rankdata

from ranzcr_tf import kaggle_paths
from ranzcr_tf.config import PreprocessConfig
from ranzcr_tf.labels import ID_COLUMN, LABELS, SUBMISSION_COLUMNS
from ranzcr_tf.serve import kernel

# Non-default on every axis the converter exposes: size, CLAHE clip and grid, interpolation, quality.
S1 = PreprocessConfig(image_size=40, clahe_clip_limit=3.5, clahe_tile_grid=4, interpolation="linear", jpeg_quality=70)
S2 = PreprocessConfig(image_size=32, clahe_clip_limit=0.0, jpeg_quality=90)
CONSTANT = np.linspace(0.1, 0.9, 11)
BAD_INDEX = 3  # this test image is corrupt: converter and kernel both skip it; its row gets column means


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel")
    data = make_tiny_dataset(str(root / "data"), n_train=8, n_test=7, seed=3, size_range=(90, 150))
    ids = pd.read_csv(os.path.join(data, "sample_submission.csv"), dtype=str)[ID_COLUMN].tolist()
    with open(os.path.join(data, "test", f"{ids[BAD_INDEX]}.jpg"), "wb") as fh:
        fh.write(b"\xff\xd8 not really a jpeg")
    records = str(root / "records")
    result = run_cli(["--data-dir", data, "--out-dir", records, "--image-size", "40", "--clahe-clip", "3.5",
                      "--clahe-grid", "4", "--interpolation", "linear", "--jpeg-quality", "70", "--folds", "2",
                      "--workers", "1", "--shard-records", "4", "--no-progress"])
    assert result.returncode == 0, result.stderr[-2000:]
    sub_only = root / "sample_only"  # a data dir without test/: forces the kernel onto the records
    sub_only.mkdir()
    shutil.copy(os.path.join(data, "sample_submission.csv"), sub_only)
    runs = root / "runs"
    write_run(str(runs), "asym_s1", [asymmetry_model(40), constant_model(40, CONSTANT, output="logits")], S1,
              output="logits", batch_size=2)
    write_run(str(runs), "asym_s2", [asymmetry_model(32, slopes=-0.5 * SLOPES, biases=0.3 + 0 * BIASES,
                                                     output="probabilities")], S2, output="probabilities", batch_size=3)
    return {"root": root, "data": data, "records": records, "sample_only": str(sub_only), "ids": ids,
            "runs": str(runs)}


def run_kernel(argv: list[str], clock=None) -> dict:
    args = kernel.build_parser().parse_args([*argv, "--no-progress"])
    args.clock = clock
    return kernel.run(args)


def read_submission(path: str) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype={ID_COLUMN: str})
    assert list(frame.columns) == list(SUBMISSION_COLUMNS)
    return frame


def good_asymmetries(dataset, settings) -> dict:
    return {sid: asymmetry(stored_pixels(os.path.join(dataset["data"], "test", f"{sid}.jpg"), settings))
            for i, sid in enumerate(dataset["ids"]) if i != BAD_INDEX}


def with_filled_row(dataset, rows: dict) -> np.ndarray:
    """Rows in sample order; the unreadable image's row is the column mean of the others."""
    good = np.array([rows[sid] for sid in dataset["ids"] if sid in rows])
    return np.array([rows.get(sid, good.mean(axis=0)) for sid in dataset["ids"]])


def test_raw_jpegs_and_records_give_identical_predictions_with_the_runs_settings(dataset, tmp_path):
    run = os.path.join(dataset["runs"], "asym_s1")
    raw = run_kernel(["--data-dir", dataset["data"], "--models", run, "--out", str(tmp_path / "raw.csv"),
                      "--workers", "2"])
    rec = run_kernel(["--data-dir", dataset["sample_only"], "--tfrecords", dataset["records"], "--models", run,
                      "--out", str(tmp_path / "rec.csv")])
    assert raw["report"].done == rec["report"].done == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    raw_frame = read_submission(raw["out"])
    assert raw_frame[ID_COLUMN].tolist() == dataset["ids"]  # every ID once, sample order
    assert (tmp_path / "raw.csv").read_bytes() == (tmp_path / "rec.csv").read_bytes()

    # What the ensemble claims: fold 0 = mean of identity and hflip views, fold 1 constant, folds averaged.
    d = good_asymmetries(dataset, S1)
    expected = with_filled_row(dataset, {sid: 0.5 * (expected_asymmetry_probs(v) + CONSTANT) for sid, v in d.items()})
    got = raw_frame[list(LABELS)].to_numpy()
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert raw["report"].filled_rows == 1
    # The settings matter: the defaults at the same size would give other pixels, other predictions.
    d_default = good_asymmetries(dataset, PreprocessConfig(image_size=40))
    assert max(abs(d[k] - d_default[k]) for k in d) > 1e-3
    # hflip really flips: the two views differ for these asymmetric images.
    assert max(np.abs(sigmoid(SLOPES * v + BIASES) - sigmoid(-SLOPES * v + BIASES)).max() for v in d.values()) > 0.01

    single = run_kernel(["--data-dir", dataset["data"], "--models", run, "--out", str(tmp_path / "id.csv"),
                         "--tta", "identity", "--workers", "1"])
    expected = with_filled_row(dataset, {sid: 0.5 * (sigmoid(SLOPES * v + BIASES) + CONSTANT) for sid, v in d.items()})
    np.testing.assert_allclose(read_submission(single["out"])[list(LABELS)].to_numpy(), expected, atol=2e-6)


@pytest.mark.parametrize("method", ["mean", "rank_mean", "weighted", "weighted_from_config"])
def test_models_with_different_preprocessing_ensemble_as_claimed(dataset, tmp_path, method):
    # Run 1 (40 px, CLAHE) is narrowed to its asymmetry fold; run 2 is 32 px without CLAHE, a probabilities model.
    run1 = os.path.join(dataset["runs"], "asym_s1", "fold0")
    run2 = os.path.join(dataset["runs"], "asym_s2")
    if method == "weighted_from_config":  # infer.* from --config YAML (+ --set), no flags for them
        config = tmp_path / "infer.yaml"
        config.write_text("infer:\n  ensemble: weighted\n  weights: [3, 5]\n")
        extra = ["--config", str(config), "--set", "infer.weights=[3, 1]", "--set", "infer.tta=[identity]"]
        method = "weighted"
    else:
        extra = ["--tta", "identity", "--ensemble", method] + (["--weights", "3", "1"] if method == "weighted" else [])
    result = run_kernel(["--data-dir", dataset["data"], "--models", run1, run2, "--out", str(tmp_path / "sub.csv"),
                         "--workers", "1", *extra])
    d1, d2 = good_asymmetries(dataset, S1), good_asymmetries(dataset, S2)
    ids = list(d1)
    p1 = np.array([sigmoid(SLOPES * d1[s] + BIASES) for s in ids])
    p2 = np.array([sigmoid(-0.5 * SLOPES * d2[s] + 0.3) for s in ids])
    if method == "mean":
        combined = (p1 + p2) / 2
    elif method == "weighted":
        combined = 0.75 * p1 + 0.25 * p2
    else:
        ranks = [np.column_stack([(rankdata(p[:, c]) - 0.5) / len(ids) for c in range(11)]) for p in (p1, p2)]
        combined = (ranks[0] + ranks[1]) / 2
    expected = with_filled_row(dataset, dict(zip(ids, combined)))
    np.testing.assert_allclose(read_submission(result["out"])[list(LABELS)].to_numpy(), expected, atol=2e-6)


def test_tta_defaults_to_the_views_the_runs_saved(dataset, tmp_path):
    # A run trained without flips saves infer.tta = [identity]: with no --tta the kernel must not add a mirrored view.
    run = write_run(str(tmp_path / "runs"), "no_flip", [asymmetry_model(40)], S1, output="logits", batch_size=2,
                    tta=["identity"])
    result = run_kernel(["--data-dir", dataset["data"], "--models", run, "--out", str(tmp_path / "sub.csv"),
                         "--workers", "1"])
    d = good_asymmetries(dataset, S1)
    expected = with_filled_row(dataset, {sid: expected_asymmetry_probs(v, views=("identity",)) for sid, v in d.items()})
    np.testing.assert_allclose(read_submission(result["out"])[list(LABELS)].to_numpy(), expected, atol=2e-6)
    # Runs that disagree share only their common views; runs with none in common must be told apart explicitly.
    both = write_run(str(tmp_path / "runs"), "flip", [asymmetry_model(40)], S1, tta=["hflip", "identity"])
    only_flip = write_run(str(tmp_path / "runs"), "only_flip", [asymmetry_model(40)], S1, tta=["hflip"])
    from ranzcr_tf.serve.modelio import discover_models

    assert kernel.saved_tta(discover_models([both, run])) == ["identity"]
    assert kernel.saved_tta(discover_models([both])) == ["hflip", "identity"]
    with pytest.raises(ValueError, match="--tta"):
        kernel.saved_tta(discover_models([run, only_flip]))


class SteppingClock:
    """A deterministic clock: every reading is ``step`` seconds after the previous one (simulated slowness)."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_time_budget_degrades_in_the_stated_order_and_still_writes_a_complete_file(dataset, tmp_path):
    runs = tmp_path / "runs"
    constants = {"m0": [CONSTANT, 1 - CONSTANT], "m1": [CONSTANT ** 2, 1 - CONSTANT ** 2]}
    for name, probs in constants.items():
        write_run(str(runs), name, [constant_model(32, p) for p in probs], S2, output="probabilities", batch_size=2)
    argv = ["--data-dir", dataset["sample_only"], "--tfrecords", dataset["records"],
            "--models", str(runs / "m0"), str(runs / "m1"), "--workers", "1"]
    # The records are 40 px CLAHE; these models want 32 px without CLAHE and there are no raw images here.
    with pytest.raises(ValueError, match="no raw test images"):
        run_kernel([*argv, "--out", str(tmp_path / "x.csv")])
    argv[1] = dataset["data"]

    # Simulated slowness: every clock reading costs a second, so each pass takes tens of "seconds".
    # The budgets below were chosen to land in each degrade step (the clock makes the run deterministic).
    reports, values = {}, {}
    for minutes in (0, 1.25, 0.8, 0.5, 0.1):
        out = tmp_path / f"b{minutes}.csv"
        reports[minutes] = run_kernel([*argv, "--out", str(out), "--max-minutes", str(minutes)],
                                      clock=SteppingClock(1.0))["report"]
        frame = read_submission(str(out))
        assert frame[ID_COLUMN].tolist() == dataset["ids"]  # complete, in order, whatever the budget
        values[minutes] = frame[list(LABELS)].to_numpy()
        assert np.isfinite(values[minutes]).all()
    done = {m: set(r.done) for m, r in reports.items()}
    every_fold = {(m, f) for m in range(2) for f in range(2)}
    assert done[0] == {(m, f, v) for m, f in every_fold for v in range(2)}
    assert done[1.25] == {(m, f, 0) for m, f in every_fold}  # 1. fewer TTA views
    assert done[0.8] == {(0, 0, 0), (1, 0, 0)}  # 2. fewer folds
    assert done[0.5] == {(0, 0, 0)}  # 3. fewer models
    assert reports[0.1].partial_fallback and not done[0.1]  # nothing finished: still a complete file
    # The file holds the ensemble of exactly the finished passes.
    np.testing.assert_allclose(values[1.25], 0.5, atol=1e-6)
    np.testing.assert_allclose(values[0.8], np.tile((CONSTANT + CONSTANT ** 2) / 2, (7, 1)), atol=1e-6)
    np.testing.assert_allclose(values[0.5], np.tile(CONSTANT, (7, 1)), atol=1e-6)
    np.testing.assert_allclose(values[0.1], 0.5)


def test_refusals_and_missing_arguments_stop_with_a_message(dataset, tmp_path, capsys):
    import keras

    inputs = keras.Input((32, 32, 1), name="image")
    x = keras.layers.Lambda(lambda t: t + 1.0)(inputs)
    lambda_run = write_run(str(tmp_path), "lam", [keras.Model(inputs, keras.layers.Dense(11)(keras.layers.Flatten()(x)))], S2)
    out = tmp_path / "sub.csv"
    code = kernel.main(["--data-dir", dataset["data"], "--models", lambda_run, "--out", str(out), "--no-progress"])
    assert code == 2 and "Lambda" in capsys.readouterr().err and not out.exists()
    if not kaggle_paths.on_kaggle():
        assert kernel.main([]) == 2
        assert "--data-dir" in capsys.readouterr().err
        assert kernel.main(["--data-dir", dataset["data"]]) == 2
        assert "--models RUN_DIR" in capsys.readouterr().err
    help_text = kernel.build_parser().format_help()
    assert "fewer TTA views" in help_text and help_text.index("views") < help_text.index("fewer models")


def test_score_cli_prints_mean_and_per_class_auc(dataset, tmp_path, capsys):
    from ranzcr_tf.report import score

    rng = np.random.default_rng(1)
    targets = (rng.random((len(dataset["ids"]), 11)) < 0.5).astype(int)
    targets[0], targets[1] = 1, 0
    pd.DataFrame({ID_COLUMN: dataset["ids"], **dict(zip(LABELS, targets.T))}).to_csv(tmp_path / "labels.csv", index=False)
    pd.DataFrame({ID_COLUMN: dataset["ids"][::-1], **dict(zip(LABELS, targets[::-1].T * 0.9))}).to_csv(
        tmp_path / "sub.csv", index=False)
    assert score.main([str(tmp_path / "sub.csv"), str(tmp_path / "labels.csv")]) == 0
    printed = capsys.readouterr().out
    assert "mean AUC" in printed and "1.0000" in printed and LABELS[10] in printed


@pytest.mark.slow
def test_offline_bundle_has_the_wheel_and_runs_and_installs_without_an_index(dataset, tmp_path):
    from ranzcr_tf.serve.package import make_bundle

    bundle = tmp_path / "bundle"
    result = make_bundle([os.path.join(dataset["runs"], "asym_s1")], str(bundle), name="ranzcr-bundle",
                         keras_wheel=False, decoder_wheel=False)
    wheels = glob.glob(str(bundle / "wheels" / "ranzcr_tf-*.whl"))
    assert len(wheels) == 1 and result["wheels"] == [os.path.basename(wheels[0])]
    for fold in ("fold0", "fold1"):
        for name in ("best.keras", "config.yaml", "preprocess.json"):
            assert (bundle / "runs" / "asym_s1" / fold / name).is_file()
    readme = (bundle / "README.md").read_text()
    assert "pip install --no-index --find-links /kaggle/input/ranzcr-bundle/wheels ranzcr-tf" in readme
    assert (bundle / "kaggle_kernel.py").is_file()
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links",
                              str(bundle / "wheels"), "ranzcr-tf", "--no-deps", "--target", str(target), "--quiet"],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    for module in ("serve/kernel.py", "serve/infer.py", "prep/preprocess.py", "serve/package.py",
                   "configs/b7_768_tpu.yaml", "configs/cpu_lines.yaml"):  # the presets ship inside the package
        assert (target / "ranzcr_tf" / module).is_file()
    # The bundled runs are what the kernel finds on Kaggle: one model, its two folds.
    from ranzcr_tf.serve.modelio import discover_models

    assert [len(m.folds) for m in discover_models([str(bundle / "runs")])] == [2]
    with pytest.raises(ValueError, match="not empty"):
        make_bundle([os.path.join(dataset["runs"], "asym_s1")], str(bundle), keras_wheel=False, decoder_wheel=False)


# ----------------------------------------------------------------------------------------------- input checks
def _copy_records(dataset, tmp_path) -> str:
    copy = str(tmp_path / "records")
    shutil.copytree(dataset["records"], copy)
    return copy


def _sample_dir(tmp_path, ids, name="sample") -> str:
    folder = tmp_path / name
    folder.mkdir()
    pd.DataFrame({ID_COLUMN: ids, **{label: 0.5 for label in LABELS}})[list(SUBMISSION_COLUMNS)].to_csv(
        folder / "sample_submission.csv", index=False)
    return str(folder)


def test_records_that_do_not_match_the_sample_are_an_error_naming_ids_and_shards(dataset, tmp_path):
    run = os.path.join(dataset["runs"], "asym_s1")
    out = tmp_path / "sub.csv"
    # Records converted from another dataset: the sample lists other IDs.
    other = _sample_dir(tmp_path, [f"9.9.{i}" for i in range(len(dataset["ids"]))], "other")
    with pytest.raises(ValueError) as info:
        run_kernel(["--data-dir", other, "--tfrecords", dataset["records"], "--models", run, "--out", str(out)])
    message = str(info.value)
    assert "7 ID(s): 9.9.0, 9.9.1, 9.9.2 and 4 more" in message and "another dataset" in message
    assert "test-000-" in message and not out.exists()

    # One test shard deleted: its IDs are named, and so is the shard the manifest lists but the disk lacks.
    records_dir = _copy_records(dataset, tmp_path)
    shards = sorted(glob.glob(os.path.join(records_dir, "test", "*.tfrec")))
    gone = shards[-1]
    from helpers_convert import read_records

    lost = [item["StudyInstanceUID"] for item in read_records(dataset["records"], "test")][-int(gone.split("-")[-1][:-6]):]
    os.remove(gone)
    with pytest.raises(ValueError) as info:
        run_kernel(["--data-dir", dataset["sample_only"], "--tfrecords", records_dir, "--models", run,
                    "--out", str(out)])
    message = str(info.value)
    assert os.path.basename(gone) in message and lost[0] in message and f"{len(lost)} ID(s)" in message
    assert not out.exists()

    # A shard copied twice under another index: every ID of it twice.
    duplicate = os.path.join(os.path.dirname(shards[0]), "test-009-" + shards[0].rsplit("-", 1)[1])
    shutil.copy(shards[0], duplicate)
    with pytest.raises(ValueError, match="more than once"):
        run_kernel(["--data-dir", dataset["data"], "--tfrecords", records_dir, "--models", run, "--out", str(out)])
    os.remove(duplicate)

    # A shard whose record count disagrees with its name (truncated at a record boundary, or replaced).
    renamed = shards[0].rsplit("-", 1)[0] + "-99.tfrec"
    os.rename(shards[0], renamed)
    with pytest.raises(ValueError, match=f"{os.path.basename(renamed)} holds .* records but its name says 99"):
        run_kernel(["--data-dir", dataset["sample_only"], "--tfrecords", records_dir, "--models", run,
                    "--out", str(out)])


def test_missing_records_fall_back_to_raw_jpegs_with_the_runs_preprocessing(dataset, tmp_path, capsys):
    run = os.path.join(dataset["runs"], "asym_s1")
    full = run_kernel(["--data-dir", dataset["sample_only"], "--tfrecords", dataset["records"], "--models", run,
                       "--out", str(tmp_path / "full.csv")])
    records_dir = _copy_records(dataset, tmp_path)
    os.remove(sorted(glob.glob(os.path.join(records_dir, "test", "*.tfrec")))[-1])
    capsys.readouterr()
    fallback = run_kernel(["--data-dir", dataset["data"], "--tfrecords", records_dir, "--models", run,
                           "--out", str(tmp_path / "fallback.csv"), "--workers", "1"])
    err = capsys.readouterr().err
    assert "documented fallback" in err and "preprocessed with the run's own settings" in err
    # The missing images were preprocessed exactly as the converter did: the same submission, byte for byte.
    assert (tmp_path / "fallback.csv").read_bytes() == (tmp_path / "full.csv").read_bytes()
    assert fallback["report"].filled_rows == full["report"].filled_rows == 1
    # The one row without a prediction says what happened: the converter found the image unreadable.
    assert f"{dataset['ids'][BAD_INDEX]}: unreadable when converted" in err


def test_corrupt_model_is_refused_at_start_and_an_earlier_submission_survives(dataset, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(os.path.join(dataset["runs"], "asym_s1"), runs / "asym_s1")
    out = tmp_path / "sub.csv"
    run_kernel(["--data-dir", dataset["sample_only"], "--tfrecords", dataset["records"], "--models",
                str(runs / "asym_s1"), "--out", str(out)])
    good = out.read_bytes()
    model = runs / "asym_s1" / "fold1" / "best.keras"
    data = bytearray(model.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])  # bad CRC, the zip still opens
    model.write_bytes(bytes(data))
    capsys.readouterr()
    code = kernel.main(["--data-dir", dataset["sample_only"], "--tfrecords", dataset["records"], "--models",
                        str(runs / "asym_s1"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(model) in err and len(err.strip().splitlines()) <= 2
    assert "fold0" not in err.split(str(model))[0].replace(str(runs), "")  # refused before fold 0 was predicted
    assert out.read_bytes() == good  # the earlier complete file is untouched
    assert not glob.glob(str(tmp_path / ".partial-*"))

    from ranzcr_tf.serve.package import make_bundle

    bundle = tmp_path / "bundle"
    with pytest.raises(ValueError, match="best.keras"):
        make_bundle([str(runs / "asym_s1")], str(bundle), keras_wheel=False, decoder_wheel=False)
    assert not bundle.exists()  # nothing left behind (no wheels/): a rerun is not refused as "not empty"


def test_out_is_checked_before_any_inference(dataset, tmp_path):
    run = os.path.join(dataset["runs"], "asym_s1")
    argv = ["--data-dir", dataset["sample_only"], "--tfrecords", dataset["records"], "--models", run]
    with pytest.raises(ValueError, match="is a folder"):
        run_kernel([*argv, "--out", str(tmp_path)])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        run_kernel([*argv, "--out", str(blocker / "sub.csv")])


def test_empty_or_header_only_sample_is_an_error_naming_the_file(dataset, tmp_path):
    run = os.path.join(dataset["runs"], "asym_s1")
    folder = tmp_path / "data"
    folder.mkdir()
    sample = folder / "sample_submission.csv"
    sample.write_text("")
    argv = ["--data-dir", str(folder), "--tfrecords", dataset["records"], "--models", run,
            "--out", str(tmp_path / "sub.csv")]
    with pytest.raises(ValueError, match=f"{sample} is empty"):
        run_kernel(argv)
    sample.write_text(",".join(SUBMISSION_COLUMNS) + "\n")
    with pytest.raises(ValueError, match="header but no rows"):
        run_kernel(argv)
    assert not (tmp_path / "sub.csv").exists()


def test_no_progress_hides_the_preprocessing_bar(dataset, tmp_path, capsys):
    run = os.path.join(dataset["runs"], "asym_s2")
    capsys.readouterr()
    run_kernel(["--data-dir", dataset["data"], "--models", run, "--out", str(tmp_path / "sub.csv"), "--workers", "1"])
    err = capsys.readouterr().err
    assert "preprocessing test images" in err and "img/s" not in err and "preprocess 32px" not in err


def test_truncated_test_shard_is_named_in_one_line(dataset, tmp_path, capsys):
    records_copy = shutil.copytree(dataset["records"], str(tmp_path / "records"))
    shard = sorted(glob.glob(os.path.join(records_copy, "test", "test-*.tfrec")))[-1]
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) - 50)
    out = tmp_path / "sub.csv"
    code = kernel.main(["--data-dir", dataset["sample_only"], "--tfrecords", records_copy, "--models",
                        os.path.join(dataset["runs"], "asym_s1"), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kaggle_kernel.py:")]
    assert code == 2 and len(lines) == 1 and f"shard {shard} is corrupt" in lines[0], err[-3000:]
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("rank", [False, True])
def test_blend_json_applies_per_label_weights_in_the_kernel(dataset, tmp_path, rank):
    # blend.json names runs by folder; the kernel reorders its weights to the --models order.
    run1 = os.path.join(dataset["runs"], "asym_s1", "fold0")
    run2 = os.path.join(dataset["runs"], "asym_s2")
    w1 = np.linspace(0.0, 1.0, 11)
    path = tmp_path / "blend.json"
    path.write_text(json.dumps({"runs": ["asym_s2", "asym_s1"], "labels": list(LABELS), "rank": rank,
                                "weights": {label: {"asym_s1": w1[c], "asym_s2": 1 - w1[c]}
                                            for c, label in enumerate(LABELS)}}))
    result = run_kernel(["--data-dir", dataset["data"], "--models", run1, run2, "--out", str(tmp_path / "sub.csv"),
                         "--workers", "1", "--tta", "identity", "--blend", str(path)])
    d1, d2 = good_asymmetries(dataset, S1), good_asymmetries(dataset, S2)
    ids = list(d1)
    p1 = np.array([sigmoid(SLOPES * d1[s] + BIASES) for s in ids])
    p2 = np.array([sigmoid(-0.5 * SLOPES * d2[s] + 0.3) for s in ids])
    if rank:
        p1, p2 = [np.column_stack([(rankdata(p[:, c]) - 0.5) / len(ids) for c in range(11)]) for p in (p1, p2)]
    expected = with_filled_row(dataset, dict(zip(ids, w1 * p1 + (1 - w1) * p2)))
    np.testing.assert_allclose(read_submission(result["out"])[list(LABELS)].to_numpy(), expected, atol=2e-6)


def test_blend_for_other_runs_is_refused_in_one_line(dataset, tmp_path):
    path = tmp_path / "blend.json"
    path.write_text(json.dumps({"runs": ["asym_s1", "other"], "labels": list(LABELS), "rank": False,
                                "weights": {label: {"asym_s1": 0.5, "other": 0.5} for label in LABELS}}))
    result = subprocess.run([sys.executable, "kaggle_kernel.py", "--data-dir", dataset["data"], "--models",
                             os.path.join(dataset["runs"], "asym_s1"), os.path.join(dataset["runs"], "asym_s2"),
                             "--blend", str(path), "--out", str(tmp_path / "sub.csv")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert "fitted for runs asym_s1, other but the models are asym_s1, asym_s2" in error
    assert not (tmp_path / "sub.csv").exists()
