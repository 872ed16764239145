"""Train one fold (or all): data -> model -> staged fit with resumable callbacks -> best model, OOF, metrics.

    placement = choose_placement(cfg.train.strategy)
    result = train_fold(cfg, "tfrecords", fold=0, out_dir="runs/demo", placement=placement)

The run folder ``<out>/fold{k}/`` is laid out as ``ranzcr_tf.runs`` defines (file names and what each holds).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import pandas as pd

from ranzcr_tf import compat, io_utils, runs
from ranzcr_tf.config import Config, save_config
from ranzcr_tf.labels import ID_COLUMN, LABELS
from ranzcr_tf.locks import FolderLock
from ranzcr_tf.model import build as models
from ranzcr_tf.model import precision
from ranzcr_tf.model import predict as model_predict
from ranzcr_tf.model.backbones import check_weights, get_spec
from ranzcr_tf.model.files import load_model_file
from ranzcr_tf.model.metrics import competition_metric, monitor_for, task_scores
from ranzcr_tf.pipeline import data
from ranzcr_tf.pipeline.data import extra_files, read_shard_ids
from ranzcr_tf.pipeline.masks import MaskSettings, recipe_data
from ranzcr_tf.pipeline.soft import SoftLabels, training_ids
from ranzcr_tf.prep import records
from ranzcr_tf.train import callbacks as cbs
from ranzcr_tf.train import identity, multihost, preset_rules, recipes
from ranzcr_tf.train.schedules import build_learning_rate, scaled_learning_rate
from ranzcr_tf.train.step import compile_for_training


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says what to try."""

    exit_code = 3  # the CLI's exit status (``ranzcr_tf.cli``): not bad input, not an internal error


# ----------------------------------------------------------------------------------------------- pieces
def resolve_image_size(cfg: Config, manifest: dict) -> tuple[int, str]:
    """The model's input size and a sentence about it: the records' size, or a resize in the pipeline."""
    stored = int(manifest["image_size"])
    wanted = int(cfg.data.image_size) or stored
    if wanted == stored:
        return wanted, f"image size {wanted} px (as stored in the records)"
    return wanted, (f"NOTE: the records hold {stored} px images but data.image_size = {wanted}: every image is "
                    f"resized to {wanted} px in the input pipeline (convert at {wanted} px to avoid this)")


def steps_per_epoch_for(cfg: Config, manifest: dict, fold: int, global_batch: int, num_train: int | None = None) -> int:
    """``train.steps_per_epoch``, else one pass over the training studies (``num_train``, default all of the
    training folds; the teacher and the student pass their annotated count)."""
    if cfg.train.steps_per_epoch:
        return int(cfg.train.steps_per_epoch)
    if num_train is None:
        num_train = sum(int(n) for k, n in manifest["fold_counts"].items() if int(k) != fold)
    steps = num_train // global_batch
    if steps < 1:
        raise ValueError(f"the training folds hold {num_train} studies, fewer than one global batch of {global_batch}: "
                         "lower train.batch_size or set train.steps_per_epoch")
    return steps


def make_train_dataset(cfg: Config, tfrecords_dir: str, fold: int, placement, *, image_size: int, seed=None,
                       deterministic: bool = False):
    """The training batches for ``placement``, ready for ``model.fit``.

    One process (default, mirrored, TPU, JAX): global batches, which the strategy splits across its
    replicas in order. Several workers: a distributed dataset whose every worker reads only its share
    (``worker_dataset_fn``) in per-replica batches, so a step still trains on one global batch. Several
    JAX processes: this process's share in batches of global / processes (``multihost.input_context``),
    which Keras puts together with the other processes' parts into the global batch.
    """
    if placement.num_workers > 1 and placement.strategy is not None:
        return placement.strategy.distribute_datasets_from_function(
            worker_dataset_fn(cfg, tfrecords_dir, fold, placement, image_size=image_size, seed=seed,
                              deterministic=deterministic))
    context = multihost.input_context(placement) if multihost.is_multi_process(placement) else None
    return data.build_train_dataset(cfg, tfrecords_dir, fold, placement.global_batch_size(cfg.train.batch_size),
                                    image_size=image_size, input_context=context, seed=seed,
                                    image_dtype=_image_dtype(cfg, placement), deterministic=deterministic)


