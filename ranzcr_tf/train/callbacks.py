"""Training callbacks: exact validation AUC, best-model checkpoint, resumable state, NaN guard, EMA swap.

Order matters at the end of an epoch (``build_callbacks`` in train.py keeps it):

    NaNGuard -> LearningRateLogger -> SwapEMAIn -> Validation (puts val_auc in logs) -> BestCheckpoint
    -> EarlyStopping -> ReduceLROnPlateau -> CSVLogger -> TensorBoard -> SwapEMAOut -> RunState -> Backup
    -> KillAfterEpoch (tests only)

so the checkpoint, early stopping and the CSV log all read the validation AUC of this epoch, and the
backup (which decides where a restarted run continues) is written last: whatever a kill interrupts,
the restarted run repeats at most the epoch whose backup was missing.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import keras
import numpy as np

from ranzcr_tf import compat, io_utils
from ranzcr_tf.model import predict as model_predict  # the one prediction function (validation, OOF, kernel)
from ranzcr_tf.train import multihost
from ranzcr_tf.train.schedules import learning_rate_value

PROCESS_CLOCK_START = time.monotonic()  # train.max_minutes counts from here (train_tpu.py imports this early)
KILL_AFTER_EPOCH_ENV = "RANZCR_TF_KILL_AFTER_EPOCH"  # test hook: SIGKILL this process after that epoch's backup

NAN_ADVICE = ("try a lower learning rate (--set train.learning_rate=...; a tenth of the current value is a good "
              "first step), check the data (targets must be 0/1: `python -m ranzcr_tf.pipeline --tfrecords DIR "
              "--fold K --show grid.png`), or train in float32 (--set model.mixed_precision=float32)")


class RunFlags:
    """State shared by the callbacks of one fit: did the loss diverge, and where."""

    def __init__(self):
        self.diverged = False
        self.message = ""

    def diverge(self, model, what: str) -> None:
        """Mark the fit as diverged (nothing more is checkpointed or backed up) and stop it after this step."""
        self.diverged = True
        self.message = f"{what}; {NAN_ADVICE}"
        print(f"\nSTOPPING: {self.message}", file=sys.stderr, flush=True)
        model.stop_training = True


# ----------------------------------------------------------------------------------------------- callbacks

def inference_model_of(model: keras.Model) -> keras.Model:
    """What validation predicts with and ``best.keras`` holds: the training model's ``inference_model`` when it
    has one (``train.recipe: aux_seg`` trains a decoder that is not served), else the model itself."""
    return getattr(model, "inference_model", None) or model


class NaNGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss, or a loss above ``LOSS_BOUND`` times the fit's first logged
    one (a finite blow-up), and records what to try (read by the trainer)."""

    LOSS_BOUND = 20.0

    def __init__(self, flags: RunFlags):
        super().__init__()
        self.flags = flags
        self._epoch = 0
        self.start_loss = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _check(self, logs, where):
        loss = (logs or {}).get("loss")
        if loss is None or self.flags.diverged:
            return
        loss = float(loss)
        if math.isfinite(loss) and self.start_loss is None:
            self.start_loss = loss
        if not math.isfinite(loss):
            self.flags.diverge(self.model, f"the training loss became {loss} at epoch {self._epoch} {where}")
        elif self.start_loss and self.start_loss > 0 and loss > self.LOSS_BOUND * self.start_loss:
            self.flags.diverge(self.model, f"the training loss rose to {loss:.4g} at epoch {self._epoch} {where}, "
                                           f"over {self.LOSS_BOUND:g} times its start ({self.start_loss:.4g})")

    def on_train_batch_end(self, batch, logs=None):
        self._check(logs, f"step {batch}")

    def on_epoch_end(self, epoch, logs=None):
        self._check(logs, "(epoch mean)")


