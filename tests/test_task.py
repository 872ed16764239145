"""The task section (issue 18): RANZCR defaults, long CSVs, the RSNA ICH metric, long submissions, the half
mask, multi-channel records, metric direction in checkpoints, patient-grouped folds for another task."""

import math
import os

import numpy as np
import pandas as pd
import pytest

from ranzcr_tf import labels
from ranzcr_tf.config import PRESET_DIR, Config, TaskConfig, load_config, save_config
from ranzcr_tf.model.metrics import is_better, monitor_for, task_scores, weighted_log_loss
from ranzcr_tf.prep.long_csv import long_to_wide, wide_to_long

ICH_LABELS = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]


def test_ranzcr_is_the_default_task_with_its_labels_and_columns():
    task = Config().task
    assert task.name == "ranzcr" and tuple(task.labels) == labels.LABELS and task.num_classes == 11
    assert {k: tuple(v) for k, v in task.groups.items()} == labels.GROUPS
    assert (task.id_column, task.group_column) == (labels.ID_COLUMN, labels.PATIENT_COLUMN)
    assert (task.reader, task.metric, task.csv_layout, task.submission_layout) == ("jpeg", "mean_auc", "wide", "wide")
    assert task.channels == 1 and monitor_for(task.metric) == ("val_auc", "max")


def test_task_config_is_validated_with_one_line_errors():
    with pytest.raises(ValueError, match="task.groups"):
        load_config(None, ["task.labels=[a, b]"])  # RANZCR's groups no longer cover the labels
    with pytest.raises(ValueError, match="model.input_channels=9"):
        load_config(os.path.join(PRESET_DIR, "rsna_ich_cpu.yaml"), ["model.input_channels=3"])
    with pytest.raises(ValueError, match="task.label_weights"):
        load_config(os.path.join(PRESET_DIR, "rsna_ich_cpu.yaml"), ["task.label_weights=[1, 2]"])
    with pytest.raises(ValueError, match="specific to the RANZCR"):
        load_config(os.path.join(PRESET_DIR, "rsna_ich_cpu.yaml"), ["train.recipe=aux_seg"])
    cfg = load_config(os.path.join(PRESET_DIR, "rsna_ich_cpu.yaml"), ["task.slice_context=0", "model.input_channels=3"])
    assert cfg.task.channels == 3


def test_task_round_trips_through_a_saved_run_config(tmp_path):
    cfg = load_config(os.path.join(PRESET_DIR, "rsna_ich_cpu.yaml"))
    path = str(tmp_path / "fold0" / "config.yaml")
    save_config(cfg, path)
    again = load_config(path)
    assert again.task == cfg.task
    assert again.task.labels == ICH_LABELS and again.task.weights() == [1, 1, 1, 1, 1, 2]
    assert again.task.windows == ["brain", "subdural", "bone"] and again.task.submission_layout == "long"


def test_long_csv_to_wide_and_back():
    long = pd.DataFrame({"ID": ["ID_aa1_epidural", "ID_aa1_any", "ID_b_2_epidural", "ID_b_2_any", "ID_aa1_any"],
                         "Label": [0, 1, 1, 1, 1]})  # a repeated identical row, and an image ID with underscores
    wide = long_to_wide(long, ["epidural", "any"], "ID")
    assert wide["ID"].tolist() == ["ID_aa1", "ID_b_2"]
    assert wide[["epidural", "any"]].to_numpy().tolist() == [[0, 1], [1, 1]]
    back = wide_to_long(wide["ID"], wide[["epidural", "any"]].to_numpy(), ["epidural", "any"])
    assert back["ID"].tolist() == ["ID_aa1_epidural", "ID_aa1_any", "ID_b_2_epidural", "ID_b_2_any"]
    assert back["Label"].tolist() == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="line 3.*ID_aa1_bogus"):
        long_to_wide(pd.DataFrame({"ID": ["ID_aa1_any", "ID_aa1_bogus"], "Label": [0, 1]}), ["any"], "ID", "x.csv")
    with pytest.raises(ValueError, match="no row for label"):
        long_to_wide(pd.DataFrame({"ID": ["ID_a_any", "ID_b_epidural", "ID_b_any"], "Label": [0, 1, 1]}),
                     ["epidural", "any"], "ID")
    with pytest.raises(ValueError, match="both 0 and 1"):
        long_to_wide(pd.DataFrame({"ID": ["ID_a_any", "ID_a_any"], "Label": [0, 1]}), ["any"], "ID")


