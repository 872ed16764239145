#!/usr/bin/env python
"""Train RANZCR CLiP models on a TPU, GPUs, several hosts, the JAX backend or a CPU: thin CLI over ranzcr_tf.train.fit."""

from __future__ import annotations

import os
import sys

from ranzcr_tf import cli

EPILOG = """\
placement (--strategy auto):
  KERAS_BACKEND=jax -> keras.distribution.DataParallel over every JAX device, across hosts when distribute.* or
  the environment names a cluster (TPU pod: --set distribute.multi_process=on; GPU hosts: distribute.coordinator,
  num_processes, process_id); a reachable TPU -> TPUStrategy;
  TF_CONFIG set -> MultiWorkerMirroredStrategy (only the chief writes the run folder); >1 GPU ->
  MirroredStrategy; otherwise the default device. The global batch is train.batch_size x replicas, and the
  learning rate scales with it when train.lr_reference_batch is set.

image size:
  the records' manifest says what size they hold. data.image_size=0 (default) trains at that size; any other
  value resizes every image in the input pipeline to that size, and the run says so at start-up.

restarts:
  run the same command again after a kill or preemption: training continues from <out-dir>/fold{k}/backup with
  its best AUC, patience counters and CSV log intact. A finished fold is skipped (delete its folder to redo it).
  A resume first checks that the run is the same: the records (manifest.json hash, shard bytes) and every
  setting that shapes the checkpoint must match what fold{k}/identity.json recorded, else it stops and
  offers --restart (discard that fold's checkpoint and state) or a new --out-dir. Settings that may change
  on resume: infer.* (validation batch size, TTA), data.cache, data.image_dtype, data.tfrecords/data_dir
  (the path; the records themselves are checked), train.strategy, distribute.*, train.steps_per_execution,
  train.jit_compile, train.early_stopping_patience, train.max_minutes, and train.epochs when train.schedule is
  constant or plateau (the other schedules' curve depends on it). Everything else must stay as it was.
  --set train.max_minutes=M stops by itself after the epoch (and its backup) past which another epoch would end
  later than M minutes into the process, exit 75: a Kaggle session (9 h) then ends in time to save its output,
  and the same command in the next session continues (kaggle/02_train.ipynb).

outputs (<out-dir>/fold{k}/):
  config.yaml, preprocess.json, best.keras (+ best.json), log.csv, metrics.json, oof.csv
  (StudyInstanceUID, fold, 11 probabilities named by label, 11 target_<label> columns), tensorboard/.
  Pool the folds' OOF files with `python -m ranzcr_tf.report.cv <out>`.
  --recipe 3stage: <out-dir>/teacher/fold{k}, <out-dir>/student/fold{k}, <out-dir>/finetune/fold{k} (each as
  above) and <out-dir>/stages.json; the kernel given <out-dir> serves the finetune stage.

label-shuffle control (proves the score comes from the images): shuffle train.csv's label rows before
converting, e.g.
  python -c "import pandas as pd, numpy as np; from ranzcr_tf.labels import LABELS as L; d=pd.read_csv('D/train.csv'); \\
d[list(L)]=d[list(L)].values[np.random.default_rng(0).permutation(len(d))]; d.to_csv('D_shuf/train.csv', index=False)"
  then convert D_shuf (same images) and train as usual: the validation AUC stays near 0.5.

examples:
  python train_tpu.py --config configs/cpu_demo.yaml --tfrecords demo/tfrecords --fold 0 --out-dir runs/demo
  python train_tpu.py --config configs/b7_768_tpu.yaml --tfrecords gs://bucket/tfrec --fold all --out-dir gs://bucket/runs/b7
  python train_tpu.py --config configs/cpu_demo.yaml --fold 0 --recipe 3stage --out-dir runs/demo3
  KERAS_BACKEND=jax python train_tpu.py --config configs/b5_512_gpu.yaml --fold 0 --set train.epochs=3
"""


def build_parser():
    from ranzcr_tf.config import RECIPES, STRATEGIES  # the one lists (light: imports no TensorFlow)

    parser = cli.build_parser("train_tpu.py", __doc__, epilog=EPILOG, settings=True)
    parser.add_argument("--fold", required=True, help="validation fold to train: a number, a comma list (0,2) or 'all'")
    parser.add_argument("--tfrecords", help="folder of converted records (default: data.tfrecords of the config)")
    parser.add_argument("--out-dir", default=None,
                        help="run folder; folds go to OUT_DIR/fold{k} (default: runs/<config name>)")
    cli.hidden_alias(parser, "--out", "out_dir")
    parser.add_argument("--restart", action="store_true", help="discard each trained fold's checkpoint and state "
                        "in the run folder and train it from the start (instead of resuming)")
    parser.add_argument("--recipe", choices=RECIPES,
                        help="training recipe (default: train.recipe of the config, normally plain); 3stage trains "
                             "teacher -> student -> finetune into OUT_DIR/<stage>/fold{k}, resumable per stage")
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="placement (default: train.strategy of the config, normally auto)")
    parser.add_argument("--quiet", action="store_true", help="no per-step progress bar (one line per epoch)")
    cli.hidden_alias(parser, "--no-progress", "quiet", action="store_true")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def run(args) -> int:
    from ranzcr_tf.config import load_config
    from ranzcr_tf.prep.records import read_manifest
    from ranzcr_tf.train.fit import parse_folds, train
    from ranzcr_tf.train.placement import choose_placement

    cfg = load_config(args.config, args.overrides)
    if args.strategy:
        cfg.train.strategy = args.strategy
    if args.recipe:
        cfg.train.recipe = args.recipe
        cfg.validate()
    out = args.out_dir or os.path.join("runs", os.path.splitext(os.path.basename(args.config or "default"))[0])
    cli.check_output_dir(out, create=False)  # the run folder is made by training, after every start-up check
    tfrecords = args.tfrecords or cfg.data.tfrecords
    manifest = read_manifest(tfrecords)
    folds = parse_folds(args.fold, int(manifest["num_folds"]))
    placement = choose_placement(cfg.train.strategy, cfg.distribute)
    print(placement.describe(), flush=True)
    train(cfg, tfrecords, folds, out, placement, verbose=2 if args.quiet else 1, restart=args.restart)
    return 0


def main(argv=None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    code = main()
    from ranzcr_tf.train.callbacks import WRITE_FAILED

    if WRITE_FAILED:  # see callbacks.WRITE_FAILED: skip the shutdown that would close the failed h5py file
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
