"""Workers for the converter, the kernel's test images and the synthetic generator; results in submission order.

Two kinds of pool feed :func:`ordered_map`:

- :func:`start_threads` (the converter and the kernel's test images): threads in this process. The
  preprocessing is native code that releases the GIL (libjpeg-turbo through simplejpeg, then OpenCV's
  CLAHE, resize and JPEG encode), so threads scale across cores like processes do on it, without
  what processes cost: a fork server to start before the first image, every result pickled through a
  pipe at the writer's CPU expense (docs/results.md#speed-measurements-behind-code-choices), a copy of OpenCV and NumPy
  per worker, and the question of forking a process that holds TensorFlow (nothing forks).
- :func:`start_pool` (the synthetic generator, whose phantom drawing is mostly Python and NumPy
  that holds the GIL): processes from a fork server. This module is kept apart from ``convert.py``
  so such a worker imports only it, ``preprocess.py``, OpenCV and NumPy (no pandas, no TensorFlow).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import cv2

from ranzcr_tf.prep.preprocess import DICOM_SUFFIXES, BadImageError, preprocess_dicom_file, preprocess_file


def process_image(task: tuple) -> tuple:
    """One ``(path, PreprocessConfig)`` -> ``('ok', jpeg_bytes, info)`` or ``('bad', reason, None)``."""
    path, settings = task
    read = preprocess_dicom_file if path.lower().endswith(DICOM_SUFFIXES) else preprocess_file
    try:
        data, info = read(path, settings)
    except BadImageError as exc:
        reason = str(exc)
        return "bad", reason[len(path) + 2:] if reason.startswith(f"{path}: ") else reason, None
    return "ok", data, info


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one): the default worker count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


@contextmanager
def start_threads(workers: int):
    """``workers`` threads for :func:`ordered_map`, or None for 1 (work then runs in the caller's thread).

    While the pool lives, OpenCV runs each call on the calling thread (``cv2.setNumThreads(1)``;
    restored on exit): parallelism comes from the pool, and OpenCV's own thread pool on top of it
    would oversubscribe the cores. On exit, queued tasks are cancelled and running ones finished.
    """
    if workers <= 1:
        yield None
        return
    opencv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="preprocess")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        cv2.setNumThreads(opencv_threads)


def _init_worker(parent_pid: int) -> None:
    # One OpenCV thread per worker: parallelism comes from the processes, and OpenCV's own thread
    # pool on top of them would oversubscribe the cores.
    cv2.setNumThreads(1)
    # Exit when the process that started the pool dies (kill -9 included): orphaned workers would
    # otherwise linger and keep its stdout/stderr pipes open. It is not our parent (the fork server
    # is, and it lives as long as any worker holds its liveness pipe), so it is watched by pid.
    threading.Thread(target=_exit_with, args=(parent_pid,), daemon=True).start()


def _process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a killed process stays a zombie until reaped: that counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (macOS): existence only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def _exit_with(pid: int) -> None:
    while not _process_gone(pid):
        time.sleep(0.5)
    os._exit(1)


@contextmanager
def start_pool(workers: int):
    """``workers`` worker processes for :func:`ordered_map`, or None for 1 (work then runs in this process).

    Workers are forked from a fork server: a fresh interpreter (never a fork of this process, which
    may hold TensorFlow, and TensorFlow is not fork-safe) that imports this module, OpenCV and NumPy
    once; each worker then starts in milliseconds instead of repeating a half-second of imports.
    A ``ProcessPoolExecutor`` rather than ``multiprocessing.Pool``: if a worker dies (out of memory,
    a decoder crash) it raises ``BrokenProcessPool`` instead of waiting forever. On exit, queued
    tasks are cancelled and running ones finished.
    """
    if workers <= 1:
        yield None
        return
    from concurrent.futures import ProcessPoolExecutor

    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    else:  # Windows
        context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ordered_map(fn, items, pool, window: int, ready: dict | None = None):
    """``map(fn, items)`` in order, at most ``window`` tasks in flight (``pool`` None = in this process).

    Consuming strictly in submission order is what makes 1 and N workers write the same bytes; the
    window is what keeps memory flat (finished results wait at most ``window`` deep). ``ready`` maps
    ``item[0]`` to a result computed earlier (it is used instead of recomputing, and removed).
    """
    ready = {} if ready is None else ready
    if pool is None:
        for item in items:
            yield ready.pop(item[0]) if item[0] in ready else fn(item)
        return
    pending: deque = deque()
    for item in items:
        if item[0] in ready:
            done: Future = Future()
            done.set_result(ready.pop(item[0]))
            pending.append(done)
        else:
            pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
