"""The Kaggle submission kernel: ``python kaggle_kernel.py`` or ``python -m ranzcr_tf.serve.kernel``.

Offline (no network), batched, with progress bars; every setting of every model comes from its run
folder. See ``--help`` for the time-budget behaviour.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from ranzcr_tf import cli, kaggle_paths
from ranzcr_tf.config import ENSEMBLE_METHODS, TTA_VIEWS, InferConfig, given_keys, load_config
from ranzcr_tf.runs import MODEL_FILE
from ranzcr_tf.serve.budget import DEGRADE_ORDER, Budget

# Shown in --help; the paths used are kaggle_paths' (RANZCR_KAGGLE_ROOT moves them, for rehearsals and tests).
KAGGLE_DATA_DIR = f"/kaggle/input/{kaggle_paths.COMPETITION}"
KAGGLE_INPUT = "/kaggle/input"
KAGGLE_WORKING = "/kaggle/working"
KAGGLE_TMP = "/kaggle/tmp"
DEFAULT_MAX_MINUTES = 480.0  # Kaggle's GPU/TPU notebooks stop at 9 h; leave room for start-up and installs

EPILOG = f"""
inputs and defaults:
  On Kaggle every default works: --data-dir {KAGGLE_DATA_DIR},
  --models = every folder under {KAGGLE_INPUT} holding best.keras files (your attached datasets),
  --out {KAGGLE_WORKING}/submission.csv. Elsewhere pass --models and --data-dir (or --tfrecords).
  A --models path may be a run folder (runs/NAME with fold*/best.keras), one fold folder, a .keras
  file, or a folder of several runs; each run is one model of the ensemble, its folds are averaged.
  Each fold is fed images preprocessed with its own preprocess.json and input size (raw test JPEGs
  are preprocessed once per distinct setting; --tfrecords are used for folds whose settings match).

settings:
  --config YAML / --set infer.KEY=VALUE give the infer.* settings (tta, ensemble, weights, batch_size);
  the flags below override them; every other setting of a model comes from its own run folder.

averaging:
  probabilities (sigmoid of logits) are averaged over TTA views, then over a run's folds, then
  combined over runs with --ensemble: mean, rank_mean (per-column ranks, for differently
  calibrated models), or weighted (--weights, one per run, in the order runs are listed).
  --blend blend.json instead applies per-label weights fitted on the runs' out-of-fold predictions
  (python -m ranzcr_tf.serve.blend), on probabilities or on ranks as they were fitted.

time budget (--max-minutes, default {DEFAULT_MAX_MINUTES:g}):
  After the first batches the estimated total time is printed. The plan is re-chosen before every
  pass from measured times; if it would overrun the budget, work is dropped in this order:
    1. {DEGRADE_ORDER[0]}, down to the first --tta view only;
    2. {DEGRADE_ORDER[1]}, down to one fold per model;
    3. {DEGRADE_ORDER[2]}, down to one model.
  A pass still running at the deadline is abandoned; the submission is the ensemble of every
  finished pass. If not even one pass finished, the rows the unfinished pass predicted are used and
  the remaining rows get the column means of those (0.5 if none): the file is always complete.
  After every finished pass the ensemble so far is written to .partial-submission.csv beside --out;
  --out itself is written once, atomically, when the run completes, so an earlier complete --out is
  never replaced by a partial file. --out is checked writable and every model file is opened and
  verified (zip CRC, safe-mode load) before any image is predicted.

