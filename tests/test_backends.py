"""Forward pass, loss and metrics give the same numbers on the TensorFlow and the JAX backend.

The backend is fixed per process, so the JAX side runs in a subprocess (KERAS_BACKEND=jax) that loads
the model saved here (in safe mode) and the inputs from temporary files, and writes its numbers back.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from ranzcr_tf.config import LossConfig, ModelConfig
from ranzcr_tf.model.build import build_model
from ranzcr_tf.model.losses import build_loss
from ranzcr_tf.model.metrics import competition_metric

JAX_SIDE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras
    assert keras.backend.backend() == "jax", keras.backend.backend()
    from ranzcr_tf.model.losses import WeightedBinaryCrossentropy
    from ranzcr_tf.model.metrics import competition_metric
    from ranzcr_tf.model.build import load_model

    # Loading creates every variable with its initializer before the saved values overwrite it, and JAX
    # compiles one random kernel per variable shape (seconds each on a busy CI core). The initial values
    # are discarded, so draw them with NumPy here; everything compared below is computed by JAX.
    import jax.numpy as jnp
    import keras.src.backend.jax.random as jax_random
    _np_rng = np.random.default_rng(0)
    jax_random.uniform = lambda shape, minval=0.0, maxval=1.0, dtype=None, seed=None: jnp.asarray(
        _np_rng.uniform(minval, maxval, shape), dtype=dtype or "float32")
    jax_random.normal = lambda shape, mean=0.0, stddev=1.0, dtype=None, seed=None: jnp.asarray(
        _np_rng.normal(mean, stddev, shape), dtype=dtype or "float32")
    jax_random.truncated_normal = lambda shape, mean=0.0, stddev=1.0, dtype=None, seed=None: jnp.asarray(
        np.clip(_np_rng.normal(mean, stddev, shape), mean - 2 * stddev, mean + 2 * stddev), dtype=dtype or "float32")

    folder = sys.argv[1]
    data = np.load(folder + "/inputs.npz")
    with open(folder + "/loss.json") as fh:
        loss = keras.losses.deserialize(json.load(fh))
    assert isinstance(loss, WeightedBinaryCrossentropy)
    model = load_model(folder + "/model.keras")
    logits = model.predict(data["images"], batch_size=16, verbose=0)
    # Loss and metrics on the TensorFlow side's logits, so that only the backends differ.
    tf_logits = data["tf_logits"]
    np.savez(folder + "/jax.npz", logits=logits, loss=float(loss(data["targets"], tf_logits)),
             own_loss=float(loss(data["targets"], logits)), score=competition_metric(data["targets"], tf_logits)[0])
""")


@pytest.mark.slow
def test_tensorflow_and_jax_agree(tmp_path):
    assert keras.backend.backend() == "tensorflow"
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (16, 32, 32, 1), dtype=np.uint8)
    targets = np.tile(np.array([[0], [1]], "float32"), (8, 11))  # both classes in every column
    targets[rng.random(targets.shape) < 0.3] = 1.0

    model = build_model(ModelConfig(backbone="efficientnet_b0", input_channels=1, pooling="gem", head="per_group"), 32)
    model.get_layer("gem_pool").p.assign(2.5)
    # Non-trivial BatchNorm statistics so inference mode is exercised on both sides.
    for layer in model.get_layer("backbone").layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            mean, var = layer.moving_mean.shape, layer.moving_variance.shape
            layer.moving_mean.assign(rng.normal(0, 0.1, mean).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, var).astype("float32"))
    # Scale the head up: a random backbone's features are tiny, and logits of order 1 make the loss telling.
    for layer in model.layers:
        if layer.name.startswith("head_") and layer.weights:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel / np.abs(kernel).mean() * 1e4, bias])
    model.save(str(tmp_path / "model.keras"))
    loss = build_loss(LossConfig(name="weighted_bce", label_smoothing=0.05), np.arange(1, 12) * 7, 200, from_logits=True)
    (tmp_path / "loss.json").write_text(json.dumps(keras.losses.serialize(loss)))
    logits = model.predict(images, batch_size=16, verbose=0)
    np.savez(tmp_path / "inputs.npz", images=images, targets=targets, tf_logits=logits)

    tf_side = {"logits": logits, "loss": float(loss(targets, logits)), "score": competition_metric(targets, logits)[0]}

    script = tmp_path / "jax_side.py"
    script.write_text(JAX_SIDE)
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    jax_side = np.load(tmp_path / "jax.npz")

    assert np.std(tf_side["logits"]) > 0.1  # the comparison is not between constants
    # Float32 error scales with the summands (logits here are ~1e4), not with a logit that cancels to near 0,
    # so the absolute tolerance is relative to the largest logit.
    scale = float(np.abs(tf_side["logits"]).max())
    np.testing.assert_allclose(jax_side["logits"], tf_side["logits"], rtol=1e-4, atol=1e-5 * scale)
    assert float(jax_side["loss"]) == pytest.approx(tf_side["loss"], rel=1e-6)
    assert float(jax_side["own_loss"]) == pytest.approx(tf_side["loss"], rel=1e-4)
    assert float(jax_side["score"]) == pytest.approx(tf_side["score"], abs=1e-6)
