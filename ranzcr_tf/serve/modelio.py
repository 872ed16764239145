"""Finding trained runs and loading their models safely (Keras safe mode; no legacy ``.h5``; no ``Lambda``).

    models = discover_models(["runs/b7_768"])       # one ModelSpec per run, one FoldSpec per best.keras
    model = load_fold_model(models[0].folds[0])     # keras.Model, compile=False, safe_mode=True

A run folder (written by training; its layout is ``ranzcr_tf.runs``) looks like ``runs/NAME/fold{k}/``
holding ``best.keras``, ``config.yaml`` (the resolved Config), ``preprocess.json`` (the converter's
preprocessing of the records it was trained on), ``metrics.json`` and ``oof.csv``. A path given as a model may be a run
folder, a single fold folder, a ``best.keras`` file, or a folder holding several runs (an attached
Kaggle dataset): every ``best.keras`` under it is found and grouped by run (the folder above the
``fold{k}`` folders). Every setting inference needs comes from the files beside each model.

Discovery and the checks (``model.files``) import no TensorFlow or Keras; only :func:`load_fold_model` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field

from ranzcr_tf.config import Config, PreprocessConfig, load_config
from ranzcr_tf.labels import LABELS
from ranzcr_tf.model.files import LEGACY_SUFFIXES, check_model_file, legacy_error, load_model_file
from ranzcr_tf.prep import records
from ranzcr_tf.runs import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PREPROCESS_FILE,
    final_stage_dir,
    fold_status,
    is_fold_dir,
)


@dataclass
class FoldSpec:
    """One fold's model file and every setting needed to feed it."""

    path: str  # the .keras file
    name: str  # "RUN/fold0"
    cfg: Config
    preprocess: PreprocessConfig
    model_image_size: int = 0  # from preprocess.json when training wrote it

    @property
    def image_size(self) -> int:
        """Model input size: as recorded by training, else ``data.image_size``, else the stored size."""
        return int(self.model_image_size or self.cfg.data.image_size or self.preprocess.image_size)

    @property
    def output(self) -> str:
        return self.cfg.model.output

    def preprocess_key(self) -> tuple:
        """Hashable identity of the preprocessing: folds with equal keys share preprocessed test images."""
        return tuple(sorted(dataclasses.asdict(self.preprocess).items()))


@dataclass
class ModelSpec:
    """One trained run (a model of the ensemble) and its folds."""

    name: str
    root: str
    folds: list[FoldSpec] = field(default_factory=list)


def _find_upwards(folder: str, name: str, stop: str) -> str | None:
    """``name`` in ``folder`` or one of its parents up to ``stop`` (a run-level config serves every fold)."""
    folder, stop = os.path.abspath(folder), os.path.abspath(stop)
    while True:
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return candidate
        if folder == stop or os.path.dirname(folder) == folder:
            return None
        folder = os.path.dirname(folder)


def read_preprocess_json(path: str, expected_labels=LABELS) -> tuple[PreprocessConfig, int]:
    """A run's ``preprocess.json`` (the converter manifest's ``preprocess`` block): the settings, and the model
    input size training recorded (0 when absent).

    Refuses records decoded with another decoder than the project's (the pixels would differ).
    """
    with open(path) as fh:
        values = json.load(fh)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object with the preprocessing settings")
    decoder, dct = values.get("decoder"), values.get("stored_dct_method", records.DCT_METHOD)
    if decoder != records.SOURCE_DECODER or dct != records.DCT_METHOD:
        raise ValueError(f"{path}: records made with decoder={decoder!r}, stored_dct_method={dct!r}; this ranzcr-tf "
                         f"preprocesses with decoder={records.SOURCE_DECODER!r} and decodes with "
                         f"{records.DCT_METHOD!r}: retrain on records from this version's converter")
    saved_labels = values.get("labels")
    if saved_labels is not None and list(saved_labels) != list(expected_labels):
        raise ValueError(f"{path}: the model was trained with label order {saved_labels}, its config's task says "
                         f"{list(expected_labels)}: its outputs would land in the wrong submission columns")
    return PreprocessConfig.from_dict(values), int(values.get("model_image_size") or 0)


def _fold_spec(model_path: str, search_stop: str, name: str) -> FoldSpec:
    folder = os.path.dirname(os.path.abspath(model_path))
    config_path = _find_upwards(folder, CONFIG_FILE, search_stop)
    if config_path is None:
        raise ValueError(f"{model_path}: no {CONFIG_FILE} beside it (or in its run folder); inference needs the "
                         f"run's saved config to rebuild the input pipeline")
    cfg = load_config(config_path)
    preprocess_path = _find_upwards(folder, PREPROCESS_FILE, search_stop)
    model_size = 0
    if preprocess_path is not None:
        settings, model_size = read_preprocess_json(preprocess_path, cfg.task.labels)
    else:  # older runs: the config's preprocess section is the best record of the training records
        print(f"warning: {model_path}: no {PREPROCESS_FILE}; using the preprocess section of {config_path}")
        settings = cfg.preprocess
    return FoldSpec(path=os.path.abspath(model_path), name=name, cfg=cfg, preprocess=settings,
                    model_image_size=model_size)


