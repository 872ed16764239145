"""The compiled training step: optimizer and ``model.compile`` for a placement.

Kept apart from ``fit`` (which reads records through tf.data) so the step imports no TensorFlow: the
device check and ``bench_step.py`` build it on Keras-JAX where TensorFlow is not installed
(``tests/test_device_check.py``).
"""

from __future__ import annotations

import keras

from ranzcr_tf.config import Config
from ranzcr_tf.train import recipes
from ranzcr_tf.train.placement import prepare_model


def build_optimizer(train_cfg, learning_rate) -> keras.optimizers.Optimizer:
    """Adam or AdamW with Keras' built-in weight EMA and gradient accumulation as configured."""
    kwargs = dict(learning_rate=learning_rate, use_ema=bool(train_cfg.use_ema), ema_momentum=train_cfg.ema_momentum,
                  gradient_accumulation_steps=train_cfg.grad_accum_steps if train_cfg.grad_accum_steps > 1 else None)
    if train_cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(weight_decay=train_cfg.weight_decay, **kwargs)
    return keras.optimizers.Adam(**kwargs)



def compile_for_training(model: keras.Model, cfg: Config, loss, learning_rate, placement, image_size: int):
    """Compile ``model`` (built under ``placement.scope()``) with a fresh optimizer from ``build_optimizer``;
    returns the optimizer. ``distribute.prepare_model`` then fits the model to the strategy (BatchNorm
    synchronised across GPU/CPU replicas, Keras 3.15 workarounds); call it again after changing what is
    trainable."""
    with placement.scope():
        optimizer = build_optimizer(cfg.train, learning_rate)
        model.compile(optimizer=optimizer, loss=loss, steps_per_execution=cfg.train.steps_per_execution,
                      jit_compile=bool(cfg.train.jit_compile) if placement.strategy is not None else "auto")
    prepare_model(model, placement, (image_size, image_size, cfg.model.input_channels), num_classes=cfg.task.num_classes,
                  targets=recipes.symbolic_targets(cfg, image_size), inputs=recipes.symbolic_inputs(cfg, image_size))
    return optimizer
