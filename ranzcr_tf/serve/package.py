"""Bundle the package, the wheels Kaggle lacks and chosen runs into one folder to upload as a Kaggle dataset.

    python -m ranzcr_tf.serve.package --models runs/b7_768 runs/b5_512 --out-dir bundle/ [--name ranzcr-bundle]

Result::

    bundle/wheels/ranzcr_tf-<version>-py3-none-any.whl   built with `pip wheel --no-deps`
    bundle/wheels/keras-<version>-py3-none-any.whl       --wheel specs (default: the installed keras)
    bundle/wheels/simplejpeg-<version>-cp3XX-...whl      the JPEG decoder, for CPython 3.10-3.13 on x86-64
    bundle/runs/<run>/fold<k>/{best.keras, config.yaml, preprocess.json, metrics.json}
    bundle/kaggle_kernel.py                              the kernel stub (runnable without installing)
    bundle/README.md                                     the notebook cell to paste
    bundle/dataset-metadata.json                         for `kaggle datasets create -p bundle`: its "id" is
                                                         USER/<name>, USER from --kaggle-user, else $KAGGLE_USERNAME,
                                                         else ~/.kaggle/kaggle.json's "username" (the Kaggle CLI's)

Which wheels: Kaggle's images ship TensorFlow, NumPy, pandas, scikit-learn, OpenCV, tqdm, PyYAML and
matplotlib, so only ranzcr-tf itself, Keras (>= 3.14 for the safe-mode loading fixes; Kaggle's
own Keras is often older) and simplejpeg (the decoder ``preprocess.py`` needs to reproduce the
converter's DCT-scaled decode; a binary wheel, fetched for each CPython Kaggle may run) are
bundled. Keras' dependencies (absl-py, h5py, ml-dtypes, namex, optree, rich) come with Kaggle's
Keras 3. Add more with ``--wheel SPEC`` (downloaded with ``pip download
--no-deps``, from PyPI, so on a machine with internet) or drop Keras with ``--no-keras``.
Every run is checked first (no legacy .h5, no Lambda layer, config.yaml present).
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile

from ranzcr_tf import cli
from ranzcr_tf.runs import BEST_INFO_FILE, METRICS_FILE, SERVING_FILES, STATE_FILE
from ranzcr_tf.serve.modelio import check_complete, discover_models, verify_models

RUN_FILES = (*SERVING_FILES, METRICS_FILE, BEST_INFO_FILE, STATE_FILE)  # the state: whether training finished
PACKAGE_NAME = "ranzcr-tf"
BUNDLE_MANIFEST = "bundle.json"  # what the bundle holds: runs, wheels, folds whose training did not finish
SOURCE_ITEMS = ("pyproject.toml", "setup.py", "README.md", "ranzcr_tf", "configs")  # setup.py ships configs/ inside


class ToolFailed(RuntimeError):
    """pip could not build or fetch a wheel (no PyPI access, a broken checkout): not a bug of ours."""

    exit_code = 1  # ``ranzcr_tf.cli`` prints it as one line without the internal-error hint


def source_root() -> str:
    """The checkout holding pyproject.toml (the wheel is built from source)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, "pyproject.toml")):
        raise ValueError(f"no pyproject.toml in {root}: run the packager from a source checkout of ranzcr-tf "
                         f"(pip install -e .)")
    return root


