"""The tf.data pipelines on tiny real TFRecords written with the project's schema (records.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from ranzcr_tf.config import Config
from ranzcr_tf.labels import NUM_CLASSES
from ranzcr_tf.pipeline import data
from ranzcr_tf.prep import records

SIZE = 32
# fold -> records per shard; fold 1 has a single shard (fewer files than input pipelines).
TRAIN_LAYOUT = {0: [6, 4], 1: [7], 2: [5, 3]}
TEST_LAYOUT = [6, 4]


def _image(rng, size=SIZE):
    """A smooth random image (compresses like a radiograph) with a unique fine texture."""
    low = rng.uniform(30, 220, (4, 4)).astype(np.float32)
    image = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 6, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_records(root, size=SIZE, train_layout=TRAIN_LAYOUT, test_layout=TEST_LAYOUT, seed=0):
    """Shards + manifest in the converter's layout; returns the source table {id: (fold, target, pixels)}."""
    rng = np.random.default_rng(seed)
    table = {}
    os.makedirs(os.path.join(root, "train"))
    os.makedirs(os.path.join(root, "test"))
    fold_counts, fold_positives = {}, {}

    def write_shard(path, fold, count, is_test):
        with tf.io.TFRecordWriter(path) as writer:
            for _ in range(count):
                uid = f"1.2.826.{len(table):04d}"
                pixels = _image(rng, size)
                jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
                target = None if is_test else (rng.random(NUM_CLASSES) < 0.3).astype(np.float32)
                writer.write(records.serialize_example(jpeg, uid, target=target, fold=fold, height=size, width=size,
                                                       orig_height=size * 4, orig_width=size * 4))
                stored = records.decode_image_numpy(jpeg)
                table[uid] = (fold, np.zeros(NUM_CLASSES, np.float32) if target is None else target, stored)

    for fold, counts in train_layout.items():
        for index, count in enumerate(counts):
            write_shard(os.path.join(root, "train", records.shard_name(fold, index, count)), fold, count, False)
        targets = np.array([t for f, t, _ in table.values() if f == fold])
        fold_counts[str(fold)] = int(sum(counts))
        fold_positives[str(fold)] = [int(v) for v in targets.sum(axis=0)]
    for index, count in enumerate(test_layout):
        write_shard(os.path.join(root, "test", records.shard_name(None, index, count)), -1, count, True)
    manifest = {"schema_version": 1, "image_size": size, "num_folds": len(train_layout),
                "fold_counts": fold_counts, "fold_positives": fold_positives, "preprocess": {"image_size": size}}
    with open(os.path.join(root, "manifest.json"), "w") as fh:
        json.dump(manifest, fh)
    return table


def _key(pixels):
    return hashlib.sha1(np.ascontiguousarray(np.asarray(pixels).reshape(SIZE, SIZE))).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("records"))
    return root, write_records(root)


def _cfg(**augment) -> Config:
    cfg = Config()
    cfg.data.shuffle_buffer = 64
    for key, value in augment.items():
        setattr(cfg.augment, key, value)
    return cfg.validate()


def _no_aug_cfg() -> Config:
    cfg = _cfg()
    for name in vars(cfg.augment):
        if name.endswith("_prob"):
            setattr(cfg.augment, name, 0.0)
    return cfg


def test_train_batches_shapes_dtypes_and_ranges(tiny):
    root, _ = tiny
    images, targets = next(iter(data.build_train_dataset(_cfg(), root, fold=0, global_batch_size=4, seed=1)))
    assert images.shape == (4, SIZE, SIZE, 1) and images.dtype == tf.uint8
    assert targets.shape == (4, NUM_CLASSES) and targets.dtype == tf.float32
    assert set(np.unique(targets.numpy())) <= {0.0, 1.0}

    cfg = _cfg()
    cfg.model.input_channels = 3
    ds = data.build_train_dataset(cfg, root, fold=0, global_batch_size=4, seed=1, image_dtype="float32")
    assert ds.element_spec[0].shape == (4, SIZE, SIZE, 3)  # static shapes for TPUs
    images, _ = next(iter(ds))
    images = images.numpy()
    assert images.dtype == np.float32 and 0.0 <= images.min() and images.max() <= 255.0
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # grey expanded at the end


