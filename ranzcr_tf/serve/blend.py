"""Per-label blend weights fitted on out-of-fold predictions, with an honest (nested) CV of the blend.

    python -m ranzcr_tf.serve.blend runs/A runs/B ... --out blend.json [--rank] [--step 0.05]
    python kaggle_kernel.py --models runs/A runs/B --blend blend.json      # the kernel applies them

What is fitted: for every label ``c``, weights ``w[m, c] >= 0`` with ``sum_m w[m, c] = 1`` that maximise
that label's ROC AUC of ``sum_m w[m, c] * p_m[:, c]`` on the runs' pooled OOF rows (``--rank``: each
model's column is first replaced by its ranks, as ``--ensemble rank_mean`` does, for models calibrated
differently). The search is exhaustive over a grid on the simplex (``--step``): AUC is a step function
of the weights, so gradient or Nelder-Mead optimisers stall on its flat parts, while a grid is
exhaustive and gives the same weights on every machine. Ties go to the point nearest equal weights
(the prior when the data cannot tell), then to the first in grid order.

Why nested: weights fitted on the same rows they are scored on overstate the blend. So for every fold
``k`` the weights are fitted on the OOF rows of the other folds and applied to fold ``k``'s rows; the
blend's printed CV is the score of these held-out rows. The weights written to ``--out`` are then
fitted on all rows. The runs must share their folds (the same conversion), or the nested CV would
leak; a study whose fold or targets differ between runs is an error.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import numpy as np

from ranzcr_tf import cli, io_utils
from ranzcr_tf.labels import ID_COLUMN, LABELS, NUM_CLASSES
from ranzcr_tf.serve.ensemble import blend_models, rank_normalize
from ranzcr_tf.tables import TARGET_COLUMNS, merge_oof

BLEND_FORMAT = 1
GRID_DIVISIONS = (100, 50, 40, 20, 10, 8, 5, 4, 2, 1)  # candidate 1/step values, finest first
MAX_GRID_POINTS = 300  # the finest step whose grid stays this small is used when --step is not given


# ----------------------------------------------------------------------------------------------- inputs
def run_name(run_dir: str) -> str:
    """A run's name in blend.json: the folder's base name (what the kernel matches its --models against)."""
    return os.path.basename(os.path.normpath(run_dir))


def load_runs(run_dirs: list[str]) -> dict:
    """The runs' pooled OOF, aligned by study: names, ids, folds ``(N,)``, targets ``(N, C)``, probs ``(M, N, C)``."""
    if len(run_dirs) < 2:
        raise ValueError("a blend needs at least two runs: pass RUN_DIR RUN_DIR [...]")
    names = [run_name(d) for d in run_dirs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"two runs are named {duplicated[0]!r}: blend.json names runs by folder name, so rename one")
    frames = []
    for run_dir in run_dirs:
        frame = merge_oof(run_dir, "the OOF blend (python -m ranzcr_tf.serve.blend)")
        if "fold" not in frame.columns:
            raise ValueError(f"{run_dir}: oof.csv has no fold column; nested CV needs each study's fold")
        frames.append(frame.assign(**{ID_COLUMN: frame[ID_COLUMN].astype(str)}).set_index(ID_COLUMN).sort_index())
    first = frames[0]
    for run_dir, frame in zip(run_dirs[1:], frames[1:]):
        for mine, other, where in ((first.index, frame.index, run_dir), (frame.index, first.index, run_dirs[0])):
            missing = mine.difference(other)
            if len(missing):
                raise ValueError(f"{where} has no OOF prediction for {len(missing)} studies the other runs have "
                                 f"(e.g. {missing[0]}): blend runs trained on the same records and folds")
        differ = first.index[first["fold"].to_numpy() != frame["fold"].to_numpy()]
        if len(differ):
            raise ValueError(f"{run_dir} puts {len(differ)} studies in another fold than {run_dirs[0]} (e.g. {differ[0]}): "
                             f"nested CV needs the same folds (same conversion, data.folds and fold_seed)")
        targets_differ = (first[TARGET_COLUMNS].to_numpy() != frame[TARGET_COLUMNS].to_numpy()).any(axis=1)
        if targets_differ.any():
            raise ValueError(f"{run_dir} has other targets than {run_dirs[0]} for {int(targets_differ.sum())} studies "
                             f"(e.g. {first.index[targets_differ][0]}): the runs come from different label files")
    return {"names": names, "ids": first.index.tolist(), "folds": first["fold"].to_numpy().astype(int),
            "targets": first[TARGET_COLUMNS].to_numpy().astype(np.float64),
            "probs": np.stack([f[list(LABELS)].to_numpy(np.float64) for f in frames])}