def build_wheel(wheel_dir: str, root: str | None = None) -> str:
    """``pip wheel --no-deps`` of a clean copy of the package (no build/ or egg-info left in the checkout)."""
    root = root or source_root()
    with tempfile.TemporaryDirectory(prefix="ranzcr-wheel-") as tmp:
        for item in SOURCE_ITEMS:
            src = os.path.join(root, item)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(tmp, item), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif os.path.exists(src):
                shutil.copy2(src, os.path.join(tmp, item))
        before = set(glob.glob(os.path.join(wheel_dir, "*.whl")))
        base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", wheel_dir]
        # Without build isolation first: works offline with the setuptools already installed.
        result = subprocess.run([*base, "--no-build-isolation", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            result = subprocess.run([*base, tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise ToolFailed(f"pip wheel failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    built = sorted(set(glob.glob(os.path.join(wheel_dir, "ranzcr_tf-*.whl"))) - before) or \
        sorted(glob.glob(os.path.join(wheel_dir, "ranzcr_tf-*.whl")))
    if not built:
        raise RuntimeError(f"pip wheel reported success but no ranzcr_tf wheel is in {wheel_dir}")
    return built[-1]


BINARY_TARGETS = [("3.10", "manylinux2014_x86_64"), ("3.11", "manylinux2014_x86_64"),
                  ("3.12", "manylinux2014_x86_64"), ("3.13", "manylinux2014_x86_64")]


def download_wheels(specs: list[str], wheel_dir: str, targets: list[tuple[str, str]] | None = None) -> list[str]:
    """``pip download --no-deps --only-binary=:all:`` each spec into ``wheel_dir`` (needs PyPI access).

    ``targets``: ``(python_version, platform)`` pairs to fetch binary wheels for (default: this interpreter).
    """
    if not specs:
        return []
    before = set(os.listdir(wheel_dir))
    for python, platform in targets or [(None, None)]:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "--dest",
               wheel_dir, *specs]
        if python:
            cmd += ["--python-version", python, "--platform", platform]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ToolFailed(f"pip download {' '.join(specs)} failed (it needs PyPI access; or pass --no-keras, "
                               f"--no-decoder and no --wheel):\n{result.stderr[-2000:]}")
    return sorted(set(os.listdir(wheel_dir)) - before)


def copy_runs(run_paths: list[str], out_dir: str, allow_incomplete: bool = False) -> tuple[list[str], list[str]]:
    """Copy each fold's model, config and preprocessing (not checkpoints or logs) to ``out_dir/runs``; returns
    the copied folders and the folds whose training did not finish (refused unless ``allow_incomplete``)."""
    models = discover_models(run_paths)  # validates: no .h5, no Lambda, zip CRC, configs present
    incomplete = check_complete(models, allow_incomplete, "the bundle")
    verify_models(models)  # and each model loads in safe mode, before anything is copied or built
    copied = []
    for spec in models:
        for fold in spec.folds:
            src = os.path.dirname(fold.path)
            rel = os.path.relpath(src, os.path.dirname(spec.root))
            dst = os.path.join(out_dir, "runs", rel)
            os.makedirs(dst, exist_ok=True)
            for name in RUN_FILES:
                for folder in (src, spec.root):  # a run-level config serves every fold: copy it beside each
                    if os.path.exists(os.path.join(folder, name)):
                        shutil.copy2(os.path.join(folder, name), os.path.join(dst, name))
                        break
            copied.append(os.path.relpath(dst, out_dir))
    return copied, incomplete


def notebook_cell(name: str) -> str:
    """The Kaggle notebook cell that installs offline from the bundle and runs the kernel."""
    return (f"!pip install --no-index --find-links /kaggle/input/{name}/wheels {PACKAGE_NAME}\n"
            f"!python -m ranzcr_tf.serve.kernel --models /kaggle/input/{name}/runs --max-minutes 480\n"
            f"# internet off, accelerator GPU or None (a submission notebook does not run on a TPU)\n")


def bundle_readme(name: str, wheels: list[str], runs: list[str], incomplete: list[str] = ()) -> str:
    return (f"# {name}: ranzcr-tf offline bundle\n\n"
            f"Upload this folder as a Kaggle dataset named `{name}` (`kaggle datasets create -p .` uses\n"
            f"dataset-metadata.json), attach it to a notebook with internet off, and run:\n\n"
            f"```\n{notebook_cell(name)}```\n\n"
            f"`python /kaggle/input/{name}/kaggle_kernel.py ...` runs the same kernel once the package is installed.\n"
            f"Every default of the kernel fits Kaggle; see `python -m ranzcr_tf.serve.kernel --help`.\n\n"
            f"Wheels: {', '.join(wheels)}\n\nRuns (folds):\n" + "".join(f"- {r}\n" for r in runs)
            + (f"\nINCOMPLETE folds (training did not finish; bundled with --allow-incomplete, and the kernel needs "
               f"--allow-incomplete too): {', '.join(incomplete)}\n" if incomplete else ""))


USER_PLACEHOLDER = "KAGGLE_USERNAME"


def kaggle_user(explicit: str | None = None) -> tuple[str, str] | None:
    """``(user name, where it came from)``: ``--kaggle-user``, else ``$KAGGLE_USERNAME``, else the ``username`` of
    the Kaggle CLI's ``kaggle.json`` (in ``$KAGGLE_CONFIG_DIR`` or ``~/.kaggle``); None when none says."""
    if explicit:
        return explicit, "--kaggle-user"
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"], "$KAGGLE_USERNAME"
    config_dir = os.environ.get("KAGGLE_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".kaggle")
    path = os.path.join(config_dir, "kaggle.json")
    try:
        with open(path) as fh:
            name = json.load(fh).get("username")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not readable JSON with a \"username\" ({exc}): fix it, or pass "
                         "--kaggle-user NAME") from None
    return (name, path) if name else None


def write_metadata(out_dir: str, name: str, user: str | None) -> str:
    """``dataset-metadata.json`` for ``kaggle datasets create -p out_dir``; returns its path."""
    path = os.path.join(out_dir, "dataset-metadata.json")
    with open(path, "w") as fh:
        json.dump({"title": name, "id": f"{user or USER_PLACEHOLDER}/{name}", "licenses": [{"name": "other"}]}, fh,
                  indent=2)
    return path


def metadata_line(out_dir: str, name: str, user: tuple[str, str] | None) -> str:
    """The line ``package`` prints about ``dataset-metadata.json``: whose id it holds, or what to edit."""
    metadata = os.path.join(out_dir, "dataset-metadata.json")
    if user:
        return f"{metadata}: id {user[0]}/{name} (user name from {user[1]})"
    return (f"note: edit {metadata}: replace {USER_PLACEHOLDER} in its \"id\" with your Kaggle user name (or rerun "
            f"with --kaggle-user NAME, or set KAGGLE_USERNAME) before `kaggle datasets create -p {out_dir}`")


def make_bundle(runs: list[str], out_dir: str, name: str | None = None, wheels: list[str] | None = None,
                keras_wheel: bool = True, decoder_wheel: bool = True, user: str | None = None,
                allow_incomplete: bool = False) -> dict:
    """Build the bundle folder; returns ``{'wheels': [...], 'runs': [...], 'out': out_dir}``."""
    if not runs:
        raise ValueError("--models is required: pass at least one run folder, --models runs/NAME [runs/NAME2 ...]")
    name = name or os.path.basename(os.path.abspath(out_dir)).lower().replace("_", "-")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} is not empty: choose a new --out-dir folder (or delete it)")
    created = not os.path.exists(out_dir)
    try:
        return _fill_bundle(runs, out_dir, name, wheels, keras_wheel, decoder_wheel, user, allow_incomplete)
    except BaseException:
        # A failed run leaves nothing behind (it started from an empty or new folder), so a rerun is not refused.
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            for entry in os.listdir(out_dir):
                path = os.path.join(out_dir, entry)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        raise


def _fill_bundle(runs: list[str], out_dir: str, name: str, wheels: list[str] | None, keras_wheel: bool,
                 decoder_wheel: bool, user: str | None, allow_incomplete: bool = False) -> dict:
    copied, incomplete = copy_runs(runs, out_dir, allow_incomplete)  # first: a refused model stops before any build
    wheel_dir = os.path.join(out_dir, "wheels")
    os.makedirs(wheel_dir, exist_ok=True)
    build_wheel(wheel_dir)
    specs = list(wheels or [])
    if keras_wheel:
        specs.append(f"keras=={importlib.metadata.version('keras')}")
    download_wheels(specs, wheel_dir)
    if decoder_wheel:
        download_wheels([f"simplejpeg=={importlib.metadata.version('simplejpeg')}"], wheel_dir, BINARY_TARGETS)
    stub = os.path.join(source_root(), "kaggle_kernel.py")
    if os.path.exists(stub):
        shutil.copy2(stub, os.path.join(out_dir, "kaggle_kernel.py"))
    wheel_names = sorted(os.listdir(wheel_dir))
    with open(os.path.join(out_dir, "README.md"), "w") as fh:
        fh.write(bundle_readme(name, wheel_names, copied, incomplete))
    write_metadata(out_dir, name, user)
    with open(os.path.join(out_dir, BUNDLE_MANIFEST), "w") as fh:
        json.dump({"name": name, "wheels": wheel_names, "runs": copied, "incomplete_folds": incomplete}, fh, indent=2)
    return {"out": out_dir, "wheels": wheel_names, "runs": copied, "name": name, "incomplete_folds": incomplete}


def build_parser():
    parser = cli.build_parser("python -m ranzcr_tf.serve.package", __doc__.split("\n\n")[0],
                              epilog="Upload the folder as a Kaggle dataset; its README.md holds the notebook cell.")
    parser.add_argument("--models", nargs="+", default=[], metavar="RUN_DIR",
                        help="run folders (runs/NAME) to include (required; the kernel's --models)")
    cli.hidden_alias(parser, "--runs", "models", nargs="+")
    parser.add_argument("--out-dir", required=True, help="new (or empty) folder for the bundle")
    cli.hidden_alias(parser, "--out", "out_dir")
    parser.add_argument("--name", help="Kaggle dataset slug, i.e. the folder name under /kaggle/input "
                        "(default: the --out-dir folder's name)")
    parser.add_argument("--kaggle-user", metavar="NAME", help="your Kaggle user name, for dataset-metadata.json's "
                        "id NAME/<name> (default: $KAGGLE_USERNAME, else the username in ~/.kaggle/kaggle.json)")
    parser.add_argument("--wheel", action="append", default=[], metavar="SPEC",
                        help="extra wheel to bundle, e.g. --wheel 'timm==1.0.9' (pip download --no-deps)")
    parser.add_argument("--no-keras", action="store_true", help="do not bundle the installed Keras wheel "
                        "(when the target image already has Keras >= 3.14)")
    parser.add_argument("--allow-incomplete", action="store_true", help="also bundle folds whose training did not "
                        "finish (refused by default); bundle.json and README.md list them")
    parser.add_argument("--no-decoder", action="store_true", help="do not bundle simplejpeg wheels (when the "
                        "target image already has simplejpeg)")
    return parser


def run(args) -> int:
    cli.check_output_dir(args.out_dir)
    user = kaggle_user(args.kaggle_user)  # before the slow build: a broken kaggle.json stops at once
    result = make_bundle(args.models, args.out_dir, args.name, args.wheel, keras_wheel=not args.no_keras,
                         decoder_wheel=not args.no_decoder, user=user[0] if user else None,
                         allow_incomplete=args.allow_incomplete)
    print(f"bundle {result['out']} ({result['name']}): wheels {', '.join(result['wheels'])}; "
          f"{len(result['runs'])} fold(s)")
    print(metadata_line(result["out"], result["name"], user))
    print("notebook cell:\n" + notebook_cell(result["name"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
