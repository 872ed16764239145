"""train.recipe teacher / student / finetune and --recipe 3stage: annotated-only data with masks where each stage
wants them, the frozen teacher (bit-identical after a student epoch), the feature term (zero without
annotations, finite under bfloat16, on JAX), each stage resuming after a real SIGKILL, and the kernel serving
the final image-only model of a 3stage run folder.

Records come from the real converter on a small hard-style synthetic set (about 30 % of the train studies
annotated), at 64 px with compact_cnn so that the CPU fits stay short.
"""

import glob
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from helpers_convert import hard_records

from ranzcr_tf.config import ModelConfig, load_config
from ranzcr_tf.labels import LABELS
from ranzcr_tf.model import build as models
from ranzcr_tf.model.distill import FeatureDistance, build_student_model, build_teacher_model
from ranzcr_tf.pipeline import data, masks
from ranzcr_tf.prep import records
from ranzcr_tf.train import recipes, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
SETTINGS = ["model.backbone=compact_cnn", "model.weights=none", "model.mixed_precision=float32", "model.dropout_rate=0.0",
            "train.batch_size=8", "train.learning_rate=0.003", "train.warmup_epochs=0", "train.seed=1",
            "infer.batch_size=16", "data.shuffle_buffer=64", "loss.name=bce"]
