"""One set of command-line conventions for every command of the project.

    parser = cli.build_parser("train_tpu.py", description=..., settings=True, progress=True)
    parser.add_argument(...)
    return cli.main(parser, body, argv)        # body(args) -> exit code; calls cli.setup() first

Every command gets ``--verbose`` (TensorFlow's C++ and absl start-up logging back; also
``RANZCR_VERBOSE=1``), ``--debug`` (tracebacks) and ``--version``; commands with settings get
``--config YAML``, ``--set KEY=VALUE`` and ``--print-config`` (the resolved config as YAML, then exit 0);
commands with progress output get ``--quiet``. Folders are ``--out-dir``, files ``--out``; an older
spelling stays as a hidden alias (``hidden_alias``). ``--workers`` always says in its help whether it
counts threads or processes.

Errors, one line on stderr, one exit code per class:

===========================================  =====  ======================================================
bad input (ValueError, FileNotFoundError,    2      ``<prog>: error: <message>``
NotADirectoryError, IsADirectoryError)
an exception with an ``exit_code`` attribute  its    ``<prog>: error: <message>`` (disk full while
                                             code   checkpointing, a diverged training run)
anything else                                1      ``<prog>: internal error: <type>: <message>`` + a hint
                                                    to rerun with --debug
Ctrl-C (KeyboardInterrupt)                   130    ``<prog>: interrupted``
SIGTERM where asked (``raise_on_sigterm``)   143    ``<prog>: terminated (SIGTERM)...``
===========================================  =====  ======================================================

Importing this module changes nothing. :func:`setup` (called by :func:`main` after parsing, or by an
entry point itself before it imports anything heavy) silences TensorFlow's C++ start-up lines (oneDNN,
cpu_feature_guard, absl, "Unable to register cuDNN factory") for a TensorFlow imported afterwards, unless
``--verbose`` is on the command line or ``RANZCR_VERBOSE=1``; an entry point therefore parses its
arguments before it imports TensorFlow (directly or through Keras). ``TF_CPP_MIN_LOG_LEVEL`` alone is
not enough: TensorFlow 2.21 writes the oneDNN line and absl's "All log messages before
absl::InitializeLog()" through absl while its libraries load, whatever that variable says. So the first
``import tensorflow`` (whoever triggers it: Keras, tf.data) runs with the process's stderr file
descriptor captured, and every line of it that is not a C++ log line is written back afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable

from ranzcr_tf import io_utils  # imports no TensorFlow

VERBOSE_ENV = "RANZCR_VERBOSE"
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
# TF_CPP_MIN_LOG_LEVEL=3 hides C++ INFO/WARNING/ERROR lines: "Unable to register cuDNN factory" is logged
# as an ERROR although it is harmless; a real failure still reaches Python as an exception.
_QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR", "GLOG_minloglevel": "3"}


def verbose_requested(argv: list[str] | None = None) -> bool:
    """``--verbose`` among the arguments, or ``RANZCR_VERBOSE`` set to 1/true/yes."""
    argv = sys.argv[1:] if argv is None else argv
    return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


# absl / TensorFlow C++ log lines ("I0000 00:00:1796186224.255745   18483 port.cc:153] ..."), absl's
# pre-initialisation notice, and cpu_feature_guard's second line.
_NATIVE_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\]|"
                              r"^WARNING: All log messages before absl::InitializeLog\(\)|"
                              r"^To enable the following instructions:")


@contextlib.contextmanager
def native_stderr_filtered():
    """Capture file descriptor 2 (where C++ libraries write) and write back all but their log lines."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded interpreters): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not _NATIVE_LOG_LINE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Runs the first ``import tensorflow`` inside ``native_stderr_filtered`` (then steps aside)."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            with native_stderr_filtered():
                execute(module)

        spec.loader.exec_module = exec_module  # this spec's own loader instance only
        return spec


