"""Inference building blocks: ensembling maths, submission writing, the budget planner, safe model loading."""

from __future__ import annotations

import os

import keras
import numpy as np
import pandas as pd
import pytest
from helpers_infer import constant_model, write_run

from ranzcr_tf.config import PreprocessConfig
from ranzcr_tf.labels import ID_COLUMN, LABELS, SUBMISSION_COLUMNS
from ranzcr_tf.model.files import check_model_file
from ranzcr_tf.report.score import score_frames
from ranzcr_tf.serve import ensemble
from ranzcr_tf.serve.budget import Budget, CostModel, choose_plan, degrade_levels
from ranzcr_tf.serve.modelio import discover_models, load_fold_model
from ranzcr_tf.serve.submission import build_submission, read_sample_submission, write_submission

# ----------------------------------------------------------------------------------------------- ensembling


def test_view_and_fold_averages_are_means_of_probabilities_skipping_missing_rows():
    a = np.array([[0.2, 0.4], [0.6, np.nan]])
    b = np.array([[0.4, 0.8], [0.8, 0.5]])
    np.testing.assert_allclose(ensemble.average_views([a, b]), [[0.3, 0.6], [0.7, 0.5]])
    np.testing.assert_allclose(ensemble.average_folds([a, b, b]), [[1.0 / 3, 2.0 / 3], [2.2 / 3, 0.5]])


def test_rank_mean_averages_per_column_ranks():
    # Model A orders the rows 0<1<2, model B 2<0<1 (column 0); column 1 has a tie in A.
    a = np.array([[0.1, 0.5], [0.2, 0.5], [0.9, 0.1]])
    b = np.array([[0.50, 0.3], [0.70, 0.2], [0.01, 0.1]])
    ranks_a = (np.array([[1, 2.5], [2, 2.5], [3, 1]]) - 0.5) / 3
    ranks_b = (np.array([[2, 3], [3, 2], [1, 1]]) - 0.5) / 3
    np.testing.assert_allclose(ensemble.combine_models([a, b], "rank_mean"), (ranks_a + ranks_b) / 2)
    # A mean of probabilities would rank row 2 first in column 0; the rank mean puts row 1 first.
    assert ensemble.combine_models([a, b], "mean")[:, 0].argmax() == 2
    assert ensemble.combine_models([a, b], "rank_mean")[:, 0].argmax() == 1


def test_weighted_ensemble_uses_normalised_weights_and_checks_them():
    a, b = np.full((2, 3), 0.2), np.full((2, 3), 0.8)
    np.testing.assert_allclose(ensemble.combine_models([a, b], "weighted", [3, 1]), 0.35)
    np.testing.assert_allclose(ensemble.combine_models([a, b], "weighted", [0, 2]), 0.8)
    with pytest.raises(ValueError, match="one weight per model"):
        ensemble.combine_models([a, b], "weighted", [1])
    with pytest.raises(ValueError, match=">= 0"):
        ensemble.combine_models([a, b], "weighted", [1, -1])
    with pytest.raises(ValueError, match="mean, rank_mean, weighted"):
        ensemble.combine_models([a, b], "median")


def test_missing_rows_are_filled_with_column_means_and_sigmoid_is_stable():
    probs = np.array([[0.2, 0.4], [np.nan, np.nan], [0.6, 0.8]])
    filled, count = ensemble.fill_missing_rows(probs)
    assert count == 1
    np.testing.assert_allclose(filled[1], [0.4, 0.6])
    filled, _ = ensemble.fill_missing_rows(np.full((2, 2), np.nan))
    np.testing.assert_allclose(filled, 0.5)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        np.testing.assert_allclose(ensemble.sigmoid([-1000.0, 0.0, 1000.0]), [0.0, 0.5, 1.0])


# ----------------------------------------------------------------------------------------------- submission


def _sample(tmp_path, ids):
    path = tmp_path / "sample_submission.csv"
    pd.DataFrame({ID_COLUMN: ids, **{label: 0.5 for label in LABELS}})[list(SUBMISSION_COLUMNS)].to_csv(path, index=False)
    return read_sample_submission(str(path))


