#!/usr/bin/env python
"""Convert the RANZCR CLiP Kaggle layout into CLAHE TFRecord shards with patient-grouped folds.

    python make_tfrecords.py --data-dir /path/to/ranzcr --out-dir tfrecords --image-size 768
    python make_tfrecords.py --config configs/cpu_demo.yaml --data-dir demo/data --out-dir demo/tfrecords
    python make_tfrecords.py --unlabeled /path/to/images --out-dir extra_records --image-size 768   # extra/ shards
    python make_tfrecords.py --config configs/rsna_ich_cpu.yaml --data-dir data/ich --out-dir records/ich  # DICOM

Settings come from the config tree (defaults <- --config preset <- --set overrides) and explicit flags
override both. Rerunning the same command resumes an interrupted conversion; --overwrite starts over.
This file only parses arguments: the work is in ranzcr_tf/convert.py (TensorFlow is imported there,
lazily, so --help and CSV errors answer without its start-up time).
"""

from __future__ import annotations

import argparse
import os
import sys

from ranzcr_tf import cli

FLAG_TO_KEY = {  # flag dest -> config key it overrides
    "image_size": "preprocess.image_size",
    "clahe_clip": "preprocess.clahe_clip_limit",
    "clahe_grid": "preprocess.clahe_tile_grid",
    "jpeg_quality": "preprocess.jpeg_quality",
    "interpolation": "preprocess.interpolation",
    "folds": "data.folds",
    "seed": "data.fold_seed",
    "shard_mb": "data.shard_mb",
    "data_dir": "data.data_dir",
    "out_dir": "data.tfrecords",
}


def build_parser() -> argparse.ArgumentParser:
    from ranzcr_tf.config import INTERPOLATIONS  # the one list (light: imports no TensorFlow)

    parser = cli.build_parser(
        "make_tfrecords.py", __doc__.split("\n\n")[0], settings=True, progress=True,
        formatter_class=argparse.HelpFormatter,
        epilog="Records per shard = --shard-mb / (mean stored size of 8 evenly spaced training images, "
               "preprocessed up front, + 600 bytes of record overhead). Rerunning the same command resumes an "
               "interrupted run (complete shards are kept, the result is byte-identical); different settings "
               "need --overwrite or another --out-dir. Example: python make_tfrecords.py --data-dir data/synthetic "
               "--out-dir tfrecords --image-size 512. Synthetic data: python -m ranzcr_tf.synth.generate --out-dir "
               "data/synthetic --n-train 200 --n-test 50")
    io = parser.add_argument_group("data")
    io.add_argument("--data-dir", help="competition folder (train.csv, train/, test/, train_annotations.csv); "
                    "default: data.data_dir of --config, else the Kaggle input folder")
    io.add_argument("--out-dir", help="output folder, local or gs:// (default: data.tfrecords, i.e. tfrecords); "
                    "one converter at a time: a local folder is locked (.lock), a gs:// folder cannot be")
    io.add_argument("--unlabeled", metavar="DIR", help="instead: a folder of unlabeled images (.jpg/.png, 8/16-bit, "
                    "and DICOM .dcm/.dicom radiographs) -> --out-dir/extra/ records with has_target 0 and no "
                    "folds, IDs from file names "
                    "(for serve.pseudo and train.extra_records)")
    io.add_argument("--no-test", action="store_true", help="convert the training images only")
    io.add_argument("--limit", type=int, default=0,
                    help="only the first N train rows and N test IDs (smoke runs; default 0 = all)")
    pre = parser.add_argument_group("preprocessing (stored in manifest.json; the kernel reuses it)")
    pre.add_argument("--image-size", type=int, help="stored square side in pixels (default 768)")
    pre.add_argument("--clahe-clip", type=float, help="CLAHE clip limit, 0 disables CLAHE (default 2.0)")
    pre.add_argument("--clahe-grid", type=int, help="CLAHE tiles per side (default 8)")
    pre.add_argument("--jpeg-quality", type=int, help="stored JPEG quality 1..100 (default 95)")
    pre.add_argument("--interpolation", choices=INTERPOLATIONS,
                     help="resize filter (default auto: bit-exact bilinear below a 2x shrink, area beyond)")
    split = parser.add_argument_group("folds and shards")
    split.add_argument("--folds", type=int, help="number of patient-grouped folds (default 5)")
    split.add_argument("--seed", type=int, help="fold and shard-order seed (default 42)")
    split.add_argument("--shard-mb", type=int, help="target shard size in MB (default 150)")
    split.add_argument("--shard-records", type=int, default=0,
                       help="records per shard, overriding the size estimate (tests, tiny data; default 0 = estimate)")
    io.add_argument("--annotations-scale", default="1", metavar="auto|FACTOR",
                    help="multiply train_annotations.csv's points by FACTOR (0.25 for images resized to a quarter), "
                         "or auto: the factor that puts them inside their images; points are checked against each "
                         "image's real size either way (default 1)")
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=int, default=0,
                     help="threads (in this process) that decode, CLAHE, resize and encode; 0 = one per available "
                          "core (default)")
    run.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    run.add_argument("--overwrite", action="store_true", help="delete this converter's earlier output in --out-dir first")
    return parser