def worker_dataset_fn(cfg: Config, tfrecords_dir: str, fold: int, placement, *, image_size: int, seed=None,
                      deterministic: bool = False):
    """``input_context -> dataset`` for ``strategy.distribute_datasets_from_function``.

    Input pipeline ``i`` of ``n`` gets every ``n``-th training shard, or, when the training folds have
    fewer shards than pipelines, every ``n``-th record of all of them (``data.build_train_dataset``):
    the workers' shares partition the training data either way. Batches are per replica.
    """
    global_batch = placement.global_batch_size(cfg.train.batch_size)
    dtype = _image_dtype(cfg, placement)

    def dataset_fn(input_context):
        return data.build_train_dataset(cfg, tfrecords_dir, fold, global_batch, image_size=image_size,
                                        input_context=input_context, seed=seed, image_dtype=dtype,
                                        deterministic=deterministic)

    return dataset_fn


def _image_dtype(cfg: Config, placement):
    return data.image_dtype_for(cfg, "jax" if placement.strategy is None else "tensorflow", placement.accelerator)


def make_eval_data(cfg: Config, tfrecords_dir: str, fold: int, placement, *, image_size: int):
    dtype = _image_dtype(cfg, placement)
    batch = placement.global_batch_size(cfg.infer.batch_size)
    num_shares, share = multihost.process_share(placement)  # several JAX processes: each decodes its share
    return data.build_eval_dataset(cfg, tfrecords_dir, "valid", batch, fold=fold, image_size=image_size,
                                   with_targets=False, image_dtype=dtype, num_shards=num_shares, shard_index=share,
                                   recipe=cfg.train.recipe, mask_settings=MaskSettings.from_config(cfg.train))


# ----------------------------------------------------------------------------------------------- run folder
def fold_dir(out_dir: str, fold: int) -> str:
    return runs.fold_dir(out_dir, fold)


def _truncate_log(path: str, keep_before_epoch: int) -> None:
    """Drop log rows of epochs a restart will repeat, so the appended log has each epoch once."""
    if not io_utils.exists(path):
        return
    rows = list(csv.reader(io_utils.read_text(path).splitlines()))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    col = header.index("epoch") if "epoch" in header else 0
    kept = [r for r in body if r and int(float(r[col])) < keep_before_epoch]
    if len(kept) == len(body):
        return
    lines = [",".join(header)] + [",".join(r) for r in kept]
    io_utils.atomic_write_text(path, "\n".join(lines) + "\n")


def write_oof(path: str, ids, fold: int, probs: np.ndarray, targets: np.ndarray, labels=LABELS,
              id_column: str = ID_COLUMN) -> None:
    """``oof.csv``: the ID column (RANZCR: StudyInstanceUID), fold, a probability column per label (named by it),
    a ``target_<label>`` column per label; ``labels`` and ``id_column`` are the task's."""
    frame = pd.DataFrame({id_column: list(ids), "fold": fold})
    for c, label in enumerate(labels):
        frame[label] = probs[:, c]
    for c, label in enumerate(labels):
        frame[f"target_{label}"] = targets[:, c].astype(int)
    io_utils.atomic_write_text(path, frame.to_csv(index=False))


def _preprocess_info(manifest: dict, image_size: int, cfg: Config) -> dict:
    info = dict(manifest.get("preprocess", {}))
    info.update({"stored_image_size": int(manifest["image_size"]), "model_image_size": int(image_size),
                 "input_channels": int(cfg.model.input_channels), "schema_version": manifest.get("schema_version"),
                 "labels": list(cfg.task.labels), "model_output": cfg.model.output})
    return info


