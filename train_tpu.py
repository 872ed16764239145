#!/usr/bin/env python
"""Train RANZCR CLiP models on a TPU, GPUs, several hosts, the JAX backend or a CPU: thin CLI over ranzcr_tf.train.fit."""

from __future__ import annotations

import argparse
import os
import sys

EPILOG = """\
placement (--strategy auto):
  KERAS_BACKEND=jax -> keras.distribution.DataParallel over every JAX device; a reachable TPU -> TPUStrategy;
  TF_CONFIG set -> MultiWorkerMirroredStrategy (only the chief writes the run folder); >1 GPU ->
  MirroredStrategy; otherwise the default device. The global batch is train.batch_size x replicas, and the
  learning rate scales with it when train.lr_reference_batch is set.

image size:
  the records' manifest says what size they hold. data.image_size=0 (default) trains at that size; any other
  value resizes every image in the input pipeline to that size, and the run says so at start-up.

restarts:
  run the same command again after a kill or preemption: training continues from <out>/fold{k}/backup with
  its best AUC, patience counters and CSV log intact. A finished fold is skipped (delete its folder to redo it).

outputs (<out>/fold{k}/):
  config.yaml, preprocess.json, best.keras (+ best.json), log.csv, metrics.json, oof.csv
  (StudyInstanceUID, fold, 11 probabilities named by label, 11 target_<label> columns), tensorboard/.
  Pool the folds' OOF files with `python -m ranzcr_tf.report.cv <out>`.

label-shuffle control (proves the score comes from the images): shuffle train.csv's label rows before
converting, e.g.
  python -c "import pandas as pd, numpy as np; from ranzcr_tf.labels import LABELS as L; d=pd.read_csv('D/train.csv'); \\
d[list(L)]=d[list(L)].values[np.random.default_rng(0).permutation(len(d))]; d.to_csv('D_shuf/train.csv', index=False)"
  then convert D_shuf (same images) and train as usual: the validation AUC stays near 0.5.

examples:
  python train_tpu.py --config configs/cpu_demo.yaml --tfrecords demo/tfrecords --fold 0 --out runs/demo
  python train_tpu.py --config configs/b7_768_tpu.yaml --tfrecords gs://bucket/tfrec --fold all --out gs://bucket/runs/b7
  KERAS_BACKEND=jax python train_tpu.py --config configs/b5_512_gpu.yaml --fold 0 --set train.epochs=3
"""


def parse_args(argv=None):
    from ranzcr_tf.config import STRATEGIES  # the one list (light: imports no TensorFlow)

    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fold", required=True, help="validation fold to train: a number, a comma list (0,2) or 'all'")
    parser.add_argument("--config", help="YAML preset (configs/*.yaml) or a saved run's config.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--tfrecords", help="folder of converted records (default: data.tfrecords of the config)")
    parser.add_argument("--out", default=None, help="run folder; folds go to OUT/fold{k} (default: runs/<config name>)")
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="placement (default: train.strategy of the config, normally auto)")
    parser.add_argument("--quiet", action="store_true", help="no per-step progress bar (one line per epoch)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ranzcr_tf.config import load_config
    from ranzcr_tf.train.placement import choose_placement
    from ranzcr_tf.prep.records import read_manifest
    from ranzcr_tf.train.fit import TrainingDiverged, parse_folds, train

    try:
        cfg = load_config(args.config, args.overrides)
        if args.strategy:
            cfg.train.strategy = args.strategy
        tfrecords = args.tfrecords or cfg.data.tfrecords
        manifest = read_manifest(tfrecords)
        folds = parse_folds(args.fold, int(manifest["num_folds"]))
        out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config or "default"))[0])
        placement = choose_placement(cfg.train.strategy)
        print(placement.describe(), flush=True)
        train(cfg, tfrecords, folds, out, placement, verbose=2 if args.quiet else 1)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"training diverged: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
