"""Train the folds a command asks for: plain recipes fold by fold (``fit.train_fold``), ``3stage`` through its
stages (``stages.train_three_stages``). The top of the training package: ``train_tpu.py`` calls ``train``.

    results = train(cfg, "tfrecords", [0, 1], "runs/demo", placement)
"""

from __future__ import annotations

import math

from ranzcr_tf.config import Config
from ranzcr_tf.prep import records
from ranzcr_tf.train import stages
from ranzcr_tf.train.fit import check_inputs, train_fold


def train(cfg: Config, tfrecords_dir: str, folds: list[int], out_dir: str, placement, *, verbose: int = 1,
          restart: bool = False) -> list[dict]:
    """Train each fold in turn into ``out_dir/fold{k}``; returns their metrics. ``restart``: see ``train_fold``."""
    check_inputs(cfg, tfrecords_dir, records.read_manifest(tfrecords_dir))  # once, before the first fold starts
    if cfg.train.recipe == "3stage":  # teacher -> student -> finetune per fold, into out_dir/<stage>/fold{k}
        results = stages.train_three_stages(cfg, tfrecords_dir, folds, out_dir, placement, verbose=verbose,
                                            restart=restart)
        _summarise(results, folds, stages.stage_dir(out_dir, stages.FINAL_STAGE))
        return results
    results = []
    for fold in folds:
        results.append(train_fold(cfg, tfrecords_dir, fold, out_dir, placement, verbose=verbose, restart=restart))
    _summarise(results, folds, out_dir)
    return results


def _summarise(results: list[dict], folds: list[int], out_dir: str) -> None:
    # A finished fold's metrics come back from metrics.json, where an undefined AUC is null.
    aucs = [math.nan if r.get("val_auc") is None else float(r["val_auc"]) for r in results]
    if len(results) > 1:
        print(f"folds {folds}: mean AUC per fold {', '.join(f'{a:.4f}' for a in aucs)}; "
              f"run `python -m ranzcr_tf.report.cv {out_dir}` for the pooled CV score", flush=True)
    if any(not math.isfinite(auc) for auc in aucs):
        print("warning: some folds have no finite AUC", flush=True)
