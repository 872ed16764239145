"""Soft labels for ``train.soft_labels`` from trained runs, never from a model that trained on the study.

    python -m ranzcr_tf.serve.pseudo oof runs/A runs/B --tfrecords tfrecords --out soft_train.csv
    python -m ranzcr_tf.serve.pseudo predict --models runs/A runs/B --tfrecords X --out soft_X.csv

The CSV holds ``StudyInstanceUID``, the 11 label probabilities and ``source`` (which models made the row).

``oof`` (competition train studies): each study's row is the mean over runs of its out-of-fold
prediction, i.e. of the one fold model per run that validated on the study's fold. Every row of
``RUN/fold{j}/oof.csv`` is checked against the records' ``folds.csv``: the study must be in fold ``j``,
the only fold ``fold{j}``'s model did not train on. A row from a model that trained on its study (a
file copied between folds, runs trained on another fold split) is refused with the file, line and
study named: such a label would be a memorised one, and a student trained on it learns the teacher's
overfit instead of its knowledge.

``predict`` (test or unlabeled records, where no model trained on any study): the kernel's prediction
path (``serve.infer.predict_ensemble``: folds x TTA views x runs, each with its own preprocessing),
on the ``test/`` shards of ``--tfrecords``, or on its ``extra/`` shards with ``--split extra``
(``make_tfrecords.py --unlabeled``).
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pandas as pd

from ranzcr_tf import cli, io_utils, tables
from ranzcr_tf.labels import ID_COLUMN, LABELS
from ranzcr_tf.pipeline.soft import SOURCE_COLUMN
from ranzcr_tf.runs import FOLD_DIR_PATTERN, OOF_FILE, require_ranzcr_run


def read_folds(tfrecords_dir: str) -> dict[str, int]:
    """``{study ID: fold}`` from the converter's folds.csv (the split every run of these records trained with)."""
    from ranzcr_tf.prep import records

    path = io_utils.join(tfrecords_dir, records.FOLDS_CSV)
    if not io_utils.exists(path):
        raise ValueError(f"{path} not found: --tfrecords must be the converted records the runs trained on")
    table = pd.read_csv(io.StringIO(io_utils.read_text(path)), dtype={ID_COLUMN: str})
    return dict(zip(table[ID_COLUMN].astype(str), table["fold"].astype(int)))


def fold_oof_files(run_dir: str) -> list[tuple[int, str]]:
    """``(validation fold j, RUN/fold{j}/oof.csv)`` for every fold folder of a run holding an oof.csv."""
    found = []
    for path in io_utils.glob(io_utils.join(run_dir, "fold*", OOF_FILE)):
        folder = os.path.basename(os.path.dirname(path))
        if FOLD_DIR_PATTERN.match(folder):
            found.append((int(folder[len("fold"):]), path))
    if not found:
        raise ValueError(f"no fold*/{OOF_FILE} under {run_dir}: train its folds first (train_tpu.py --fold all)")
    return sorted(found)


def read_oof_rows(path: str, validation_fold: int, folds: dict[str, int], model: str) -> pd.DataFrame:
    """One fold model's OOF rows, each checked to be a study that model never trained on."""
    frame = tables.read_table(path, "OOF file", (ID_COLUMN, *LABELS))
    frame[list(LABELS)] = tables.check_values(frame, list(LABELS), path, "OOF file")
    ids = frame[ID_COLUMN].astype(str)
    study_folds = ids.map(folds)
    unknown = study_folds.isna().to_numpy()
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise ValueError(f"{path} line {row + 2}: study {ids.iloc[row]} is not in the records' folds.csv "
                         f"({int(unknown.sum())} such): the run was trained on other records than --tfrecords")
    trained_on = (study_folds.to_numpy(int) != validation_fold)
    if "fold" in frame.columns:  # the file's own claim must agree too
        trained_on |= frame["fold"].to_numpy(int) != validation_fold
    if trained_on.any():
        row = int(np.flatnonzero(trained_on)[0])
        raise ValueError(f"{path} line {row + 2}: study {ids.iloc[row]} is in fold {int(study_folds.iloc[row])}, "
                         f"which {model}'s model trained on (it validated on fold {validation_fold} only); "
                         f"refusing to label {int(trained_on.sum())} studies with a model that saw them")
    return frame.assign(**{ID_COLUMN: ids, SOURCE_COLUMN: model})