def test_train_pairs_match_source_table_and_skip_validation_fold(tiny):
    root, table = tiny
    by_pixels = {_key(pixels): uid for uid, (_, _, pixels) in table.items()}
    cfg = _no_aug_cfg()
    cfg.data.shuffle_buffer = 4  # a small buffer so that 60 rows surely cover every study
    ds = data.build_train_dataset(cfg, root, fold=1, global_batch_size=5, seed=3)
    seen = set()
    for images, targets in ds.take(12):  # 60 rows: several epochs of the 18 training studies
        for image, target in zip(images.numpy(), targets.numpy()):
            uid = by_pixels[_key(image)]  # every image is a stored image exactly (all probabilities 0)
            fold, source_target, _ = table[uid]
            assert fold != 1
            np.testing.assert_array_equal(target, source_target)
            seen.add(uid)
    assert seen == {uid for uid, (fold, _, _) in table.items() if fold in (0, 2)}


def test_train_never_opens_validation_fold_files(tiny, tmp_path):
    root, _ = tiny
    broken = str(tmp_path / "broken")
    shutil.copytree(root, broken)
    for name in os.listdir(os.path.join(broken, "train")):
        if name.startswith("fold2-"):
            with open(os.path.join(broken, "train", name), "wb") as fh:
                fh.write(b"not a tfrecord" * 100)
    # Opening a corrupted shard fails loudly ...
    with pytest.raises(tf.errors.DataLossError):
        list(data.build_eval_dataset(_cfg(), broken, "valid", 4, fold=2).dataset)
    # ... and training without fold 2 reads several epochs without touching it.
    for _ in data.build_train_dataset(_cfg(), broken, fold=2, global_batch_size=4, seed=0).take(20):
        pass


def test_augmentation_changes_pixels_never_labels(tiny):
    root, _ = tiny
    kwargs = dict(fold=0, global_batch_size=4, seed=7, deterministic=True)
    plain = list(data.build_train_dataset(_cfg(), root, augment=False, **kwargs).take(5))
    augmented = list(data.build_train_dataset(_cfg(hflip_prob=1.0), root, **kwargs).take(5))
    for (x0, y0), (x1, y1) in zip(plain, augmented):
        np.testing.assert_array_equal(y0.numpy(), y1.numpy())
        assert not np.array_equal(x0.numpy(), x1.numpy())


@pytest.mark.parametrize("split,fold", [("valid", 0), ("test", None)])
def test_eval_every_id_once_in_stable_order_padded_to_full_batches(tiny, split, fold):
    root, table = tiny
    ev = data.build_eval_dataset(_cfg(), root, split, 4, fold=fold)
    expected = [uid for uid, (f, _, _) in table.items() if f == (0 if split == "valid" else -1)]
    assert ev.num_examples == 10 and ev.num_batches == 3 and ev.num_padding == 2
    assert sorted(ev.ids) == sorted(expected) and len(set(ev.ids)) == 10

    def rows():
        batches = list(ev.dataset)
        assert len(batches) == 3 and all(x.shape[0] == 4 for x, _ in batches)  # the last one too
        return np.concatenate([x.numpy() for x, _ in batches]), np.concatenate([y.numpy() for _, y in batches])

    images, targets = rows()
    images_again, _ = rows()
    np.testing.assert_array_equal(images, images_again)  # same order on every pass
    assert images.shape[0] == 12 and not images[10:].any() and not targets[10:].any()  # marked padding
    images, targets = ev.unpad(images), ev.unpad(targets)
    assert images.shape[0] == 10
    for uid, image, target, source in zip(ev.ids, images, targets, ev.targets):
        np.testing.assert_array_equal(image[..., 0], table[uid][2])  # row i is ids[i]'s stored image
        np.testing.assert_array_equal(target, table[uid][1])
        np.testing.assert_array_equal(source, table[uid][1])
    with pytest.raises(ValueError, match="steps=3"):
        ev.unpad(images)


def test_eval_options_hflip_weights_and_images_only(tiny):
    root, _ = tiny
    plain = np.concatenate([x for x, _ in data.build_eval_dataset(_cfg(), root, "valid", 4, fold=0).dataset])
    flipped = data.build_eval_dataset(_cfg(), root, "valid", 4, fold=0, tta="hflip", with_targets=False)
    flipped = np.concatenate([x.numpy() for x in flipped.dataset])
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])
    weighted = data.build_eval_dataset(_cfg(), root, "valid", 4, fold=0, with_weights=True)
    weights = np.concatenate([w.numpy() for _, _, w in weighted.dataset])
    np.testing.assert_array_equal(weights, [1.0] * 10 + [0.0] * 2)
    exact = data.build_eval_dataset(_cfg(), root, "test", 5)  # 10 = 2 x 5: no padding at all
    assert exact.num_padding == 0 and sum(int(x.shape[0]) for x, _ in exact.dataset) == 10


