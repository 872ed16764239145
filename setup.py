"""Packaging beyond pyproject.toml: the presets in configs/ ship inside the package as ranzcr_tf/configs/."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["ranzcr_tf*"]), "ranzcr_tf.configs"],
    package_dir={"ranzcr_tf.configs": "configs"},
    package_data={"ranzcr_tf.configs": ["*.yaml"]},
)