def soft_labels_from_oof(run_dirs: list[str], tfrecords_dir: str) -> pd.DataFrame:
    """Per study, the mean of its OOF probabilities over the runs, and the fold models that made them."""
    for run_dir in run_dirs:
        require_ranzcr_run(run_dir, "soft labels (python -m ranzcr_tf.serve.pseudo)")
    folds = read_folds(tfrecords_dir)
    rows = []
    for run_dir in run_dirs:
        name = os.path.basename(os.path.normpath(run_dir))
        for fold, path in fold_oof_files(run_dir):
            rows.append(read_oof_rows(path, fold, folds, f"{name}/fold{fold}"))
    frame = pd.concat(rows, ignore_index=True)
    repeated = frame.duplicated([ID_COLUMN, SOURCE_COLUMN])
    if repeated.any():
        raise ValueError(f"study {frame[ID_COLUMN][repeated].iloc[0]} appears twice in the OOF of "
                         f"{frame[SOURCE_COLUMN][repeated].iloc[0]}")
    grouped = frame.groupby(ID_COLUMN, sort=False)
    out = grouped[list(LABELS)].mean()
    out[SOURCE_COLUMN] = grouped[SOURCE_COLUMN].agg(lambda names: "oof:" + "+".join(sorted(names)))
    out = out.reindex([sid for sid in folds if sid in out.index])  # folds.csv order
    missing = len(folds) - len(out)
    if missing:
        print(f"note: {missing} of the {len(folds)} studies in {tfrecords_dir} have no OOF prediction in these runs "
              f"(folds not trained); training with these soft labels will refuse until they do", file=sys.stderr)
    return out.reset_index()


def soft_labels_from_models(model_dirs: list[str], tfrecords_dir: str, split: str, batch_size: int | None,
                            progress: bool) -> pd.DataFrame:
    """The kernel's ensemble prediction on ``tfrecords_dir``'s ``split`` shards (test or extra)."""
    import tempfile

    from ranzcr_tf.config import InferConfig
    from ranzcr_tf.serve.budget import Budget
    from ranzcr_tf.serve.infer import TestSource, predict_ensemble
    from ranzcr_tf.serve.kernel import saved_tta
    from ranzcr_tf.serve.modelio import discover_models, verify_models

    for model_dir in model_dirs:
        require_ranzcr_run(model_dir, "soft labels (python -m ranzcr_tf.serve.pseudo)")
    models = discover_models(model_dirs)
    verify_models(models)
    with tempfile.TemporaryDirectory(prefix="ranzcr-pseudo-") as work_dir:
        source = TestSource.from_records(tfrecords_dir, split, work_dir)
        infer_cfg = InferConfig(tta=saved_tta(models), batch_size=batch_size or 1)
        probs, report = predict_ensemble(models, source, infer_cfg, Budget(None), batch_size=batch_size,
                                         progress=progress)
        if report.filled_rows:
            raise ValueError(f"{report.filled_rows} records of {tfrecords_dir}/{split} got no prediction; "
                             f"soft labels are not written for guesses")
        frame = pd.DataFrame(probs, columns=list(LABELS))
        frame.insert(0, ID_COLUMN, source.ids)
    frame[SOURCE_COLUMN] = "models:" + "+".join(spec.name for spec in models)
    return frame


def build_parser():
    parser = cli.build_parser("python -m ranzcr_tf.serve.pseudo", "Write soft labels (train.soft_labels) from "
                              "trained runs: out-of-fold for train studies, ensemble predictions for test or "
                              "unlabeled records.", epilog=__doc__, progress=True)
    modes = parser.add_subparsers(dest="mode", required=True)
    oof = cli.add_subcommand(modes, "oof", "train studies, from the runs' out-of-fold predictions only", progress=True)
    oof.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders holding fold*/oof.csv")
    oof.add_argument("--tfrecords", required=True, help="the converted records the runs trained on (its folds.csv)")
    oof.add_argument("--out", required=True, help="soft-label CSV to write")
    predict = cli.add_subcommand(modes, "predict", "test or unlabeled records, from the kernel's ensemble prediction",
                                 progress=True)
    predict.add_argument("--models", nargs="+", required=True, metavar="RUN_DIR", help="run folders")
    predict.add_argument("--tfrecords", required=True, help="records folder holding test/ or extra/ shards")
    predict.add_argument("--split", choices=("test", "extra"), default="test", help="which shards (default test)")
    predict.add_argument("--batch-size", type=int, default=None, help="prediction batch size (default: each run's)")
    predict.add_argument("--out", required=True, help="soft-label CSV to write")
    return parser


def run(args) -> int:
    cli.check_output_file(args.out)
    if args.mode == "oof":
        frame = soft_labels_from_oof(args.run_dirs, args.tfrecords)
    else:
        frame = soft_labels_from_models(args.models, args.tfrecords, args.split, args.batch_size,
                                        progress=not args.quiet)
    io_utils.atomic_write_text(args.out, frame.to_csv(index=False))
    print(f"wrote {args.out}: {len(frame)} studies")
    return 0


def main(argv=None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
