"""Training recipes: what ``train.recipe`` changes in a fold's training (``fit.FoldRun`` calls these).

============  =========================================================================================
``plain``     today's classifier: image -> 11 outputs, the configured classification loss (``loss.*``)
``aux_seg``   the same classifier plus a light FPN decoder (``model.decoder``) predicting per-family line
              masks at 1/4 resolution, trained with Dice + BCE on annotated studies
              (``train.mask_loss_weight``, ``train.mask_line_width``), and with ``train.tip_loss_weight`` > 0
              per-family tip heat maps (``pipeline/tips.py``, ``train.tip_sigma``); the decoder is not part of
              ``best.keras``: validation, OOF and the kernel use the plain classifier inside it
``teacher``   stage 1 of 3stage: annotated studies only, input = image + 4 line-mask channels
              (``model.distill.build_teacher_model``), classification loss; validated on the fold's annotated
              studies (with their masks), so its ``val_auc`` is not comparable with the others'
``student``   stage 2: annotated studies, image only; classification loss + ``train.distill_weight`` x
              distance (``train.distill_loss`` mse|cosine) between its and the frozen teacher's feature maps
              at ``train.distill_layer``; the teacher is ``train.teacher/fold{k}/best.keras``; ``best.keras``
              is the image-only classifier, validated on the whole fold
``finetune``  stage 3: all studies, the classification loss, weights from ``train.init_from/fold{k}/best.keras``
              (``aux_seg`` starts from there too when ``train.init_from`` is set: 3stage with
              ``train.finetune_recipe: aux_seg``)
``3stage``    not a fold recipe: ``train.stages`` runs teacher -> student -> finetune into ``OUT/<stage>/``
============  =========================================================================================

The training data follow the recipe by themselves (``data.build_train_dataset`` reads ``train.recipe``;
``pipeline.masks.RECIPE_DATA`` says which studies and where the masks go).
"""

from __future__ import annotations

import keras

from ranzcr_tf.config import Config
from ranzcr_tf.labels import NUM_FAMILIES, mask_size

FOLD_RECIPES = ("plain", "aux_seg", "teacher", "student", "finetune")  # config.RECIPES also has 3stage


def build_training_model(cfg: Config, image_size: int, positives, num_train: int, *, from_logits: bool, fold: int = 0):
    """``(model, loss)`` to compile for ``cfg.train.recipe``; build under the placement's scope.

    ``loss`` is None for aux_seg and student: their models compute their own loss (``compute_loss``). ``fold``
    picks the teacher's (student) or the starting run's (finetune) ``fold{k}/best.keras``.
    """
    from ranzcr_tf.model import build as models
    from ranzcr_tf.model import losses

    recipe = cfg.train.recipe
    if recipe not in FOLD_RECIPES:
        raise ValueError(f"train.recipe = {recipe!r} trains no single fold; expected one of {', '.join(FOLD_RECIPES)}")
    classification_loss = losses.build_loss(cfg.loss, positives, num_train, from_logits=from_logits,
                                           num_classes=cfg.task.num_classes)
    if recipe == "teacher":
        from ranzcr_tf.model.distill import build_teacher_model

        return build_teacher_model(cfg.model, image_size, mask_size(image_size)), classification_loss
    classifier = models.build_model(cfg.model, image_size, cfg.task.num_classes, groups=cfg.task.groups)
    if recipe == "plain":
        return classifier, classification_loss
    if cfg.train.init_from and recipe in ("finetune", "aux_seg"):
        _copy_weights(_load_run_model(cfg.train.init_from, fold, "train.init_from"), classifier, cfg.train.init_from)
    if recipe == "finetune":
        return classifier, classification_loss
    if recipe == "student":
        from ranzcr_tf.model.distill import build_student_model

        teacher = _load_run_model(cfg.train.teacher, fold, "train.teacher")
        if not isinstance(teacher.input, dict) or "masks" not in teacher.input:
            raise ValueError(f"train.teacher = {cfg.train.teacher}: its fold{fold}/best.keras takes no masks input; "
                             "give the run folder of a train.recipe=teacher run")
        model = build_student_model(classifier, teacher, classification_loss, layer_name=cfg.train.distill_layer,
                                    distance=cfg.train.distill_loss, weight=cfg.train.distill_weight)
        return model, None
    from ranzcr_tf.model.decoder import build_aux_seg_model

    mask_size(image_size)  # image size divisible by 32, else a clear ValueError
    model = build_aux_seg_model(classifier, cfg.model.backbone, classification_loss,
                                mask_loss_weight=cfg.train.mask_loss_weight, tip_loss_weight=cfg.train.tip_loss_weight,
                                seg_attention=cfg.model if cfg.model.seg_attention else None)
    return model, None


