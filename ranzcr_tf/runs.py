"""The run-folder layout, defined once: training writes it, the kernel, ``package``, ``report.cv`` and model
discovery read it, and so does the run report (``python -m ranzcr_tf.report``). Import the names from here instead of
typing the file names.

``<out>/fold{k}/`` (one per trained fold; :func:`fold_dir`):

=====================  ===========================================================================
config.yaml            the resolved config + versions + git revision (``config.save_config``)
preprocess.json        the records' preprocessing settings (from their manifest) + the model's input size
best.keras / best.json the best model by validation mean AUC, and its epoch and AUC
log.csv                one row per epoch: loss, learning_rate, val_auc, val_auc_<label> (appended on resume)
metrics.json           validation mean AUC, per-class AUCs and the best epoch (from the reloaded best.keras)
oof.csv                StudyInstanceUID, fold, the 11 predicted probabilities under the label names, and
                       the 11 targets as ``target_<label>``
train_state.json       counters that must survive a restart (best value, patience, plateau)
identity.json          the records' fingerprint and the settings the checkpoint is trained with: a resume
                       with other ones is refused (``train.identity`` lists what may change)
backup/                the Backup callback's weights + optimizer (a restarted command continues from here)
tensorboard/           TensorBoard logs
=====================  ===========================================================================

A 3stage run (``train.stages``) holds one such run per stage, ``<out>/teacher``, ``<out>/student`` and
``<out>/finetune``, and ``<out>/stages.json`` naming the final one: what is served (:func:`final_stage_dir`).

``<out>/`` itself gets ``cv.json`` and ``roc.png`` from ``python -m ranzcr_tf.report.cv`` (pooled OOF score).

Only ``best.keras``, ``config.yaml`` and ``preprocess.json`` are needed to predict (:data:`SERVING_FILES`:
what ``package`` bundles); the rest is training state and reports.
"""

from __future__ import annotations

import os
import re

from ranzcr_tf import io_utils

MODEL_FILE = "best.keras"
BEST_INFO_FILE = "best.json"
CONFIG_FILE = "config.yaml"
PREPROCESS_FILE = "preprocess.json"
LOG_FILE = "log.csv"
METRICS_FILE = "metrics.json"
OOF_FILE = "oof.csv"
STATE_FILE = "train_state.json"
IDENTITY_FILE = "identity.json"
BACKUP_DIR = "backup"
TENSORBOARD_DIR = "tensorboard"
CV_REPORT_FILE = "cv.json"  # in the run folder, above the folds
ROC_PLOT_FILE = "roc.png"
STAGES_FILE = "stages.json"  # a 3stage run's <out>/: {"recipe": "3stage", "stages": [...], "final": "finetune"}

FOLD_FILES = (CONFIG_FILE, PREPROCESS_FILE, MODEL_FILE, LOG_FILE, METRICS_FILE, OOF_FILE, STATE_FILE)
SERVING_FILES = (MODEL_FILE, CONFIG_FILE, PREPROCESS_FILE)  # what inference reads beside each model
FOLD_DIR_PATTERN = re.compile(r"^fold\d+$")


def fold_dir_name(fold: int) -> str:
    return f"fold{int(fold)}"


def fold_dir(out_dir: str, fold: int) -> str:
    """``out_dir/fold{k}`` (local path or ``gs://``)."""
    return io_utils.join(out_dir, fold_dir_name(fold))


def is_fold_dir(path: str) -> bool:
    return bool(FOLD_DIR_PATTERN.match(os.path.basename(os.path.normpath(path))))


def final_stage_dir(folder: str) -> str | None:
    """The final stage's folder when ``folder`` is a 3stage run (it holds ``stages.json``), else None."""
    import json

    path = os.path.join(folder, STAGES_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            final = json.load(handle)["final"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a stages file written by train_tpu.py --recipe 3stage: "
                         "remove it or train the run again") from None
    return os.path.join(folder, str(final))


def fold_status(fold_dir: str) -> tuple[bool, int | None]:
    """``(complete, last epoch)`` of a fold folder. ``train_state.json`` decides where present (training marks
    it completed at the very end; ``package`` bundles it); else a ``metrics.json`` (written at the end) or no
    training log at all (a model file put there by hand) counts as complete. The last epoch is the last row
    of ``log.csv`` (else ``best.json``'s epoch), None when unknown."""
    import json

    state_path = io_utils.join(fold_dir, STATE_FILE)
    log_path = io_utils.join(fold_dir, LOG_FILE)
    if io_utils.exists(state_path):
        complete = bool(json.loads(io_utils.read_text(state_path)).get("completed"))
    else:
        complete = io_utils.exists(io_utils.join(fold_dir, METRICS_FILE)) or not io_utils.exists(log_path)
    last = None
    if io_utils.exists(log_path):
        lines = [line for line in io_utils.read_text(log_path).splitlines() if line.strip()]
        header = lines[0].split(",") if lines else []
        if len(lines) > 1 and "epoch" in header:
            last = int(float(lines[-1].split(",")[header.index("epoch")]))
    if last is None and io_utils.exists(io_utils.join(fold_dir, BEST_INFO_FILE)):
        last = json.loads(io_utils.read_text(io_utils.join(fold_dir, BEST_INFO_FILE))).get("epoch")
    return complete, last


def saved_task(run_dir: str):
    """The task a run was trained for (its first fold's ``config.yaml``; a 3stage run's final stage), or None when
    no fold folder holds a config (the caller's own checks then name what is missing)."""
    from ranzcr_tf.config import load_config

    folder = final_stage_dir(run_dir) or run_dir
    candidates = [io_utils.join(folder, CONFIG_FILE)] if is_fold_dir(folder) else []
    candidates += sorted(io_utils.glob(io_utils.join(folder, "fold*", CONFIG_FILE)))
    for path in candidates:
        if io_utils.exists(path):
            return load_config(path).task
    return None


def require_ranzcr_run(run_dir: str, feature: str) -> None:
    """Refuse (one-line ``ValueError``) a run trained for another task than RANZCR CLiP: ``feature`` reads RANZCR's
    11 columns, so another task's OOF or models would be mis-labelled or fail deep inside."""
    task = saved_task(run_dir)
    if task is not None:
        task.require_ranzcr(f"{feature} (run {run_dir})", advice="its OOF is scored by the run's own task metric "
                            "(fold*/metrics.json) and its submission written by kaggle_kernel.py")