test records:
  --tfrecords are checked against sample_submission.csv first: record counts per shard against the
  shard names and the manifest, and the IDs against the sample. Test images the converter skipped as
  unreadable get the column means of the other rows (a warning names them and why). Any other
  missing ID is an error naming it and the missing shards, unless its raw JPEG is in --data-dir/test:
  then those images are preprocessed with the run's own settings and predicted with the records
  (a one-line note says so). Records of IDs the sample does not list are an error.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser(
        "kaggle_kernel.py", "Predict the RANZCR CLiP test set with an ensemble of trained runs "
        "(TTA x folds x models) and write submission.csv.", epilog=EPILOG, settings=True, progress=True)
    parser.add_argument("--data-dir", help=f"competition folder with sample_submission.csv and test/*.jpg "
                        f"(default on Kaggle: {KAGGLE_DATA_DIR})")
    parser.add_argument("--models", nargs="+", metavar="RUN_DIR", help="run folders (or fold folders / .keras "
                        f"files); default on Kaggle: every folder under {KAGGLE_INPUT} holding best.keras")
    parser.add_argument("--tfrecords", help="converter output folder whose test/ shards to predict instead of "
                        "preprocessing raw test JPEGs (used for the folds trained with the same preprocessing)")
    parser.add_argument("--out", help=f"submission path (default: {KAGGLE_WORKING}/submission.csv on Kaggle, "
                        "else ./submission.csv)")
    parser.add_argument("--max-minutes", type=float, default=DEFAULT_MAX_MINUTES,
                        help="wall-clock budget for the whole kernel (0 = no limit)")
    parser.add_argument("--tta", nargs="+", choices=TTA_VIEWS, help="TTA views, most important first "
                        "(default: infer.tta of --config, else the runs' saved infer.tta; views not every run lists "
                        "are left out); the last ones are dropped first under the budget")
    parser.add_argument("--ensemble", choices=ENSEMBLE_METHODS,
                        help=f"how runs are combined (default: infer.ensemble of --config, else {InferConfig().ensemble})")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per run for --ensemble weighted "
                        "(default: infer.weights of --config)")
    parser.add_argument("--blend", metavar="BLEND_JSON", help="per-label weights fitted on the runs' OOF by "
                        "`python -m ranzcr_tf.serve.blend` (replaces --ensemble/--weights; its run names must be "
                        "the --models runs' folder names)")
    parser.add_argument("--batch-size", type=int, help="prediction batch size (default: infer.batch_size of "
                        "--config, else each run's own)")
    parser.add_argument("--workers", type=int, default=0,
                        help="threads (in this process) preprocessing raw test images; 0 = one per available core (default)")
    parser.add_argument("--plan", action="store_true", help="measure load, preprocessing and prediction speed on "
                        "the first --plan-images test images per model, print the estimate for folds x TTA x test "
                        "images against --max-minutes and which plan fits; writes no submission")
    parser.add_argument("--plan-images", type=int, default=16, help="--plan: test images timed per model (default 16)")
    parser.add_argument("--allow-incomplete", action="store_true", help="also serve folds whose training did not "
                        "finish (refused by default: a preempted run's early best.keras); the log says which")
    parser.add_argument("--work-dir", help=f"scratch folder for preprocessed test images (default: {KAGGLE_TMP} "
                        "on Kaggle, else the system temp folder); removed at the end")
    return parser


def kaggle_model_dirs(input_dir: str | None = None, competition_dir: str | None = None) -> list[str]:
    """Every attached dataset folder under ``input_dir`` (except the competition's) holding a best.keras."""
    input_dir = input_dir or kaggle_paths.input_dir()
    competition_dir = competition_dir or kaggle_paths.competition_dir()
    found = []
    for name in sorted(os.listdir(input_dir)):
        folder = os.path.join(input_dir, name)
        if not os.path.isdir(folder) or os.path.abspath(folder) == os.path.abspath(competition_dir):
            continue
        if any(MODEL_FILE in files for _, _, files in os.walk(folder, followlinks=True)):
            found.append(folder)
    return found


