"""``train.recipe: 3stage``: teacher -> student -> finetune for each fold, each stage its own run folder.

    python train_tpu.py --recipe 3stage --fold 0 --out-dir runs/r3    # or --fold all

``OUT/teacher/fold{k}``, ``OUT/student/fold{k}`` and ``OUT/finetune/fold{k}`` are ordinary fold folders
(``runs``: config.yaml, best.keras, log.csv, metrics.json, oof.csv, backup/ ...), each trained by
``fit.train_fold`` with the stage's recipe, so every stage resumes like a plain run: a finished stage is
skipped on rerun, a killed one continues from its backup, ``--restart`` discards the stages of the folds
given. The student reads ``OUT/teacher`` (``train.teacher``), the finetune stage starts from
``OUT/student`` (``train.init_from``): both are set here, for the stage's config only. Epochs per stage:
``train.teacher_epochs``, ``train.student_epochs``, ``train.finetune_epochs`` (0 = ``train.epochs``).
``train.finetune_recipe: aux_seg`` trains stage 3 as ``aux_seg`` (the line-mask decoder, and tip maps with
``train.tip_loss_weight``) from the student's weights; its folder is still ``OUT/finetune``.

``OUT/stages.json`` names the stages and the final one; model discovery (``serve.modelio.discover_models``,
the kernel, ``package``) serves only the final stage of a 3stage folder (``runs.final_stage_dir``): the
image-only finetuned model.
"""

from __future__ import annotations

import copy

from ranzcr_tf import io_utils
from ranzcr_tf.config import Config
from ranzcr_tf.runs import STAGES_FILE
from ranzcr_tf.train.fit import train_fold

STAGES = ("teacher", "student", "finetune")
FINAL_STAGE = STAGES[-1]


def stage_config(cfg: Config, stage: str, out_dir: str) -> Config:
    """The config of one stage: its recipe, epochs and the run folders it reads."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    staged = copy.deepcopy(cfg)
    staged.train.recipe = stage
    staged.train.epochs = int(getattr(cfg.train, f"{stage}_epochs") or cfg.train.epochs)
    staged.train.frozen_epochs = min(staged.train.frozen_epochs, staged.train.epochs)
    for name in STAGES:  # the stage's count is train.epochs now: the run folder records the stage alone
        setattr(staged.train, f"{name}_epochs", 0)
    if stage == "student":
        staged.train.teacher = stage_dir(out_dir, "teacher")
    if stage == "finetune":  # from the student's weights; train.finetune_recipe=aux_seg adds the line-mask decoder
        staged.train.init_from = stage_dir(out_dir, "student")
        staged.train.recipe = cfg.train.finetune_recipe
    staged.validate()
    return staged


def stage_dir(out_dir: str, stage: str) -> str:
    return io_utils.join(out_dir, stage)


def train_three_stages(cfg: Config, tfrecords_dir: str, folds: list[int], out_dir: str, placement, *,
                       verbose: int = 1, restart: bool = False) -> list[dict]:
    """Each fold in turn through the three stages; returns the final stage's metrics per fold."""
    configs = {stage: stage_config(cfg, stage, out_dir) for stage in STAGES}  # every setting checked up front
    if placement.is_chief:
        io_utils.makedirs(out_dir)
        io_utils.atomic_write_json(io_utils.join(out_dir, STAGES_FILE),
                                   {"recipe": "3stage", "stages": list(STAGES), "final": FINAL_STAGE})
    results = []
    for fold in folds:
        for stage in STAGES:
            print(f"fold {fold}: 3stage: stage {STAGES.index(stage) + 1} of 3, {stage} "
                  f"({configs[stage].train.epochs} epochs) -> {stage_dir(out_dir, stage)}", flush=True)
            result = train_fold(configs[stage], tfrecords_dir, fold, stage_dir(out_dir, stage), placement,
                                verbose=verbose, restart=restart)
        results.append(result)
    return results
