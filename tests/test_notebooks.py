"""The three Kaggle notebooks (kaggle/*.ipynb), executed headless by a real Jupyter kernel (nbclient), chained as a
user chains them on Kaggle, in the exact Kaggle layout under a temporary root (``RANZCR_KAGGLE_ROOT``):

    ROOT/kaggle/input/ranzcr-clip-catheter-line-classification/   synthetic competition data (synth.generate)
    ROOT/kaggle/input/ranzcr-tf-code/                              this repository (the "code dataset")
    ROOT/kaggle/input/<notebook slug>/                             a saved version's /kaggle/working
    ROOT/kaggle/working/                                           fresh for every session (the kernel's cwd)

1 -> its output becomes the records dataset; 2 runs twice, the second session resuming from the first one's
output attached as an input; ``python -m ranzcr_tf.serve.package`` (as a user runs it) -> the bundle dataset;
3 installs the wheel with ``pip --no-index`` into a throwaway venv and writes the submission, with every
non-local connection refused and logged (the guard is shown to fire in its own test).

Commands of docs/walkthroughs.md run here: ``python -m ranzcr_tf.synth.generate``, ``make_tfrecords.py`` and
``train_tpu.py`` (through notebooks 1 and 2), ``python -m ranzcr_tf.serve.package ... --kaggle-user``, ``pip
install --no-index --find-links .../wheels ranzcr-tf`` and ``python -m ranzcr_tf.serve.kernel`` (notebook 3).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from ranzcr_tf import kaggle_paths
from ranzcr_tf.labels import ID_COLUMN, LABELS
from ranzcr_tf.serve import package

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "kaggle")
RECORDS_SLUG, TRAIN_SLUG, BUNDLE_SLUG, CODE_SLUG = "ranzcr-make-tfrecords", "ranzcr-train", "ranzcr-bundle", "ranzcr-tf-code"
RUN_NAME = "tiny"
# Tiny everything: 64 px records, 3 folds, compact_cnn, 2 epochs of 4 steps.
CONVERT_SETTINGS = ["preprocess.image_size=64", "data.folds=3"]
TRAIN_SETTINGS = ["train.epochs=2", "train.batch_size=8", "train.warmup_epochs=0", "data.shuffle_buffer=64",
                  "infer.batch_size=16"]

# Loaded into every process of notebook 3 (the kernel, pip, the prediction command) through PYTHONPATH: a
# connection to anything but this machine is logged and refused, and so is a name lookup of another host.
NETWORK_GUARD = textwrap.dedent('''
    import os
    import socket

    _LOG = os.environ["RANZCR_NETWORK_LOG"]
    _LOCAL = ("127.", "::1", "localhost", "0.0.0.0")


    def _refuse(what):
        with open(_LOG, "a") as fh:
            fh.write(f"{os.getpid()} {what}\\n")
        raise OSError(f"network disabled for this run: {what}")


    def _is_local(host):
        return isinstance(host, str) and host.startswith(_LOCAL)


    def _guard(original):
        def connect(self, address):
            if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
                _refuse(f"connect {address}")
            return original(self, address)
        return connect


    _getaddrinfo = socket.getaddrinfo


    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_local(host if isinstance(host, str) else host.decode()):
            _refuse(f"getaddrinfo {host}")
        return _getaddrinfo(host, *args, **kwargs)


    socket.socket.connect = _guard(socket.socket.connect)
    socket.socket.connect_ex = _guard(socket.socket.connect_ex)
    socket.getaddrinfo = getaddrinfo
''')


def _kernelspec(jupyter_dir: str, name: str, python: str, env: dict) -> str:
    folder = os.path.join(jupyter_dir, "kernels", name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "kernel.json"), "w") as fh:
        json.dump({"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": name,
                   "language": "python", "env": env}, fh)
    return name


def run_notebook(root: str, name: str, kernel: str, parameters: dict, save_as: str | None = None) -> str:
    """One Kaggle session: a fresh /kaggle/working, the notebook run top to bottom with ``parameters`` injected
    after its "parameters" cell (as papermill does), then "Save Version": working -> /kaggle/input/``save_as``.
    Returns every output the cells printed."""
    working = os.path.join(root, "kaggle", "working")
    shutil.rmtree(working, ignore_errors=True)
    os.makedirs(working)
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(notebook, timeout=300, kernel_name=kernel, resources={"metadata": {"path": working}}).execute()
    printed = "\n".join(output.get("text", "") or str(output.get("data", {}).get("text/plain", ""))
                        for cell in notebook.cells for output in cell.get("outputs", []))
    if save_as:
        shutil.move(working, os.path.join(root, "kaggle", "input", save_as))
    return printed


def offline_venv(folder: str) -> str:
    """A throwaway venv whose "system" packages are this environment's (TensorFlow, Keras, ... as in Kaggle's
    image) but not ranzcr-tf: the notebook must install that from the bundle. ``--system-site-packages`` alone
    would expose the base interpreter's, not this venv's, so a .pth adds a view of this site-packages (links to
    every entry but ranzcr_tf's own) and pip comes from there too (``--without-pip``)."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", folder], check=True)
    shared = os.path.join(folder, "shared-site-packages")
    os.makedirs(shared)
    site = sysconfig.get_paths()["purelib"]
    for entry in os.listdir(site):
        if not entry.lower().startswith(("ranzcr_tf", "__editable__", "ranzcr-tf")):
            os.symlink(os.path.join(site, entry), os.path.join(shared, entry))
    python = os.path.join(folder, "bin", "python")
    venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(venv_site, "kaggle-image.pth"), "w") as fh:
        fh.write(shared + "\n")
    return python


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    """The Kaggle tree under a temporary root, with the competition data and the code dataset in place."""
    root = str(tmp_path_factory.mktemp("kaggle-root"))
    inputs = os.path.join(root, "kaggle", "input")
    os.makedirs(inputs)
    os.symlink(REPO, os.path.join(inputs, CODE_SLUG))
    made = subprocess.run([sys.executable, "-m", "ranzcr_tf.synth.generate", "--out", os.path.join(
        inputs, kaggle_paths.COMPETITION), "--n-train", "40", "--n-test", "10", "--seed", "0", "--scale", "0.1",
        "--workers", "1"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    jupyter = str(tmp_path_factory.mktemp("jupyter"))
    saved = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = jupyter
    # Notebooks 1 and 2 (internet on, this environment): they find the package through the code dataset alone.
    online = _kernelspec(jupyter, "kaggle-online", sys.executable, {
        kaggle_paths.ROOT_ENV: root, "PYTHONPATH": "", "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""})
    yield {"root": root, "jupyter": jupyter, "online": online, "inputs": inputs}
    if saved is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = saved


def _log_rows(run_dir: str) -> pd.DataFrame:
    return pd.read_csv(os.path.join(run_dir, "fold0", "log.csv"))


@pytest.mark.slow
def test_notebooks_records_train_resume_package_and_submit_offline(kaggle, tmp_path):
    root, inputs = kaggle["root"], kaggle["inputs"]
    printed = run_notebook(root, "01_make_tfrecords.ipynb", kaggle["online"], {
        "CODE_DATASET": CODE_SLUG, "CONFIG": "configs/cpu_demo.yaml", "SETTINGS": CONVERT_SETTINGS,
        "EXTRA_ARGS": ["--workers", "1"]}, save_as=RECORDS_SLUG)
    manifest = json.load(open(os.path.join(inputs, RECORDS_SLUG, "tfrecords", "manifest.json")))
    assert manifest["image_size"] == 64 and manifest["num_folds"] == 3 and sum(manifest["fold_counts"].values()) == 40
    assert f"code {os.path.join(inputs, CODE_SLUG)}" in printed

    # Session 1 stops at its time budget after epoch 1 (0.01 minutes: always after the first epoch), exit 75,
    # and the version is saved with the run folder; the notebook itself does not fail.
    train = {"CODE_DATASET": CODE_SLUG, "RECORDS_DATASET": RECORDS_SLUG, "PREVIOUS": TRAIN_SLUG,
             "CONFIG": "configs/cpu_demo.yaml", "RUN_NAME": RUN_NAME, "FOLDS": "0", "BACKEND": "tensorflow",
             "SETTINGS": TRAIN_SETTINGS}
    printed = run_notebook(root, "02_train.ipynb", kaggle["online"], {**train, "MAX_MINUTES": 0.01}, save_as=TRAIN_SLUG)
    first = os.path.join(inputs, TRAIN_SLUG, "runs", RUN_NAME)
    assert "no earlier session's run" in printed and "stopped at the time budget" in printed
    assert "stopped after epoch 1, its checkpoint saved" in printed
    assert len(_log_rows(first)) == 1 and not os.path.exists(os.path.join(first, "fold0", "metrics.json"))
    assert json.load(open(os.path.join(first, "fold0", "backup", "stage0", "training_metadata.json")))["epoch"] == 1

    # Session 2, the first session's output attached as PREVIOUS: it resumes at epoch 2 and finishes the fold.
    printed = run_notebook(root, "02_train.ipynb", kaggle["online"], {**train, "MAX_MINUTES": 500},
                           save_as=TRAIN_SLUG + "-2")
    second = os.path.join(inputs, TRAIN_SLUG + "-2", "runs", RUN_NAME)
    assert "copied the earlier session's run" in printed and "every fold asked for has finished" in printed
    assert "1 epoch(s) already done" in printed
    log = _log_rows(second)
    assert list(log["epoch"]) == [0, 1]
    assert log.iloc[0].equals(_log_rows(first).iloc[0])  # epoch 0 kept from session 1, not trained again
    assert os.path.exists(os.path.join(second, "fold0", "metrics.json"))

    # The bundle, built as a user builds it (wheels of Keras and simplejpeg left out: the "image" has them).
    bundle = os.path.join(inputs, BUNDLE_SLUG)
    packaged = subprocess.run([sys.executable, "-m", "ranzcr_tf.serve.package", "--models", second, "--out-dir", bundle,
                               "--kaggle-user", "some-kaggler", "--no-keras", "--no-decoder"], capture_output=True,
                              text=True, cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert packaged.returncode == 0, packaged.stderr[-2000:]
    assert json.load(open(os.path.join(bundle, "dataset-metadata.json")))["id"] == f"some-kaggler/{BUNDLE_SLUG}"
    assert "user name from --kaggle-user" in packaged.stdout

    # Notebook 3, offline: pip's index off, every non-local connection refused and logged, a bare venv kernel.
    python = offline_venv(str(tmp_path / "venv"))
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NETWORK_GUARD)
    network_log = tmp_path / "network.log"
    offline = _kernelspec(kaggle["jupyter"], "kaggle-offline", python, {
        kaggle_paths.ROOT_ENV: root, "PYTHONPATH": str(guard), "RANZCR_NETWORK_LOG": str(network_log),
        "PIP_NO_INDEX": "1", "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""})
    printed = run_notebook(root, "03_submit.ipynb", offline, {"BUNDLE": BUNDLE_SLUG, "MAX_MINUTES": 10})
    assert "Successfully installed ranzcr-tf" in printed
    assert f"ranzcr_tf installed in {os.path.dirname(python)[:-len('bin')]}" in printed  # the wheel, not the checkout
    assert not network_log.exists(), network_log.read_text()

    submission = pd.read_csv(os.path.join(root, "kaggle", "working", "submission.csv"))
    sample = pd.read_csv(os.path.join(inputs, kaggle_paths.COMPETITION, "sample_submission.csv"))
    assert list(submission.columns) == list(sample.columns) == [ID_COLUMN, *LABELS]
    assert list(submission[ID_COLUMN]) == list(sample[ID_COLUMN]) and len(submission) == 10
    values = submission[list(LABELS)].to_numpy()
    assert ((values >= 0) & (values <= 1)).all() and not pd.isna(values).any()


def test_network_guard_fires_on_a_deliberate_connect(tmp_path):
    """The guard notebook 3 runs under is not a check that cannot fail: a connect or lookup elsewhere is refused."""
    (tmp_path / "sitecustomize.py").write_text(NETWORK_GUARD)
    log = tmp_path / "network.log"
    probe = ("import socket\n"
             "for call in (lambda: socket.socket().connect(('192.0.2.1', 80)),\n"
             "             lambda: socket.getaddrinfo('pypi.org', 443)):\n"
             "    try:\n        call()\n    except OSError as exc:\n        print(exc)\n"
             "server = socket.socket(); server.bind(('127.0.0.1', 0)); server.listen()\n"
             "socket.create_connection(server.getsockname(), timeout=1).close(); print('local ok')\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(tmp_path), "RANZCR_NETWORK_LOG": str(log)})
    assert result.returncode == 0, result.stderr
    assert "network disabled for this run: connect ('192.0.2.1', 80)" in result.stdout
    assert "network disabled for this run: getaddrinfo pypi.org" in result.stdout and "local ok" in result.stdout
    assert len(log.read_text().splitlines()) == 2


def test_kaggle_user_comes_from_the_flag_then_the_environment_then_kaggle_json(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    assert package.kaggle_user() is None
    out = str(tmp_path / "bundle")
    os.makedirs(out)
    package.write_metadata(out, "ranzcr-bundle", None)
    assert json.load(open(os.path.join(out, "dataset-metadata.json")))["id"] == "KAGGLE_USERNAME/ranzcr-bundle"
    note = package.metadata_line(out, "ranzcr-bundle", None)
    assert note.startswith("note: edit") and "--kaggle-user NAME" in note and "\n" not in note

    (tmp_path / "kaggle.json").write_text(json.dumps({"username": "from-json", "key": "x"}))
    assert package.kaggle_user() == ("from-json", str(tmp_path / "kaggle.json"))
    monkeypatch.setenv("KAGGLE_USERNAME", "from-env")
    assert package.kaggle_user() == ("from-env", "$KAGGLE_USERNAME")
    assert package.kaggle_user("from-flag") == ("from-flag", "--kaggle-user")
    package.write_metadata(out, "ranzcr-bundle", package.kaggle_user("from-flag")[0])
    assert json.load(open(os.path.join(out, "dataset-metadata.json")))["id"] == "from-flag/ranzcr-bundle"
    assert package.metadata_line(out, "ranzcr-bundle", ("from-flag", "--kaggle-user")).endswith(
        "id from-flag/ranzcr-bundle (user name from --kaggle-user)")

    monkeypatch.delenv("KAGGLE_USERNAME")
    (tmp_path / "kaggle.json").write_text("{not json")
    with pytest.raises(ValueError, match="kaggle.json is not readable JSON"):
        package.kaggle_user()


def test_kaggle_paths_follow_the_root_variable_at_every_call(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(kaggle_paths.ROOT_ENV, raising=False)
    assert kaggle_paths.competition_dir() == f"/kaggle/input/{kaggle_paths.COMPETITION}"
    assert kaggle_paths.working_dir("submission.csv") == "/kaggle/working/submission.csv"
    monkeypatch.setenv(kaggle_paths.ROOT_ENV, str(tmp_path))
    assert kaggle_paths.input_dir("x") == str(tmp_path / "kaggle" / "input" / "x")
    assert not kaggle_paths.on_kaggle()
    from ranzcr_tf.config import load_config

    assert load_config(None, []).data.data_dir == str(tmp_path / "kaggle" / "input" / kaggle_paths.COMPETITION)

    previous, out = tmp_path / "prev" / "run", tmp_path / "out" / "run"
    assert "starts from the beginning" in kaggle_paths.carry_over_run(str(previous), str(out))
    (previous / "fold0").mkdir(parents=True)
    (previous / "fold0" / "log.csv").write_text("epoch\n0\n")
    assert "copied" in kaggle_paths.carry_over_run(str(previous), str(out))
    assert (out / "fold0" / "log.csv").read_text() == "epoch\n0\n"
    (out / "fold0" / "log.csv").write_text("epoch\n0\n1\n")  # this session's own progress is kept
    assert "already exists" in kaggle_paths.carry_over_run(str(previous), str(out))
    assert (out / "fold0" / "log.csv").read_text() == "epoch\n0\n1\n"

    # The notebooks' kernel imports it: it must leave the accelerator to the command it starts (one TPU owner).
    loaded = subprocess.run([sys.executable, "-c", "import sys; from ranzcr_tf import kaggle_paths; print(sorted("
                             "{m.split('.')[0] for m in sys.modules} & {'tensorflow', 'jax', 'keras', 'numpy'}))"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=60)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    with pytest.raises(kaggle_paths.StepFailed, match="exited with 3"):
        kaggle_paths.run_step([sys.executable, "-c", "print('a line'); raise SystemExit(3)"])
    assert "a line" in capsys.readouterr().out
    assert kaggle_paths.run_step([sys.executable, "-c", "raise SystemExit(75)"], ok_codes=(0, 75)) == 75
