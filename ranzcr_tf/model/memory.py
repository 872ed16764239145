"""Activation memory of a model, estimated from its layer shapes: ``python -m ranzcr_tf.model.memory``.

    python -m ranzcr_tf.model.memory --backbone efficientnet_b7 --image-size 768 --batch 4 --bytes 2

Method: every layer's output (nested models walked) is kept for the backward pass, so the activations of a
training step take about sum(output elements per image) x bytes per value x images per device. An estimate:
XLA fuses some element-wise layers away (less) and keeps some inputs of fused ops besides (more); weights,
gradients and optimizer slots come on top (``params`` x 4 bytes x 4 for AdamW with EMA). Printed per part:
the backbone (encoder), the aux_seg line-mask decoder (``model.decoder``) and the rest of the training model.
"""

from __future__ import annotations

import argparse
import sys

import keras


def activation_values(model: keras.Model) -> int:
    """Output elements per example of every layer of ``model`` (nested models walked, inputs left out)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            total += activation_values(layer)
            continue
        outputs = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
        for output in outputs:
            count = 1
            for dim in output.shape[1:]:
                count *= int(dim)
            total += count
    return int(total)


def aux_seg_parts(backbone: str, image_size: int) -> dict[str, int]:
    """Activation values per image of the aux_seg training model's parts, and its parameter count."""
    from ranzcr_tf.config import ModelConfig
    from ranzcr_tf.model.build import build_model, get_backbone
    from ranzcr_tf.model.decoder import build_aux_seg_model

    classifier = build_model(ModelConfig(backbone=backbone, weights=None, input_channels=1), image_size)
    model = build_aux_seg_model(classifier, backbone, keras.losses.BinaryCrossentropy(from_logits=True))
    decoder = model.get_layer("mask_decoder")
    encoder = activation_values(get_backbone(classifier))
    parts = {"encoder": encoder, "decoder": activation_values(decoder)}
    parts["rest"] = activation_values(model) - parts["encoder"] - parts["decoder"]
    parts["params"] = int(model.count_params())
    parts["decoder_params"] = int(decoder.count_params())
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ranzcr_tf.model.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_b7")
    parser.add_argument("--image-size", type=int, default=768)
    parser.add_argument("--batch", type=int, default=4, help="images per device (default 4: the B7 preset)")
    parser.add_argument("--bytes", type=int, default=2, help="bytes per activation (2: bfloat16/float16, 4: float32)")
    args = parser.parse_args(argv)
    parts = aux_seg_parts(args.backbone, args.image_size)
    scale = args.batch * args.bytes / 2**30
    print(f"{args.backbone} at {args.image_size} px, aux_seg, {args.batch} image(s) per device, {args.bytes} bytes "
          f"per value (activations kept for the backward pass, estimated from layer shapes):")
    for name in ("encoder", "decoder", "rest"):
        print(f"  {name:<8} {parts[name] / 1e6:9.1f} M values per image  {parts[name] * scale:7.2f} GiB")
    total = parts["encoder"] + parts["decoder"] + parts["rest"]
    print(f"  total    {total / 1e6:9.1f} M values per image  {total * scale:7.2f} GiB; decoder share "
          f"{parts['decoder'] / total:.1%}")
    print(f"  weights {parts['params'] / 1e6:.1f} M (decoder {parts['decoder_params'] / 1e6:.2f} M): ~"
          f"{parts['params'] * 16 / 2**30:.2f} GiB with float32 gradients, AdamW slots and EMA")
    return 0


if __name__ == "__main__":
    sys.exit(main())