def _install_quiet_import(install: bool) -> None:
    hooks = [hook for hook in sys.meta_path if isinstance(hook, _QuietTensorFlowImport)]
    if install and not hooks and "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, _QuietTensorFlowImport())
    elif not install:
        for hook in hooks:
            sys.meta_path.remove(hook)


def configure_logging(verbose: bool) -> None:
    """Quiet (default) or restore the frameworks' logging. The environment part only takes effect if
    TensorFlow has not been imported yet; the Python loggers are set either way."""
    if verbose:
        for key in _QUIET_ENV:
            if os.environ.get(key) == _QUIET_ENV[key]:
                os.environ.pop(key)  # back to TensorFlow's own default
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        level = logging.INFO
    else:
        for key, value in _QUIET_ENV.items():
            os.environ.setdefault(key, value)  # a level the user set explicitly is respected
        level = logging.ERROR
    _install_quiet_import(not verbose)
    logging.getLogger("tensorflow").setLevel(level)
    logging.getLogger("absl").setLevel(level)
    if "absl.logging" in sys.modules:
        sys.modules["absl.logging"].set_verbosity(level)


def setup(argv: list[str] | None = None) -> None:
    """The process-wide set-up of a command: quiet TensorFlow's start-up lines unless ``--verbose`` is in
    ``argv`` (default ``sys.argv``) or ``RANZCR_VERBOSE`` is set. Sets environment variables and installs an
    import hook, so only entry points call it (:func:`main` does), never a library module at import."""
    configure_logging(verbose_requested(argv))


def package_version() -> str:
    """The installed ranzcr-tf version (``importlib.metadata``), else the package's own ``__version__``."""
    from importlib import metadata

    try:
        return metadata.version("ranzcr-tf")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        from ranzcr_tf import __version__

        return __version__


# ----------------------------------------------------------------------------------------------- arguments
def build_parser(prog: str, description: str, *, epilog: str | None = None, settings: bool = False,
                 progress: bool = False, formatter_class=argparse.RawDescriptionHelpFormatter) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the shared flags; the command adds its own."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=formatter_class)
    if settings:
        add_config_flags(parser)
    if progress:
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
        hidden_alias(parser, "--no-progress", "quiet", action="store_true")
    parser.add_argument("--verbose", action="store_true",
                        help=f"show TensorFlow's start-up and framework logging (also {VERBOSE_ENV}=1)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"%(prog)s (ranzcr-tf {package_version()})")
    return parser


def add_config_flags(parser: argparse.ArgumentParser, default: str | None = None, help_text: str | None = None,
                     overrides: bool = True) -> None:
    """``--config``, ``--set`` (unless not ``overrides``) and ``--print-config`` (handled by :func:`main`)."""
    parser.add_argument("--config", default=default,
                        help=help_text or "YAML preset (configs/*.yaml) or a saved run's config.yaml")
    if overrides:
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override one config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (--config and every --set applied) as YAML and exit")


def _config_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``--config``/``--set`` (and ``--verbose``/``--debug``) of ``argv``, the command's other arguments ignored."""
    only = argparse.ArgumentParser(prog=parser.prog, add_help=False)
    add_config_flags(only, default=parser.get_default("config"), overrides=parser.get_default("overrides") is not None)
    only.add_argument("--verbose", action="store_true")
    only.add_argument("--debug", action="store_true")
    return only.parse_known_args(argv)[0]


def print_config(args: argparse.Namespace) -> int:
    """Print the config ``--config`` and ``--set`` resolve to, as YAML (what ``--print-config`` shows)."""
    import yaml

    from ranzcr_tf.config import load_config

    cfg = load_config(args.config, getattr(args, "overrides", None))
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def add_subcommand(subparsers, name: str, help_text: str, *, progress: bool = False) -> argparse.ArgumentParser:
    """A sub-command's parser that also accepts the shared flags after its name (``pseudo oof ... --debug``);
    given before it or after it, they mean the same."""
    sub = subparsers.add_parser(name, help=help_text)
    flags = [("--verbose", "show TensorFlow's start-up and framework logging"),
             ("--debug", "show the full traceback of an error")] + ([("--quiet", "no progress bars")] if progress else [])
    for flag, text in flags:  # SUPPRESS: left out, the flag keeps what the main parser read
        sub.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
    return sub


def hidden_alias(parser: argparse.ArgumentParser, flag: str, dest: str, **kwargs) -> None:
    """An older spelling of a flag that still works but is not shown in --help. The flag it stands for cannot
    be ``required=True`` (argparse would ask for it even when the old spelling is given): check it with
    :func:`require` instead."""
    parser.add_argument(flag, dest=dest, help=argparse.SUPPRESS, **kwargs)


def require(args: argparse.Namespace, dest: str, flag: str) -> None:
    """A ``ValueError`` (exit 2) when the required ``flag`` (or its hidden older spelling) was not given."""
    if not getattr(args, dest, None):
        raise ValueError(f"{flag} is required")


# ----------------------------------------------------------------------------------------------- outputs
def check_output_dir(path: str, flag: str = "--out-dir", create: bool = True) -> None:
    """At start-up: ``path`` is (or can become) a folder we can write into; a ``ValueError`` otherwise.

    Writes a probe file, so a read-only mount is caught too (``os.access`` says yes to root there): in
    ``path``, created first (``create``), or else in its nearest existing parent, so a command that may
    still stop on a later check leaves no empty folder behind. Remote paths (gs://) are left to the writer.
    """
    if not path or io_utils.is_remote(path):
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a folder: pass a folder (new or existing)")
    folder = os.path.abspath(path)
    while not create and not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: {folder} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".tmp-write-check-", dir=folder)
        os.close(handle)
        with contextlib.suppress(FileNotFoundError):  # a converter's stale-file clean-up may have taken it
            os.remove(probe)
    except OSError as exc:
        raise ValueError(f"{flag} {path} is not writable ({exc.strerror}): pass a folder you can write to") from None


