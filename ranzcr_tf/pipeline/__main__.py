"""``python -m ranzcr_tf.pipeline`` (also spelled ``python -m ranzcr_tf.pipeline.data``): a grid of training samples.

    python -m ranzcr_tf.pipeline --tfrecords tfrecords --fold 0 --show grid.png [--no-augment]

The arguments are parsed before TensorFlow is imported: ``--help`` is quick and prints no TensorFlow lines.
"""

from __future__ import annotations

import sys

from ranzcr_tf import cli

PROG = "python -m ranzcr_tf.pipeline"


def build_parser(prog: str = PROG):
    parser = cli.build_parser(prog, "Preview the training input: a grid of augmented samples with their labels.",
                              settings=True)
    parser.add_argument("--tfrecords", required=True, help="converted records folder (holds manifest.json)")
    parser.add_argument("--fold", type=int, default=0, help="validation fold; the grid shows the other folds")
    parser.add_argument("--show", required=True, metavar="PNG", help="output image path")
    parser.add_argument("--n", type=int, default=16, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-augment", action="store_true", help="show the stored pixels")
    return parser


def run(args) -> int:
    from ranzcr_tf.config import load_config
    from ranzcr_tf.pipeline.data import show_grid  # TensorFlow: imported once the arguments are known

    cfg = load_config(args.config, args.overrides)
    cli.check_output_file(args.show, "--show")
    print(show_grid(cfg, args.tfrecords, args.fold, args.show, n=args.n, seed=args.seed, augment=not args.no_augment))
    return 0


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return cli.main(build_parser(prog), run, argv)


if __name__ == "__main__":
    sys.exit(main())