# ----------------------------------------------------------------------------------------------- fitting
def simplex_grid(num_models: int, divisions: int) -> np.ndarray:
    """Every weight vector of ``num_models`` multiples of ``1/divisions`` summing to 1, ``(points, models)``."""
    rows = []
    for bars in itertools.combinations(range(divisions + num_models - 1), num_models - 1):  # stars and bars
        edges = (-1, *bars, divisions + num_models - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(num_models)])
    return np.asarray(rows, dtype=np.float64) / divisions


def grid_divisions(num_models: int, step: float | None) -> int:
    """``1/step`` (checked to be a whole number), or the finest default whose grid has <= MAX_GRID_POINTS."""
    if step is not None:
        divisions = round(1.0 / step) if step > 0 else 0
        if step <= 0 or step > 1 or abs(divisions * step - 1.0) > 1e-9:
            raise ValueError(f"--step {step} must divide 1 into whole parts (e.g. 0.05, 0.1, 0.25)")
        return divisions
    from math import comb

    return next((d for d in GRID_DIVISIONS if comb(d + num_models - 1, num_models - 1) <= MAX_GRID_POINTS), 1)


def column_aucs(targets, scores) -> np.ndarray:
    """ROC AUC of every column of ``scores (N, P)`` against 0/1 ``targets (N,)`` (ties count half, as sklearn)."""
    from scipy.stats import rankdata

    positive = np.asarray(targets) > 0.5
    num_pos, num_neg = int(positive.sum()), int((~positive).sum())
    ranks = rankdata(scores, axis=0, method="average")
    return (ranks[positive].sum(axis=0) - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)


def fit_label_weights(model_scores, targets, grid: np.ndarray) -> np.ndarray:
    """The grid point maximising the AUC of ``model_scores (M, N)`` blended, for one label; equal weights if
    the rows hold one class only (no AUC to maximise)."""
    model_scores = np.asarray(model_scores, dtype=np.float64)
    num_models = model_scores.shape[0]
    equal = np.full(num_models, 1.0 / num_models)
    if np.unique(np.asarray(targets) > 0.5).size < 2:
        return equal
    aucs = np.concatenate([column_aucs(targets, model_scores.T @ grid[start:start + 64].T)
                           for start in range(0, len(grid), 64)])  # in chunks: (rows x points) stays small
    best = np.flatnonzero(aucs >= aucs.max() - 1e-12)
    distance = np.abs(grid[best] - equal).sum(axis=1)
    return grid[best[np.argmin(distance)]].copy()  # argmin takes the first of equal distances: grid order


def fit_weights(probs, targets, grid: np.ndarray, rank: bool) -> np.ndarray:
    """Per-label weights ``(models, classes)`` on the rows given (``rank``: fitted on per-column ranks)."""
    probs = np.asarray(probs, dtype=np.float64)
    if rank:
        probs = np.stack([rank_normalize(p) for p in probs])
    return np.column_stack([fit_label_weights(probs[:, :, c], targets[:, c], grid) for c in range(probs.shape[2])])


