"""One set of CLI conventions (ranzcr_tf.cli): error classes and exit codes, TensorFlow's start-up noise,
output paths and config files refused at start-up with one line (real subprocesses, real folders)."""

import contextlib
import os
import subprocess
import sys

import pytest
from helpers_train import write_tiny_records

from ranzcr_tf import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("oneDNN", "cpu_feature_guard", "absl::InitializeLog", "Unable to register", "I0000 ")


def load_script(name):
    """A root-level CLI (``train_tpu.py``, ``make_tfrecords.py``) as a module, whatever sys.path holds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(args, *, env_extra=None, drop=("TF_CPP_MIN_LOG_LEVEL",), timeout=300):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", KERAS_BACKEND="tensorflow", PYTHONPATH=ROOT)
    for key in drop:
        env.pop(key, None)
    env.pop(cli.VERBOSE_ENV, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("records"))
    write_tiny_records(root, num_folds=3, per_fold=8, size=32)
    return root


def one_error_line(stderr: str, prog: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------- wrapper
def _parser():
    return cli.build_parser("prog", "test command", settings=True, progress=True)


@pytest.mark.parametrize("raised, code, prefix", [
    (ValueError("bad row 3\nsecond line"), 2, "prog: error: bad row 3 | second line"),
    (FileNotFoundError("no such file x.csv"), 2, "prog: error: no such file x.csv"),
    (RuntimeError("boom"), 1, "prog: internal error: RuntimeError: boom (rerun with --debug"),
    (KeyboardInterrupt(), 130, "prog: interrupted"),
])
def test_one_error_line_and_exit_code_per_class(raised, code, prefix, capsys):
    def body(args):
        raise raised

    assert cli.main(_parser(), body, []) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith(prefix) and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_debug_shows_the_traceback_and_exit_code_attribute_is_honoured(capsys):
    def body(args):
        raise ValueError("bad value")

    assert cli.main(_parser(), body, ["--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err

    class DiskFull(OSError):
        exit_code = 1

    def full(args):
        raise DiskFull("could not write backup (No space left on device)")

    assert cli.main(_parser(), full, []) == 1
    err = capsys.readouterr().err
    assert err.startswith("prog: error: could not write backup") and "internal" not in err


def test_shared_flags_and_hidden_aliases():
    args = _parser().parse_args(["--no-progress", "--set", "a.b=1", "--config", "x.yaml"])
    assert args.quiet and args.overrides == ["a.b=1"] and args.config == "x.yaml"
    assert "--no-progress" not in _parser().format_help()
    train_tpu = load_script("train_tpu")
    parsed = train_tpu.parse_args(["--fold", "0", "--out", "runs/x", "--no-progress"])
    assert parsed.out_dir == "runs/x" and parsed.quiet
    help_text = train_tpu.build_parser().format_help()
    assert "--out-dir" in help_text and "--out " not in help_text and "--restart" in help_text


# ----------------------------------------------------------------------------------------------- noise
def test_tensorflow_startup_lines_hidden_unless_verbose(tiny, tmp_path):
    # A real command that imports TensorFlow (Keras) and stops on a bad fold.
    args = ["train_tpu.py", "--fold", "7", "--tfrecords", tiny, "--out-dir", str(tmp_path / "run")]
    quiet = run_script(args)
    assert quiet.returncode == 2
    assert not [n for n in NOISE if n in quiet.stderr], quiet.stderr[-3000:]
    one_error_line(quiet.stderr, "train_tpu.py")
    loud = run_script([*args, "--verbose"])
    assert loud.returncode == 2 and any(n in loud.stderr for n in NOISE), loud.stderr[-3000:]
    env_loud = run_script(args, env_extra={cli.VERBOSE_ENV: "1"})
    assert any(n in env_loud.stderr for n in NOISE)
    helped = run_script(["train_tpu.py", "--help"])
    assert helped.returncode == 0 and not [n for n in NOISE if n in helped.stderr + helped.stdout]


# ----------------------------------------------------------------------------------------------- outputs
@contextlib.contextmanager
def read_only_folder(path):
    """A real read-only folder: a read-only tmpfs mount as root (permissions do not stop root), else chmod."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield path
        finally:
            os.chmod(path, 0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", path], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=False)


def test_output_paths_are_refused_at_start_with_one_line(tiny, tmp_path, capsys):
    make_tfrecords, train_tpu = load_script("make_tfrecords"), load_script("train_tpu")
    from ranzcr_tf.serve import kernel

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    data = tmp_path / "data"
    data.mkdir()
    train = ["--fold", "0", "--tfrecords", tiny]
    cases = [
        (train_tpu.main, "train_tpu.py", [*train, "--out-dir", str(a_file)], "is a file, not a folder"),
        (make_tfrecords.main, "make_tfrecords.py", ["--data-dir", str(data), "--out-dir", str(a_file)],
         "is a file, not a folder"),
        (kernel.main, "kaggle_kernel.py", ["--data-dir", str(data), "--models", str(tmp_path), "--out", str(tmp_path)],
         "is a folder"),
        (kernel.main, "kaggle_kernel.py", ["--data-dir", str(data), "--models", str(tmp_path), "--out",
                                           str(a_file / "sub.csv")], "is a file, not a folder"),
    ]
    with read_only_folder(str(tmp_path / "ro")) as read_only:
        cases += [
            (train_tpu.main, "train_tpu.py", [*train, "--out-dir", os.path.join(read_only, "run")], "not writable"),
            (make_tfrecords.main, "make_tfrecords.py", ["--data-dir", str(data), "--out-dir", read_only], "not writable"),
            (kernel.main, "kaggle_kernel.py", ["--data-dir", str(data), "--models", str(tmp_path), "--out",
                                               os.path.join(read_only, "sub.csv")], "not writable"),
        ]
        for main, prog, argv, expected in cases:
            assert main(argv) == 2, (prog, argv)
            line = one_error_line(capsys.readouterr().err, prog)
            assert expected in line, line
    # Nothing was started: no fold folder, no manifest, no submission.
    assert not os.path.exists(tmp_path / "run") and not list(tmp_path.glob("**/manifest.json"))


@pytest.mark.parametrize("content, expected", [
    ("train:\n\tepochs: 3\n", "is not valid YAML"),
    ("- train\n- model\n", "holds a list, not sections"),
    (None, "is a folder"),
])
def test_bad_config_files_are_one_line_errors(tiny, tmp_path, capsys, content, expected):
    make_tfrecords, train_tpu = load_script("make_tfrecords"), load_script("train_tpu")
    from ranzcr_tf.serve import kernel

    if content is None:
        config = tmp_path / "configs"
        config.mkdir()
    else:
        config = tmp_path / "bad.yaml"
        config.write_text(content)
    for main, prog, argv in [
        (train_tpu.main, "train_tpu.py", ["--fold", "0", "--tfrecords", tiny, "--out-dir", str(tmp_path / "r")]),
        (make_tfrecords.main, "make_tfrecords.py", ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")]),
        (kernel.main, "kaggle_kernel.py", ["--data-dir", str(tmp_path), "--models", str(tmp_path),
                                           "--out", str(tmp_path / "s.csv")]),
    ]:
        assert main([*argv, "--config", str(config)]) == 2
        line = one_error_line(capsys.readouterr().err, prog)
        assert str(config) in line and expected in line, line
    if content and content.startswith("train"):
        assert "line 2" in line
