"""The mission defaults and presets that add up: the bare commands, the preset arithmetic on 8 and 4 devices,
steps_per_execution made a divisor, one image-size rule (b5_512_gpu on larger records), every preset's folder
names against the real competitions' layouts, --plan and the CPU cost stop on tiny settings."""

from __future__ import annotations

import importlib.util
import os

import pytest
import yaml
from helpers_train import TINY_SETTINGS, write_tiny_records

from ranzcr_tf import presets
from ranzcr_tf.config import given_keys, load_config
from ranzcr_tf.train.preset_rules import (
    fit_steps_per_execution,
    follow_preset_image_size,
    largest_divisor_at_most,
    preset_arithmetic,
    training_studies,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = presets.list_presets()
# The competitions' own layouts (RANZCR_DATA.md; the RSNA ICH 2019 download): CSV, image folders, sample.
REAL_LAYOUTS = {
    "ranzcr": {"train_csv": "train.csv", "train_images": ["train"], "test_images": ["test"],
               "sample_submission": "sample_submission.csv", "extension": ".jpg"},
    "rsna_ich": {"train_csv": "stage_2_train.csv", "train_images": ["stage_2_train"], "test_images": ["stage_2_test"],
                 "sample_submission": "stage_2_sample_submission.csv", "extension": ".dcm"},
}
# TINY_SETTINGS without the preset-shaped keys this file sets itself.
TINY = [s for s in TINY_SETTINGS if not s.startswith("train.batch_size")]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tpu = _script("train_tpu")


def _sets(*settings):
    return [a for s in settings for a in ("--set", s)]


@pytest.fixture(scope="module")
def records_64(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("records64"))
    write_tiny_records(root, num_folds=3, per_fold=16, size=64)
    return root


# ----------------------------------------------------------------------------------------------- defaults
def test_bare_commands_default_to_the_mission(monkeypatch):
    monkeypatch.delenv(presets.DEFAULT_PRESET_ENV, raising=False)
    path = presets.default_preset()
    assert os.path.basename(path) == "b7_768_tpu.yaml"
    cfg = load_config(path)
    assert (cfg.model.backbone, cfg.model.weights, cfg.preprocess.image_size, cfg.train.recipe) == \
        ("efficientnet_b7", "imagenet", 768, "aux_seg")
    help_text = train_tpu.build_parser().format_help()
    assert "default preset (no --config): configs/b7_768_tpu.yaml" in help_text and "runs/b7_768_tpu" in help_text
    assert "configs/cpu_lines.yaml" in help_text
    # A bare make_tfrecords.py stores what the mission trains on: 768 px with the preset's preprocessing.
    make_tfrecords = _script("make_tfrecords")
    args = make_tfrecords.build_parser().parse_args(["--data-dir", ROOT])
    _, options = make_tfrecords.resolve(args)
    assert options.out_dir == cfg.data.tfrecords == "tfrecords"
    assert options.preprocess == cfg.preprocess and options.preprocess.image_size == 768
    # Presets are found by name too (an installed package has no configs/ beside the working folder).
    found = [presets.find_preset(name) for name in ("b7_768_tpu", "b7_768_tpu.yaml", "configs/b7_768_tpu.yaml")]
    assert all(os.path.samefile(p, path) for p in found) and presets.find_preset("no_such_preset") is None
    monkeypatch.setenv(presets.DEFAULT_PRESET_ENV, "none")
    assert presets.default_preset() is None


def test_presets_ship_inside_the_package():
    with open(os.path.join(ROOT, "setup.py")) as handle:
        setup = handle.read()
    assert '"ranzcr_tf.configs": "configs"' in setup and '"ranzcr_tf.configs": ["*.yaml"]' in setup
    assert set(PRESETS) >= {"b7_768_tpu", "b5_512_gpu", "cpu_lines", "cpu_demo", "rsna_ich_cpu", "rsna_ich_b3_512_gpu"}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_names_its_competitions_folders(preset):
    task = load_config(presets.find_preset(preset)).task
    real = REAL_LAYOUTS[task.name]
    assert {key: getattr(task, key) for key in real} == real


# ----------------------------------------------------------------------------------------------- arithmetic
def test_b7_preset_on_a_v3_8_and_a_v4_8():
    cfg = load_config(presets.find_preset("b7_768_tpu"))
    num_train = training_studies(None, 0, cfg.data.folds)
    assert num_train == 24_066  # 30,083 x 4/5
    v3 = preset_arithmetic(cfg, num_replicas=8, num_train=num_train)
    assert (v3.global_batch, v3.steps_per_epoch, v3.steps_per_execution) == (32, 752, 16)
    assert v3.learning_rate == pytest.approx(4e-4)
    assert v3.notes == ("train.steps_per_execution 32 -> 16: the largest divisor of the 752 steps per epoch not "
                        "above 32 (a remainder would train extra steps off the schedule)",)
    v4 = preset_arithmetic(cfg, num_replicas=4, num_train=num_train)
    assert (v4.global_batch, v4.steps_per_epoch, v4.steps_per_execution, v4.notes) == (16, 1504, 32, ())
    assert v4.learning_rate == pytest.approx(2e-4)  # scaled with the global batch (lr_reference_batch 32)


def test_steps_per_execution_becomes_a_divisor():
    assert fit_steps_per_execution(32, 752)[0] == 16
    assert fit_steps_per_execution(8, 64) == (8, None)
    assert fit_steps_per_execution(1, 751) == (1, None)
    assert fit_steps_per_execution(4, 7)[0] == 1  # a prime: one step per execution
    assert [largest_divisor_at_most(n, 6) for n in (12, 10, 7, 3)] == [6, 5, 1, 3]


def test_image_size_rule():
    """b5_512_gpu on the default 768 px records trains at 512; on smaller records at theirs (said); an explicit
    data.image_size wins; agreeing sizes change nothing."""
    path = presets.find_preset("b5_512_gpu")
    b5 = load_config(path)
    note = follow_preset_image_size(b5, given_keys(path), 768)
    assert b5.data.image_size == 512 and "resized to 512 px" in note and "records hold 768 px" in note
    mission = presets.find_preset("b7_768_tpu")
    same = load_config(mission)
    assert follow_preset_image_size(same, given_keys(mission), 768) is None and same.data.image_size == 0
    explicit = load_config(path, ["data.image_size=0"])
    assert follow_preset_image_size(explicit, given_keys(path, ["data.image_size=0"]), 768) is None
    assert explicit.data.image_size == 0
    small = load_config(path)
    note = follow_preset_image_size(small, given_keys(path), 256)
    assert small.data.image_size == 0 and "training at 256 px" in note and "data.image_size=512 to upsample" in note


@pytest.mark.slow
def test_a_preset_size_other_than_the_records_trains_at_the_preset_size_with_a_dividing_steps_per_execution(
        records_64, tmp_path, capsys):
    """A real record folder at 64 px under the b5 preset told to train at 32 px (its own 512 px on 768 px records
    is the pure test above; small sizes keep this fit short) -> training at 32, announced; 6 steps per epoch at
    train.steps_per_execution 4 -> 3, announced, and exactly 6 optimizer steps trained."""
    out = str(tmp_path / "run")
    code = train_tpu.main(["--config", presets.find_preset("b5_512_gpu"), "--fold", "0", "--tfrecords", records_64,
                           "--out-dir", out, "--quiet",
                           *_sets(*TINY, "train.batch_size=4", "train.epochs=1", "train.frozen_epochs=0",
                                  "train.steps_per_epoch=6", "train.steps_per_execution=4", "train.grad_accum_steps=1",
                                  "model.pooling=avg", "preprocess.image_size=32")])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    assert "the preset trains at preprocess.image_size = 32 px and the records hold 64 px" in printed
    assert "train.steps_per_execution 4 -> 3: the largest divisor of the 6 steps per epoch" in printed
    assert "optimizer step 6" in printed
    with open(os.path.join(out, "fold0", "preprocess.json")) as handle:
        assert yaml.safe_load(handle)["model_image_size"] == 32
    with open(os.path.join(out, "fold0", "config.yaml")) as handle:
        assert yaml.safe_load(handle)["train"]["steps_per_execution"] == 3


# ----------------------------------------------------------------------------------------------- --plan, CPU stop
SMALL_MISSION = ("model.backbone=compact_cnn", "model.weights=none", "preprocess.image_size=32", "train.batch_size=2")


@pytest.mark.slow
def test_plan_on_cpu_measures_and_writes_nothing(records_64, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(presets.DEFAULT_PRESET_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    code = train_tpu.main(["--plan", "--tfrecords", records_64, "--plan-steps", "2", *_sets(*SMALL_MISSION)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    lines = [line for line in printed.splitlines() if line.startswith("plan: ")]
    text = "\n".join(lines)
    for expected in ("placement: default -- 1 replica(s) on cpu", "devices /cpu:0", "recipe aux_seg",
                     "global batch 2 (2 x 1 replicas)", "16 steps per epoch (fold 0 of the records",
                     "steps per execution 16", "measured 2 training steps at global batch 2",
                     "peak device memory not reported", "per fold (15 epochs)", "for --fold all (3 folds)",
                     "ESTIMATE for a TPU v3-8 (not measured)", "records hold 64 px", "resized to 32 px"):
        assert expected in text, text
    assert os.listdir(tmp_path) == []  # no run folder, nothing written


@pytest.mark.slow
def test_bare_command_on_cpu_says_the_cost_and_stops(records_64, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(presets.DEFAULT_PRESET_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    code = train_tpu.main(["--fold", "0", "--tfrecords", records_64, *_sets(*SMALL_MISSION, "train.recipe=plain")])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.out.splitlines()
    assert lines[0] == "preset: configs/b7_768_tpu.yaml (the default; --config names another)"
    assert lines[2].startswith("no accelerator here (cpu): configs/b7_768_tpu.yaml (the default preset)")
    assert lines[3].startswith("cost on this CPU: ") and "x 16 steps per epoch" in lines[3] and "x 15 epochs" in lines[3]
    assert "per fold" in lines[3] and "for --fold all" in lines[3]
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and "--config configs/cpu_lines.yaml" in error[0] and "--force-cpu" in error[0]
    assert os.listdir(tmp_path) == []