# ----------------------------------------------------------------------------------------------- training
def check_inputs(cfg: Config, tfrecords_dir: str, manifest: dict) -> None:
    """Before any folder is made: the model settings name things that exist, and every fold's shards
    are exactly those the manifest lists (training reads all folds: k for validation, the rest to train)."""
    cfg.validate()
    get_spec(cfg.model.backbone)
    check_weights(cfg.model.weights)
    shards = records.check_shards(tfrecords_dir, manifest, records.TRAIN_DIR)
    records.check_shard_settings(tfrecords_dir, manifest, shards)
    if cfg.train.soft_labels:  # every study any fold trains on needs its soft label: checked now, not mid-epoch
        soft = SoftLabels.read(cfg.train.soft_labels)
        ids = training_ids(tfrecords_dir, range(int(manifest.get("num_folds") or 0)))
        soft.check_covers(ids, f"the training records of {tfrecords_dir}")
        if cfg.train.extra_records:
            check_extra_records(cfg.train.extra_records, manifest, soft)


def check_fold_scoreable(cfg: Config, manifest: dict, fold: int) -> None:
    """A fold scored by AUC needs a label with both classes among its validation studies (the manifest's counts):
    refused before training, not after every epoch produced an undefined score."""
    if monitor_for(cfg.task.metric)[0] != "val_auc":
        return
    count = int((manifest.get("fold_counts") or {}).get(str(fold), 0))
    positives = (manifest.get("fold_positives") or {}).get(str(fold))
    if not count or positives is None:
        return
    if not any(0 < int(p) < count for p in positives):
        raise ValueError(f"fold {fold}'s {count} validation studies hold one class in every label, so no AUC can "
                         "be computed on them: convert with fewer folds (make_tfrecords.py --folds) or more data")


def check_extra_records(extra_dir: str, manifest: dict, soft) -> None:
    """The unlabeled records were preprocessed as the training records, and each has a soft label."""
    extra = records.read_manifest(extra_dir)
    if extra.get("preprocess") != manifest.get("preprocess"):
        raise ValueError(f"train.extra_records {extra_dir} was preprocessed with {extra.get('preprocess')}, the "
                         f"training records with {manifest.get('preprocess')}: convert the unlabeled images with "
                         f"the same settings (make_tfrecords.py --unlabeled ... --config the same preset)")
    ids = [sid for path in extra_files(extra_dir) for sid in read_shard_ids(path)]
    soft.check_covers(ids, f"train.extra_records {extra_dir}")


def train_fold(cfg: Config, tfrecords_dir: str, fold: int, out_dir: str, placement, *, verbose: int = 1,
               restart: bool = False) -> dict:
    """Train fold ``fold`` (validate on it, train on the others) into ``out_dir/fold{fold}``; returns metrics.

    Re-running the same call after a kill continues from the backup, once ``identity.json`` confirms
    the same records and settings; ``restart`` discards the fold's checkpoint and state first. A
    finished fold is not retrained. One process per fold folder (``locks.FolderLock`` on
    ``out_dir/.lock-fold{k}``, taken by the chief). Raises ``TrainingDiverged`` on a NaN loss.
    """
    manifest = records.read_manifest(tfrecords_dir)
    num_folds = int(manifest["num_folds"])
    if not 0 <= fold < num_folds:
        raise ValueError(f"--fold {fold} is out of range: the records in {tfrecords_dir} have folds 0..{num_folds - 1}")
    check_inputs(cfg, tfrecords_dir, manifest)
    check_fold_scoreable(cfg, manifest, fold)
    if cfg.train.recipe == "3stage":
        raise ValueError("train.recipe = 3stage trains three runs per fold: call train.run.train (train_tpu.py), not train_fold")
    chief_dir = fold_dir(out_dir, fold)
    lock = (FolderLock(out_dir, "train_tpu.py", name=f".lock-{runs.fold_dir_name(fold)}") if placement.is_chief
            else contextlib.nullcontext())
    with lock:
        if restart and placement.is_chief and io_utils.exists(chief_dir):
            print(f"fold {fold}: --restart: discarding {chief_dir}", flush=True)
            io_utils.rmtree(chief_dir)
        # Several JAX processes: the others read the chief's folder only after it has been discarded.
        multihost.check_same_everywhere(placement, f"fold {fold}", fold)
        if placement.is_chief:
            return FoldRun(cfg, tfrecords_dir, fold, chief_dir, chief_dir, manifest, placement, verbose).train()
        # Only the chief writes the run folder; other workers write their copies to a private temp folder,
        # deleted afterwards.
        scratch = tempfile.mkdtemp(prefix=f"ranzcr-worker{placement.worker_index}-")
        try:
            return FoldRun(cfg, tfrecords_dir, fold, chief_dir, os.path.join(scratch, runs.fold_dir_name(fold)),
                           manifest, placement, verbose).train()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _stages(train_cfg) -> list[tuple[int, int, bool]]:
    """``(first_epoch, end_epoch, backbone_trainable)`` per stage; the epoch counter runs on across stages."""
    stages = []
    if train_cfg.frozen_epochs:
        stages.append((0, train_cfg.frozen_epochs, False))
    if train_cfg.frozen_epochs < train_cfg.epochs:
        stages.append((train_cfg.frozen_epochs, train_cfg.epochs, True))
    return stages