def test_decode_for_model_resizes_with_area_and_static_shape(tiny):
    root, table = tiny
    uid = next(iter(table))
    serialized = next(iter(tf.data.TFRecordDataset(records.list_shards(root, "train", [0]))))
    image_bytes = records.parse_example(serialized)[records.IMAGE]
    same = data.decode_for_model(image_bytes, SIZE)
    np.testing.assert_array_equal(same.numpy()[..., 0], table[uid][2])
    small = tf.function(lambda b: data.decode_for_model(b, 16, channels=3))
    assert small.get_concrete_function(tf.TensorSpec([], tf.string)).output_shapes == (16, 16, 3)
    expected = tf.image.resize(table[uid][2][..., None].astype(np.float32), [16, 16], method="area")
    np.testing.assert_array_equal(small(image_bytes).numpy()[..., :1], np.round(expected.numpy()).astype(np.uint8))
    cfg = _cfg()
    cfg.data.image_size = 48  # enlarging (bilinear) through the config
    assert data.build_eval_dataset(cfg, root, "test", 4).dataset.element_spec[0].shape == (4, 48, 48, 1)


def test_training_positive_counts_from_manifest(tiny):
    root, table = tiny
    positives, total = data.training_positive_counts(root, fold=2)
    targets = np.array([t for f, t, _ in table.values() if f in (0, 1)])
    assert total == len(targets) == 17
    np.testing.assert_array_equal(positives, targets.sum(axis=0))


def _graph_ops(ds) -> set:
    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(ds._as_serialized_graph().numpy())
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops |= {node.op for node in function.node_def}
    return ops


def test_pipeline_graph_has_no_python_function_ops(tiny):
    root, _ = tiny
    cfg = _cfg(noise_prob=0.5, blur_prob=0.5, warp="projective")
    train_ops = _graph_ops(data.build_train_dataset(cfg, root, fold=0, global_batch_size=4))
    assert "ImageProjectiveTransformV3" in train_ops and "DecodeJpeg" in train_ops  # the inspection sees maps
    xla_ops = _graph_ops(data.build_train_dataset(_cfg(warp="xla"), root, fold=0, global_batch_size=4))
    assert "GatherV2" in xla_ops and "ImageProjectiveTransformV3" not in xla_ops
    eval_ops = _graph_ops(data.build_eval_dataset(cfg, root, "test", 4, tta="hflip").dataset)
    for ops in (train_ops, xla_ops, eval_ops):
        assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc", "NumpyFunction"}


def test_xla_warp_runs_inside_the_pipeline(tiny):
    root, _ = tiny
    cfg = _cfg(warp="xla", affine_prob=1.0)
    images, targets = next(iter(data.build_train_dataset(cfg, root, fold=0, global_batch_size=4, seed=2)))
    assert images.shape == (4, SIZE, SIZE, 1) and images.dtype == tf.uint8 and targets.shape == (4, NUM_CLASSES)


def test_input_context_shards_by_file_or_by_record(tiny):
    root, table = tiny
    by_pixels = {_key(pixels): uid for uid, (_, _, pixels) in table.items()}

    def ids_seen(fold, pipelines, pipeline_id, batches):
        context = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=pipelines)
        cfg = _no_aug_cfg()
        cfg.data.shuffle_buffer = 4
        ds = data.build_train_dataset(cfg, root, fold=fold, global_batch_size=4, input_context=context, seed=0)
        assert ds.element_spec[0].shape[0] == 4 // pipelines  # per-replica batch
        return {by_pixels[_key(x)] for images, _ in ds.take(batches) for x in images.numpy()}

    # Folds 0 and 1 hold 3 shards: 2 pipelines split by file; 4 pipelines split by record.
    for pipelines in (2, 4):
        shares = [ids_seen(2, pipelines, i, 24) for i in range(pipelines)]
        for i in range(pipelines):
            for j in range(i + 1, pipelines):
                assert not shares[i] & shares[j]
        assert set().union(*shares) == {uid for uid, (f, _, _) in table.items() if f in (0, 1)}


def test_bad_arguments_raise_value_errors(tiny):
    root, _ = tiny
    with pytest.raises(ValueError, match="fold must be"):
        data.build_train_dataset(_cfg(), root, fold=3, global_batch_size=4)
    with pytest.raises(ValueError, match="split must be"):
        data.build_eval_dataset(_cfg(), root, "train", 4, fold=0)
    with pytest.raises(ValueError, match="fold must be"):
        data.build_eval_dataset(_cfg(), root, "valid", 4)
    with pytest.raises(ValueError, match="tta"):
        data.build_eval_dataset(_cfg(), root, "test", 4, tta="vflip")


def test_image_dtype_choice():
    cfg = Config()
    assert data.image_dtype_for(cfg, "tensorflow", "gpu") == tf.uint8
    assert data.image_dtype_for(cfg, "jax", "tpu") == tf.uint8
    assert data.image_dtype_for(cfg, "tensorflow", "tpu") == tf.bfloat16
    cfg.model.mixed_precision = "float32"
    assert data.image_dtype_for(cfg, "tensorflow", "tpu") == tf.float32
    cfg.data.image_dtype = "float32"
    assert data.image_dtype_for(cfg, "tensorflow", "cpu") == tf.float32