def nested_cv(runs: dict, grid: np.ndarray, rank: bool) -> tuple[np.ndarray, dict]:
    """Held-out blend of every fold (weights fitted on the other folds): ``(blended OOF (N, C), weights per fold)``."""
    probs, targets, folds = runs["probs"], runs["targets"], runs["folds"]
    blended = np.full(targets.shape, np.nan)
    per_fold = {}
    for fold in sorted(set(folds.tolist())):
        held_out = folds == fold
        weights = fit_weights(probs[:, ~held_out], targets[~held_out], grid, rank)
        blended[held_out] = blend_models(list(probs[:, held_out]), weights, rank=rank)
        per_fold[int(fold)] = weights
    return blended, per_fold


def score(targets, scores, folds) -> dict:
    """Pooled CV AUC, per-label AUCs and the mean of the per-fold AUCs (as ``report.cv``)."""
    import warnings

    from ranzcr_tf.model.metrics import competition_metric

    with warnings.catch_warnings():  # single-class columns are reported as NaN in the table
        warnings.simplefilter("ignore", RuntimeWarning)
        pooled, per_class = competition_metric(targets, scores)
        fold_scores = [competition_metric(targets[folds == k], scores[folds == k])[0] for k in sorted(set(folds))]
    return {"cv_auc": pooled, "per_class_auc": per_class, "mean_fold_auc": float(np.nanmean(fold_scores))}


def fit_blend(runs: dict, divisions: int, rank: bool) -> dict:
    """Everything ``blend.json`` holds: the weights on all rows, and single / equal-mean / nested-blend CVs."""
    probs, targets, folds, names = runs["probs"], runs["targets"], runs["folds"], runs["names"]
    grid = simplex_grid(len(names), divisions)
    fold_ids = sorted(set(folds.tolist()))
    # With one fold there are no other folds to fit a held-out fold's weights on: no nested CV, said so.
    blended, fold_weights = nested_cv(runs, grid, rank) if len(fold_ids) > 1 else (None, {})
    order = np.concatenate([np.flatnonzero(folds == k) for k in fold_ids])

    def blend_by_fold(weights):  # blended fold by fold, as the nested blend is (ranks are taken within each fold)
        return np.concatenate([blend_models(list(probs[:, folds == k]), weights, rank=rank) for k in fold_ids])

    equal_mean = blend_by_fold(np.full((len(names), NUM_CLASSES), 1.0 / len(names)))
    single = {}
    for m, name in enumerate(names):  # on the blend's scale: with --rank each run's within-fold ranks
        one_hot = np.zeros((len(names), NUM_CLASSES))
        one_hot[m] = 1.0
        single[name] = score(targets[order], blend_by_fold(one_hot), folds[order])
    weights = fit_weights(probs, targets, grid, rank)
    return {
        "format": BLEND_FORMAT, "runs": names, "labels": list(LABELS), "rank": bool(rank), "step": 1.0 / divisions,
        "weights": {label: dict(zip(names, weights[:, c].round(12).tolist())) for c, label in enumerate(LABELS)},
        "fold_weights": {str(k): {label: w[:, c].round(12).tolist() for c, label in enumerate(LABELS)}
                         for k, w in fold_weights.items()},
        "cv": {"single": single,
               "equal_mean": score(targets[order], equal_mean, folds[order]),
               "blend_nested": None if blended is None else score(targets, blended, folds)},
        "num_studies": int(len(folds)),
    }


# ----------------------------------------------------------------------------------------------- blend.json
def weights_matrix(blend: dict) -> np.ndarray:
    """``(runs, labels)`` weights in ``blend["runs"]`` and ``LABELS`` order."""
    return np.array([[blend["weights"][label][name] for label in LABELS] for name in blend["runs"]], dtype=np.float64)