def _backup_dir(run_dir: str, stage: int) -> str:
    return io_utils.join(run_dir, runs.BACKUP_DIR, f"stage{stage}")


class ResumeState:
    """Where a fold continues, owned in one place: the stage backups (epochs done), ``train_state.json`` (the
    callbacks' counters per epoch, ``completed``) and ``best.json`` (the best value so far). Read from the
    chief's folder, which every worker reads."""

    ARCHIVED = (runs.MODEL_FILE, runs.BEST_INFO_FILE, runs.METRICS_FILE, runs.OOF_FILE, runs.LOG_FILE,
                runs.STATE_FILE, runs.BACKUP_DIR)

    def __init__(self, chief_dir: str, num_stages: int):
        self.chief_dir, self.num_stages = chief_dir, num_stages
        self.state = cbs.read_state(io_utils.join(chief_dir, runs.STATE_FILE))

    def backup_epoch(self, stage: int) -> int | None:
        return cbs.backup_epoch(_backup_dir(self.chief_dir, stage))

    def start_stage(self) -> int:
        """The last stage with a backup (0 without one)."""
        return max([i for i in range(self.num_stages) if self.backup_epoch(i) is not None], default=0)

    def finished(self) -> bool:
        return bool(self.state.get("completed")) and all(
            io_utils.exists(io_utils.join(self.chief_dir, name)) for name in (runs.METRICS_FILE, runs.OOF_FILE))

    def orphaned(self) -> bool:
        """Training state (a best model, logs, counters) without any backup to continue it from."""
        if any(self.backup_epoch(i) is not None for i in range(self.num_stages)):
            return False
        return any(io_utils.exists(io_utils.join(self.chief_dir, name)) for name in self.ARCHIVED)

    def archive(self) -> str:
        """Move the earlier training's files to ``fold{k}/.archive/<time>/`` (hidden: never served), so the new
        training's best.json, metrics.json and log.csv describe it alone."""
        folder = io_utils.join(self.chief_dir, ".archive", time.strftime("%Y%m%dT%H%M%S"))
        io_utils.makedirs(folder)
        for name in self.ARCHIVED:
            path = io_utils.join(self.chief_dir, name)
            if io_utils.exists(path):
                io_utils.rename(path, io_utils.join(folder, name))
        self.state = {}
        return folder

    def initial_epoch(self, stage: int, first_epoch: int) -> int:
        return self.backup_epoch(stage) or first_epoch

    def restore_callbacks(self, stateful: dict, initial_epoch: int, best_info_path: str, monitor: str) -> None:
        """The counters of the epoch the backup ended with, and the best value so far, into the new callbacks."""
        snapshot = self.state.get("snapshots", {}).get(str(initial_epoch - 1), {}) if initial_epoch > 0 else {}
        best_info = cbs.read_state(best_info_path)
        stateful["checkpoint"].set_state(snapshot.get("checkpoint", {}))
        stateful["checkpoint"].set_state({"best": best_info.get(monitor), "best_epoch": best_info.get("epoch")})
        for name in ("early_stopping", "plateau"):
            if name in stateful:
                stateful[name].pending_state = snapshot.get(name)

    @staticmethod
    def mark_completed(state_path: str) -> None:
        state = cbs.read_state(state_path)
        state["completed"] = True
        io_utils.atomic_write_json(state_path, state)