def _tiny_model():
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(x))
    model.compile(optimizer="adam", loss=keras.losses.BinaryCrossentropy(from_logits=True))
    return model


def test_short_fit_and_predict_on_tensorflow_backend(tiny):
    root, _ = tiny
    cfg = _cfg()
    model = _tiny_model()
    train = data.build_train_dataset(cfg, root, fold=0, global_batch_size=4, seed=0)
    valid = data.build_eval_dataset(cfg, root, "valid", 4, fold=0, with_weights=True)
    history = model.fit(train, steps_per_epoch=3, epochs=2, validation_data=valid.dataset,
                        validation_steps=valid.num_batches, verbose=0)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["val_loss"]).all()
    test = data.build_eval_dataset(cfg, root, "test", 4, with_targets=False)
    predictions = test.unpad(model.predict(test.dataset, steps=test.num_batches, verbose=0))
    assert predictions.shape == (10, NUM_CLASSES) and len(test.ids) == 10


JAX_FIT = """
import os, sys
os.environ["KERAS_BACKEND"] = "jax"
from ranzcr_tf import device
device.hide_accelerators_from_tf()
from ranzcr_tf.pipeline import data
import keras, numpy as np
from ranzcr_tf.config import Config
assert keras.backend.backend() == "jax"
cfg = Config(); cfg.data.shuffle_buffer = 16
root, size = sys.argv[1], int(sys.argv[2])
train = data.build_train_dataset(cfg, root, fold=0, global_batch_size=4, seed=0)
assert train.element_spec[0].dtype.name == "uint8"
inputs = keras.Input((size, size, 1))
x = keras.layers.Rescaling(1 / 255)(inputs)
x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
x = keras.layers.GlobalAveragePooling2D()(x)
model = keras.Model(inputs, keras.layers.Dense(11)(x))
model.compile(optimizer="adam", loss=keras.losses.BinaryCrossentropy(from_logits=True))
history = model.fit(train, steps_per_epoch=3, epochs=2, verbose=0)
valid = data.build_eval_dataset(cfg, root, "valid", 4, fold=0, with_targets=False)
predictions = valid.unpad(model.predict(valid.dataset, steps=valid.num_batches, verbose=0))
assert predictions.shape == (10, 11), predictions.shape
assert np.isfinite(history.history["loss"]).all()
print("JAX_FIT_OK")
"""


@pytest.mark.slow
def test_short_fit_on_jax_backend(tiny):
    root, _ = tiny
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(JAX_FIT), root, str(SIZE)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "JAX_FIT_OK" in result.stdout, result.stderr[-3000:]


def test_show_grid_cli_writes_png(tiny, tmp_path):
    root, _ = tiny
    path = str(tmp_path / "grid.png")
    from ranzcr_tf.pipeline.__main__ import main

    assert main(["--tfrecords", root, "--fold", "0", "--show", path, "--n", "4", "--set", "augment.hflip_prob=1"]) == 0
    image = cv2.imread(path)
    assert image is not None and image.shape[0] > 100 and image.std() > 1


def test_records_on_a_remote_filesystem_read_like_local_ones(tiny):
    """gs:// paths go through tf.io.gfile and TFRecordDataset; TensorFlow's in-memory ram:// filesystem
    takes the same code path without a network."""
    root, _ = tiny
    remote = f"ram://data-test-{os.getpid()}/records"
    for folder, _, names in os.walk(root):
        rel = os.path.relpath(folder, root)
        tf.io.gfile.makedirs(remote if rel == "." else f"{remote}/{rel}")
        for name in names:
            tf.io.gfile.copy(os.path.join(folder, name), f"{remote}/{name}" if rel == "." else f"{remote}/{rel}/{name}")
    for split, fold in (("valid", 0), ("test", None)):
        local, far = (data.build_eval_dataset(_cfg(), r, split, 4, fold=fold) for r in (root, remote))
        assert list(far.ids) == list(local.ids)
        np.testing.assert_array_equal(np.concatenate([x for x, _ in far.dataset]),
                                      np.concatenate([x for x, _ in local.dataset]))
    np.testing.assert_array_equal(data.training_positive_counts(remote, 0)[0], data.training_positive_counts(root, 0)[0])
    images, targets = next(iter(data.build_train_dataset(_cfg(), remote, 0, 4, seed=0)))
    assert images.shape[0] == 4 and targets.shape == (4, NUM_CLASSES)
