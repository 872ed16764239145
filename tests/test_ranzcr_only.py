"""The RANZCR-only stages (report, CV report, score, blend, pseudo labels, the JPEG converter) refuse a run or
config of another task with one line and exit 2, instead of reading its OOF under RANZCR's 11 columns."""

import os

import numpy as np
import pandas as pd
import pytest

import make_tfrecords
from ranzcr_tf import runs
from ranzcr_tf.config import PRESET_DIR, Config, load_config, save_config
from ranzcr_tf.report import __main__ as report_main
from ranzcr_tf.report import cv, score
from ranzcr_tf.serve import blend, pseudo

ICH_PRESET = os.path.join(PRESET_DIR, "rsna_ich_cpu.yaml")
REFUSAL = "specific to the RANZCR CLiP task; task.name = 'rsna_ich'"


def saved_run(folder, cfg: Config) -> str:
    """A finished one-fold run of ``cfg``'s task: config.yaml, metrics.json and an oof.csv in its own columns."""
    task = cfg.task
    fold = os.path.join(folder, "fold0")
    save_config(cfg, os.path.join(fold, runs.CONFIG_FILE))
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({task.id_column: [f"ID_{i:04x}" for i in range(8)], "fold": 0})
    for label in task.labels:
        frame[label] = rng.random(8).round(4)
    for label in task.labels:
        frame[f"target_{label}"] = rng.integers(0, 2, 8)
    frame.to_csv(os.path.join(fold, runs.OOF_FILE), index=False)
    with open(os.path.join(fold, runs.METRICS_FILE), "w") as handle:
        handle.write('{"val_weighted_log_loss": 0.5}')
    return str(folder)


@pytest.fixture
def ich_run(tmp_path):
    return saved_run(tmp_path / "ich", load_config(ICH_PRESET))


def test_the_run_tools_refuse_an_ich_run_with_one_line(ich_run, tmp_path, capsys):
    other = saved_run(tmp_path / "ich2", load_config(ICH_PRESET))
    commands = {
        "python -m ranzcr_tf.report.cv": lambda: cv.main([ich_run]),
        "python -m ranzcr_tf.report": lambda: report_main.main([ich_run, "--out-dir", str(tmp_path / "report")]),
        "python -m ranzcr_tf.serve.blend": lambda: blend.main([ich_run, other, "--out", str(tmp_path / "b.json")]),
        "python -m ranzcr_tf.serve.pseudo oof": lambda: pseudo.main(
            ["oof", ich_run, "--tfrecords", str(tmp_path), "--out", str(tmp_path / "soft.csv")]),
        "python -m ranzcr_tf.serve.pseudo predict": lambda: pseudo.main(
            ["predict", "--models", ich_run, "--tfrecords", str(tmp_path), "--out", str(tmp_path / "soft.csv")]),
    }
    for name, command in commands.items():
        assert command() == 2, name
        err = capsys.readouterr().err.strip()
        assert REFUSAL in err and f"(run {ich_run})" in err and len(err.splitlines()) == 1, (name, err)
    assert not os.path.exists(tmp_path / "report" / "index.html") and not os.path.exists(tmp_path / "soft.csv")


def test_a_ranzcr_run_passes_the_check(tmp_path):
    run = saved_run(tmp_path / "ranzcr", Config())
    runs.require_ranzcr_run(run, "the CV report")  # no error
    assert runs.saved_task(run).is_ranzcr and runs.saved_task(os.path.join(run, "fold0")).is_ranzcr
    assert runs.saved_task(str(tmp_path / "empty")) is None
    assert cv.main([run]) == 0  # the RANZCR OOF still goes through the CV report


def test_score_refuses_a_long_submission(tmp_path, capsys):
    long = pd.DataFrame({"ID": ["ID_a_epidural", "ID_a_any"], "Label": [0.1, 0.7]})
    submission, labels = tmp_path / "submission.csv", tmp_path / "test_labels.csv"
    long.to_csv(submission, index=False)
    long.assign(Label=[0, 1]).to_csv(labels, index=False)
    assert score.main([str(submission), str(labels)]) == 2
    err = capsys.readouterr().err.strip()
    assert "long ID,Label file" in err and "specific to the RANZCR CLiP task" in err and len(err.splitlines()) == 1
    pd.DataFrame({"StudyInstanceUID": ["1"], "x": [0.5]}).to_csv(submission, index=False)
    assert score.main([str(submission), str(labels)]) == 2
    assert "lacks column(s)" in capsys.readouterr().err  # a wide file missing columns keeps its own message


def test_the_jpeg_converter_refuses_a_long_csv_task_and_unlabeled(tmp_path, capsys):
    # A wide-CSV jpeg/png task converts (tests/test_image_task.py); a long CSV and --unlabeled stay RANZCR's.
    jpeg_ich = ["--config", ICH_PRESET, "--set", "task.reader=jpeg", "--set", "task.windows=[]",
                "--set", "task.slice_context=0", "--set", "model.input_channels=3"]
    out = str(tmp_path / "records")
    assert make_tfrecords.main([*jpeg_ich, "--data-dir", str(tmp_path), "--out-dir", out]) == 2
    err = capsys.readouterr().err
    assert REFUSAL in err and "the JPEG/PNG converter with task.csv_layout = long" in err
    assert "task.csv_layout: wide" in err and len(err.strip().splitlines()) == 1
    assert make_tfrecords.main(["--config", ICH_PRESET, "--unlabeled", str(tmp_path), "--out-dir", out]) == 2
    assert REFUSAL in capsys.readouterr().err and not os.path.exists(out)