def test_submission_keeps_template_order_and_columns_and_is_validated(tmp_path):
    ids = ["1.2.3", "1.2.10", "1.2.2"]  # deliberately not sorted
    template = _sample(tmp_path, ids)
    probs = np.arange(33).reshape(3, 11) / 40.0
    out = write_submission(build_submission(template, probs), str(tmp_path / "sub.csv"), template)
    written = pd.read_csv(out, dtype={ID_COLUMN: str})
    assert list(written.columns) == list(SUBMISSION_COLUMNS)
    assert written[ID_COLUMN].tolist() == ids
    np.testing.assert_allclose(written[list(LABELS)].to_numpy(), probs, atol=1e-6)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []
    bad = build_submission(template, probs)
    bad.loc[1, LABELS[0]] = np.nan
    with pytest.raises(ValueError, match="missing or infinite"):
        write_submission(bad, str(tmp_path / "bad.csv"), template)
    assert not (tmp_path / "bad.csv").exists()
    with pytest.raises(ValueError, match="template's order"):
        write_submission(build_submission(template, probs).iloc[::-1].reset_index(drop=True),
                         str(tmp_path / "bad.csv"), template)


def test_sample_submission_with_wrong_columns_or_duplicates_is_refused(tmp_path):
    path = tmp_path / "s.csv"
    pd.DataFrame({ID_COLUMN: ["a", "a"], **{label: 0.5 for label in LABELS}}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="duplicated"):
        read_sample_submission(str(path))
    pd.DataFrame({ID_COLUMN: ["a"], LABELS[0]: [0.5]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="expected"):
        read_sample_submission(str(path))


def test_score_matches_ids_not_positions():
    rng = np.random.default_rng(0)
    targets = (rng.random((20, 11)) < 0.5).astype(int)
    targets[0], targets[1] = 0, 1  # every column has both classes
    ids = [f"id{i}" for i in range(20)]
    labels = pd.DataFrame(targets, columns=list(LABELS), index=ids)
    perfect = pd.DataFrame(targets * 0.8 + 0.1, columns=list(LABELS), index=ids).iloc[::-1]
    assert score_frames(perfect, labels)["mean_auc"] == pytest.approx(1.0)
    inverted = pd.DataFrame(1 - targets, columns=list(LABELS), index=ids)
    assert score_frames(inverted, labels)["mean_auc"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------- budget


def test_degrade_levels_drop_views_then_folds_then_models():
    levels = degrade_levels([3, 2], num_views=2)
    assert levels[0] == {(m, f, v) for m, n in enumerate([3, 2]) for f in range(n) for v in range(2)}
    assert levels[1] == {(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0), (1, 1, 0)}  # views first
    assert levels[2] == {(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)}  # then folds
    assert levels[3] == {(0, 0, 0), (1, 0, 0)}
    assert levels[4] == {(0, 0, 0)}  # then models, last first
    assert degrade_levels([1, 1], 2, model_priority=[1, 0])[-1] == {(1, 0, 0)}  # weighted: lowest weight goes


def test_choose_plan_picks_the_largest_level_that_fits():
    levels = degrade_levels([2, 2], num_views=2)  # 8, 4, 2, 1 passes
    costs = CostModel(num_images=100, image_sizes={(m, f): 64 for m in range(2) for f in range(2)},
                      groups={(m, f): "g" for m in range(2) for f in range(2)}, safety=1.0)
    costs.predict_seconds_per_image[(0, 0, 0)] = 0.01  # 1 s per pass
    assert choose_plan(levels, costs, 100.0)[0] == 0
    assert choose_plan(levels, costs, 5.0)[0] == 1  # 4 passes fit, 8 do not
    assert choose_plan(levels, costs, 0.5)[0] == len(levels) - 1  # nothing fits: the minimum
    costs.done.update({(0, 0, 0), (0, 0, 1)})
    assert costs.estimate(levels[0]) == pytest.approx(6.0)  # finished passes cost nothing
    costs.load_seconds.append(2.0)
    assert costs.estimate(levels[1]) == pytest.approx(3.0 + 3 * 2.0)  # 3 folds still to load
    ticks = iter(range(0, 1000, 10))
    budget = Budget(60.0, clock=lambda: next(ticks), reserve_seconds=5.0)
    assert budget.remaining() == pytest.approx(60 - 5 - 10)
    with pytest.raises(ValueError, match="max-minutes"):
        Budget(-1.0)


# ----------------------------------------------------------------------------------------------- safe loading

SETTINGS = PreprocessConfig(image_size=32, clahe_clip_limit=0.0, jpeg_quality=90)


def test_run_folder_is_discovered_and_loaded_in_safe_mode(tmp_path):
    run = write_run(str(tmp_path), "runA", [constant_model(32, np.full(11, 0.3)), constant_model(32, np.full(11, 0.6))],
                    SETTINGS, output="probabilities")
    models = discover_models([run])
    assert [m.name for m in models] == ["runA"] and [f.name for f in models[0].folds] == ["runA/fold0", "runA/fold1"]
    fold = models[0].folds[1]
    assert fold.preprocess == SETTINGS and fold.image_size == 32 and fold.output == "probabilities"
    model = load_fold_model(fold)
    np.testing.assert_allclose(model.predict_on_batch(np.zeros((2, 32, 32, 1), np.float32)), 0.6, atol=1e-6)
    # The parent folder (a Kaggle dataset holding several runs) finds each run separately.
    write_run(str(tmp_path), "runB", [constant_model(32, np.full(11, 0.5))], SETTINGS, output="probabilities")
    assert [m.name for m in discover_models([str(tmp_path)])] == [f"{tmp_path.name}/runA", f"{tmp_path.name}/runB"]


def test_lambda_layer_model_is_refused(tmp_path):
    inputs = keras.Input((32, 32, 1), name="image")
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(11)(keras.layers.Flatten()(x)))
    run = write_run(str(tmp_path), "lambda_run", [model], SETTINGS)
    path = os.path.join(run, "fold0", "best.keras")
    with pytest.raises(ValueError, match="Lambda"):
        discover_models([run])
    with pytest.raises(ValueError, match="Lambda"):
        check_model_file(path)
    # Keras safe mode itself refuses it too (our check only makes the message clear and early).
    with pytest.raises(ValueError):
        keras.models.load_model(path, safe_mode=True)


def test_legacy_h5_is_refused(tmp_path):
    run = write_run(str(tmp_path), "h5run", [constant_model(32, np.full(11, 0.5))], SETTINGS)
    folder = os.path.join(run, "fold0")
    keras.models.load_model(os.path.join(folder, "best.keras")).save(os.path.join(folder, "best.h5"))
    os.remove(os.path.join(folder, "best.keras"))
    with pytest.raises(ValueError, match="legacy HDF5"):
        discover_models([run])
    with pytest.raises(ValueError, match="legacy HDF5"):
        discover_models([os.path.join(folder, "best.h5")])


def test_preprocess_json_with_other_label_order_or_decoder_is_refused(tmp_path):
    run = write_run(str(tmp_path), "r", [constant_model(32, np.full(11, 0.5))], SETTINGS)
    path = os.path.join(run, "fold0", "preprocess.json")
    info = pd.read_json(path, typ="series").to_dict()
    pd.Series({**info, "labels": list(reversed(LABELS))}).to_json(path)
    with pytest.raises(ValueError, match="label order"):
        discover_models([run])
    pd.Series({**info, "stored_dct_method": "INTEGER_FAST"}).to_json(path)
    with pytest.raises(ValueError, match="INTEGER_ACCURATE"):
        discover_models([run])
    # Records from a converter that decoded sources another way (an older OpenCV 1/2-1/4-1/8 reduction).
    for decoder in ("opencv", None):
        pd.Series({**info, "decoder": decoder}).to_json(path)
        with pytest.raises(ValueError, match="libjpeg-turbo-m8"):
            discover_models([run])