def resolve_paths(args) -> tuple[str | None, list[str], str]:
    """Fill the Kaggle defaults, or stop with a message saying what to pass."""
    on_kaggle = kaggle_paths.on_kaggle()
    data_dir = args.data_dir
    if data_dir is None and on_kaggle and os.path.isdir(kaggle_paths.competition_dir()):
        data_dir = kaggle_paths.competition_dir()
    if data_dir is None and args.tfrecords is None:
        raise ValueError("no test data: pass --data-dir DIR (the competition folder with sample_submission.csv "
                         "and test/) or --tfrecords DIR (converted test records)")
    models = args.models
    if not models:
        if not on_kaggle:
            raise ValueError("no models: pass --models RUN_DIR [RUN_DIR ...] (run folders written by train_tpu.py, "
                             "e.g. runs/NAME with fold*/best.keras)")
        models = kaggle_model_dirs()
        if not models:
            raise ValueError(f"no best.keras under {kaggle_paths.input_dir()}: attach the dataset made by "
                             f"`python -m ranzcr_tf.serve.package` (Add data -> Your datasets), or pass --models")
    out = args.out or (kaggle_paths.working_dir("submission.csv") if os.path.isdir(kaggle_paths.working_dir())
                       else "submission.csv")
    return data_dir, models, out


def partial_path(out: str) -> str:
    """Where the ensemble of the passes finished so far is kept until the whole run completes."""
    folder, name = os.path.split(os.path.abspath(out))
    return os.path.join(folder, f".partial-{name}")


def saved_tta(models) -> list[str]:
    """TTA views as the runs were configured (``infer.tta`` in each fold's config.yaml).

    Views are shared by the whole ensemble, so only those every fold lists are used, in the first fold's order;
    a model trained without flips (because sides matter to its labels) thus never sees a mirrored view.
    """
    folds = [fold for spec in models for fold in spec.folds]
    views = [view for view in folds[0].cfg.infer.tta if all(view in fold.cfg.infer.tta for fold in folds)]
    if not views:
        raise ValueError("the runs' saved infer.tta lists have no view in common; pass --tta explicitly")
    if any(list(fold.cfg.infer.tta) != views for fold in folds):
        print(f"note: runs list different TTA views; using the ones all share: {' '.join(views)}", file=sys.stderr)
    return views


def load_blend(args, models):
    """``--blend``'s weights in the order of ``models`` (None without it); its runs must be exactly these."""
    path = getattr(args, "blend", None)
    if not path:
        return None
    if args.ensemble or args.weights:
        raise ValueError("--blend replaces --ensemble and --weights: pass one or the other")
    from ranzcr_tf.serve.blend import read_blend, run_name, weights_for_models
    from ranzcr_tf.serve.ensemble import BlendWeights

    blend = read_blend(path)
    matrix = weights_for_models(blend, [run_name(spec.root) for spec in models], path)
    return BlendWeights(weights=matrix, rank=bool(blend["rank"]))


def check_out_is_not_an_input(out: str, data_dir: str | None, model_paths: list[str], tfrecords: str | None,
                              task) -> None:
    """``--out`` must not overwrite what the kernel reads: the sample submission, a test image folder, a run or
    the test records (a ``ValueError`` naming both)."""
    target = os.path.realpath(out)
    files = [os.path.join(data_dir, name) for name in {"sample_submission.csv", task.sample_submission}] if data_dir else []
    folders = [*model_paths, *([tfrecords] if tfrecords else [])]
    if data_dir:
        folders += [os.path.join(data_dir, name) for name in {"test", *task.test_images}]
    for path in files + folders:
        real = os.path.realpath(path)
        if target == real or (path in folders and target.startswith(real.rstrip(os.sep) + os.sep)):
            raise ValueError(f"--out {out} would overwrite the kernel's own input {path}: pass another path, e.g. "
                             f"{os.path.join(os.getcwd(), 'submission.csv')}")


def check_config_task(config_path: str | None, overrides: list[str], task) -> None:
    """A ``--config`` (or ``--set task.*``) of another task than the runs' is refused: its infer settings were
    meant for other models."""
    if not config_path and not any(item.startswith("task.") for item in overrides):
        return
    given = load_config(config_path, overrides).task
    if (given.name, list(given.labels)) != (task.name, list(task.labels)):
        raise ValueError(f"--config {config_path} is for task {given.name!r} but the runs were trained for "
                         f"{task.name!r}: pass a config of the runs' task, or none (each run's own settings apply)")


