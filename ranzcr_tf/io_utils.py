"""Small file helpers: atomic writes that work on local paths and, through ``tf.io.gfile``, on ``gs://``.

TensorFlow is imported only for remote paths, so tools that touch only local files (and the synthetic
generator's worker processes) stay light and fork-safe.
"""

from __future__ import annotations

import json
import math
import os
import uuid


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def makedirs(path: str) -> None:
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def listdir(path: str) -> list[str]:
    return sorted(_gfile().listdir(path)) if is_remote(path) else sorted(os.listdir(path))


def remove(path: str) -> None:
    if is_remote(path):
        _gfile().remove(path)
    else:
        os.remove(path)


def rename(src: str, dst: str) -> None:
    """Replace ``dst`` with ``src`` (atomic on a local disk; ``tf.io.gfile`` for ``gs://``)."""
    if is_remote(src):
        _gfile().rename(src, dst, overwrite=True)
    else:
        os.replace(src, dst)


def rmtree(path: str) -> None:
    """Delete a folder and everything in it (local or remote)."""
    if is_remote(path):
        _gfile().rmtree(path)
    else:
        import shutil

        shutil.rmtree(path)


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts[:-1]) + "/" + parts[-1] if is_remote(parts[0]) else os.path.join(*parts)


def glob(pattern: str) -> list[str]:
    """Paths matching ``pattern`` (``*`` wildcards), sorted; local or remote."""
    if is_remote(pattern):
        return sorted(_gfile().glob(pattern))
    import glob as local_glob

    return sorted(local_glob.glob(pattern))


def open_binary(path: str):
    """A seekable binary file object for reading (``tf.io.gfile.GFile`` for ``gs://``)."""
    return _gfile().GFile(path, "rb") if is_remote(path) else open(path, "rb")


def read_text(path: str) -> str:
    if is_remote(path):
        with _gfile().GFile(path, "r") as fh:
            return fh.read()
    with open(path) as fh:
        return fh.read()


def temp_name(path: str) -> str:
    """A sibling name that readers ignore (``.tmp-`` prefix) and that no other writer shares."""
    head, tail = os.path.split(path) if not is_remote(path) else path.rsplit("/", 1)
    name = f".tmp-{uuid.uuid4().hex[:8]}-{tail}"
    return join(head, name) if head else name


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary sibling, then rename: readers see the old file or the whole new one."""
    parent = os.path.dirname(path) if not is_remote(path) else path.rsplit("/", 1)[0]
    if parent:
        makedirs(parent)
    tmp = temp_name(path)
    if is_remote(path):
        with _gfile().GFile(tmp, "wb") as fh:
            fh.write(data)
        rename(tmp, path)
        return
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        rename(tmp, path)
    except BaseException:  # disk full, read-only, a signal ...: no half-written temporary file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj):
    """``obj`` with every NaN/inf float as None (JSON ``null``: bare ``NaN`` is not JSON, and other tools' parsers
    reject it) and NumPy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    if type(obj).__module__ == "numpy" and getattr(obj, "shape", None) == ():
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path: str, obj) -> None:
    """Pretty JSON, atomically; undefined values (NaN, inf) are written as ``null`` (``json_safe``)."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")
