"""Where Kaggle puts things, resolved through one environment variable, and the notebooks' two helpers.

A Kaggle notebook sees the competition data at ``/kaggle/input/<competition>``, every attached dataset or
notebook output at ``/kaggle/input/<slug>``, its output folder at ``/kaggle/working`` (saved with the
notebook's version, and attachable to another notebook as an input) and scratch space at ``/kaggle/tmp``.
``RANZCR_KAGGLE_ROOT`` (default ``/``) moves that whole tree: with ``RANZCR_KAGGLE_ROOT=/tmp/k``,
``/kaggle/input/x`` is ``/tmp/k/kaggle/input/x``. The notebooks in ``kaggle/`` and the commands' Kaggle
defaults (``make_tfrecords.py --data-dir``, the kernel's ``--data-dir``, ``--models`` and ``--out``) all
resolve their paths here, so a rehearsal on a laptop or in CI (``tests/test_notebooks.py``) runs the same
code against a temporary folder. The variable is read at every call, never cached.

Standard library only, on purpose: a notebook's own kernel imports this, and on a TPU VM the accelerator belongs
to one process, the training command the notebook starts, so the kernel must not import TensorFlow or JAX.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT_ENV = "RANZCR_KAGGLE_ROOT"
COMPETITION = "ranzcr-clip-catheter-line-classification"


def root() -> str:
    """The folder holding ``kaggle/``: ``$RANZCR_KAGGLE_ROOT``, or ``/`` on Kaggle itself."""
    return os.environ.get(ROOT_ENV) or os.sep


def kaggle_dir(*parts: str) -> str:
    return os.path.join(root(), "kaggle", *parts)


def input_dir(*parts: str) -> str:
    """``/kaggle/input[/parts...]``: the competition folder and every attached dataset (read-only on Kaggle)."""
    return kaggle_dir("input", *parts)


def working_dir(*parts: str) -> str:
    """``/kaggle/working[/parts...]``: the notebook's output, kept when a version is saved."""
    return kaggle_dir("working", *parts)


def tmp_dir(*parts: str) -> str:
    return kaggle_dir("tmp", *parts)


def competition_dir() -> str:
    """The RANZCR CLiP competition folder (``train.csv``, ``train/``, ``test/``, ``sample_submission.csv``)."""
    return input_dir(COMPETITION)


def on_kaggle() -> bool:
    """True where ``/kaggle/input`` exists (a Kaggle notebook, or a rehearsal under ``RANZCR_KAGGLE_ROOT``)."""
    return os.path.isdir(input_dir())


def carry_over_run(previous: str, out_dir: str) -> str:
    """Start this session's run folder ``out_dir`` from an earlier session's copy ``previous``, if there is one.

    Attached inputs are read-only, and training writes its checkpoints into the run folder, so the earlier
    session's folder is copied (not linked) into ``out_dir``; training then resumes from it (``train_tpu.py``
    finds ``fold{k}/backup`` and skips finished folds). An ``out_dir`` that already exists is this session's own
    and is kept. Returns the line it printed.
    """
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        note = f"{out_dir} already exists: training continues from it"
    elif os.path.isdir(previous):
        shutil.copytree(previous, out_dir, dirs_exist_ok=True)
        note = f"copied the earlier session's run {previous} -> {out_dir}: training resumes from it"
    else:
        note = (f"no earlier session's run at {previous}: training starts from the beginning into {out_dir} "
                "(to continue a run, attach the previous version's output as an input)")
    print(note, flush=True)
    return note


class StepFailed(RuntimeError):
    """A notebook step's command exited with a code it does not accept."""


def run_step(argv: list[str], ok_codes: tuple[int, ...] = (0,), env: dict | None = None) -> int:
    """Run one command of a notebook, its output shown in the cell as it comes; returns its exit code.

    A code outside ``ok_codes`` raises ``StepFailed`` naming the command, so the notebook stops there
    (``!cmd`` would carry on silently).
    """
    print("$ " + " ".join(argv), flush=True)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               env={**os.environ, **(env or {})})
    for line in process.stdout:
        sys.stdout.write(line)
    code = process.wait()
    if code not in ok_codes:
        shown = " ".join(os.path.basename(arg) for arg in argv[:3])
        raise StepFailed(f"`{shown} ...` exited with {code}: its last lines above say why")
    return code