class FoldRun:
    """One fold's training in three steps: ``prepare`` (sizes, identity, resume decision, model, data),
    ``run_stages`` (frozen / trainable stages, each a resumable ``fit``) and ``finish`` (best model -> OOF,
    metrics, completed). ``chief_dir`` holds the shared run folder; ``run_dir`` is where this process
    writes (the chief: the same folder)."""

    def __init__(self, cfg, tfrecords_dir, fold, chief_dir, run_dir, manifest, placement, verbose):
        self.cfg, self.tfrecords_dir, self.fold = cfg, tfrecords_dir, fold
        self.chief_dir, self.run_dir, self.manifest = chief_dir, run_dir, manifest
        self.placement, self.verbose = placement, verbose
        self.paths = {name: io_utils.join(run_dir, name) for name in runs.FOLD_FILES}
        self.stages = _stages(cfg.train)
        self.resume = ResumeState(chief_dir, len(self.stages))
        self.flags = cbs.RunFlags()

    def train(self) -> dict:
        finished = self.prepare()
        if finished is not None:
            return finished
        self.run_stages()
        return self.finish()

    # ------------------------------------------------------------------------------------------- prepare
    def prepare(self) -> dict | None:
        """Everything before the first epoch; returns the saved metrics when the fold has finished already."""
        cfg, fold, placement = self.cfg, self.fold, self.placement
        self.image_size, size_note = resolve_image_size(cfg, self.manifest)
        self.global_batch = placement.global_batch_size(cfg.train.batch_size)
        if recipe_data(cfg.train.recipe).annotated_only:  # teacher, student: the annotated studies' counts
            positives, num_train = data.annotated_positive_counts(self.tfrecords_dir, fold)
            size_note += f"; {num_train} annotated training studies"
        else:
            positives, num_train = data.training_positive_counts(self.tfrecords_dir, fold)
        self.steps_per_epoch = steps_per_epoch_for(cfg, self.manifest, fold, self.global_batch, num_train)
        # a divisor of the epoch, said in one line
        self.cfg = cfg = preset_rules.with_steps_per_execution(cfg, self.steps_per_epoch)
        peak_lr = scaled_learning_rate(cfg.train, self.global_batch)
        self.peak_lr = peak_lr
        if self._resume_or_finished():
            return json.loads(io_utils.read_text(io_utils.join(self.chief_dir, runs.METRICS_FILE)))
        io_utils.makedirs(self.run_dir)
        identity.write_identity(self.run_dir, self.identity)
        save_config(cfg, self.paths[runs.CONFIG_FILE])
        io_utils.atomic_write_json(self.paths[runs.PREPROCESS_FILE], _preprocess_info(self.manifest, self.image_size, cfg))
        keras.utils.set_random_seed(cfg.train.seed + fold)
        policy = precision.apply_policy(precision.choose_policy(cfg.model, placement.accelerator))
        print(f"fold {fold}: {size_note}; dtype policy {policy}; global batch {self.global_batch} "
              f"({cfg.train.batch_size} x {placement.num_replicas} replicas); {self.steps_per_epoch} steps/epoch; "
              f"peak learning rate {peak_lr:.3g} ({cfg.train.schedule})", flush=True)
        self.train_ds = make_train_dataset(cfg, self.tfrecords_dir, fold, placement, image_size=self.image_size,
                                           seed=cfg.train.seed + fold)
        self.eval_data = make_eval_data(cfg, self.tfrecords_dir, fold, placement, image_size=self.image_size)
        self.from_logits = cfg.model.output == "logits"
        with placement.scope():  # train.recipe: the classifier, or a training model around it (train/recipes.py)
            self.model, self.loss = recipes.build_training_model(cfg, self.image_size, positives, num_train,
                                                                 from_logits=self.from_logits, fold=fold)
        self.schedule = build_learning_rate(cfg.train, self.steps_per_epoch, peak_lr)
        return None

    def _resume_or_finished(self) -> bool:
        """Check that a resume continues the same training, say what happens; True when the fold has finished."""
        fold, chief_dir = self.fold, self.chief_dir
        # Before anything is written: a checkpoint continues only with the records and settings it was trained with.
        self.identity = identity.run_identity(self.cfg, self.tfrecords_dir, self.manifest, {
            "global_batch": self.global_batch, "steps_per_epoch": self.steps_per_epoch, "image_size": self.image_size,
            **recipes.source_identity(self.cfg, fold)})
        check_same_records_as_other_folds(chief_dir, self.identity, fold)
        if identity.has_progress(chief_dir):
            note = identity.check_resumable(chief_dir, self.identity, fold)
            if note:
                print(note, flush=True)
        # The chief's files (every worker reads them), so that all workers skip a finished fold together.
        finished = self.resume.finished()
        multihost.check_same_everywhere(self.placement, f"whether fold {fold} has finished", int(finished))
        if finished:
            print(f"fold {fold} already finished in {chief_dir} (pass --restart to train it again)", flush=True)
            return True
        if self.placement.is_chief and self.resume.orphaned():
            archived = self.resume.archive()
            print(f"fold {fold}: {chief_dir} holds an earlier training but no backup to continue it from: training "
                  f"from epoch 0; the earlier best model and logs moved to {archived}", flush=True)
        return False

    # ------------------------------------------------------------------------------------------- stages
    def run_stages(self) -> None:
        """Each stage's ``fit`` from where its backup ends; a finished stage only restores its weights."""
        previous_iterations = None
        for index in range(self.resume.start_stage(), len(self.stages)):
            optimizer, stateful = self._run_stage(index, previous_iterations)
            previous_iterations = compat.optimizer_steps(optimizer)
            if self.verbose:
                print(f"after epoch {self.stages[index][1] - 1}: optimizer step {previous_iterations}", flush=True)
            if "early_stopping" in stateful and stateful["early_stopping"].stopped_epoch > 0:
                print(f"early stopping after epoch {stateful['early_stopping'].stopped_epoch}", flush=True)
                break

    def _run_stage(self, index: int, previous_iterations):
        cfg, model, placement = self.cfg, self.model, self.placement
        first_epoch, last_epoch, backbone_trainable = self.stages[index]
        if len(self.stages) > 1 or cfg.train.frozen_epochs:
            models.set_backbone_trainable(model, backbone_trainable)
            if self.verbose:
                print(f"epochs {first_epoch}..{last_epoch - 1}: backbone {'trainable' if backbone_trainable else 'frozen'}")
        optimizer = compile_for_training(model, cfg, self.loss, self.schedule, placement, self.image_size)
        with placement.scope():
            if previous_iterations is not None:  # the new stage's optimizer continues the step count
                optimizer.build(model.trainable_variables)
                compat.optimizer_step_counter(optimizer).assign(previous_iterations)
        backup_dir = _backup_dir(self.chief_dir, index)
        initial_epoch = self.resume.initial_epoch(index, first_epoch)
        multihost.check_same_everywhere(placement, f"the stage and epoch fold {self.fold} resumes at", index,
                                        initial_epoch)
        callbacks, stateful = _build_callbacks(cfg, self.run_dir, self.paths, backup_dir, self.eval_data, placement,
                                               self.flags, self.from_logits, self.verbose)
        self.resume.restore_callbacks(stateful, initial_epoch, io_utils.join(self.run_dir, runs.BEST_INFO_FILE),
                                      monitor_for(cfg.task.metric)[0])
        if placement.is_chief:
            _truncate_log(self.paths[runs.LOG_FILE], initial_epoch)
        if initial_epoch < last_epoch:  # the Backup callback restores the weights of initial_epoch
            with data.naming_corrupt_shard(records.list_shards(self.tfrecords_dir, records.TRAIN_DIR)):
                model.fit(self.train_ds, epochs=last_epoch, initial_epoch=initial_epoch,
                          steps_per_epoch=self.steps_per_epoch,
                          shuffle=False,  # tf.data shuffles; Keras would only warn that it cannot
                          callbacks=callbacks, verbose=1 if self.verbose == 1 else 0)  # quiet (2): Validation's line
        else:  # this stage already finished: restore its weights for the next one
            _restore(model, backup_dir, self.flags)
        if self.flags.diverged:
            raise TrainingDiverged(f"training diverged: fold {self.fold}, peak learning rate {self.peak_lr:.3g}: "
                                   f"{self.flags.message}")
        return optimizer, stateful

    # ------------------------------------------------------------------------------------------- finish
    def finish(self) -> dict:
        result = _finish(self.cfg, self.fold, self.run_dir, self.chief_dir, self.paths, self.eval_data,
                         self.placement, self.from_logits)
        if self.placement.is_chief:
            ResumeState.mark_completed(self.paths[runs.STATE_FILE])
        return result


