"""Where the named presets (``configs/*.yaml``) are, in a source checkout and in an installed package.

    path = find_preset("b7_768_tpu")            # a name, a file name or a path
    path = default_preset()                     # what a bare ``train_tpu.py`` trains (the mission preset)

A checkout keeps them in ``configs/`` beside the package; ``pip install`` ships the same files inside the
package as ``ranzcr_tf/configs/`` (``setup.py`` maps that package folder to ``configs/``), so an installed
user finds them by name without the repository.
"""

from __future__ import annotations

import os

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The mission (the design card): EfficientNet-B7 at 768 px from ImageNet weights on a TPU v3-8.
DEFAULT_PRESET = "b7_768_tpu"
# A bare train_tpu.py trains this preset; "none" = the library defaults of the config tree (no preset).
DEFAULT_PRESET_ENV = "RANZCR_DEFAULT_PRESET"
CPU_PRESET = "cpu_lines"  # the preset that learns the hard phantoms on a CPU in minutes to hours


def preset_dir() -> str:
    """``ranzcr_tf/configs`` when installed, else the checkout's ``configs/``."""
    installed = os.path.join(_PACKAGE_DIR, "configs")
    if os.path.isdir(installed):
        return installed
    return os.path.join(os.path.dirname(_PACKAGE_DIR), "configs")


def list_presets() -> list[str]:
    folder = preset_dir()
    return sorted(name[:-5] for name in os.listdir(folder) if name.endswith(".yaml")) if os.path.isdir(folder) else []


def find_preset(name_or_path: str) -> str | None:
    """The path of ``name_or_path`` if it exists, else of the preset of that name (``configs/x.yaml``,
    ``x.yaml`` or ``x``) in ``preset_dir()``; None when neither exists."""
    if os.path.exists(name_or_path):
        return name_or_path
    stem = os.path.basename(name_or_path)
    stem = stem[:-5] if stem.endswith(".yaml") else stem
    candidate = os.path.join(preset_dir(), f"{stem}.yaml")
    return candidate if os.path.isfile(candidate) else None


def preset_display(path: str) -> str:
    """``configs/b7_768_tpu.yaml`` for any path of a shipped preset (how --help and messages name it)."""
    return f"configs/{os.path.basename(path)}"


def default_preset() -> str | None:
    """The preset a command uses without ``--config``: ``$RANZCR_DEFAULT_PRESET`` (a name or path, or
    ``none`` for the library defaults), else the mission preset."""
    wanted = os.environ.get(DEFAULT_PRESET_ENV, "").strip() or DEFAULT_PRESET
    if wanted.lower() == "none":
        return None
    path = find_preset(wanted)
    if path is None:
        raise ValueError(f"{DEFAULT_PRESET_ENV}={wanted}: no such preset; presets: {', '.join(list_presets())}")
    return path
