"""Mixed-precision policy by accelerator: bfloat16 on TPU, float16 on GPU, float32 on CPU.

    name = choose_policy(cfg.model, accelerator="tpu")   # "mixed_bfloat16" unless model.mixed_precision says otherwise
    apply_policy(name)                                   # before build_model

Under ``mixed_float16`` Keras 3's ``model.compile`` wraps the optimizer in a ``LossScaleOptimizer``
itself; the model's head and outputs stay float32 (see ``models.build_model``).
"""

from __future__ import annotations

import keras

from ranzcr_tf.config import ModelConfig

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
AUTO_POLICY = {"tpu": "mixed_bfloat16", "gpu": "mixed_float16", "cpu": "float32"}


def choose_policy(model_cfg: ModelConfig, accelerator: str) -> str:
    """The dtype policy name: ``model_cfg.mixed_precision`` unless it is ``"auto"``, then by ``accelerator``.

    ``accelerator``: ``"tpu"``, ``"gpu"`` or ``"cpu"`` (``Placement.accelerator``, from
    ``device.detect_accelerator``; model code does not look at devices itself).
    """
    accelerator = str(accelerator).lower()
    if accelerator not in AUTO_POLICY:
        raise ValueError(f"accelerator {accelerator!r}: expected one of {', '.join(AUTO_POLICY)}")
    if model_cfg.mixed_precision == "auto":
        return AUTO_POLICY[accelerator]
    if model_cfg.mixed_precision not in POLICIES:
        raise ValueError(f"model.mixed_precision = {model_cfg.mixed_precision!r}: expected auto or one of {POLICIES}")
    return model_cfg.mixed_precision


def apply_policy(name: str) -> str:
    """Set Keras' global dtype policy (affects models built afterwards); returns the name."""
    if name not in POLICIES:
        raise ValueError(f"dtype policy {name!r}: expected one of {', '.join(POLICIES)}")
    keras.mixed_precision.set_dtype_policy(name)
    return name