def allowed_tta(tta: list[str], models) -> list[str]:
    """``tta`` without the views some run was not trained for (its saved ``infer.tta`` leaves them out, e.g. no
    flip where sides matter to its labels), with a note naming them; an error if none is left."""
    permitted = {view for view in tta if all(view in fold.cfg.infer.tta for spec in models for fold in spec.folds)}
    dropped = [view for view in tta if view not in permitted]
    if dropped:
        print(f"note: TTA view(s) {' '.join(dropped)} dropped: a run's saved infer.tta leaves them out (its labels "
              "depend on what the view changes)", file=sys.stderr)
    kept = [view for view in tta if view in permitted]
    if not kept:
        raise ValueError(f"no TTA view of {' '.join(tta)} is allowed by every run; pass --tta identity")
    return kept


def runs_task(models):
    """The task every run was trained for (saved in its config); runs of different tasks are refused."""
    tasks = {(fold.cfg.task.name, tuple(fold.cfg.task.labels)): fold.cfg.task for spec in models for fold in spec.folds}
    if len(tasks) > 1:
        raise ValueError(f"the runs were trained for different tasks or label orders {sorted(tasks)}: ensemble runs "
                         "of one task only")
    return next(iter(tasks.values()))


def inference_settings(args, config_path: str | None, overrides: list[str]):
    """The config's infer.* settings, which of them were given, --batch-size and the time budget (refusals first)."""
    settings, given = load_config(config_path, overrides).infer, given_keys(config_path, overrides)
    batch_size = args.batch_size or (settings.batch_size if "infer.batch_size" in given else None)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    max_seconds = None if not args.max_minutes else args.max_minutes * 60.0
    clock = getattr(args, "clock", None) or time.monotonic
    # Kept back at the end for writing the file and exiting: 5% of the budget, at most 2 minutes.
    budget = Budget(max_seconds, clock=clock, reserve_seconds=min(120.0, 0.05 * max_seconds) if max_seconds else 0.0)
    return settings, given, batch_size, max_seconds, budget


def load_models(args, data_dir, model_paths, out, config_path, overrides, settings, given, batch_size):
    """Find, check and verify the runs; returns (models, incomplete folds, task, InferConfig, blend or None)."""
    from ranzcr_tf.serve.modelio import check_complete, discover_models, verify_models

    models = discover_models(model_paths, exclude=(os.path.abspath(kaggle_paths.competition_dir()),))
    incomplete = check_complete(models, bool(getattr(args, "allow_incomplete", False)), "the submission")
    verify_models(models)  # every fold's file opened now (zip CRC, safe-mode load), not when its fold is reached
    task = runs_task(models)
    check_config_task(config_path, overrides, task)
    check_out_is_not_an_input(out, data_dir, model_paths, args.tfrecords, task)
    tta = allowed_tta(args.tta or (settings.tta if "infer.tta" in given else None) or saved_tta(models), models)
    infer_cfg = InferConfig(tta=list(tta), ensemble=args.ensemble or settings.ensemble,
                            weights=list(settings.weights if args.weights is None else args.weights),
                            batch_size=batch_size or 1)
    infer_cfg.validate()
    blend = load_blend(args, models)
    if infer_cfg.ensemble == "weighted" and blend is None:
        from ranzcr_tf.serve.ensemble import check_weights

        check_weights(infer_cfg.weights, len(models))
    return models, incomplete, task, infer_cfg, blend


def print_models(models, infer_cfg: InferConfig, blend) -> None:
    """One stderr line per model of the ensemble: name, folds, input sizes and weight."""
    for index, spec in enumerate(models):
        weight = f", weight {infer_cfg.weights[index]:g}" if infer_cfg.ensemble == "weighted" and blend is None else ""
        if blend is not None:
            weight = f", blend weights {blend.weights[index].min():.2f}..{blend.weights[index].max():.2f}"
        sizes = sorted({fold.image_size for fold in spec.folds})
        print(f"model {index}: {spec.name} ({len(spec.folds)} fold(s), {'/'.join(map(str, sizes))} px{weight})",
              file=sys.stderr)


