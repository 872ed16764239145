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


# ----------------------------------------------------------------------------------------------- every command
COMMANDS = {  # the prog each command names itself by -> how to start it
    "train_tpu.py": ["train_tpu.py"], "make_tfrecords.py": ["make_tfrecords.py"],
    "kaggle_kernel.py": ["kaggle_kernel.py"],
    **{f"python -m {m}": ["-m", m] for m in (
        "ranzcr_tf.demo", "ranzcr_tf.synth.generate", "ranzcr_tf.synth.ich", "ranzcr_tf.pipeline",
        "ranzcr_tf.pipeline.data", "ranzcr_tf.model", "ranzcr_tf.model.build", "ranzcr_tf.serve.package",
        "ranzcr_tf.serve.pseudo", "ranzcr_tf.serve.blend", "ranzcr_tf.report", "ranzcr_tf.report.cv",
        "ranzcr_tf.report.score")},
}


def test_every_command_has_version_and_names_itself_as_it_is_started():
    from concurrent.futures import ThreadPoolExecutor

    from ranzcr_tf.cli import package_version

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(COMMANDS, pool.map(lambda argv: run_script([*argv, "--version"], timeout=120),
                                              COMMANDS.values())))
    for prog, result in results.items():
        assert result.returncode == 0 and result.stdout.strip() == f"{prog} (ranzcr-tf {package_version()})", \
            (prog, result.stdout, result.stderr[-2000:])
    import importlib.metadata

    assert package_version() == importlib.metadata.version("ranzcr-tf")


def test_help_without_tensorflow_is_quick_and_quiet():
    """The model and pipeline commands parse before TensorFlow loads: --help prints no TensorFlow line and takes
    a fraction of TensorFlow's import time; demo --help says how to start it."""
    import time

    for argv, usage in ((["-m", "ranzcr_tf.pipeline.data"], "usage: python -m ranzcr_tf.pipeline.data"),
                        (["-m", "ranzcr_tf.model.build"], "usage: python -m ranzcr_tf.model.build"),
                        (["-m", "ranzcr_tf.demo"], "usage: python -m ranzcr_tf.demo")):
        start = time.perf_counter()
        result = run_script([*argv, "--help", "--verbose"], timeout=120)  # --verbose: TensorFlow would speak
        seconds = time.perf_counter() - start
        assert result.returncode == 0 and result.stdout.startswith(usage), result.stdout[:300]
        assert not [n for n in NOISE if n in result.stderr + result.stdout], result.stderr[-2000:]
        assert "tensorflow" not in result.stderr.lower()
        assert seconds < 5, f"{argv} --help took {seconds:.1f} s"  # importing TensorFlow takes longer on this machine
    make_tfrecords = load_script("make_tfrecords").build_parser().format_help()
    assert "DICOM not yet" not in make_tfrecords and ".dcm" in make_tfrecords


def test_workers_say_threads_or_processes():
    from ranzcr_tf.serve import kernel
    from ranzcr_tf.synth import generate

    for parser, kind in ((load_script("make_tfrecords").build_parser(), "threads"), (kernel.build_parser(), "threads"),
                         (generate.build_parser(), "processes")):
        workers = next(a for a in parser._actions if "--workers" in a.option_strings)
        assert workers.help.startswith(kind), workers.help


def test_print_config_prints_the_resolved_yaml_and_exits_0(tmp_path, capsys):
    import yaml

    from ranzcr_tf import demo
    from ranzcr_tf.pipeline.__main__ import main as pipeline_main
    from ranzcr_tf.serve import kernel

    preset = os.path.join(ROOT, "configs", "cpu_demo.yaml")
    override = ["--config", preset, "--set", "train.epochs=7", "--print-config"]
    for main in (load_script("train_tpu").main, load_script("make_tfrecords").main, kernel.main, pipeline_main):
        assert main(override) == 0, main
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["train"]["epochs"] == 7 and printed["model"]["backbone"], main
    assert demo.main(["--config", preset, "--print-config"]) == 0  # demo takes a preset, no --set
    assert yaml.safe_load(capsys.readouterr().out)["data"]["folds"] >= 2
    assert kernel.main(["--config", str(tmp_path / "missing.yaml"), "--print-config"]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_failed_training_start_leaves_no_run_folder(tiny, tmp_path, capsys):
    train_tpu = load_script("train_tpu")
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("train:\n  epochs: many\n")
    for argv in (["--fold", "0", "--tfrecords", str(tmp_path / "no_records")],
                 ["--fold", "0", "--tfrecords", tiny, "--config", str(bad_config)],
                 ["--fold", "9", "--tfrecords", tiny]):
        run_dir = tmp_path / "runs" / "x"
        assert train_tpu.main([*argv, "--out-dir", str(run_dir)]) == 2, argv
        one_error_line(capsys.readouterr().err, "train_tpu.py")
        assert not (tmp_path / "runs").exists(), argv


def test_one_name_for_run_folders_and_flags_after_the_subcommand():
    from ranzcr_tf.serve import package, pseudo

    parser = package.build_parser()
    assert parser.parse_args(["--runs", "a", "b", "--out-dir", "o"]).models == ["a", "b"]  # the older spelling
    assert parser.parse_args(["--models", "a", "--out-dir", "o"]).models == ["a"]
    assert "--models" in parser.format_help() and "--runs" not in parser.format_help()
    parser = pseudo.build_parser()
    common = ["--tfrecords", "t", "--out", "o.csv"]
    for argv in (["--debug", "--quiet", "oof", "run", *common], ["oof", "run", *common, "--debug", "--quiet"]):
        args = parser.parse_args(argv)
        assert args.debug and args.quiet and args.run_dirs == ["run"], argv
    args = parser.parse_args(["predict", "--models", "r", *common])
    assert not args.debug and not args.quiet and not args.verbose


def test_check_output_dir_creates_the_folder_or_only_probes_its_parent(tmp_path):
    made, probed = tmp_path / "a" / "b", tmp_path / "c" / "d"
    cli.check_output_dir(str(made))
    cli.check_output_dir(str(probed), create=False)
    assert made.is_dir() and not (tmp_path / "c").exists() and not list(tmp_path.glob("**/.tmp-write-check-*"))
    (tmp_path / "file").write_text("x")
    for create in (True, False):
        with pytest.raises(ValueError, match="file, not a folder|not writable"):
            cli.check_output_dir(str(tmp_path / "file" / "run"), create=create)