def test_weighted_log_loss_equals_a_hand_computation():
    y = np.array([[1, 0], [0, 0], [1, 1]], dtype=float)
    p = np.array([[0.9, 0.2], [0.0, 0.5], [0.6, 1.0]])
    weights = [1.0, 2.0]
    eps = 1e-7
    bce = lambda t, q: -(t * math.log(q) + (1 - t) * math.log(1 - q))  # noqa: E731
    rows = [
        (1 * bce(1, 0.9) + 2 * bce(0, 0.2)) / 3,
        (1 * bce(0, eps) + 2 * bce(0, 0.5)) / 3,  # 0 is clipped to 1e-7
        (1 * bce(1, 0.6) + 2 * bce(1, 1 - eps)) / 3,  # 1 is clipped to 1 - 1e-7
    ]
    score, per_label = weighted_log_loss(y, p, weights)
    assert score == pytest.approx(np.mean(rows), rel=1e-12)
    assert per_label[0] == pytest.approx(np.mean([bce(1, 0.9), bce(0, eps), bce(1, 0.6)]), rel=1e-12)
    perfect, _ = weighted_log_loss(y, y, weights)
    assert perfect < 1e-6 < score
    task = load_config(os.path.join(PRESET_DIR, "rsna_ich_cpu.yaml")).task
    rng = np.random.default_rng(0)
    y6, p6 = (rng.random((20, 6)) < 0.3).astype(float), rng.random((20, 6))
    scores = task_scores(task, y6, p6)
    assert scores["val_weighted_log_loss"] == pytest.approx(weighted_log_loss(y6, p6, [1, 1, 1, 1, 1, 2])[0])
    assert "val_auc" in scores and "val_log_loss_any" in scores


def test_metric_direction_decides_better():
    assert monitor_for("weighted_log_loss") == ("val_weighted_log_loss", "min")
    assert is_better(0.2, 0.3, "min") and not is_better(0.4, 0.3, "min")
    assert is_better(0.9, 0.8, "max") and not is_better(0.7, 0.8, "max")
    assert is_better(0.5, None, "min") and not is_better(math.nan, 0.3, "min")


def test_best_checkpoint_in_min_mode_never_replaces_a_better_model(tmp_path):
    import keras

    from ranzcr_tf.train.callbacks import BestCheckpoint

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    checkpoint = BestCheckpoint(str(tmp_path / "best.keras"), monitor="val_weighted_log_loss", mode="min")
    checkpoint.set_model(model)
    for epoch, loss in enumerate([0.5, 0.3, 0.4, 0.35]):
        checkpoint.on_epoch_end(epoch, {"val_weighted_log_loss": loss})
    assert (checkpoint.best, checkpoint.best_epoch) == (0.3, 1)
    import json

    assert json.loads((tmp_path / "best.json").read_text()) == {"epoch": 1, "val_weighted_log_loss": 0.3}
    checkpoint.set_state({"best": 0.9, "best_epoch": 7})  # a worse saved best never wins
    assert checkpoint.best == 0.3


def _long_sample(tmp_path, images):
    rows = [f"{image}_{label}" for image in images for label in ICH_LABELS]
    path = tmp_path / "stage_2_sample_submission.csv"
    pd.DataFrame({"ID": rows, "Label": 0.5}).to_csv(path, index=False)
    return str(path)


def test_long_submission_has_every_id_once_in_sample_order(tmp_path):
    from ranzcr_tf.serve.submission import LongTemplate, build_long_submission, write_long_submission

    template = LongTemplate(_long_sample(tmp_path, ["ID_c", "ID_a", "ID_b"]), ICH_LABELS, "ID")
    assert template.wide["ID"].tolist() == ["ID_c", "ID_a", "ID_b"]
    probs = np.arange(18, dtype=float).reshape(3, 6) / 20
    order = ["ID_a", "ID_b", "ID_c"]  # predictions in another row order than the sample
    frame = build_long_submission(template, order, probs)
    out = write_long_submission(frame, str(tmp_path / "submission.csv"), template)
    written = pd.read_csv(out)
    assert written["ID"].tolist() == template.frame["ID"].tolist() and written["ID"].is_unique
    assert len(written) == 3 * 6
    assert written.set_index("ID").loc["ID_c_any", "Label"] == pytest.approx(probs[2, 5])
    assert written.set_index("ID").loc["ID_a_epidural", "Label"] == pytest.approx(probs[0, 0])


