"""benchmarks/soft_labels.py end to end on a tiny set: two teachers on every fold, OOF soft labels, a
student, unlabeled images soft-labelled by the first model, a blend, each scored on the test labels."""

import importlib.util
import json
import os

import pandas as pd
import pytest
from helpers_convert import REPO, make_dataset

from ranzcr_tf.labels import ID_COLUMN, LABELS


def _script():
    spec = importlib.util.spec_from_file_location("soft_labels_bench", os.path.join(REPO, "benchmarks", "soft_labels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _script()


def test_missing_inputs_exit_2_with_one_line(tmp_path, capsys):
    assert bench.main(["--data", str(tmp_path), "--unlabeled", str(tmp_path), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "test_labels.csv" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_tiny_measurement_end_to_end_then_a_rerun_only_prints_the_table(tmp_path, capsys):
    data = make_dataset(str(tmp_path / "data"), n_train=60, n_test=20, seed=0)
    unlabeled = make_dataset(str(tmp_path / "unl"), n_train=16, n_test=2, seed=1)
    out = tmp_path / "bench"
    argv = ["--data", data, "--unlabeled", os.path.join(unlabeled, "train"), "--out-dir", str(out),
            "--set", "preprocess.image_size=64", "--set", "data.folds=2", "--set", "train.epochs=1",
            "--set", "train.batch_size=8", "--set", "data.shuffle_buffer=64", "--set", "infer.batch_size=32"]
    assert bench.main(argv) == 0
    first = capsys.readouterr().out
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "AUC" not in line]
    assert len(rows) == 4, table
    for row in rows:
        validation, test = (float(cell) for cell in row.strip("| ").split(" | ")[1:])
        assert 0 <= validation <= 1 and 0 <= test <= 1
    # (a) every train study has one soft label, made by both teachers' out-of-fold models
    train_ids = set(pd.read_csv(os.path.join(data, "train.csv"))[ID_COLUMN])
    soft_train = pd.read_csv(out / "soft_train.csv")
    assert set(soft_train[ID_COLUMN]) == train_ids and tuple(soft_train.columns[1:12]) == tuple(LABELS)
    # (b) the 16 unlabeled images join the labelled ones in the student's soft-label file
    assert len(pd.read_csv(out / "soft_all.csv")) == len(train_ids) + 16
    # (c) per-label blend weights of the two teachers, summing to 1
    blend = json.loads((out / "blend.json").read_text())
    assert len(blend["runs"]) == 2 and set(blend["weights"]) == set(LABELS)
    for label, per_run in blend["weights"].items():
        assert set(per_run) == set(blend["runs"]) and min(per_run.values()) >= 0, label
        assert abs(sum(per_run.values()) - 1) < 1e-9, (label, per_run)
    assert "CV mean AUC" in table
    assert "$ python" in first and "train_tpu.py" in first
    assert bench.main(argv) == 0
    again = capsys.readouterr().out
    assert "$ python" not in again and again.strip() == table.strip()  # every step resumed from its output