def resolve(args: argparse.Namespace):
    """Config tree (preset <- --set <- explicit flags), validated, and the converter options."""
    from ranzcr_tf import kaggle_paths
    from ranzcr_tf.config import load_config
    from ranzcr_tf.prep.convert import ConvertOptions

    flags = [f"{key}={getattr(args, dest)}" for dest, key in FLAG_TO_KEY.items() if getattr(args, dest) is not None]
    cfg = load_config(args.config, list(args.overrides) + flags)
    if cfg.task.reader != "dicom" and cfg.task.csv_layout != "wide":  # before the data folder's checks
        cfg.task.require_ranzcr(f"the JPEG/PNG converter with task.csv_layout = {cfg.task.csv_layout}",
                                advice="a jpeg/png task needs a wide CSV (task.csv_layout: wide: one row per image, "
                                "one 0/1 column per label)")
    data_dir = cfg.data.data_dir
    if not os.path.isdir(data_dir):
        hint = (f"no --data-dir given and the Kaggle folder {data_dir} does not exist"
                if args.data_dir is None and data_dir == kaggle_paths.competition_dir()
                else f"data folder {data_dir} does not exist")
        if cfg.task.reader == "dicom":
            raise ValueError(f"{hint}: point --data-dir at the competition folder ({cfg.task.train_csv}, "
                             f"{cfg.task.train_images[0]}/), or make a synthetic set with `python -m ranzcr_tf.synth.ich "
                             "--out data/ich --patients 12 --seed 0`")
        raise ValueError(f"{hint}: point --data-dir at the competition folder (train.csv, train/, test/), or make "
                         f"a synthetic set with `python -m ranzcr_tf.synth.generate --out-dir data/synthetic --n-train 200 "
                         f"--n-test 50` and pass --data-dir data/synthetic")
    options = ConvertOptions(
        data_dir=data_dir, out_dir=cfg.data.tfrecords, preprocess=cfg.preprocess, num_folds=cfg.data.folds,
        fold_seed=cfg.data.fold_seed, workers=args.workers, shard_mb=float(cfg.data.shard_mb),
        shard_records=args.shard_records, include_test=not args.no_test, limit=args.limit, strict=args.strict,
        overwrite=args.overwrite, progress=not args.quiet, task=cfg.task, annotations_scale=args.annotations_scale)
    return cfg, options


def run_unlabeled(args: argparse.Namespace) -> int:
    """``--unlabeled DIR``: the images of DIR -> ``--out-dir/extra/`` shards (``prep/unlabeled.py``)."""
    from ranzcr_tf.config import load_config

    if not args.out_dir:  # never the default data.tfrecords, which holds the competition records
        raise ValueError("--unlabeled needs --out-dir: a new folder for the unlabeled records")
    flags = [f"{key}={getattr(args, dest)}" for dest, key in FLAG_TO_KEY.items()
             if getattr(args, dest) is not None and key.startswith("preprocess.")]
    cfg = load_config(args.config, list(args.overrides) + flags)
    cfg.task.require_ranzcr("--unlabeled (extra records for train.extra_records)")
    cli.check_output_dir(args.out_dir)
    from ranzcr_tf.prep.unlabeled import convert_unlabeled

    manifest = convert_unlabeled(args.unlabeled, args.out_dir, cfg.preprocess, workers=args.workers,
                                 shard_records=args.shard_records, progress=not args.quiet)
    skipped = len(manifest["skipped"])
    print(f"wrote {manifest['num_extra']} unlabeled records in {len(manifest['shards']['extra'])} shards to "
          f"{args.out_dir}/extra" + (f"; skipped {skipped} files (listed in manifest.json)" if skipped else ""))
    return 0


def run_dicom(cfg, options) -> int:
    """``task.reader: dicom`` (RSNA ICH presets): DICOM slices -> windowed multi-channel records (prep/convert_dicom.py)."""
    from ranzcr_tf.prep.convert_dicom import SKIPPED_CSV, DicomConvertOptions, convert_dicom

    manifest = convert_dicom(DicomConvertOptions(
        data_dir=options.data_dir, out_dir=options.out_dir, task=cfg.task, preprocess=options.preprocess,
        num_folds=options.num_folds, fold_seed=options.fold_seed, workers=options.workers, shard_mb=options.shard_mb,
        shard_records=options.shard_records, include_test=options.include_test, limit=options.limit,
        strict=options.strict, overwrite=options.overwrite, progress=options.progress))
    skipped = manifest["skipped"]
    print(f"wrote {manifest['num_train']} train records ({manifest['image_channels']} channels) in "
          f"{len(manifest['shards']['train'])} shards over {manifest['num_folds']} folds grouped by "
          f"{cfg.task.group_column} and {manifest['num_test']} test records to {options.out_dir}"
          + (f"; skipped {len(skipped)} files (e.g. {skipped[0]['path'] or skipped[0]['id']}: {skipped[0]['reason']}; "
             f"all listed in {options.out_dir}/{SKIPPED_CSV})" if skipped else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.unlabeled:
        return run_unlabeled(args)
    cfg, options = resolve(args)
    cli.check_output_dir(options.out_dir)
    if cfg.task.reader == "dicom":
        return run_dicom(cfg, options)
    from ranzcr_tf.prep.convert import convert

    manifest = convert(options)
    skipped = len(manifest["skipped"])
    print(f"wrote {manifest['num_train']} train records in {len(manifest['shards']['train'])} shards over "
          f"{manifest['num_folds']} folds and {manifest['num_test']} test records in "
          f"{len(manifest['shards']['test'])} shards to {options.out_dir}"
          + (f"; skipped {skipped} unreadable images (listed in manifest.json)" if skipped else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
