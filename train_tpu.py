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

image size (one rule):
  the records' manifest says what size they hold. A preset (or --set) that names preprocess.image_size trains
  at that size on larger records, every image resized in the input pipeline (configs/b5_512_gpu.yaml on the
  default 768 px records trains at 512); on smaller records at theirs (no upsampling); either said in one line
  at start. data.image_size, when given, wins: 0 = the records' size, any other value that size (resized in the
  pipeline and said).

presets that add up (said at start): replicas come from the devices found (TPU v3-8: 8, v4-8: 4); the global
  batch is train.batch_size x replicas and the learning rate scales with it when train.lr_reference_batch is set;
  train.steps_per_execution is lowered to a divisor of the steps per epoch (Keras would train extra steps).

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

one process per fold:
  a fold folder is locked while it trains (<out-dir>/.lock-fold{k}: host, PID, start time); a second
  train_tpu.py on the same fold stops with one line naming the holder (exit 2); a lock left by a killed
  process is taken over with a note. Folds of one run may train in parallel processes. Not on gs://
  (object stores have no locks): give each process its own folds there.
  The folds of one run must come from one conversion (their identity.json record the manifest hash).

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
    from ranzcr_tf import presets
    from ranzcr_tf.config import RECIPES, STRATEGIES  # the one lists (light: imports no TensorFlow)

    default = (f"default preset (no --config): configs/{presets.DEFAULT_PRESET}.yaml, the mission -- EfficientNet-B7 "
               f"at 768 px from ImageNet\nweights (downloaded once into the Keras cache), recipe aux_seg, run folder "
               f"runs/{presets.DEFAULT_PRESET}. Without an accelerator it\nprints what it would cost here and stops "
               f"(--force-cpu trains anyway; a CPU preset: --config configs/{presets.CPU_PRESET}.yaml).\n"
               f"{presets.DEFAULT_PRESET_ENV}=none makes the library defaults the default instead.\n\n")
    parser = cli.build_parser("train_tpu.py", __doc__, epilog=default + EPILOG, settings=True)
    parser.add_argument("--fold", help="validation fold to train: a number, a comma list (0,2) or 'all' (required "
                        "unless --plan)")
    parser.add_argument("--plan", action="store_true", help="print devices, global batch, steps per epoch and "
                        "execution, the time per step measured over a few real steps here, the estimated time per "
                        "epoch, fold and --fold all, and peak device memory; trains and writes nothing")
    parser.add_argument("--plan-steps", type=int, default=3, help="--plan: training steps timed (default 3)")
    parser.add_argument("--plan-batch", type=int, default=0, help="--plan: per-replica batch timed (default: the "
                        "preset's; the time is scaled to the preset's batch)")
    parser.add_argument("--force-cpu", action="store_true", help="train the default preset even without an "
                        "accelerator (otherwise a CPU run of it stops after printing what it would cost)")
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
    from ranzcr_tf import presets
    from ranzcr_tf.config import given_keys, load_config
    from ranzcr_tf.model.weights import prepare_weights
    from ranzcr_tf.prep.records import read_manifest
    from ranzcr_tf.train import plan, preset_rules
    from ranzcr_tf.train.fit import parse_folds
    from ranzcr_tf.train.placement import choose_placement
    from ranzcr_tf.train.run import train

    config_path = args.config or presets.default_preset()  # bare command: the mission preset
    cfg = load_config(config_path, args.overrides)
    if args.strategy:
        cfg.train.strategy = args.strategy
    if args.recipe:
        cfg.train.recipe = args.recipe
        cfg.validate()
    if args.fold is None and not args.plan:
        raise ValueError("--fold is required: a fold number, a comma list (0,2) or all (or --plan for the estimate)")
    given = given_keys(config_path, args.overrides)
    tfrecords = args.tfrecords or cfg.data.tfrecords
    if args.plan:  # before weights and output folders: it reads and writes nothing
        placement = choose_placement(cfg.train.strategy, cfg.distribute)
        plan.run_plan(cfg, placement, tfrecords, given, per_replica_batch=args.plan_batch, steps=args.plan_steps)
        return 0
    if config_path and not args.config:
        print(f"preset: {presets.preset_display(config_path)} (the default; --config names another)", flush=True)
    out = args.out_dir or os.path.join("runs", os.path.splitext(os.path.basename(config_path or "default"))[0])
    cli.check_output_dir(out, create=False)  # the run folder is made by training, after every start-up check
    placement = choose_placement(cfg.train.strategy, cfg.distribute)  # first: a strategy precedes any TF work
    print(placement.describe(), flush=True)
    if config_path and not args.config and placement.accelerator == "cpu" and not args.force_cpu:
        plan.refuse_cpu_run(cfg, placement, tfrecords, given, presets.preset_display(config_path), presets.CPU_PRESET)
    prepare_weights(cfg.model)  # before any record is read: cached, downloaded once, or one line saying where
    manifest = read_manifest(tfrecords)
    folds = parse_folds(args.fold, int(manifest["num_folds"]))
    size_note = preset_rules.follow_preset_image_size(cfg, given, int(manifest["image_size"]))
    for line in (size_note, preset_rules.unused_settings(cfg),
                 preset_rules.describe_scaling(cfg, placement.num_replicas, placement.accelerator)):
        if line:
            print(line, flush=True)
    cli.raise_on_sigterm()  # preemption, docker stop: unwind like Ctrl-C, keeping the last backup
    try:
        train(cfg, tfrecords, folds, out, placement, verbose=2 if args.quiet else 1, restart=args.restart)
    except KeyboardInterrupt as exc:
        exc.message = (f"{getattr(exc, 'message', None) or 'interrupted'}: each fold keeps its last backup in "
                       f"{out}; rerun the same command to resume")
        raise
    return 0


def main(argv=None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