class LearningRateLogger(keras.callbacks.Callback):
    """Puts the optimizer's current learning rate into the epoch logs (CSV, TensorBoard)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = learning_rate_value(self.model.optimizer)


class EMASwapper:
    """Swaps the optimizer's moving-average weights into the model and back (Keras' SwapEMAWeights logic)."""

    def __init__(self):
        self.in_model = False

    def swap(self, model, want_ema: bool):
        if self.in_model != want_ema:
            compat.swap_ema_weights(model)
            self.in_model = want_ema


class SwapEMAIn(keras.callbacks.Callback):
    def __init__(self, swapper: EMASwapper, flags: RunFlags):
        super().__init__()
        self.swapper, self.flags = swapper, flags

    def on_epoch_end(self, epoch, logs=None):
        if not self.flags.diverged:
            self.swapper.swap(self.model, True)


class SwapEMAOut(keras.callbacks.Callback):
    def __init__(self, swapper: EMASwapper):
        super().__init__()
        self.swapper = swapper

    def on_epoch_end(self, epoch, logs=None):
        self.swapper.swap(self.model, False)

    def on_train_end(self, logs=None):
        self.swapper.swap(self.model, False)


class Validation(keras.callbacks.Callback):
    """Each epoch: predict the whole validation fold, score it with the task's metric (``metrics.task_scores``).

    Adds ``val_auc`` (mean over the classes that have both labels) and ``val_auc_<label slug>`` to the
    epoch logs, for the callbacks after it; a task scored by ``weighted_log_loss`` adds
    ``val_weighted_log_loss`` (lower is better) and ``val_log_loss_<label slug>`` too. ``task``: a
    ``config.TaskConfig`` (default: RANZCR).
    """

    def __init__(self, eval_data, *, from_logits: bool, placement, flags: RunFlags, verbose: bool = True, task=None):
        from ranzcr_tf.config import TaskConfig
        from ranzcr_tf.model.metrics import monitor_for

        super().__init__()
        self.eval_data, self.from_logits, self.placement = eval_data, from_logits, placement
        self.flags, self.verbose = flags, verbose
        self.task = task or TaskConfig()
        self.monitor, self.mode = monitor_for(self.task.metric)
        self.targets = np.asarray(eval_data.targets)
        self.best = -math.inf if self.mode == "max" else math.inf
        self._predictor, self._predictor_of = None, None
        self.probabilities = None  # the last epoch's predictions (tests compare them with the kernel's)
        self.constant_epochs = 0

    def on_epoch_end(self, epoch, logs=None):
        from ranzcr_tf.model.metrics import is_better, task_scores

        logs = logs if logs is not None else {}
        if self.flags.diverged:
            logs["val_auc"] = math.nan
            logs[self.monitor] = math.nan
            return
        if self._predictor_of is not self.model:
            self._predictor = model_predict.build_predictor(inference_model_of(self.model),
                                                            from_logits=self.from_logits, placement=self.placement)
            self._predictor_of = self.model
        probs = model_predict.predict_eval(inference_model_of(self.model), self.eval_data,
                                           from_logits=self.from_logits, placement=self.placement,
                                           predictor=self._predictor)
        self.probabilities = probs  # this epoch's validation predictions, in eval_data.ids order
        if self._diverged_predictions(epoch, probs):
            logs["val_auc"] = logs[self.monitor] = math.nan
            return
        scores = task_scores(self.task, self.targets, probs)
        logs.update(scores)
        score = scores[self.monitor]
        if is_better(score, self.best, self.mode):
            self.best = float(score)
        if self.verbose:
            extra = f"  {self.monitor} {score:.4f}" if self.monitor != "val_auc" else ""
            print(f"epoch {epoch}: loss {logs.get('loss', math.nan):.4f}  val_auc {scores['val_auc']:.4f}{extra}",
                  flush=True)


    CONSTANT_EPOCHS = 2  # validation predictions identical for every study this many epochs running: diverged

    def _diverged_predictions(self, epoch: int, probs: np.ndarray) -> bool:
        """NaN/inf predictions, or the same prediction for every study (a saturated, dead model) for
        ``CONSTANT_EPOCHS`` epochs, or at the fit's last epoch: the model diverged (``RunFlags.diverge``)."""
        if not np.isfinite(probs).all():
            self.flags.diverge(self.model, f"the validation predictions hold NaN or inf at epoch {epoch}")
            return True
        constant = len(probs) > 1 and bool((np.ptp(probs, axis=0) < 1e-6).all())
        self.constant_epochs = self.constant_epochs + 1 if constant else 0
        last_epoch = epoch + 1 >= int((self.params or {}).get("epochs") or 0)
        if constant and (self.constant_epochs >= self.CONSTANT_EPOCHS or last_epoch):
            self.flags.diverge(self.model, f"the model predicts the same probabilities for every validation study "
                                           f"({self.constant_epochs} epoch(s) running, up to epoch {epoch})")
            return True
        return False


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, I/O error); the previous one is intact."""

    exit_code = 1  # the CLI prints the message as one line (``ranzcr_tf.cli``), without an internal-error hint


def _write_then_rename(make_bytes, path: str, what: str, keeps: str) -> None:
    """Build the file in memory (``make_bytes()``), then write it to a temporary sibling and rename it over
    ``path``: a kill, a full disk or an I/O error mid-write leaves the previous file as it was, no temporary
    file behind and no library file handle open (``compat.weights_file_bytes``: why that matters)."""
    data = make_bytes()
    try:
        io_utils.atomic_write_bytes(path, data)
    except OSError as exc:
        raise CheckpointWriteError(f"could not write {what} {path} ({exc.strerror or exc}; disk full?): {keeps}; "
                                   f"free space and rerun the same command to resume") from exc


def _atomic_save_model(model: keras.Model, path: str) -> None:
    """Save to a temporary sibling, then rename: a kill mid-save never leaves a broken best.keras."""
    from ranzcr_tf.train.placement import batchnorm_layers

    # Saved with BatchNorm synchronisation off: it only matters in training, and a saved
    # ``synchronized=True`` would stop the model loading under the JAX backend.
    synced = [layer for layer in batchnorm_layers(model) if layer.synchronized]
    for layer in synced:
        layer.synchronized = False
    try:
        with multihost.process_local_objects():  # every process saves (the others to a scratch folder), unsynchronised
            _write_then_rename(lambda: compat.model_file_bytes(model), path, "the best model",
                               "the previous best.keras is intact")
    finally:
        for layer in synced:
            layer.synchronized = True


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the model as ``best.keras`` whenever ``monitor`` beats the best so far in ``mode`` (``max``:
    higher is better, as ``val_auc``; ``min``: lower, as ``val_weighted_log_loss``), never a worse one.

    ``best`` survives restarts: the trainer restores it from ``best.json`` and the run state.
    """

    def __init__(self, path: str, monitor: str = "val_auc", mode: str = "max"):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"BestCheckpoint mode must be max or min, got {mode!r}")
        self.path, self.monitor, self.mode = path, monitor, mode
        self.best = -math.inf if mode == "max" else math.inf
        self.best_epoch = None
        self.info_path = os.path.splitext(path)[0] + ".json"

    def on_epoch_end(self, epoch, logs=None):
        from ranzcr_tf.model.metrics import is_better

        current = (logs or {}).get(self.monitor)
        if current is None or not is_better(float(current), self.best, self.mode):
            return
        _atomic_save_model(inference_model_of(self.model), self.path)
        try:
            io_utils.atomic_write_json(self.info_path, {"epoch": int(epoch), self.monitor: float(current)})
        except OSError as exc:
            raise CheckpointWriteError(f"could not write {self.info_path} ({exc.strerror}; disk full?): free space "
                                       "and rerun the same command to resume") from exc
        self.best, self.best_epoch = float(current), int(epoch)

    def get_state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def set_state(self, state: dict) -> None:
        from ranzcr_tf.model.metrics import is_better

        best = state.get("best")
        if best is not None and is_better(float(best), self.best, self.mode):
            self.best, self.best_epoch = float(best), state.get("best_epoch")