def run_model_path(run_dir: str, fold: int) -> str:
    """``run_dir/fold{k}/best.keras``: the model a later stage starts from."""
    from ranzcr_tf import io_utils, runs

    return io_utils.join(runs.fold_dir(run_dir, fold), runs.MODEL_FILE)


def source_identity(cfg: Config, fold: int) -> dict:
    """The checkpoint a student or finetune run starts from, by its ``best.json`` (epoch and AUC of that
    ``best.keras``), for ``identity.json``: a student resumed with a retrained teacher is refused."""
    import json

    from ranzcr_tf import io_utils, runs

    source = {"student": cfg.train.teacher, "finetune": cfg.train.init_from, "aux_seg": cfg.train.init_from}.get(
        cfg.train.recipe)
    if not source:
        return {}
    path = io_utils.join(runs.fold_dir(source, fold), runs.BEST_INFO_FILE)
    return {"source_best": json.loads(io_utils.read_text(path)) if io_utils.exists(path) else None}


def _load_run_model(run_dir: str, fold: int, setting: str) -> keras.Model:
    from ranzcr_tf import io_utils
    from ranzcr_tf.model.files import load_model_file

    path = run_model_path(run_dir, fold)
    if not io_utils.exists(path):
        raise ValueError(f"{setting} = {run_dir}: no {path}; train that stage for fold {fold} first")
    return load_model_file(path)


def _copy_weights(source: keras.Model, target: keras.Model, run_dir: str) -> None:
    """Every weight of ``source`` into ``target`` (same architecture), else a ValueError saying what differs."""
    have = [tuple(w.shape) for w in source.weights]
    want = [tuple(w.shape) for w in target.weights]
    if have != want:
        raise ValueError(f"train.init_from = {run_dir}: its model ({len(have)} weights) does not match model.* of this "
                         f"run ({len(want)} weights): use the same backbone, head, pooling and image size")
    target.set_weights(source.get_weights())


def symbolic_targets(cfg: Config, image_size: int):
    """The symbolic target structure of one batch of the recipe (for ``placement.prepare_model``)."""
    if cfg.train.recipe not in ("aux_seg", "student"):
        return None
    side = mask_size(image_size)
    targets = {"target": keras.KerasTensor((1, cfg.task.num_classes), dtype="float32"),
               "mask": keras.KerasTensor((1, side, side, NUM_FAMILIES), dtype="uint8"),
               "has_mask": keras.KerasTensor((1,), dtype="float32")}
    if cfg.train.recipe == "aux_seg" and cfg.train.tip_loss_weight > 0:
        targets["tip"] = keras.KerasTensor((1, side, side, NUM_FAMILIES), dtype="uint8")
    return targets


def symbolic_inputs(cfg: Config, image_size: int, image_dtype: str = "float32"):
    """The symbolic input structure of one batch when it is not one image (the teacher's), else None."""
    if cfg.train.recipe != "teacher":
        return None
    side = mask_size(image_size)
    channels = cfg.model.input_channels
    return {"image": keras.KerasTensor((1, image_size, image_size, channels), dtype=image_dtype),
            "masks": keras.KerasTensor((1, side, side, NUM_FAMILIES), dtype="uint8")}