def check_same_records_as_other_folds(chief_dir: str, current: dict, fold: int) -> None:
    """The folds of one run come from one conversion: refuse records whose manifest differs from the one the
    run's other folds recorded (their ``identity.json``)."""
    run_dir = os.path.dirname(chief_dir.rstrip("/"))
    wanted = current["records"]["manifest_sha256"]
    for path in sorted(io_utils.glob(io_utils.join(run_dir, "fold*", runs.IDENTITY_FILE))):
        other = os.path.basename(os.path.dirname(path))
        if other == runs.fold_dir_name(fold):
            continue
        saved = json.loads(io_utils.read_text(path)).get("records", {}).get("manifest_sha256")
        if saved and saved != wanted:
            raise ValueError(f"fold {fold}: {run_dir}/{other} was trained from other records (manifest hash "
                             f"{saved[:12]}, these {wanted[:12]}): the folds of one run must come from one "
                             f"conversion; pass the records {other} used, or choose a new --out-dir")


def _restore(model, backup_dir, flags):
    backup = cbs.Backup(backup_dir, flags=flags, writer=False)
    backup.set_model(model)
    backup.restore()


def _build_callbacks(cfg, run_dir, paths, backup_dir, eval_data, placement, flags, from_logits, verbose):
    """The callbacks in the order the module docstring of ``callbacks`` explains."""
    swapper = cbs.EMASwapper()
    monitor, mode = monitor_for(cfg.task.metric)  # val_auc (max) for RANZCR; val_weighted_log_loss (min) for RSNA ICH
    checkpoint = cbs.BestCheckpoint(paths[runs.MODEL_FILE], monitor=monitor, mode=mode)
    stateful = {"checkpoint": checkpoint}
    callbacks = [cbs.NaNGuard(flags), cbs.LearningRateLogger()]
    if cfg.train.use_ema:
        callbacks.append(cbs.SwapEMAIn(swapper, flags))
    callbacks += [cbs.Validation(eval_data, from_logits=from_logits, placement=placement, flags=flags,
                                 verbose=bool(verbose), task=cfg.task), checkpoint]
    if cfg.train.early_stopping_patience:
        stateful["early_stopping"] = cbs.ResumableEarlyStopping(monitor=monitor, mode=mode,
                                                                patience=cfg.train.early_stopping_patience)
        callbacks.append(stateful["early_stopping"])
    if cfg.train.schedule == "plateau":
        stateful["plateau"] = cbs.ResumablePlateau(monitor=monitor, mode=mode, factor=cfg.train.plateau_factor,
                                                   patience=cfg.train.plateau_patience,
                                                   min_lr=cfg.train.min_learning_rate, verbose=1)
        callbacks.append(stateful["plateau"])
    callbacks.append(cbs.CSVLog(paths[runs.LOG_FILE], append=True))
    if importlib.util.find_spec("tensorboard") is not None:
        callbacks.append(keras.callbacks.TensorBoard(io_utils.join(run_dir, runs.TENSORBOARD_DIR), write_graph=False))
    elif verbose:
        print("note: the tensorboard package is not installed, so no TensorBoard logs (pip install tensorboard)")
    if cfg.train.use_ema:
        callbacks.append(cbs.SwapEMAOut(swapper))
    callbacks += [cbs.RunState(paths[runs.STATE_FILE], stateful, flags, writer=placement.is_chief),
                  cbs.Backup(backup_dir, flags=flags, writer=placement.is_chief)]
    if cfg.train.max_minutes:
        callbacks.append(cbs.TimeBudget(cfg.train.max_minutes, placement))
    kill_after = os.environ.get(cbs.KILL_AFTER_EPOCH_ENV)
    if kill_after:
        callbacks.append(cbs.KillAfterEpoch(int(kill_after), placement))
    return callbacks, stateful


