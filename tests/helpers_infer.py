"""Run folders holding tiny Keras models with known outputs, for the inference and kernel tests.

Models use built-in layers only (they load in safe mode without custom objects):

- ``asymmetry_model``: logits ``z_c = slope_c * (mean(left half) - mean(right half)) / 255 + bias_c``, so a
  horizontal flip turns ``d`` into ``-d`` and TTA averages ``sigmoid(slope d + b)`` and ``sigmoid(-slope d + b)``.
- ``constant_model``: the same probabilities ``p`` for every image.
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np

from ranzcr_tf.config import Config, PreprocessConfig, save_config
from ranzcr_tf.labels import LABELS, NUM_CLASSES
from ranzcr_tf.prep import records
from ranzcr_tf.prep.preprocess import preprocess_file

SLOPES = np.linspace(-6.0, 6.0, NUM_CLASSES)
BIASES = np.linspace(-1.0, 1.0, NUM_CLASSES)


def asymmetry_model(size: int, channels: int = 1, slopes=SLOPES, biases=BIASES, output: str = "logits"):
    inputs = keras.Input((size, size, channels), name="image")
    x = keras.layers.Flatten()(inputs)
    half = np.zeros((size, size, channels), np.float32)
    half[:, : size // 2] = 1.0
    half[:, size - size // 2:] = -1.0  # odd sizes: the middle column counts on neither side
    per_pixel = half.reshape(-1, 1) / (255.0 * channels * size * (size // 2))
    dense = keras.layers.Dense(NUM_CLASSES, activation="sigmoid" if output == "probabilities" else None)
    outputs = dense(x)
    dense.set_weights([(per_pixel * np.asarray(slopes)[None]).astype(np.float32), np.asarray(biases, np.float32)])
    return keras.Model(inputs, outputs)


def constant_model(size: int, probs, channels: int = 1, output: str = "probabilities"):
    probs = np.asarray(probs, np.float64)
    inputs = keras.Input((size, size, channels), name="image")
    x = keras.layers.Flatten()(inputs)
    dense = keras.layers.Dense(NUM_CLASSES, activation="sigmoid" if output == "probabilities" else None)
    outputs = dense(x)
    dense.set_weights([np.zeros((size * size * channels, NUM_CLASSES), np.float32),
                       np.log(probs / (1 - probs)).astype(np.float32)])
    return keras.Model(inputs, outputs)


def write_run(root: str, name: str, folds: list, settings: PreprocessConfig, output: str = "logits",
              channels: int = 1, batch_size: int = 4, model_image_size: int = 0, tta=None) -> str:
    """``root/name/fold{k}/`` with best.keras, config.yaml and preprocess.json (as training writes them)."""
    run = os.path.join(root, name)
    for index, model in enumerate(folds):
        folder = os.path.join(run, f"fold{index}")
        os.makedirs(folder, exist_ok=True)
        model.save(os.path.join(folder, "best.keras"))
        cfg = Config()
        cfg.preprocess = dataclasses.replace(settings)
        cfg.model.output = output
        cfg.model.input_channels = channels
        cfg.model.backbone = "compact_cnn"
        cfg.data.image_size = model_image_size
        cfg.infer.batch_size = batch_size
        if tta is not None:
            cfg.infer.tta = list(tta)
        save_config(cfg, os.path.join(folder, "config.yaml"))
        info = {**dataclasses.asdict(settings), "decoder": records.SOURCE_DECODER, "stored_dct_method": records.DCT_METHOD,
                "stored_image_size": settings.image_size, "model_image_size": model_image_size or settings.image_size,
                "input_channels": channels, "labels": list(LABELS), "model_output": output}
        with open(os.path.join(folder, "preprocess.json"), "w") as fh:
            json.dump(info, fh)
    return run


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def stored_pixels(path: str, settings: PreprocessConfig) -> np.ndarray:
    """What the model sees for a raw image: the converter's preprocessing, then the one decoder."""
    return records.decode_image_numpy(preprocess_file(path, settings)[0]).astype(np.float64)


def asymmetry(pixels: np.ndarray) -> float:
    size = pixels.shape[1]
    return (pixels[:, : size // 2].mean() - pixels[:, size - size // 2:].mean()) / 255.0


def expected_asymmetry_probs(d: float, views=("identity", "hflip"), slopes=SLOPES, biases=BIASES) -> np.ndarray:
    """The TTA mean of the asymmetry model's probabilities for an image with asymmetry ``d``."""
    per_view = [sigmoid(np.asarray(slopes) * (d if v == "identity" else -d) + np.asarray(biases)) for v in views]
    return np.mean(per_view, axis=0)
