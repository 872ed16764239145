"""python -m ranzcr_tf.serve.pseudo: OOF soft labels only from models that never trained on the study; predictions
for unlabeled records through the kernel's path."""

from __future__ import annotations

import os
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers_convert import phantom
from helpers_infer import constant_model, write_run
from helpers_train import write_tiny_records

from ranzcr_tf.config import PreprocessConfig
from ranzcr_tf.labels import ID_COLUMN, LABELS
from ranzcr_tf.serve import pseudo
from ranzcr_tf.tables import TARGET_COLUMNS


def write_oof(run_dir: str, fold: int, frame: pd.DataFrame, probs: np.ndarray) -> str:
    """``run_dir/fold{fold}/oof.csv`` as training writes it, for the studies of ``frame``."""
    out = pd.DataFrame({ID_COLUMN: frame[ID_COLUMN].to_numpy(), "fold": fold})
    for c, label in enumerate(LABELS):
        out[label] = probs[:, c]
    for c, column in enumerate(TARGET_COLUMNS):
        out[column] = frame[LABELS[c]].to_numpy()
    os.makedirs(os.path.join(run_dir, f"fold{fold}"), exist_ok=True)
    path = os.path.join(run_dir, f"fold{fold}", "oof.csv")
    out.to_csv(path, index=False)
    return path


@pytest.fixture()
def teachers(tmp_path):
    """Records with 3 folds of 8 studies and two runs whose fold-k models predicted exactly fold k."""
    records_dir = str(tmp_path / "records")
    table = write_tiny_records(records_dir, num_folds=3, per_fold=8, size=32)
    fold_of = np.array([int(s.split(".")[-2]) for s in table[ID_COLUMN]])
    rng = np.random.default_rng(0)
    probs = {name: rng.random((len(table), 11)) for name in ("A", "B")}
    for name in probs:
        for fold in range(3):
            write_oof(str(tmp_path / "runs" / name), fold, table[fold_of == fold], probs[name][fold_of == fold])
    return {"records": records_dir, "table": table, "fold_of": fold_of, "probs": probs, "runs": tmp_path / "runs"}


def test_oof_soft_labels_average_the_runs_models_that_did_not_train_on_each_study(teachers, tmp_path):
    out = tmp_path / "soft.csv"
    runs = [str(teachers["runs"] / "A"), str(teachers["runs"] / "B")]
    assert pseudo.main(["oof", *runs, "--tfrecords", teachers["records"], "--out", str(out)]) == 0
    soft = pd.read_csv(out, dtype={ID_COLUMN: str})
    assert list(soft.columns) == [ID_COLUMN, *LABELS, "source"]
    assert soft[ID_COLUMN].tolist() == teachers["table"][ID_COLUMN].tolist()  # folds.csv order, every study
    expected = (teachers["probs"]["A"] + teachers["probs"]["B"]) / 2
    np.testing.assert_allclose(soft[list(LABELS)].to_numpy(), expected, atol=1e-9)
    for source, fold in zip(soft["source"], teachers["fold_of"]):
        assert source == f"oof:A/fold{fold}+B/fold{fold}"  # only the fold model that validated on it


def test_a_fold_model_labelling_its_own_training_fold_is_refused(teachers, tmp_path, capsys):
    # Leak: run A's fold-1 model also "predicts" two fold-0 studies, which it trained on.
    table, fold_of = teachers["table"], teachers["fold_of"]
    leaky = pd.concat([table[fold_of == 1], table[fold_of == 0].iloc[:2]])
    write_oof(str(teachers["runs"] / "A"), 1, leaky, np.full((len(leaky), 11), 0.5))
    out = tmp_path / "soft.csv"
    code = pseudo.main(["oof", str(teachers["runs"] / "A"), "--tfrecords", teachers["records"], "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"fold1{os.sep}oof.csv line 10: study {table[ID_COLUMN][fold_of == 0].iloc[0]} is in fold 0" in error
    assert "A/fold1's model trained on" in error and "refusing to label 2 studies" in error
    assert not out.exists()


def test_oof_rows_copied_into_another_fold_folder_are_refused(teachers, tmp_path):
    # fold2/oof.csv replaced by fold0's file (fold column says 0): the fold-2 model never predicted these studies.
    run = teachers["runs"] / "B"
    shutil.copy(run / "fold0" / "oof.csv", run / "fold2" / "oof.csv")
    with pytest.raises(ValueError, match=r"is in fold 0, which B/fold2's model trained on"):
        pseudo.soft_labels_from_oof([str(run)], teachers["records"])


def test_predict_mode_labels_unlabeled_records_with_the_kernels_ensemble(tmp_path):
    from ranzcr_tf.prep.unlabeled import convert_unlabeled

    settings = PreprocessConfig(image_size=32, clahe_clip_limit=0.0)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        cv2.imwrite(str(folder / f"u{i}.png"), phantom(rng, 50, 40))
    convert_unlabeled(str(folder), str(tmp_path / "extra"), settings, workers=1, progress=False)
    low, high = np.linspace(0.1, 0.5, 11), np.linspace(0.3, 0.9, 11)
    run_a = write_run(str(tmp_path / "runs"), "A", [constant_model(32, low), constant_model(32, high)], settings,
                      output="probabilities", batch_size=2, tta=["identity"])
    out = tmp_path / "soft_extra.csv"
    assert pseudo.main(["--quiet", "predict", "--models", run_a, "--tfrecords", str(tmp_path / "extra"),
                        "--split", "extra", "--out", str(out)]) == 0
    soft = pd.read_csv(out)
    assert sorted(soft[ID_COLUMN]) == [f"u{i}" for i in range(5)]
    np.testing.assert_allclose(soft[list(LABELS)].to_numpy(), np.tile((low + high) / 2, (5, 1)), atol=1e-6)
    assert set(soft["source"]) == {"models:A"}


def test_predict_mode_refuses_records_preprocessed_otherwise_than_the_run(tmp_path):
    from ranzcr_tf.prep.unlabeled import convert_unlabeled

    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "u0.png"), phantom(np.random.default_rng(4), 50, 40))
    convert_unlabeled(str(folder), str(tmp_path / "extra"), PreprocessConfig(image_size=32), workers=1, progress=False)
    run = write_run(str(tmp_path / "runs"), "A", [constant_model(32, np.full(11, 0.5))],
                    PreprocessConfig(image_size=32, clahe_clip_limit=0.0), output="probabilities", tta=["identity"])
    with pytest.raises(ValueError, match="extra records in .* were made with .* convert them again"):
        pseudo.soft_labels_from_models([run], str(tmp_path / "extra"), "extra", None, progress=False)