def read_blend(path: str) -> dict:
    """A blend.json, checked for its keys and the project's label order; ``ValueError`` naming the file."""
    try:
        blend = json.loads(io_utils.read_text(path))
    except FileNotFoundError:
        raise ValueError(f"--blend {path}: no such file (write it with python -m ranzcr_tf.serve.blend)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--blend {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(blend, dict) or not {"runs", "labels", "weights", "rank"} <= set(blend):
        raise ValueError(f"--blend {path}: not a blend file (needs runs, labels, weights, rank); "
                         f"write it with python -m ranzcr_tf.serve.blend")
    if list(blend["labels"]) != list(LABELS):
        raise ValueError(f"--blend {path}: its labels {blend['labels']} are not the 11 labels in submission order")
    try:
        weights_matrix(blend)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"--blend {path}: weights must give every label a number for every run") from None
    return blend


def weights_for_models(blend: dict, model_names: list[str], path: str = "blend.json") -> np.ndarray:
    """The blend's weights ``(models, labels)`` in the order of ``model_names``; the run names must match exactly."""
    if sorted(blend["runs"]) != sorted(model_names) or len(set(model_names)) != len(model_names):
        raise ValueError(f"--blend {path} was fitted for runs {', '.join(blend['runs'])} but the models are "
                         f"{', '.join(model_names)}: pass the same runs to --models (or refit the blend)")
    matrix = weights_matrix(blend)
    return matrix[[blend["runs"].index(name) for name in model_names]]


# ----------------------------------------------------------------------------------------------- report
def format_table(blend: dict) -> str:
    """Per-label AUC of each run, the equal mean and the nested blend, with the final weights."""
    names, cv = blend["runs"], blend["cv"]
    mean_name = "rank mean" if blend["rank"] else "mean"
    nested = cv.get("blend_nested") is not None
    heads = [*names, mean_name, *(["blend*"] if nested else [])]
    width = max(9, *(len(h) + 1 for h in heads))
    lines = [f"{'label':<28}" + "".join(f"{h:>{width}}" for h in heads) + "  weights " + "/".join(names)]
    columns = [cv["single"][n] for n in names] + [cv["equal_mean"], *([cv["blend_nested"]] if nested else [])]
    for label in LABELS:
        weights = "/".join(f"{blend['weights'][label][n]:.2f}" for n in names)
        lines.append(f"{label:<28}" + "".join(f"{c['per_class_auc'][label]:>{width}.4f}" for c in columns)
                     + f"  {weights}")
    lines.append(f"{'CV mean AUC (pooled OOF)':<28}" + "".join(f"{c['cv_auc']:>{width}.4f}" for c in columns))
    lines.append(f"{'mean of fold AUCs':<28}" + "".join(f"{c['mean_fold_auc']:>{width}.4f}" for c in columns))
    how = ("* blend: nested CV (each fold scored with weights fitted on the other folds)" if nested else
           "* no nested CV of the blend: the runs' OOF holds one fold, so no fold can be scored with weights fitted "
           "on others (the weights are fitted on all rows; train more folds to score them honestly)")
    lines.append(f"{how}; step {blend['step']:g}{', on ranks' if blend['rank'] else ''}; "
                 f"{blend['num_studies']} studies")
    return "\n".join(lines)


def build_parser():
    parser = cli.build_parser("python -m ranzcr_tf.serve.blend",
                              "Fit per-label blend weights of several runs on their OOF predictions (nested CV) "
                              "and write blend.json for kaggle_kernel.py --blend.", epilog=__doc__)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders holding fold*/oof.csv "
                        "(trained on the same records and folds)")
    parser.add_argument("--out", required=True, help="blend.json to write")
    parser.add_argument("--rank", action="store_true", help="blend per-column ranks instead of probabilities")
    parser.add_argument("--step", type=float, default=None, help="weight grid step (default: the finest of "
                        f"0.01, 0.02, 0.025, 0.05, ... whose grid has at most {MAX_GRID_POINTS} points)")
    return parser


def run(args) -> int:
    cli.check_output_file(args.out)
    runs = load_runs(args.run_dirs)
    blend = fit_blend(runs, grid_divisions(len(runs["names"]), args.step), args.rank)
    print(format_table(blend))
    io_utils.atomic_write_json(args.out, blend)
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