class _ResumableCounters:
    """Mixin for a Keras callback whose counters (``RESUMED``: (attribute, type) pairs) carry over a restart.

    The trainer sets ``pending_state`` (a ``get_state()`` of the epoch the restart continues after);
    ``on_train_begin`` restores it over the fresh values Keras sets there. A missing or null value
    keeps the fresh one.
    """

    RESUMED: tuple = ()
    pending_state: dict | None = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        for name, kind in self.RESUMED:
            value = (self.pending_state or {}).get(name)
            if value is not None:
                setattr(self, name, kind(value))

    def get_state(self) -> dict:
        return {name: None if getattr(self, name) is None else kind(getattr(self, name))
                for name, kind in self.RESUMED}


class ResumableEarlyStopping(_ResumableCounters, keras.callbacks.EarlyStopping):
    """EarlyStopping whose patience counter and best value carry over a restart."""

    RESUMED = (("wait", int), ("best", float))


class ResumablePlateau(_ResumableCounters, keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose counters carry over a restart (the lowered rate itself is in the backup)."""

    RESUMED = (("wait", int), ("cooldown_counter", int), ("best", float))


class CSVLog(keras.callbacks.CSVLogger):
    """Keras' ``CSVLogger`` that also closes a ``gs://`` log: Keras asks the file for ``.closed``, which
    ``tf.io.gfile.GFile`` lacks, so a remote run folder failed at the end of every ``fit``."""

    def on_train_end(self, logs=None):
        if self.csv_file is not None:
            self.csv_file.close()
            self.csv_file = None
        self.writer = None


class RunState(keras.callbacks.Callback):
    """Writes ``train_state.json`` each epoch: the stateful callbacks' counters, keyed by epoch."""

    def __init__(self, path: str, stateful: dict, flags: RunFlags, writer: bool = True):
        super().__init__()
        self.path, self.stateful, self.flags, self.writer = path, stateful, flags, writer

    def on_epoch_end(self, epoch, logs=None):
        if self.flags.diverged or not self.writer:
            return
        state = read_state(self.path)
        snapshots = state.setdefault("snapshots", {})
        snapshots[str(epoch)] = {name: cb.get_state() for name, cb in self.stateful.items()}
        for key in sorted(snapshots, key=int)[:-3]:  # a restart needs only the latest ones
            del snapshots[key]
        io_utils.atomic_write_json(self.path, state)


def read_state(path: str) -> dict:
    return json.loads(io_utils.read_text(path)) if io_utils.exists(path) else {}


BACKUP_METADATA = "training_metadata.json"


def backup_epoch(backup_dir: str) -> int | None:
    """Epochs completed according to a backup folder, or None when there is no backup."""
    path = io_utils.join(backup_dir, BACKUP_METADATA)
    if not io_utils.exists(path):
        return None
    return int(json.loads(io_utils.read_text(path))["epoch"])


class Backup(keras.callbacks.Callback):
    """Backs up weights and optimizer after every epoch, safe to kill at any moment, chief-only, NaN-aware.

    Weights go to ``epoch{N}.weights.h5`` and only then does the metadata (written atomically) point at
    them, so a restart always finds a complete pair. Non-chief workers read the chief's folder and write
    nothing. Weights of a diverged epoch are never backed up. The backup is kept after training.

    ``on_train_begin`` restores the backup's weights; the trainer passes ``initial_epoch=backup_epoch(...)``
    to ``fit`` so the epochs continue where the backup ends. (Keras' ``BackupAndRestore`` does both through
    private hooks and a private model attribute; this class needs neither.)
    """

    def __init__(self, backup_dir: str, *, flags: RunFlags, writer: bool = True):
        super().__init__()
        if not backup_dir:
            raise ValueError("Backup needs a backup folder")
        self.backup_dir, self.flags, self.writer = backup_dir, flags, writer

    def on_train_begin(self, logs=None):
        self.restore()

    def restore(self) -> int | None:
        """Load the backup's weights (and optimizer state) into the model; returns its epoch count, or None."""
        epoch = backup_epoch(self.backup_dir)
        if epoch is None:
            return None
        meta = json.loads(io_utils.read_text(io_utils.join(self.backup_dir, BACKUP_METADATA)))
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        weights = io_utils.join(self.backup_dir, meta["weights"])
        try:
            self.model.load_weights(weights)
        except (OSError, ValueError) as exc:
            raise ValueError(f"the backup {weights} cannot be read ({(str(exc).splitlines() or ['?'])[0]}): pass "
                             "--restart to train this fold anew") from None
        step = compat.optimizer_steps(self.model.optimizer) if self.model.optimizer else 0
        print(f"resumed from {self.backup_dir}: {epoch} epoch(s) already done, optimizer step {step}", flush=True)
        return epoch

    def on_epoch_end(self, epoch, logs=None):
        self.save(epoch + 1)

    def save(self, epochs_done: int) -> None:
        """Write the weights after ``epochs_done`` epochs, then point the metadata at them (chief only)."""
        if not self.writer or self.flags.diverged:
            return
        io_utils.makedirs(self.backup_dir)
        name = f"epoch{epochs_done}.weights.h5"
        previous = backup_epoch(self.backup_dir)
        keeps = (f"the backup of epoch {previous} is intact" if previous is not None else "no earlier backup exists")
        with multihost.process_local_objects():  # the chief alone: no collectives (multihost)
            _write_then_rename(lambda: compat.weights_file_bytes(self.model), io_utils.join(self.backup_dir, name),
                               "the backup", keeps)
        try:
            io_utils.atomic_write_json(io_utils.join(self.backup_dir, BACKUP_METADATA),
                                       {"epoch": epochs_done, "batch": 0, "weights": name})
        except OSError as exc:
            raise CheckpointWriteError(f"could not write the backup metadata in {self.backup_dir} ({exc.strerror}; "
                                       f"disk full?): {keeps}; free space and rerun the same command to resume") from exc
        for old in io_utils.listdir(self.backup_dir):
            if old.endswith(".weights.h5") and old != name:
                io_utils.remove(io_utils.join(self.backup_dir, old))


class TimeBudgetReached(RuntimeError):
    """Training stopped after an epoch's checkpoint because the next epoch would overrun ``train.max_minutes``."""

    exit_code = 75  # EX_TEMPFAIL: not an error of the run; the same command continues it


class TimeBudget(keras.callbacks.Callback):
    """Raise ``TimeBudgetReached`` after an epoch (after its backup) when another epoch as long as the
    longest so far would end past ``max_minutes`` from the process start. Listed after ``Backup``."""

    def __init__(self, max_minutes: float, placement=None, started: float = PROCESS_CLOCK_START):
        super().__init__()
        self.deadline = started + 60.0 * float(max_minutes)
        self.placement, self.longest, self.epoch_started = placement, 0.0, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        self.longest = max(self.longest, now - (self.epoch_started or now))
        stop = now + self.longest > self.deadline
        if self.placement is not None:  # several processes (their own clocks) stop at the same epoch
            stop = multihost.any_everywhere(self.placement, stop)
        if stop:
            minutes = (self.deadline - PROCESS_CLOCK_START) / 60.0
            raise TimeBudgetReached(
                f"stopped after epoch {epoch + 1}, its checkpoint saved: another epoch ({self.longest / 60:.1f} min) "
                f"would pass train.max_minutes={minutes:g}; run the same command again (on Kaggle: the next "
                "session, with this one's output attached) to continue")


class KillAfterEpoch(keras.callbacks.Callback):
    """Test hook: with ``RANZCR_TF_KILL_AFTER_EPOCH=N`` the process SIGKILLs itself after epoch N's backup.

    In a multi-process run every process first meets the others at a barrier: a process killed while a
    peer is still inside the epoch's collectives makes JAX's coordination service abort that peer (SIGABRT)
    instead of the kill the test simulates."""

    def __init__(self, epoch: int, placement=None):
        super().__init__()
        self.epoch, self.placement = int(epoch), placement

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            if self.placement is not None:
                multihost.check_same_everywhere(self.placement, "the epoch of the test kill", epoch)
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
