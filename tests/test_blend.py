"""python -m ranzcr_tf.serve.blend: per-label OOF weights with nested CV, on run folders of real oof.csv files."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ranzcr_tf.labels import ID_COLUMN, LABELS
from ranzcr_tf.serve import blend
from ranzcr_tf.serve.ensemble import blend_models, rank_normalize
from ranzcr_tf.tables import TARGET_COLUMNS

NUM_STUDIES, NUM_FOLDS = 240, 3


def make_truth(seed: int = 0):
    rng = np.random.default_rng(seed)
    targets = (rng.random((NUM_STUDIES, len(LABELS))) < 0.3).astype(int)
    folds = np.arange(NUM_STUDIES) % NUM_FOLDS
    return rng, targets, folds


def write_oof_run(root, name: str, ids, folds, targets, probs) -> str:
    """``root/name/fold{k}/oof.csv`` in the layout training writes (``runs.py``)."""
    run = os.path.join(str(root), name)
    for fold in range(NUM_FOLDS):
        rows = folds == fold
        frame = pd.DataFrame({ID_COLUMN: np.asarray(ids)[rows], "fold": fold})
        for c, label in enumerate(LABELS):
            frame[label] = probs[rows, c]
        for c, column in enumerate(TARGET_COLUMNS):
            frame[column] = targets[rows, c]
        os.makedirs(os.path.join(run, f"fold{fold}"), exist_ok=True)
        frame.to_csv(os.path.join(run, f"fold{fold}", "oof.csv"), index=False)
    return run


@pytest.fixture()
def two_runs(tmp_path):
    """Run A is informative on the first six labels only, run B on the last five only."""
    rng, targets, folds = make_truth()
    ids = [f"1.2.{i}" for i in range(NUM_STUDIES)]
    noise_a, noise_b = rng.random(targets.shape), rng.random(targets.shape)
    signal = targets + 0.8 * rng.standard_normal(targets.shape)
    informative_a = np.arange(len(LABELS)) < 6
    probs_a = np.where(informative_a, 1 / (1 + np.exp(-signal)), noise_a)
    probs_b = np.where(~informative_a, 1 / (1 + np.exp(-(signal + 0.5 * rng.standard_normal(targets.shape)))), noise_b)
    a = write_oof_run(tmp_path / "runs", "run_a", ids, folds, targets, probs_a)
    b = write_oof_run(tmp_path / "runs", "run_b", ids, folds, targets, probs_b)
    return {"a": a, "b": b, "targets": targets, "folds": folds, "probs": np.stack([probs_a, probs_b]), "ids": ids}


def test_simplex_grid_is_every_point_of_the_step_summing_to_one():
    grid = blend.simplex_grid(3, 4)
    assert grid.shape == (15, 3)  # C(4 + 2, 2)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    assert (grid >= 0).all() and len({tuple(row) for row in grid}) == 15
    assert blend.grid_divisions(2, None) == 100 and blend.grid_divisions(3, 0.1) == 10
    with pytest.raises(ValueError, match="--step 0.3"):
        blend.grid_divisions(2, 0.3)


def test_label_weights_maximise_the_auc_over_the_grid(two_runs):
    grid = blend.simplex_grid(2, 20)
    targets, probs = two_runs["targets"], two_runs["probs"]
    for c in (0, 8):
        weights = blend.fit_label_weights(probs[:, :, c], targets[:, c], grid)
        brute = [roc_auc_score(targets[:, c], w @ probs[:, :, c]) for w in grid]
        assert roc_auc_score(targets[:, c], weights @ probs[:, :, c]) == pytest.approx(max(brute), abs=1e-12)
    single_class = blend.fit_label_weights(probs[:, :, 0], np.zeros(NUM_STUDIES), grid)
    np.testing.assert_allclose(single_class, [0.5, 0.5])  # nothing to maximise: equal weights


def test_nested_cv_scores_each_fold_with_weights_from_the_other_folds(two_runs):
    runs = blend.load_runs([two_runs["a"], two_runs["b"]])
    grid = blend.simplex_grid(2, 10)
    blended, per_fold = blend.nested_cv(runs, grid, rank=False)
    targets, probs, folds = two_runs["targets"], two_runs["probs"], two_runs["folds"]
    order = np.argsort(two_runs["ids"])  # load_runs sorts by ID
    targets, probs, folds = targets[order], probs[:, order], folds[order]
    for fold in range(NUM_FOLDS):
        held = folds == fold
        expected_weights = blend.fit_weights(probs[:, ~held], targets[~held], grid, rank=False)
        np.testing.assert_array_equal(per_fold[fold], expected_weights)
        by_hand = (expected_weights[0] * probs[0, held] + expected_weights[1] * probs[1, held])
        np.testing.assert_allclose(blended[held], by_hand, atol=1e-12)
    # The held-out weights differ from the in-sample ones somewhere, else nesting would be a no-op here.
    in_sample = blend.fit_weights(probs, targets, grid, rank=False)
    assert any((per_fold[k] != in_sample).any() for k in per_fold)


def test_cli_writes_reproducible_weights_and_prints_single_mean_and_blend(two_runs, tmp_path, capsys):
    out1, out2 = tmp_path / "b1.json", tmp_path / "b2.json"
    assert blend.main([two_runs["a"], two_runs["b"], "--out", str(out1), "--step", "0.05"]) == 0
    table = capsys.readouterr().out
    assert blend.main([two_runs["b"], two_runs["a"], "--out", str(out2), "--step", "0.05"]) == 0
    first, second = json.loads(out1.read_text()), json.loads(out2.read_text())
    assert first["weights"] == {label: {k: v[k] for k in ("run_a", "run_b")} for label, v in second["weights"].items()}
    assert first["cv"]["blend_nested"] == second["cv"]["blend_nested"]
    matrix = blend.weights_matrix(first)
    np.testing.assert_allclose(matrix.sum(axis=0), 1.0)
    assert (matrix >= 0).all()
    assert (matrix[0, :6] > matrix[1, :6]).all() and (matrix[1, 6:] > matrix[0, 6:]).all()  # each run where it informs
    assert "run_a" in table and "blend*" in table and "nested CV" in table
    cv = first["cv"]
    assert cv["blend_nested"]["cv_auc"] > max(cv["single"]["run_a"]["cv_auc"], cv["single"]["run_b"]["cv_auc"])
    assert cv["blend_nested"]["cv_auc"] > cv["equal_mean"]["cv_auc"]
    pooled = blend_models(list(blend.load_runs([two_runs["a"], two_runs["b"]])["probs"]), np.full((2, 11), 0.5))
    assert cv["equal_mean"]["cv_auc"] == pytest.approx(
        blend.score(np.asarray(two_runs["targets"])[np.argsort(two_runs["ids"])], pooled,
                    two_runs["folds"][np.argsort(two_runs["ids"])])["cv_auc"])


def test_rank_blend_is_fitted_on_ranks(two_runs, tmp_path):
    out = tmp_path / "rank.json"
    assert blend.main([two_runs["a"], two_runs["b"], "--out", str(out), "--rank"]) == 0
    fitted = json.loads(out.read_text())
    assert fitted["rank"] is True and fitted["step"] == pytest.approx(0.01)


def test_runs_with_other_folds_or_names_are_refused_in_one_line(two_runs, tmp_path, capsys):
    folds = (two_runs["folds"] + 1) % NUM_FOLDS
    other = write_oof_run(tmp_path / "other", "run_c", two_runs["ids"], folds, two_runs["targets"], two_runs["probs"][0])
    assert blend.main([two_runs["a"], other, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "another fold" in err and len(err.splitlines()) == 1
    same_name = write_oof_run(tmp_path / "elsewhere", "run_a", two_runs["ids"], two_runs["folds"],
                              two_runs["targets"], two_runs["probs"][1])
    assert blend.main([two_runs["a"], same_name, "--out", str(tmp_path / "x.json")]) == 2
    assert "named 'run_a'" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_blend_file_must_name_the_same_runs_and_labels(tmp_path):
    fitted = {"runs": ["run_a", "run_b"], "labels": list(LABELS), "rank": False,
              "weights": {label: {"run_a": 0.25, "run_b": 0.75} for label in LABELS}}
    path = tmp_path / "blend.json"
    path.write_text(json.dumps(fitted))
    loaded = blend.read_blend(str(path))
    np.testing.assert_allclose(blend.weights_for_models(loaded, ["run_b", "run_a"]), [[0.75] * 11, [0.25] * 11])
    with pytest.raises(ValueError, match="fitted for runs run_a, run_b but the models are run_a, run_c"):
        blend.weights_for_models(loaded, ["run_a", "run_c"])
    path.write_text(json.dumps({**fitted, "labels": list(reversed(LABELS))}))
    with pytest.raises(ValueError, match="submission order"):
        blend.read_blend(str(path))


def test_with_rank_every_column_of_the_table_is_on_within_fold_ranks(two_runs, tmp_path):
    out = tmp_path / "rank.json"
    assert blend.main([two_runs["a"], two_runs["b"], "--out", str(out), "--rank", "--step", "0.1"]) == 0
    fitted = json.loads(out.read_text())
    runs = blend.load_runs([two_runs["a"], two_runs["b"]])
    folds, targets = runs["folds"], runs["targets"]
    order = np.concatenate([np.flatnonzero(folds == k) for k in range(NUM_FOLDS)])
    ranked_a = np.concatenate([rank_normalize(runs["probs"][0][folds == k]) for k in range(NUM_FOLDS)])
    expected = blend.score(targets[order], ranked_a, folds[order])
    assert fitted["cv"]["single"]["run_a"]["cv_auc"] == pytest.approx(expected["cv_auc"], abs=1e-12)
    # Per-fold AUCs do not depend on the ranking; the pooled score does (the scale differs between folds).
    assert fitted["cv"]["single"]["run_a"]["mean_fold_auc"] == pytest.approx(
        blend.score(targets, runs["probs"][0], folds)["mean_fold_auc"], abs=1e-12)
