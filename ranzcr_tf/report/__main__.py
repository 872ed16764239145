"""``python -m ranzcr_tf.report RUN [RUN ...] --out-dir report/``: the run report (``report.build``)."""

from __future__ import annotations

import sys

from ranzcr_tf import cli


def build_parser():
    parser = cli.build_parser(
        "python -m ranzcr_tf.report",
        "One self-contained HTML page about trained runs: data, training curves, ROC / PR with bootstrap "
        "intervals, calibration, Grad-CAM beside the annotation lines, the worst studies, CV side by side.",
        progress=True)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (train_tpu.py --out-dir); the first is "
                        "reported in full, all enter the CV table")
    parser.add_argument("--out-dir", default="report", help="folder for index.html and summary.json (default: report)")
    parser.add_argument("--tfrecords", help="the records the first run was trained on (default: its data.tfrecords)")
    parser.add_argument("--max-images", type=int, default=33,
                        help="Grad-CAM studies in all (default 33: three per column)")
    parser.add_argument("--cam", choices=("layercam", "gradcam"), default="layercam",
                        help="heat maps: layercam (default; LayerCAM on the backbone's stride-4 stage, peaks on the "
                        "tube itself) or gradcam (Grad-CAM on the last stage, as coarse as its stride 32)")
    parser.add_argument("--worst", type=int, default=12, help="rows of the worst-studies table (default 12)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per column (default 1000)")
    return parser


def run(args) -> int:
    from ranzcr_tf.report.build import build_report

    cli.check_output_dir(args.out_dir)
    path = build_report(args.runs, args.out_dir, tfrecords=args.tfrecords, max_images=args.max_images,
                        worst=args.worst, num_resamples=args.bootstrap, quiet=args.quiet,
                        cam=args.cam)
    print(f"report: {path}")
    return 0


def main(argv=None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
