"""Noisy-student EfficientNet weights of the ``efficientnet`` package (qubvel) -> keras.applications.

    convert_efficientnet_package_weights("efficientnet-b7_noisy-student_notop.h5", "efficientnet_b7",
                                         "b7_noisy_student.weights.h5")
    # then model.weights = b7_noisy_student.weights.h5   (builds the same graph as weights="imagenet")

The package's files are Keras-2 HDF5 weight files (root attribute ``layer_names``; one group per layer
with a ``weight_names`` attribute, arrays stored as ``<layer>/<layer>/<variable>:0``). Its layer names
are those of ``keras.applications.EfficientNet`` ('stem_conv', 'block1a_dwconv', 'block2a_expand_bn',
'top_conv', ...), and stride-2 "same" padding equals Keras' explicit ``correct_pad`` for even sizes,
so the conversion copies arrays by layer name and variable name, checking every shape, and fails on
any layer left unmatched on either side. Only h5py is needed, never the package itself (it returns
TensorFlow tensors under the JAX backend, so it cannot be the runtime path).

The package normalises inputs outside the model with ImageNet mean/std (``mode='torch'``). The
keras.applications graph built with ``weights="imagenet"`` normalises inside with
``(x/255 - mean) / sqrt(v) / sqrt(std)``, the published files storing ``v = std``; the converted file
stores the same, so the converted model computes the package's normalisation exactly.
"""

from __future__ import annotations

import os

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STDDEV = (0.229, 0.224, 0.225)
# Classifier layers of a with-top file: not part of a backbone, skipped and reported.
TOP_LAYERS = ("probs", "predictions")
_ALIASES = {"depthwise_kernel": "kernel"}


def read_package_weights(h5_path: str) -> dict[str, dict[str, np.ndarray]]:
    """``{layer_name: {variable_name: array}}`` of a Keras-2 HDF5 weight file (layers with weights only)."""
    import h5py

    if not os.path.isfile(h5_path):
        raise ValueError(f"{h5_path}: no such file; give the `efficientnet` package's .h5 weights file")
    out: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(h5_path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise ValueError(f"{h5_path} is not a Keras-2 HDF5 weights file (no 'layer_names' attribute); "
                             "expected e.g. efficientnet-b7_noisy-student_notop.h5")
        for raw in root.attrs["layer_names"]:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            group = root[name]
            arrays = {}
            for raw_w in group.attrs.get("weight_names", []):
                weight_name = raw_w.decode() if isinstance(raw_w, bytes) else str(raw_w)
                variable = weight_name.split("/")[-1].split(":")[0]
                arrays[_ALIASES.get(variable, variable)] = np.asarray(group[weight_name])
            if arrays:
                out[name] = arrays
    return out


def convert_efficientnet_package_weights(h5_path: str, backbone_name: str, out_path: str) -> dict:
    """Convert a qubvel ``efficientnet`` weight file for ``backbone_name`` into a Keras 3 ``.weights.h5``.

    Every weighted layer of the keras.applications backbone must be found in the source by name with
    equal variable names and shapes, and every weighted source layer must be used (classifier layers
    ``probs``/``predictions`` excepted); otherwise a ``ValueError`` lists the mismatches. Returns
    ``{"layers": n, "arrays": n, "skipped": [...]}``. Use ``out_path`` as ``model.weights``.
    """
    import keras

    from ranzcr_tf.model.backbones import build_backbone, get_spec

    spec = get_spec(backbone_name)
    if not backbone_name.startswith("efficientnet_b"):
        raise ValueError(f"noisy-student conversion supports efficientnet_b0..b7, not {backbone_name!r}")
    if not str(out_path).endswith(".weights.h5"):
        raise ValueError(f"--out {out_path!r} must end with .weights.h5 (the Keras 3 weights format)")
    source = read_package_weights(h5_path)
    target = build_backbone(spec.name, 64, 3, weights=None)

    problems, used, arrays = [], set(), 0
    for layer in target.layers:
        if not layer.weights:
            continue
        if isinstance(layer, keras.layers.Normalization):
            # Same convention as the published keras.applications files (see the module docstring).
            layer.set_weights([np.asarray(IMAGENET_MEAN, "float32"), np.asarray(IMAGENET_STDDEV, "float32"),
                               np.asarray(0, dtype=layer.weights[2].dtype)])
            continue
        if layer.name not in source:
            problems.append(f"target layer {layer.name!r} has no source layer of that name")
            continue
        src = source[layer.name]
        values = []
        for variable in layer.weights:
            key = variable.name.split("/")[-1]
            if key not in src:
                problems.append(f"{layer.name}: source has no {key!r} (has {sorted(src)})")
            elif tuple(src[key].shape) != tuple(variable.shape):
                problems.append(f"{layer.name}/{key}: source shape {src[key].shape} != target {tuple(variable.shape)}")
            else:
                values.append(src[key])
        extra = set(src) - {v.name.split("/")[-1] for v in layer.weights}
        if extra:
            problems.append(f"{layer.name}: source variables {sorted(extra)} have no target")
        if len(values) == len(layer.weights) and not extra:
            layer.set_weights(values)
            arrays += len(values)
        used.add(layer.name)
    skipped = [name for name in source if name not in used and name in TOP_LAYERS]
    for name in source:
        if name not in used and name not in TOP_LAYERS:
            problems.append(f"source layer {name!r} has no target layer in {spec.application}")
    if problems:
        head = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"cannot convert {h5_path} to {backbone_name}: is it the {backbone_name} file?\n  {head}{more}")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    target.save_weights(out_path)
    return {"layers": len(used), "arrays": arrays, "skipped": skipped}
