"""Run provenance: what produced an artifact (package versions, git revision, host, time, Keras backend).

Saved beside every artifact: a run's ``config.yaml`` (``_meta``) and a converter's ``manifest.json``.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess


def run_metadata() -> dict:
    """Package versions, git revision, host and time: saved beside every artifact."""
    versions = {}
    for dist in ("ranzcr-tf", "tensorflow", "tensorflow-cpu", "tensorflow-tpu", "keras", "jax", "jaxlib", "numpy",
                 "opencv-python-headless", "opencv-python", "pandas", "scikit-learn"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "versions": versions,
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "host": platform.node(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
    }


def git_revision() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