def _finish(cfg, fold, run_dir, chief_dir, paths, eval_data, placement, from_logits) -> dict:
    """Reload best.keras, predict the validation fold in order, write oof.csv and metrics.json."""
    # Every worker reloads the same best.keras: the chief's, once it is written (the barrier), since a
    # worker's own copy lacks the epochs before a resume; its own where it cannot read the chief's folder
    # (a first run on local disks: the same epochs improved, so the same weights; checked below).
    multihost.check_same_everywhere(placement, f"fold {fold} reaching its end", fold)
    best_dir = chief_dir if io_utils.exists(io_utils.join(chief_dir, runs.MODEL_FILE)) else run_dir
    if not io_utils.exists(io_utils.join(best_dir, runs.MODEL_FILE)):
        raise RuntimeError(f"no best.keras in {run_dir}: no epoch produced a finite validation "
                           f"{monitor_for(cfg.task.metric)[0]}")
    info = cbs.read_state(io_utils.join(best_dir, runs.BEST_INFO_FILE))
    # Several JAX processes predict one set together, each with its own copy of the weights: they must agree.
    best_epoch = info.get("epoch")
    multihost.check_same_everywhere(placement, "the best epoch", -1 if best_epoch is None else int(best_epoch))
    with placement.scope():
        best = load_model_file(io_utils.join(best_dir, runs.MODEL_FILE))
    probs = model_predict.predict_eval(best, eval_data, from_logits=from_logits, placement=placement)
    targets = np.asarray(eval_data.targets)
    mean_auc, per_class = competition_metric(targets, probs, list(cfg.task.labels))
    result = {"fold": fold, "val_auc": mean_auc, "per_class_auc": per_class, "best_epoch": info.get("epoch"),
              "logged_val_auc": info.get("val_auc"), "num_examples": int(eval_data.num_examples),
              "placement": placement.kind, "num_replicas": placement.num_replicas}
    monitor, _ = monitor_for(cfg.task.metric)
    score_note = ""
    if monitor != "val_auc":  # RANZCR's metrics.json stays as it was
        result.update({"metric": cfg.task.metric, monitor: task_scores(cfg.task, targets, probs)[monitor],
                       f"logged_{monitor}": info.get(monitor)})
        score_note = f", {monitor} {result[monitor]:.4f}"
    if placement.is_chief:
        write_oof(paths[runs.OOF_FILE], eval_data.ids, fold, probs, targets, cfg.task.labels, cfg.task.id_column)
        io_utils.atomic_write_json(paths[runs.METRICS_FILE], result)
    print(f"fold {fold}: best epoch {result['best_epoch']}, validation mean AUC {mean_auc:.4f}{score_note} "
          f"(written to {run_dir})", flush=True)
    return result


def parse_folds(value: str, num_folds: int) -> list[int]:
    """``"all"`` -> every fold; ``"0"`` or ``"0,2"`` -> those folds (checked against the records)."""
    if value == "all":
        return list(range(num_folds))
    try:
        folds = [int(v) for v in str(value).split(",")]
    except ValueError:
        raise ValueError(f"--fold {value!r}: give a fold number, a comma list (0,2) or 'all'") from None
    bad = [f for f in folds if not 0 <= f < num_folds]
    if bad:
        raise ValueError(f"--fold {bad}: the records have folds 0..{num_folds - 1}")
    return folds