def test_long_submission_refuses_missing_or_extra_ids(tmp_path):
    from ranzcr_tf.serve.submission import LongTemplate, build_long_submission, validate_long_submission

    template = LongTemplate(_long_sample(tmp_path, ["ID_a", "ID_b"]), ICH_LABELS, "ID")
    with pytest.raises(ValueError, match="lack 6 ID"):
        build_long_submission(template, ["ID_a", "ID_x"], np.zeros((2, 6)))
    good = build_long_submission(template, ["ID_a", "ID_b"], np.zeros((2, 6)))
    with pytest.raises(ValueError, match="1 missing.*1 extra"):
        validate_long_submission(good.replace({"ID": {"ID_a_any": "ID_z_any"}}), template)
    with pytest.raises(ValueError, match="order"):
        validate_long_submission(good.iloc[::-1].reset_index(drop=True), template)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"ID": ["ID_a_any", "ID_a_epidural", "ID_b_any"], "Label": 0.5}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="one row per label"):
        LongTemplate(str(bad), ["epidural", "any"], "ID")


def test_half_mask_blanks_exactly_one_half():
    import tensorflow as tf

    from ranzcr_tf.config import AugmentConfig
    from ranzcr_tf.pipeline.augment import augment_image

    off = dict(hflip_prob=0.0, affine_prob=0.0, crop_prob=0.0, brightness_contrast_prob=0.0, gamma_prob=0.0,
               cutout_prob=0.0)
    image = tf.constant(np.random.default_rng(1).integers(1, 256, (32, 32, 9)), tf.uint8)  # no zero pixel
    sides = set()
    for seed in range(12):
        out = augment_image(image, AugmentConfig(**off, half_mask_prob=1.0), tf.constant([seed, 3]), channels=9).numpy()
        left_blank, right_blank = (out[:, :16] == 0).all(), (out[:, 16:] == 0).all()
        assert left_blank != right_blank  # exactly one half
        kept = out[:, 16:] if left_blank else out[:, :16]
        assert (kept == (image.numpy()[:, 16:] if left_blank else image.numpy()[:, :16])).all()
        sides.add("left" if left_blank else "right")
    assert sides == {"left", "right"}
    same = augment_image(image, AugmentConfig(**off, half_mask_prob=0.0), tf.constant([0, 3]), channels=9).numpy()
    assert (same == image.numpy()).all()


def test_multichannel_records_round_trip(tmp_path):
    import tensorflow as tf

    from ranzcr_tf.prep import records

    image = np.random.default_rng(2).integers(0, 256, (20, 24, 9), dtype=np.uint8)
    parts = records.encode_channels(image)
    assert len(parts) == 3 and (records.decode_channels_numpy(parts) == image).all()
    assert records.part_channels(5) == [3, 1, 1]
    serialized = records.serialize_example(None, "ID_x", target=[0, 1, 0, 0, 0, 1], fold=2, height=20, width=24,
                                           orig_height=20, orig_width=24, num_classes=6, image_parts=parts, channels=9)
    layout = records.RecordLayout(num_classes=6, channels=9)
    parsed = records.parse_example(tf.constant(serialized), layout=layout)
    assert (records.decode_stored(parsed, 9).numpy() == image).all()
    assert parsed[records.TARGET].numpy().tolist() == [0, 1, 0, 0, 0, 1]
    assert records.RecordLayout.from_manifest({"labels": ICH_LABELS, "image_channels": 9}) == layout
    assert records.RecordLayout.from_manifest({}) == records.RecordLayout(11, 1)  # older manifests: RANZCR


def test_folds_of_another_task_are_grouped_by_patient():
    from ranzcr_tf.prep.folds import assign_folds

    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"ID": [f"ID_{i}" for i in range(120)], "PatientID": [f"P{i // 8}" for i in range(120)]})
    for label in ICH_LABELS:
        frame[label] = (rng.random(120) < 0.3).astype(int)
    folds = assign_folds(frame, 3, 0, labels=ICH_LABELS, group_column="PatientID")
    assert sorted(set(folds)) == [0, 1, 2]
    assert frame.assign(fold=folds).groupby("PatientID")["fold"].nunique().max() == 1


def test_model_takes_the_task_head_and_many_channels():
    from ranzcr_tf.config import ModelConfig
    from ranzcr_tf.model.build import build_model

    model = build_model(ModelConfig(backbone="compact_cnn", input_channels=9), 64, num_classes=6, groups={})
    assert model.input_shape == (None, 64, 64, 9) and model.output_shape == (None, 6)
    grouped = build_model(ModelConfig(backbone="compact_cnn", input_channels=3, head="per_group"), 64, num_classes=6,
                          groups={"subtypes": ICH_LABELS[:5], "any": ["any"]})
    assert grouped.output_shape == (None, 6)
    assert TaskConfig().num_classes == 11