def make_work_dir(args) -> str:
    """A scratch folder for preprocessed test images: under --work-dir, else Kaggle's tmp when present."""
    scratch_parent = args.work_dir or (kaggle_paths.tmp_dir() if os.path.isdir(kaggle_paths.tmp_dir()) else None)
    if scratch_parent:
        os.makedirs(scratch_parent, exist_ok=True)
    return tempfile.mkdtemp(prefix="ranzcr-test-", dir=scratch_parent)


def predict_and_write(models, source, infer_cfg: InferConfig, budget: Budget, batch_size, blend, out: str,
                      progress: bool):
    """Predict the ensemble (checkpointing beside --out) and write --out atomically; returns (probs, report)."""
    from ranzcr_tf.serve.infer import predict_ensemble
    from ranzcr_tf.serve.submission import (
        build_long_submission,
        build_submission,
        write_long_submission,
        write_submission,
    )

    template = source.template
    partial = partial_path(out)

    def checkpoint(probs):  # the ensemble so far, beside --out: an earlier complete --out is never replaced by it
        write_submission(build_submission(template, probs), partial, template)

    probs, report = predict_ensemble(models, source, infer_cfg, budget, batch_size=batch_size,
                                     progress=progress, checkpoint=checkpoint, blend=blend)
    if source.long_template is not None:  # RSNA: ID,Label rows in the sample submission's order
        write_long_submission(build_long_submission(source.long_template, source.ids, probs), out,
                              source.long_template)
    else:
        write_submission(build_submission(template, probs), out, template)
    if os.path.exists(partial):
        os.remove(partial)
    return probs, report


def run(args) -> dict:
    """Everything ``main`` does, returning a summary (tests call this)."""
    start = time.monotonic()
    data_dir, model_paths, out = resolve_paths(args)
    plan = getattr(args, "plan", False)
    if not plan:
        cli.check_output_file(out)  # now, not after the whole inference pass
    config_path, overrides = getattr(args, "config", None), list(getattr(args, "overrides", None) or [])
    settings, given, batch_size, max_seconds, budget = inference_settings(args, config_path, overrides)

    import keras

    from ranzcr_tf import device
    from ranzcr_tf.serve.infer import TestSource

    if keras.backend.backend() == "jax":
        device.hide_accelerators_from_tf()  # tf.data only; JAX owns the GPU/TPU
    models, incomplete, task, infer_cfg, blend = load_models(args, data_dir, model_paths, out, config_path,
                                                             overrides, settings, given, batch_size)
    print_models(models, infer_cfg, blend)
    work_dir = make_work_dir(args)
    try:
        source = TestSource.from_paths(data_dir, args.tfrecords, work_dir, workers=args.workers,
                                       progress=not args.quiet, task=task)
        if plan:  # measured on a few real test images; no submission is written
            from ranzcr_tf.serve.kernel_plan import plan_kernel

            return {"plan": plan_kernel(models, source, infer_cfg, max_seconds, batch_size=batch_size,
                                        sample=args.plan_images)}
        probs, report = predict_and_write(models, source, infer_cfg, budget, batch_size, blend, out,
                                          progress=not args.quiet)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    elapsed = time.monotonic() - start
    template = source.template
    rows = len(template) if source.long_template is None else len(source.long_template.frame)
    print(f"wrote {out}: {rows} rows ({len(template)} images); plan used: {report.final_plan or 'fallback (no pass finished)'} "
          f"of {report.full_plan}; {elapsed / 60:.1f} min"
          + (f"; INCOMPLETE fold(s) used (--allow-incomplete): {', '.join(incomplete)}" if incomplete else ""),
          file=sys.stderr)
    return {"out": out, "report": report, "models": models, "rows": rows, "elapsed_seconds": elapsed,
            "incomplete_folds": incomplete,
            "probabilities": probs, "ids": list(source.ids)}


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), lambda args: run(args) and 0, argv)


if __name__ == "__main__":
    sys.exit(main())