MODEL = ModelConfig(backbone="compact_cnn", weights=None, mixed_precision="float32", dropout_rate=0.0)


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", KERAS_BACKEND="tensorflow",
               PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    env.pop("TF_CONFIG", None)
    env.pop("RANZCR_TF_KILL_AFTER_EPOCH", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dataset(shared_build):  # built once per test run: test_auxseg.py and test_three_stage.py read the same records
    return shared_build(f"hard_records_{SIZE}", lambda folder: hard_records(folder, SIZE, _env()))


def _cfg(*extra):
    return load_config(None, [*SETTINGS, *extra])


def _annotated_ids(records_dir, folds):
    files = records.list_shards(records_dir, records.TRAIN_DIR, folds)
    found = set()
    for serialized in tf.data.TFRecordDataset(files):
        parsed = records.parse_example(serialized, with_annotations=True)
        if int(tf.size(parsed[records.ANN_LABEL])) > 0:
            found.add(parsed[records.ID].numpy().decode())
    return found


# ----------------------------------------------------------------------------------------------- data
def test_teacher_and_student_read_annotated_studies_only_with_masks_where_each_wants_them(dataset):
    rec = dataset["records"]
    positives, count = data.annotated_positive_counts(rec, 0)
    assert count == len(_annotated_ids(rec, [1, 2])) and 0 < count < 32
    assert positives.shape == (11,) and positives.sum() > 0

    teacher = data.build_train_dataset(_cfg("train.recipe=teacher"), rec, 0, 8, seed=0, image_dtype=tf.uint8,
                                       augment=False)
    x, y = next(iter(teacher))
    assert set(x) == {"image", "masks"} and x["image"].shape == (8, SIZE, SIZE, 1)
    assert x["masks"].shape == (8, SIZE // 4, SIZE // 4, 4) and y.shape == (8, 11)
    assert (x["masks"].numpy().reshape(8, -1).sum(axis=1) > 0).all()  # every study has lines

    student = data.build_train_dataset(_cfg("train.recipe=student", "train.teacher=x"), rec, 0, 16, seed=0,
                                       image_dtype=tf.uint8, augment=False)
    for images, targets in student.take(3):
        assert images.shape == (16, SIZE, SIZE, 1)
        assert (targets["has_mask"].numpy() == 1).all()  # the filter: no study without annotations
    aux = data.build_train_dataset(_cfg("train.recipe=aux_seg"), rec, 0, 32, seed=0, image_dtype=tf.uint8)
    assert 0 < next(iter(aux))[1]["has_mask"].numpy().sum() < 32  # without the filter there are some

    ev = data.build_eval_dataset(_cfg("train.recipe=teacher"), rec, "valid", 16, fold=0, recipe="teacher",
                                 with_targets=False)
    assert set(ev.ids) == _annotated_ids(rec, [0]) and ev.num_examples == len(ev.ids) > 0
    batch = next(iter(ev.dataset))
    assert set(batch) == {"image", "masks"}
    assert ev.num_examples < records.count_records(records.list_shards(rec, records.TRAIN_DIR, [0]))


# ----------------------------------------------------------------------------------------------- models
def _student(distance="mse", layer_name=""):
    teacher = build_teacher_model(MODEL, SIZE, SIZE // 4)
    classifier = models.build_model(MODEL, SIZE)
    return teacher, build_student_model(classifier, teacher, keras.losses.BinaryCrossentropy(from_logits=True),
                                        layer_name=layer_name, distance=distance)


@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_studies_without_annotations_contribute_exactly_zero_feature_loss_and_gradient(distance):
    _, student = _student(distance, layer_name="stage3_add")
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (4, SIZE, SIZE, 1)), tf.float32)
    mask = tf.constant(rng.integers(0, 2, (4, 16, 16, 4)), tf.uint8)
    has_mask = tf.constant([1.0, 0.0, 1.0, 0.0])
    teacher = student.teacher_features({"image": images, "masks": mask}, training=False)
    loss = FeatureDistance(distance)
    with tf.GradientTape() as tape:
        tape.watch(images)
        out = student(images, training=False)
        value = loss(teacher, out["features"], sample_weight=has_mask)
    grad = tape.gradient(value, images).numpy()
    assert np.abs(grad[[1, 3]]).max() == 0.0 and np.abs(grad[[0, 2]]).max() > 0
    per_study = loss.call(teacher, out["features"]).numpy()
    assert float(value) == pytest.approx(per_study[[0, 2]].mean(), rel=1e-6) and float(value) > 0
    y = {"target": tf.zeros([4, 11]), "mask": mask, "has_mask": tf.zeros([4])}
    total = student.compute_loss(images, y, out)
    assert float(total) == float(student.classification_loss(y["target"], out["logits"]))


def test_teacher_is_bit_identical_after_a_student_epoch_and_the_student_learns(dataset):
    cfg = _cfg("train.recipe=student", "train.teacher=x")
    ds = data.build_train_dataset(cfg, dataset["records"], 0, 8, seed=0, image_dtype=tf.uint8)
    teacher, student = _student()
    teacher_before = [w.numpy().copy() for w in teacher.weights]  # kernels and BatchNorm moving statistics
    student_before = [w.numpy().copy() for w in student.inference_model.weights]
    assert not any(w is v for w in teacher.weights for v in student.trainable_weights)
    student.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = student.fit(ds, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False).history
    assert np.isfinite(history["loss"]).all() and history["feature_loss"][-1] > 0
    for before, after in zip(teacher_before, teacher.weights):
        np.testing.assert_array_equal(before, after.numpy())
    assert any(not np.array_equal(b, a.numpy()) for b, a in zip(student_before, student.inference_model.weights))
    moving = [w for w in student.inference_model.weights if "moving_mean" in w.path]
    assert moving and any(not np.array_equal(b, a.numpy()) for b, a in  # the student's BatchNorm does train
                          zip(student_before, student.inference_model.weights) if "moving_mean" in a.path)


def test_bfloat16_student_step_has_finite_float32_losses(dataset):
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        _, student = _student("cosine")
        assert student.get_layer("backbone").compute_dtype == "bfloat16"
        student.compile(optimizer=keras.optimizers.Adam(3e-3))
        ds = data.build_train_dataset(_cfg("train.recipe=student", "train.teacher=x"), dataset["records"], 0, 8,
                                      seed=0, image_dtype=tf.uint8)
        images, targets = next(iter(ds))
        logs = student.train_on_batch(images, targets, return_dict=True)
        assert all(np.isfinite(v) for v in logs.values()) and logs["feature_loss"] > 0
    finally:
        keras.config.set_dtype_policy("float32")


def test_student_and_finetune_need_their_run_folders_and_matching_models(dataset, tmp_path):
    with pytest.raises(ValueError, match="train.teacher=runs/NAME"):
        _cfg("train.recipe=student").validate()
    with pytest.raises(ValueError, match="train.init_from=runs/NAME"):
        _cfg("train.recipe=finetune").validate()
    with pytest.raises(ValueError, match="train.distill_loss"):
        _cfg("train.distill_loss=l1").validate()
    cfg = _cfg("train.recipe=student", f"train.teacher={tmp_path}")
    with pytest.raises(ValueError, match="train that stage for fold 0 first"):
        recipes.build_training_model(cfg, SIZE, np.ones(11), 16, from_logits=True)
    plain = tmp_path / "fold0"
    plain.mkdir()
    models.build_model(MODEL, SIZE).save(str(plain / "best.keras"))
    with pytest.raises(ValueError, match="takes no masks input"):
        recipes.build_training_model(cfg, SIZE, np.ones(11), 16, from_logits=True)
    wide = _cfg("train.recipe=finetune", f"train.init_from={tmp_path}", "model.backbone=compact_cnn_wide")
    with pytest.raises(ValueError, match="does not match model"):
        recipes.build_training_model(wide, SIZE, np.ones(11), 16, from_logits=True)
    same = _cfg("train.recipe=finetune", f"train.init_from={tmp_path}")
    model, _ = recipes.build_training_model(same, SIZE, np.ones(11), 16, from_logits=True)
    saved = models.load_model(str(plain / "best.keras"))
    for a, b in zip(model.weights, saved.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # aux_seg from a run's weights (3stage's train.finetune_recipe=aux_seg): the served classifier inside it starts
    # as that run's model; the decoder and tip head are new
    decoded = _cfg("train.recipe=aux_seg", f"train.init_from={tmp_path}", "train.tip_loss_weight=1.0")
    model, loss = recipes.build_training_model(decoded, SIZE, np.ones(11), 16, from_logits=True)
    assert loss is None and {"masks", "tips"} <= set(model.output)
    served = model.inference_model
    assert len(served.weights) == len(saved.weights) < len(model.weights)
    for a, b in zip(served.weights, saved.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    fresh, _ = recipes.build_training_model(_cfg("train.recipe=aux_seg"), SIZE, np.ones(11), 16, from_logits=True)
    assert not all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(fresh.inference_model.weights, saved.weights))


def test_stage_configs_wire_the_run_folders_and_epochs(dataset, tmp_path):
    cfg = _cfg("train.recipe=3stage", "train.epochs=7", "train.student_epochs=3")
    teacher, student, finetune = (stages.stage_config(cfg, stage, "runs/x") for stage in stages.STAGES)
    assert [c.train.recipe for c in (teacher, student, finetune)] == list(stages.STAGES)
    assert (teacher.train.epochs, student.train.epochs, finetune.train.epochs) == (7, 3, 7)
    assert student.train.teacher == "runs/x/teacher" and finetune.train.init_from == "runs/x/student"
    assert cfg.train.recipe == "3stage" and cfg.train.student_epochs == 3  # the given config is left as it was
    decoded = stages.stage_config(_cfg("train.recipe=3stage", "train.finetune_recipe=aux_seg"), "finetune", "runs/x")
    assert decoded.train.recipe == "aux_seg" and decoded.train.init_from == "runs/x/student"
    with pytest.raises(ValueError, match="train.finetune_recipe = 'plain' is invalid"):
        _cfg("train.recipe=3stage", "train.finetune_recipe=plain").validate()
    from ranzcr_tf.train import fit

    with pytest.raises(ValueError, match="call train.run.train"):
        fit.train_fold(cfg, dataset["records"], 0, str(tmp_path / "run"), placement=None)
    assert not os.path.exists(tmp_path / "run")


JAX_STUDENT = r"""
import os, sys
import numpy as np, keras, tensorflow as tf
assert keras.backend.backend() == "jax"
from ranzcr_tf.config import load_config
from ranzcr_tf.model.distill import build_teacher_model
from ranzcr_tf.pipeline import data
from ranzcr_tf.train import recipes
teacher_dir = sys.argv[2]
os.makedirs(os.path.join(teacher_dir, "fold0"))
cfg = load_config(None, sys.argv[3:] + ["train.recipe=student", f"train.teacher={teacher_dir}"])
build_teacher_model(cfg.model, 64, 16).save(os.path.join(teacher_dir, "fold0", "best.keras"))
ds = data.build_train_dataset(cfg, sys.argv[1], 0, 8, seed=0, image_dtype=tf.uint8)
model, loss = recipes.build_training_model(cfg, 64, np.ones(11), 32, from_logits=True)
assert loss is None
before = [np.array(w) for w in model.teacher_features.weights]
model.compile(optimizer=keras.optimizers.Adam(3e-3))
h = model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0, shuffle=False).history
same = all(np.array_equal(b, np.array(w)) for b, w in zip(before, model.teacher_features.weights))
print("LOSSES", h["loss"][-1], h["feature_loss"][-1], h["classification_loss"][-1], int(same))
"""


def test_jax_backend_student_steps_have_finite_losses_and_a_frozen_teacher(dataset, tmp_path):
    script = tmp_path / "jax_student.py"
    script.write_text(JAX_STUDENT)
    done = subprocess.run([sys.executable, str(script), dataset["records"], str(tmp_path / "teacher"), *SETTINGS],
                          cwd=ROOT, timeout=300, env=_env(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    values = [float(v) for v in done.stdout.split("LOSSES")[1].split()]
    assert all(np.isfinite(values[:3])) and values[1] > 0 and values[3] == 1


# ----------------------------------------------------------------------------------------------- 3stage CLI
def _train(dataset, out, env, extra=()):
    args = [sys.executable, os.path.join(ROOT, "train_tpu.py"), "--fold", "0", "--recipe", "3stage",
            "--tfrecords", dataset["records"], "--out", out, "--quiet",
            *[a for s in [*SETTINGS, "train.epochs=2", *extra] for a in ("--set", s)]]
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_3stage_each_stage_resumes_after_a_kill_then_the_kernel_serves_the_final_model(dataset, tmp_path):
    """Stage 3 here is ``train.finetune_recipe=aux_seg`` with tip maps (the plain finetune stage's weights and
    wiring: the two tests above): the decoder's run folder resumes and serves like the others."""
    out = str(tmp_path / "run")
    killing = _env(RANZCR_TF_KILL_AFTER_EPOCH="0")  # SIGKILL after epoch 0's backup, in every fit
    decoded = ("train.finetune_recipe=aux_seg", "train.tip_loss_weight=1.0")
    outputs = []
    for stage in stages.STAGES:  # each run: the stage before resumes and finishes, this one is killed mid-stage
        done = _train(dataset, out, killing, decoded)
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == -9, outputs[-1][-3000:]
        assert os.path.exists(os.path.join(out, stage, "fold0", "backup", "stage0"))
        assert not os.path.exists(os.path.join(out, stage, "fold0", "metrics.json"))
    done = _train(dataset, out, killing, decoded)  # the finetune stage resumes at epoch 1 and finishes
    outputs.append(done.stdout + done.stderr)
    assert done.returncode == 0, outputs[-1][-3000:]
    for index, stage in enumerate(stages.STAGES):
        assert "resumed from" in outputs[index + 1].split(f"stage {index + 1} of 3")[1].split("stage ")[0]
        folder = os.path.join(out, stage, "fold0")
        log = pd.read_csv(os.path.join(folder, "log.csv"))
        assert log["epoch"].tolist() == [0, 1], stage  # each epoch once: the killed epoch is not repeated
        with open(os.path.join(folder, "metrics.json")) as handle:
            assert np.isfinite(json.load(handle)["val_auc"])
    assert "fold 0 already finished" in outputs[-1].split("stage 2 of 3")[1]  # finished stages are skipped
    assert {"feature_loss", "classification_loss"} <= set(pd.read_csv(os.path.join(out, "student", "fold0", "log.csv")))
    finetune_log = pd.read_csv(os.path.join(out, "finetune", "fold0", "log.csv"))
    assert {"mask_loss", "tip_loss"} <= set(finetune_log) and np.isfinite(finetune_log["tip_loss"]).all()
    assert "tip_loss_weight" not in outputs[-1]  # the tip term is trained by stage 3: no "unused" note
    for stage, source in (("student", "teacher"), ("finetune", "student")):  # resumes keep the stage they start from
        with open(os.path.join(out, stage, "fold0", "identity.json")) as handle, \
                open(os.path.join(out, source, "fold0", "best.json")) as best:
            assert json.load(handle)["derived"]["source_best"] == json.load(best)
    teacher_best = models.load_model(os.path.join(out, "teacher", "fold0", "best.keras"))
    assert set(teacher_best.input) == {"image", "masks"}
    final = models.load_model(os.path.join(out, "finetune", "fold0", "best.keras"))
    assert final.input_shape == (None, SIZE, SIZE, 1) and final.output.shape == (None, len(LABELS))

    from ranzcr_tf.serve import kernel
    from ranzcr_tf.serve.modelio import discover_models

    found = discover_models([out])
    assert [f.path for spec in found for f in spec.folds] == [os.path.join(out, "finetune", "fold0", "best.keras")]
    sub = str(tmp_path / "submission.csv")
    parsed = kernel.build_parser().parse_args(["--data-dir", dataset["raw"], "--models", out, "--out", sub,
                                               "--no-progress", "--workers", "1"])
    parsed.clock = None
    kernel.run(parsed)
    frame = pd.read_csv(sub)
    assert len(frame) == 6 and list(frame.columns[1:]) == list(LABELS)
    assert np.isfinite(frame[list(LABELS)].to_numpy()).all()
    assert glob.glob(os.path.join(out, "*", "fold0", "oof.csv")) and masks.recipe_data("student").annotated_only
