"""benchmarks/ablate_recipe.py: the grid it plans, and a tiny real ablation end to end (convert, train, kernel, score)."""

import importlib.util
import os
import sys

import pandas as pd
import pytest
from helpers_convert import REPO, make_dataset

from ranzcr_tf.labels import ID_COLUMN, LABELS


def _script():
    spec = importlib.util.spec_from_file_location("ablate_recipe", os.path.join(REPO, "benchmarks", "ablate_recipe.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


ablate = _script()


def test_one_factor_at_a_time_plan_skips_values_equal_to_the_base():
    axes = ablate.parse_vary(["model.pooling=avg,max,avgmax", "preprocess.image_size=128,256"])
    cells = ablate.plan_cells(ablate.DEFAULT_CONFIG, ["train.epochs=3"], axes, "ofat", control=True)
    # cpu_demo is avg pooling at 128 px: those values are the base cell itself.
    assert [c.name for c in cells] == ["base", "model.pooling=max", "model.pooling=avgmax", "preprocess.image_size=256",
                                       ablate.CONTROL]
    assert cells[1].overrides == ["train.epochs=3", "model.pooling=max"] and cells[-1].shuffled
    factorial = ablate.plan_cells(ablate.DEFAULT_CONFIG, [], axes, "factorial", control=False)
    assert len(factorial) == 6 and "model.pooling=max, preprocess.image_size=256" in [c.name for c in factorial]
    # 4 min = 30 s fixed + 8 epochs of 26 s (a ninth would overrun); never more than configured, never 0.
    assert ablate.capped_epochs(50, 4, 30.0, 26.0) == 8 and ablate.capped_epochs(5, 4, 10.0, 1.0) == 5
    assert ablate.capped_epochs(50, 0.01, 30.0, 26.0) == 1


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    assert ablate.main(["--data", f"easy={data}", "--out-dir", str(tmp_path / "out")]) == 2
    assert "lacks train.csv" in capsys.readouterr().err
    for name in ("train.csv", "test_labels.csv", "sample_submission.csv", "train", "test"):
        (data / name).mkdir() if "." not in name else (data / name).write_text("x")
    assert ablate.main(["--data", f"easy={data}", "--out-dir", str(tmp_path / "out"), "--vary", "model.pool=max"]) == 2
    err = capsys.readouterr().err
    assert "model.pool" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_tiny_ablation_end_to_end_then_a_rerun_only_prints_the_table(tmp_path, capsys):
    easy = make_dataset(str(tmp_path / "easy"), n_train=60, n_test=20, seed=0)
    other = make_dataset(str(tmp_path / "other"), n_train=60, n_test=20, seed=1)
    out = tmp_path / "ablate"
    argv = ["--data", f"easy={easy}", "--data", f"other={other}", "--out-dir", str(out),
            "--base", "preprocess.image_size=64", "train.epochs=1", "train.batch_size=8", "data.shuffle_buffer=64",
            "infer.batch_size=32", "--vary", "model.pooling=avg,max"]
    assert ablate.main(argv) == 0
    first = capsys.readouterr().out

    frame = pd.read_csv(out / "results.csv")
    cells = ("base", "model.pooling=max")
    assert sorted(zip(frame["cell"], frame["style"])) == sorted((c, s) for c in cells for s in ("easy", "other"))
    assert frame["val_auc"].between(0, 1).all() and frame["test_auc"].between(0, 1).all()
    assert (frame["epochs"] == 1).all() and (frame["minutes"] > 0).all()
    table = (out / "results.md").read_text()
    for cell in cells:
        assert sum(line.startswith(f"| {cell} |") for line in table.splitlines()) == 1, cell
    assert "easy test AUC" in table and "other test AUC" in table and "min test AUC over styles" in table
    base_row = next(line for line in table.splitlines() if line.startswith("| base |"))
    base_tests = frame[frame["cell"] == "base"]["test_auc"]
    # The table shows 3 decimals of the same minimum results.csv holds (compared as numbers: a value such as
    # 0.4995 prints as 0.500 from one float and 0.499 from its neighbour).
    assert abs(float(base_row.rstrip(" |").rsplit("|", 1)[1]) - base_tests.min()) <= 0.0005 + 1e-9
    assert "[4/4]" in first

    # Each cell trained its own setting; the cells shared one records folder per style (same stored size).
    saved = (out / "cells" / "model.pooling=max" / "easy" / "run" / "fold0" / "config.yaml").read_text()
    assert "pooling: max" in saved
    assert "pooling: avg" in (out / "cells" / "base" / "easy" / "run" / "fold0" / "config.yaml").read_text()
    assert sorted(p.split("-64px")[0] for p in os.listdir(out / "records")) == ["easy", "other"]

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name in ("best.keras", "result.json", "submission.csv")}
    assert len(stamps) == 12
    assert ablate.main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("done earlier") == 4 and "converted" not in second
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert pd.read_csv(out / "results.csv").equals(frame)

    # The same out-dir with another base is refused, not mixed into the table.
    changed = [a if a != "train.epochs=1" else "train.epochs=2" for a in argv]
    assert ablate.main(changed) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_time_cap_and_shuffled_label_control(tmp_path, capsys):
    easy = make_dataset(str(tmp_path / "easy"), n_train=60, n_test=20, seed=0)
    out = tmp_path / "ablate"
    argv = ["--data", f"easy={easy}", "--out-dir", str(out), "--base", "preprocess.image_size=64", "train.epochs=3",
            "train.batch_size=8", "data.shuffle_buffer=64", "infer.batch_size=32", "--control",
            "--minutes-per-cell", "0.001"]
    assert ablate.main(argv) == 0
    assert "probes: one epoch" in capsys.readouterr().out
    frame = pd.read_csv(out / "results.csv").set_index("cell")
    assert list(frame.index) == ["base", ablate.CONTROL]
    # 0.06 s cannot hold even the probes' fixed costs: each cell trains 1 of its 3 epochs, the control reusing
    # the base's epochs instead of probing; the probes' folders are removed.
    assert (frame["epochs"] == 1).all()
    assert frame.loc["base", "probe_minutes"] > 0 and frame.loc[ablate.CONTROL, "probe_minutes"] == 0
    assert not list(out.rglob("probe-*"))
    assert frame["test_auc"].between(0, 1).all()

    # The control trained on the same label rows, permuted over the studies, from records of its own.
    original = pd.read_csv(os.path.join(easy, "train.csv"), dtype={ID_COLUMN: str})
    shuffled = pd.read_csv(out / "data" / "easy-shuffled" / "train.csv", dtype={ID_COLUMN: str})
    assert list(shuffled[ID_COLUMN]) == list(original[ID_COLUMN])
    assert sorted(map(tuple, shuffled[list(LABELS)].values)) == sorted(map(tuple, original[list(LABELS)].values))
    assert (shuffled[list(LABELS)].values != original[list(LABELS)].values).any()
    assert sorted(p.split("-64px")[0] for p in os.listdir(out / "records")) == ["easy", "easy-shuffled"]
