"""ImageNet weights at start-up: in the Keras cache already, or downloaded there by Keras once, or one line
that says which file to get from where (and how to attach it on Kaggle) before any work starts.

    path = ensure_imagenet_weights("efficientnet_b7")   # ~/.keras/models/efficientnetb7_notop.h5

Which file and where from is asked of Keras itself: the application is constructed at a tiny input size
with a ``file_utils`` that records the ``get_file`` call it makes (file name, origin URL, hash) and stops
there (``compat.application_file_utils``), so the names stay Keras' own. ``$RANZCR_WEIGHTS_URL`` replaces
the folder part of the origin (a mirror; the tests' local server); files from a mirror are not checked
against Keras' hashes, which belong to Keras' own files.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass

import keras

from ranzcr_tf import compat
from ranzcr_tf.model.backbones import KAGGLE_HINT, get_spec, keras_cache_dir

WEIGHTS_URL_ENV = "RANZCR_WEIGHTS_URL"
DOWNLOAD_TIMEOUT_S = 30  # per socket operation: an offline notebook fails in seconds instead of hanging
# keras.applications module of each constructor whose ImageNet file we can name (backbones.BACKBONES).
_MODULES = {"EfficientNetB": "efficientnet", "EfficientNetV2": "efficientnet_v2", "MobileNetV3": "mobilenet_v3"}


@dataclass(frozen=True)
class WeightsFile:
    """The file Keras would fetch for a backbone's ``weights="imagenet"``."""

    fname: str
    origin: str
    file_hash: str | None

    @property
    def cached_path(self) -> str:
        return os.path.join(keras_cache_dir(), self.fname)


class _Asked(Exception):
    """Raised by the recording ``file_utils`` to stop the constructor at its ``get_file`` call."""


class _Recorder:
    def __init__(self, original):
        self._original = original

    def __getattr__(self, name):
        return getattr(self._original, name)

    def get_file(self, fname=None, origin=None, file_hash=None, **_ignored):
        raise _Asked(WeightsFile(fname, origin, file_hash))


def imagenet_file(backbone: str) -> WeightsFile:
    """The ImageNet notop file of ``backbone`` as Keras names it (origin with ``$RANZCR_WEIGHTS_URL`` applied)."""
    spec = get_spec(backbone)
    if spec.application is None:
        raise ValueError(f"backbone {backbone} has no ImageNet weights: set model.weights=none (or a local file)")
    module = next(m for prefix, m in _MODULES.items() if spec.application.startswith(prefix))
    try:
        with compat.application_file_utils(module, _Recorder), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MobileNetV3's note that 32 px is not its 224 px
            getattr(keras.applications, spec.application)(include_top=False, weights="imagenet", input_shape=(32, 32, 3))
    except _Asked as asked:
        found = asked.args[0]
    else:
        raise RuntimeError(f"keras.applications.{spec.application} asked for no weights file")
    mirror = os.environ.get(WEIGHTS_URL_ENV, "").strip()
    if mirror:
        return WeightsFile(found.fname, f"{mirror.rstrip('/')}/{found.origin.rsplit('/', 1)[-1]}", None)
    return found


def ensure_imagenet_weights(backbone: str, announce=print) -> str:
    """The cached ImageNet file of ``backbone``, downloaded by ``keras.utils.get_file`` (with its progress bar)
    if missing; a one-line ``ValueError`` naming the file, its URL and the Kaggle way when that fails."""
    wanted = imagenet_file(backbone)
    if os.path.isfile(wanted.cached_path):
        return wanted.cached_path
    cache_home = os.path.dirname(keras_cache_dir())
    os.makedirs(keras_cache_dir(), exist_ok=True)  # get_file falls back to /tmp/.keras when the folder is missing
    announce(f"ImageNet weights: downloading {wanted.fname} from {wanted.origin} into {keras_cache_dir()} (once)")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        path = keras.utils.get_file(wanted.fname, wanted.origin, cache_subdir="models", cache_dir=cache_home,
                                    file_hash=wanted.file_hash)
    except Exception as exc:  # noqa: BLE001  (Keras wraps every fetch failure in a plain Exception)
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ValueError(offline_message(wanted, reason)) from None
    finally:
        socket.setdefaulttimeout(previous)
    return path


def offline_message(wanted: WeightsFile, reason: str) -> str:
    """One line: which file, where to get it, where to put it, how on Kaggle."""
    return (f"ImageNet weights {wanted.fname} are not in {keras_cache_dir()} and could not be downloaded from "
            f"{wanted.origin} ({reason}). Download that file where there is internet and put it into "
            f"{keras_cache_dir()}. " + KAGGLE_HINT.format(fname=wanted.fname)
            + " Or set model.weights=none to train from scratch.")


def prepare_weights(model_cfg, announce=print) -> None:
    """At start, before records are read: ``model.weights: imagenet`` has its file in the cache (else see above)."""
    if model_cfg.weights == "imagenet":
        ensure_imagenet_weights(model_cfg.backbone, announce)
