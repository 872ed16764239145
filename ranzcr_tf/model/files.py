"""Model files: the checks before loading and the one loader, for training and inference alike.

    check_model_file("runs/b7/fold0/best.keras")   # legacy .h5, damaged archive, Lambda layer -> ValueError
    model = load_model_file("runs/b7/fold0/best.keras")   # keras.Model, compile=False, safe mode

Training (a stage starting from an earlier stage's model, the OOF pass) and inference (``serve.modelio``,
the kernel, ``package``) load through :func:`load_model_file`, so both refuse the same files the same way.
The checks read the archive only; Keras is imported when a model is loaded.
"""

from __future__ import annotations

import json
import zipfile
import zlib

from ranzcr_tf import io_utils

LEGACY_SUFFIXES = (".h5", ".hdf5")


def legacy_error(path: str) -> ValueError:
    return ValueError(f"{path}: legacy HDF5 model files (.h5/.hdf5) are refused: they load without Keras safe "
                      f"mode. Re-save the model in the Keras 3 format: keras.models.load_model(old).save('best.keras') "
                      f"on a trusted machine, then point --models at the folder holding best.keras")


def check_model_file(path: str) -> None:
    """Refuse legacy HDF5 files, damaged archives (zip CRC) and ``.keras`` files that hold a ``Lambda`` layer,
    before loading anything.

    A Lambda layer carries Python bytecode; Keras safe mode would refuse it at load time too, but
    checking the archive's ``config.json`` first gives one clear message for every bad fold up front.
    """
    if path.lower().endswith(LEGACY_SUFFIXES):
        raise legacy_error(path)
    if not path.endswith(".keras"):
        raise ValueError(f"{path}: expected a Keras 3 '.keras' model file")
    try:
        with io_utils.open_binary(path) as fh, zipfile.ZipFile(fh) as archive:
            damaged = archive.testzip()  # reads every member and checks its CRC: a damaged copy is caught here
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable .keras model archive ({exc}); copy or download it again") from None
    if damaged is not None:
        raise ValueError(f"{path}: damaged .keras archive (CRC mismatch in {damaged}); copy or download it again")
    lambdas = list(_lambda_layers(config))
    if lambdas:
        raise ValueError(f"{path}: the model contains Lambda layer(s) {lambdas}; Lambda layers hold arbitrary "
                         f"Python code and are refused (Keras safe mode). Replace them with registered layers "
                         f"(see ranzcr_tf/layers.py) and retrain or re-save the model")


def _lambda_layers(node):
    if isinstance(node, dict):
        if node.get("class_name") == "Lambda":
            yield (node.get("config") or {}).get("name", "?")
        for value in node.values():
            yield from _lambda_layers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _lambda_layers(value)


def load_model_file(path: str):
    """The one model loader (training's OOF pass, the kernel, ``package``): archive checks, then Keras safe mode
    (``compile=False``); a model that cannot be loaded is a one-line ``ValueError`` naming the file."""
    # Keras is heavy: imported only when a model is loaded (the checks and run discovery stay light).
    from ranzcr_tf.model.build import load_model  # registers our custom layers so safe mode can rebuild them

    check_model_file(path)
    try:
        return load_model(path, compile=False)
    except ValueError as exc:
        text = str(exc)
        if "safe_mode" in text or "Lambda" in text or "lambda" in text:
            raise ValueError(f"{path}: refused by Keras safe mode (it would run code stored in the file): "
                             f"{text.splitlines()[0][:200]}") from None
        raise ValueError(f"{path}: cannot load the model: {text.splitlines()[0][:300]}") from None
    except TypeError as exc:  # an unregistered custom class
        raise ValueError(f"{path}: cannot rebuild the model ({str(exc)[:300]}); was it saved by a newer or "
                         f"different ranzcr-tf? Install the version that trained it") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{path}: cannot read the model file ({exc}); copy or download it again") from None
