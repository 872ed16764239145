"""kaggle_kernel.py --plan on a tiny raw test set: measured speeds, folds x TTA x images against --max-minutes,
and nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_convert import make_tiny_dataset
from helpers_infer import asymmetry_model, constant_model, write_run

from ranzcr_tf.config import PreprocessConfig
from ranzcr_tf.serve import kernel

S1 = PreprocessConfig(image_size=40, clahe_clip_limit=3.5, clahe_tile_grid=4, interpolation="linear", jpeg_quality=70)
S2 = PreprocessConfig(image_size=32, clahe_clip_limit=0.0, jpeg_quality=90)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel_plan")
    data = make_tiny_dataset(str(root / "data"), n_train=4, n_test=7, seed=5, size_range=(90, 150))
    runs = root / "runs"
    first = write_run(str(runs), "two_folds", [asymmetry_model(40), constant_model(40, np.full(11, 0.3), output="logits")],
                      S1, output="logits", batch_size=2)
    second = write_run(str(runs), "one_fold", [asymmetry_model(32, output="probabilities")], S2,
                       output="probabilities", batch_size=2)
    return {"data": data, "models": [first, second], "root": root}


@pytest.mark.parametrize("minutes, fits", [(480, True), (0.0001, False)])
def test_kernel_plan_measures_and_compares_with_the_budget(setup, tmp_path, capsys, minutes, fits):
    out = tmp_path / "sub" / "submission.csv"
    args = kernel.build_parser().parse_args(["--plan", "--plan-images", "4", "--data-dir", setup["data"], "--models",
                                             *setup["models"], "--out", str(out), "--max-minutes", str(minutes),
                                             "--tta", "identity", "hflip", "--workers", "1", "--no-progress"])
    result = kernel.run(args)["plan"]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: ")]
    assert printed[0].startswith("plan: model 0 two_folds: 2 fold(s) at 40 px; measured on 4 test images (batch 2)")
    assert printed[1].startswith("plan: model 1 one_fold: 1 fold(s) at 32 px; measured on 4 test images (batch 2)")
    assert "images/s" in printed[0] and "preprocess" in printed[0]
    assert printed[2].startswith("plan: full plan 2/2 models, 3/3 folds, 2/2 views (6 passes) x 7 test images: estimated")
    assert result["estimated_seconds"] > 0
    assert (result["level"] == 0) is fits and printed[3].startswith("plan: the full plan fits" if fits else
                                                                      "plan: the full plan does not fit")
    assert not out.exists() and not out.parent.exists()  # no submission, not even its folder
