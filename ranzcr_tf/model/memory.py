"""Activation memory of a model, estimated from its layer shapes: ``python -m ranzcr_tf.model.memory``.

    python -m ranzcr_tf.model.memory --backbone efficientnet_b7 --image-size 768 --batch 4 --bytes 2

Method: every layer's output (nested models walked) is kept for the backward pass, so the activations of a
training step take about sum(output elements per image) x bytes per value x images per device. An estimate:
XLA fuses some element-wise layers away (less) and keeps some inputs of fused ops besides (more); weights,
gradients and optimizer slots come on top (``params`` x 4 bytes x 4 for AdamW with EMA). Printed per part:
the backbone (encoder), the aux_seg line-mask decoder (``model.decoder``), with ``--tip`` the training-only
tip head (``train.tip_loss_weight`` > 0) and the rest of the training model.
"""

from __future__ import annotations

import sys

from ranzcr_tf import cli


def activation_values(model) -> int:
    """Output elements per example of every layer of ``model`` (nested models walked, inputs left out)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            total += activation_values(layer)
            continue
        outputs = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
        total += sum(values_per_example(output) for output in outputs)
    return int(total)


def values_per_example(tensor) -> int:
    count = 1
    for dim in tensor.shape[1:]:
        count *= int(dim)
    return count


def aux_seg_parts(backbone: str, image_size: int, tip: bool = False) -> dict[str, int]:
    """Activation values per image of the aux_seg training model's parts (with the tip head when ``tip``), and
    its parameter count."""
    import keras

    from ranzcr_tf.config import ModelConfig
    from ranzcr_tf.model.build import build_model, get_backbone
    from ranzcr_tf.model.decoder import build_aux_seg_model

    classifier = build_model(ModelConfig(backbone=backbone, weights=None, input_channels=1), image_size)
    model = build_aux_seg_model(classifier, backbone, keras.losses.BinaryCrossentropy(from_logits=True),
                                tip_loss_weight=1.0 if tip else 0.0)
    decoder = model.get_layer("mask_decoder")
    parts = {"encoder": activation_values(get_backbone(classifier)), "decoder": activation_values(decoder),
             "tip": values_per_example(model.get_layer("tip_logits").output) if tip else 0}  # one 1x1 conv
    parts["rest"] = activation_values(model) - parts["encoder"] - parts["decoder"] - parts["tip"]
    parts["params"] = int(model.count_params())
    parts["decoder_params"] = int(decoder.count_params())
    return parts


def build_parser():
    parser = cli.build_parser("python -m ranzcr_tf.model.memory", __doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_b7")
    parser.add_argument("--image-size", type=int, default=768)
    parser.add_argument("--batch", type=int, default=4, help="images per device (default 4: the B7 preset)")
    parser.add_argument("--bytes", type=int, default=2, help="bytes per activation (2: bfloat16/float16, 4: float32)")
    parser.add_argument("--tip", action="store_true", help="with the tip head (train.tip_loss_weight > 0)")
    return parser


def run(args) -> None:
    parts = aux_seg_parts(args.backbone, args.image_size, args.tip)
    scale = args.batch * args.bytes / 2**30
    print(f"{args.backbone} at {args.image_size} px, aux_seg{' + tip head' if args.tip else ''}, {args.batch} image(s) "
          f"per device, {args.bytes} bytes per value (activations kept for the backward pass, from layer shapes):")
    for name in ("encoder", "decoder", "tip", "rest"):
        if name != "tip" or args.tip:
            print(f"  {name:<8} {parts[name] / 1e6:9.2f} M values per image  {parts[name] * scale:7.3f} GiB")
    total = parts["encoder"] + parts["decoder"] + parts["tip"] + parts["rest"]
    print(f"  total    {total / 1e6:9.2f} M values per image  {total * scale:7.3f} GiB; decoder share "
          f"{(parts['decoder'] + parts['tip']) / total:.1%}")
    print(f"  weights {parts['params'] / 1e6:.1f} M (decoder {parts['decoder_params'] / 1e6:.2f} M): ~"
          f"{parts['params'] * 16 / 2**30:.2f} GiB with float32 gradients, AdamW slots and EMA")


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