def _run_folder(model_path: str) -> str:
    fold_folder = os.path.dirname(os.path.abspath(model_path))
    return os.path.dirname(fold_folder) if is_fold_dir(fold_folder) else fold_folder


def discover_models(paths: list[str], exclude: tuple[str, ...] = ()) -> list[ModelSpec]:
    """One :class:`ModelSpec` per run found under ``paths`` (in the order given; sorted within a path).

    Raises ``ValueError`` naming the path when nothing usable is found, when a folder holds only
    legacy ``.h5`` models, or when a fold lacks its ``config.yaml``.
    """
    models: dict[str, ModelSpec] = {}
    for given in paths:
        if not os.path.exists(given):
            raise ValueError(f"--models {given}: no such file or folder")
        if os.path.isfile(given):
            check_model_file(given)
            found = [given]
        else:
            found, legacy = [], []
            for folder, dirs, files in os.walk(given, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and os.path.abspath(os.path.join(folder, d)) not in exclude)
                final = final_stage_dir(folder)
                if final is not None:  # a 3stage run: serve its final (image-only) stage, not teacher or student
                    dirs[:] = [d for d in dirs if os.path.join(folder, d) == final]
                found += [os.path.join(folder, f) for f in sorted(files) if f == MODEL_FILE]
                legacy += [os.path.join(folder, f) for f in files if f.lower().endswith(LEGACY_SUFFIXES)]
            if not found:
                if legacy:
                    raise legacy_error(legacy[0])
                raise ValueError(f"--models {given}: no {MODEL_FILE} under it; pass a run folder written by "
                                 f"train_tpu.py (runs/NAME with fold*/best.keras)")
        base = os.path.dirname(os.path.abspath(given))
        for model_path in found:
            run = _run_folder(model_path)
            run_name = os.path.relpath(run, base)
            if run_name == "." or run_name.startswith(".."):
                run_name = os.path.basename(run)
            fold_name = os.path.relpath(os.path.dirname(os.path.abspath(model_path)), run)
            spec = models.setdefault(run, ModelSpec(name=run_name, root=run))
            if any(f.path == os.path.abspath(model_path) for f in spec.folds):
                continue
            spec.folds.append(_fold_spec(model_path, run, run_name if fold_name == "." else f"{run_name}/{fold_name}"))
    for spec in models.values():
        for fold in spec.folds:
            check_model_file(fold.path)
    return list(models.values())


def incomplete_folds(models: list[ModelSpec]) -> list[str]:
    """One phrase per fold whose training did not finish (``runs.fold_status``): its name and last epoch."""
    found = []
    for spec in models:
        for fold in spec.folds:
            complete, last = fold_status(os.path.dirname(fold.path))
            if not complete:
                done = "no epoch logged" if last is None else f"last epoch {last} of {fold.cfg.train.epochs}"
                found.append(f"{fold.name} ({done})")
    return found


def check_complete(models: list[ModelSpec], allow_incomplete: bool, what: str) -> list[str]:
    """Refuse (one line) folds whose training never finished, unless ``allow_incomplete``; returns them."""
    found = incomplete_folds(models)
    if found and not allow_incomplete:
        raise ValueError(f"{', '.join(found)}: training did not finish (not marked completed in its train_state.json, "
                         f"no {METRICS_FILE}), so {what} would use an early best.keras: finish it (rerun the same "
                         "train_tpu.py command) or pass --allow-incomplete to use it anyway")
    if found:
        print(f"note: --allow-incomplete: using fold(s) whose training did not finish: {', '.join(found)}",
              file=sys.stderr)
    return found


def load_fold_model(fold: FoldSpec):
    """Load one fold's model (:func:`load_model_file`) and check it against the fold's saved config."""
    model = load_model_file(fold.path)
    shape = model.input_shape
    if isinstance(shape, list):
        raise ValueError(f"{fold.path}: the model has {len(shape)} inputs; expected one image input")
    if shape[1] is not None and (shape[1] != fold.image_size or shape[2] != fold.image_size):
        raise ValueError(f"{fold.path}: the model takes {shape[1]}x{shape[2]} images but its config says "
                         f"{fold.image_size}: the run folder's config.yaml does not belong to this model")
    if shape[-1] != fold.cfg.model.input_channels:
        raise ValueError(f"{fold.path}: the model takes {shape[-1]} channel(s) but its config says "
                         f"model.input_channels={fold.cfg.model.input_channels}")
    return model


def verify_models(models: list[ModelSpec]) -> None:
    """Open every fold's model once (zip CRC, safe-mode load, input shape), so a bad file stops the command
    when it starts rather than when its fold is reached hours later."""
    import gc

    for spec in models:
        for fold in spec.folds:
            model = load_fold_model(fold)
            del model
    gc.collect()
