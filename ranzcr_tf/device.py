"""What this process computes on, and keeping TensorFlow off the accelerators: one owner for both.

    device.keras_backend()            # "tensorflow" | "jax"
    device.detect_accelerator()       # "tpu" | "gpu" | "cpu"
    device.hide_accelerators_from_tf()  # JAX backend: tf.data only, JAX owns the GPUs/TPUs

Training's placement (``train.placement``), the precision policy it picks, the pipeline's image dtype
(``pipeline.data``) and the kernel all ask these functions, so they cannot disagree. Keras, JAX and
TensorFlow are imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

ACCELERATOR_OF_JAX_PLATFORM = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


def keras_backend() -> str:
    """The Keras backend of this process (``KERAS_BACKEND``, read by Keras at import)."""
    import keras

    return keras.backend.backend()


def detect_accelerator() -> str:
    """``"tpu"``, ``"gpu"`` or ``"cpu"``: what the Keras backend computes on in this process.

    The one place that decides it (the placement, the precision policy and the image dtype all follow).
    TensorFlow: a TPU strategy in scope or TPU cores connected to this process -> tpu; else a GPU that
    TensorFlow may use -> gpu. Listing connected TPU cores starts TensorFlow's runtime, after which a
    ``MultiWorkerMirroredStrategy`` can no longer be created, so ``train.placement.choose_placement`` asks
    only after creating its strategy. JAX: the platform of the first JAX device.
    """
    if keras_backend() == "jax":
        import jax

        return ACCELERATOR_OF_JAX_PLATFORM.get(jax.devices()[0].platform, "cpu")
    import tensorflow as tf

    if tf.distribute.has_strategy() and "TPU" in type(tf.distribute.get_strategy()).__name__:
        return "tpu"
    try:
        if tf.config.list_logical_devices("TPU"):
            return "tpu"
        if tf.config.get_visible_devices("GPU"):
            return "gpu"
    except RuntimeError:
        pass
    return "cpu"


def hide_accelerators_from_tf() -> None:
    """Keep TensorFlow (used only for tf.data) off the GPUs/TPUs so the JAX backend owns them.

    Call before anything initialises TensorFlow's devices; afterwards it is too late and a warning is
    logged (TF would already have reserved GPU memory).
    """
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError) as exc:  # devices already initialised, or no such device type
            if "initialized" in str(exc).lower():
                log.warning("could not hide %s devices from TensorFlow: %s", kind, exc)
