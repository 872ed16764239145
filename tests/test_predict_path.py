"""One prediction function: validation (fit's Validation callback), OOF writing and the kernel predict through
``model.predict.predict_eval`` and give identical numbers for the same saved model and the same records."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
from helpers_infer import write_run
from helpers_train import write_tiny_records

from ranzcr_tf.config import Config, PreprocessConfig
from ranzcr_tf.labels import ID_COLUMN, LABELS, SUBMISSION_COLUMNS
from ranzcr_tf.model import predict as model_predict
from ranzcr_tf.prep import records
from ranzcr_tf.prep.shard_plan import preprocess_settings
from ranzcr_tf.prep.shard_writer import write_manifest
from ranzcr_tf.serve import kernel

SETTINGS = PreprocessConfig(image_size=32)


def test_validation_and_kernel_predictions_are_identical_and_come_from_one_function(tmp_path, monkeypatch):
    import keras

    from ranzcr_tf.model.build import build_model
    from ranzcr_tf.pipeline.data import build_eval_dataset
    from ranzcr_tf.serve.modelio import discover_models, load_fold_model
    from ranzcr_tf.train.callbacks import RunFlags, Validation

    train_records = str(tmp_path / "records")
    write_tiny_records(train_records, num_folds=2, per_fold=13, size=32, seed=4)
    keras.utils.set_random_seed(3)
    model_cfg = Config().model
    model_cfg.backbone, model_cfg.weights, model_cfg.output = "compact_cnn", "none", "logits"
    model = build_model(model_cfg, 32)
    run = write_run(str(tmp_path / "runs"), "cnn", [model], SETTINGS, output="logits", batch_size=5)
    fold = discover_models([run])[0].folds[0]
    cfg = fold.cfg

    calls = []
    original = model_predict.predict_eval

    def recording(*args, **kwargs):
        calls.append(args[1].split)
        return original(*args, **kwargs)

    monkeypatch.setattr(model_predict, "predict_eval", recording)

    # Validation as fit computes it: the saved model, fold 0's records, padded batches of infer.batch_size.
    eval_data = build_eval_dataset(cfg, train_records, "valid", cfg.infer.batch_size, fold=0, with_targets=False)
    assert eval_data.num_padding > 0  # 13 rows in batches of 5: the padding must drop out
    callback = Validation(eval_data, from_logits=True, placement=None, flags=RunFlags(), verbose=False)
    callback.set_model(load_fold_model(fold))
    logs = {}
    callback.on_epoch_end(0, logs)
    validation = callback.probabilities
    assert validation.shape == (13, 11) and np.isfinite(logs["val_auc"])

    # The kernel on the same records, presented as the test split, rows listed in another order.
    kernel_records = tmp_path / "test_records"
    (kernel_records / "test").mkdir(parents=True)
    shards = records.list_shards(train_records, records.TRAIN_DIR, [0])
    names = []
    for index, path in enumerate(shards):
        name = records.shard_name(None, index, records.parse_shard_name(path)["count"])
        shutil.copy(path, kernel_records / "test" / name)
        names.append(f"test/{name}")
    write_manifest(str(kernel_records), preprocess=preprocess_settings(SETTINGS), image_size=32, num_folds=0,
                   num_train=0, num_test=13, shards={"train": [], "test": names}, skipped=[])
    ids = list(eval_data.ids)[::-1]
    sample = tmp_path / "sample"
    sample.mkdir()
    pd.DataFrame({ID_COLUMN: ids, **{label: 0.5 for label in LABELS}})[list(SUBMISSION_COLUMNS)].to_csv(
        sample / "sample_submission.csv", index=False)
    args = kernel.build_parser().parse_args(["--data-dir", str(sample), "--tfrecords", str(kernel_records),
                                             "--models", run, "--tta", "identity", "--out",
                                             str(tmp_path / "sub.csv"), "--max-minutes", "0", "--no-progress"])
    result = kernel.run(args)
    by_id = dict(zip(result["ids"], result["probabilities"]))
    from_kernel = np.array([by_id[sid] for sid in eval_data.ids])

    assert calls == ["valid", "test"]  # both went through the one function
    assert np.array_equal(from_kernel, validation.astype(np.float64))
    assert len(np.unique(validation[:, 0])) > 1  # a real model: the rows differ, so a row mix-up would show
