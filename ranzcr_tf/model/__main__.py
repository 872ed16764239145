"""``python -m ranzcr_tf.model`` (also spelled ``python -m ranzcr_tf.model.build``): model utilities.

    python -m ranzcr_tf.model --summary --image-size 768 [--backbones efficientnet_b7,compact_cnn]
    python -m ranzcr_tf.model --convert-noisy-student IN.h5 --backbone efficientnet_b7 --out OUT.weights.h5

The arguments are parsed before Keras (and TensorFlow) is imported: ``--help`` is quick and prints no
TensorFlow lines.
"""

from __future__ import annotations

import sys

from ranzcr_tf import cli

PROG = "python -m ranzcr_tf.model"


def build_parser(prog: str = PROG):
    parser = cli.build_parser(
        prog, "Model utilities: per-backbone size/compute summary, and conversion of noisy-student EfficientNet "
              "weights (qubvel `efficientnet` package files) to keras.applications.")
    parser.add_argument("--summary", action="store_true", help="print parameters and multiply-adds per image")
    parser.add_argument("--image-size", type=int, default=768, help="square input size for --summary (default 768)")
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3), help="model input channels (default 1)")
    parser.add_argument("--backbones", default="",
                        help="comma-separated subset for --summary (default: every registered backbone)")
    parser.add_argument("--convert-noisy-student", metavar="IN.h5",
                        help="weights file of the `efficientnet` package (e.g. efficientnet-b7_noisy-student_notop.h5)")
    parser.add_argument("--backbone", default="efficientnet_b7", help="target backbone of the conversion")
    parser.add_argument("--out", help="output .weights.h5 of the conversion (use it as model.weights)")
    return parser


def run(args) -> int:
    if args.convert_noisy_student:
        if not args.out:
            raise ValueError("--convert-noisy-student needs --out OUT.weights.h5")
        from ranzcr_tf.model.noisy_student import convert_efficientnet_package_weights  # Keras: after parsing

        report = convert_efficientnet_package_weights(args.convert_noisy_student, args.backbone, args.out)
        print(f"wrote {args.out}: {report['layers']} layers, {report['arrays']} arrays from {args.convert_noisy_student}")
        return 0
    if args.summary:
        from ranzcr_tf.model.backbones import get_spec, list_backbones
        from ranzcr_tf.model.build import print_summary, summarize  # Keras: after parsing

        names = [b.strip() for b in args.backbones.split(",") if b.strip()] or list_backbones()
        for name in names:
            get_spec(name)
        print_summary(summarize(names, args.image_size, args.channels))
        return 0
    raise ValueError("nothing to do: pass --summary or --convert-noisy-student IN.h5 (see --help)")


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return cli.main(build_parser(prog), run, argv)


if __name__ == "__main__":
    sys.exit(main())
