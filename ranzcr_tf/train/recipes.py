"""Training recipes: what ``train.recipe`` changes in a fold's training (``fit._train_fold`` calls these).

============  =========================================================================================
``plain``     today's classifier: image -> 11 outputs, the configured classification loss (``loss.*``)
``aux_seg``   the same classifier plus a light FPN decoder (``model.decoder``) predicting per-family line
              masks at 1/4 resolution, trained with Dice + BCE on annotated studies
              (``train.mask_loss_weight``, ``train.mask_line_width``); the decoder is not part of
              ``best.keras``: validation, OOF and the kernel use the plain classifier inside it
============  =========================================================================================

The training data follow the recipe by themselves (``data.build_train_dataset`` reads ``train.recipe``:
aux_seg batches carry ``{"target", "mask", "has_mask"}``).
"""

from __future__ import annotations

import keras

from ranzcr_tf.config import Config
from ranzcr_tf.labels import NUM_CLASSES

RECIPES = ("plain", "aux_seg")


def build_training_model(cfg: Config, image_size: int, positives, num_train: int, *, from_logits: bool):
    """``(model, loss)`` to compile for ``cfg.train.recipe``; build under the placement's scope.

    ``loss`` is None for aux_seg: its model computes its own loss (``AuxSegModel.compute_loss``).
    """
    from ranzcr_tf.model import build as models
    from ranzcr_tf.model import losses

    classifier = models.build_model(cfg.model, image_size)
    classification_loss = losses.build_loss(cfg.loss, positives, num_train, from_logits=from_logits)
    if cfg.train.recipe == "plain":
        return classifier, classification_loss
    if cfg.train.recipe == "aux_seg":
        from ranzcr_tf.model.decoder import build_aux_seg_model
        from ranzcr_tf.pipeline.masks import mask_size

        mask_size(image_size)  # image size divisible by 32, else a clear ValueError
        model = build_aux_seg_model(classifier, cfg.model.backbone, classification_loss,
                                    mask_loss_weight=cfg.train.mask_loss_weight)
        return model, None
    raise ValueError(f"train.recipe = {cfg.train.recipe!r}; expected one of {', '.join(RECIPES)}")


def symbolic_targets(cfg: Config, image_size: int):
    """The symbolic target structure of one batch of the recipe (for ``placement.prepare_model``)."""
    if cfg.train.recipe != "aux_seg":
        return None
    from ranzcr_tf.pipeline.masks import NUM_FAMILIES, mask_size

    side = mask_size(image_size)
    return {"target": keras.KerasTensor((1, NUM_CLASSES), dtype="float32"),
            "mask": keras.KerasTensor((1, side, side, NUM_FAMILIES), dtype="uint8"),
            "has_mask": keras.KerasTensor((1,), dtype="float32")}