def check_output_file(path: str, flag: str = "--out") -> None:
    """At start-up: ``path`` can be written as a file (its folder exists or can be made, is writable, and
    ``path`` is not a folder); a ``ValueError`` otherwise. An existing file is left untouched."""
    if not path or io_utils.is_remote(path):
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder: pass a file path such as {os.path.join(path, 'submission.csv')}")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
    check_output_dir(parent, flag=f"{flag} {path}: the folder")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path} exists and is read-only: pass another path or make it writable")


# ----------------------------------------------------------------------------------------------- running
class Terminated(KeyboardInterrupt):
    """SIGTERM (cloud preemption, ``docker stop``) raised where the main thread is, so it unwinds as Ctrl-C does
    (``finally`` blocks run, temporary files are removed); ``main`` prints ``message`` and exits 143 (128 + 15)."""

    exit_code = 143
    message = "terminated (SIGTERM)"


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises ``Terminated`` in the main thread (commands with state worth unwinding)."""
    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def main(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
         argv: list[str] | None = None) -> int:
    """Parse ``argv``, run ``body(args)`` and turn what it raises into one line and an exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--print-config" in argv and parser.get_default("print_config") is not None:  # a command with --config
        args, body = _config_arguments(parser, argv), print_config  # the command's other arguments may be absent
    else:
        args = parser.parse_args(argv)
    setup(["--verbose"] if args.verbose else [])
    prog = parser.prog
    try:
        return int(body(args) or 0)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM where the command asked for it (``Terminated``)
        if args.debug:
            raise
        print(f"\n{prog}: {getattr(exc, 'message', None) or 'interrupted'}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))
    except Exception as exc:  # noqa: BLE001  (every error ends as one line; --debug shows the traceback)
        if args.debug:
            traceback.print_exc()
        code = getattr(exc, "exit_code", None)
        if isinstance(exc, BAD_INPUT) or code is not None:
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
            return 2 if code is None else int(code)
        print(f"{prog}: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the "
              f"traceback, and report it)", file=sys.stderr)
        return 1
