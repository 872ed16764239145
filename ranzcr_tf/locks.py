"""One writer per output folder: an advisory lock that a second process is refused, with one line naming the holder.

    with FolderLock("tfrecords", "make_tfrecords.py"):          # the converter's --out-dir
        ...
    with FolderLock("runs/demo", "train_tpu.py", name=".lock-fold0"):   # training: one lock per fold
        ...

The lock is ``fcntl.flock`` on a small file in the folder that holds the holder's host, PID, start time and
command. The kernel releases a ``flock`` when its process dies (even by SIGKILL), so a lock can never be
left held by a dead process; a lock file still naming a process that is gone (killed, or crashed) means
it did not end cleanly, and the next run says so in one note and takes over.

What is protected: local disks and mounts whose filesystem supports ``flock`` across the processes that
share it (one machine; NFS v4 and most cloud-VM disks do). **Not protected: ``gs://`` (and other remote
paths)**: object stores have no locks, so two processes writing one ``gs://`` folder are not detected;
give each run its own folder there. The lock file of a remote folder is not written.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

from ranzcr_tf import io_utils

LOCK_FILE = ".lock"


class FolderBusy(RuntimeError):
    """Another live process holds the folder's lock."""

    exit_code = 2  # the CLI's bad-input code: the user picks another folder or waits


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def describe_holder(holder: dict) -> str:
    return (f"{holder.get('command', 'a process')} (host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')})")


class FolderLock:
    """``with FolderLock(folder, command):`` holds ``folder/<name>`` exclusively; raises ``FolderBusy`` when taken."""

    def __init__(self, folder: str, command: str, *, name: str = LOCK_FILE):
        self.folder, self.command, self.name = folder, command, name
        self.path = os.path.join(folder, name)
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        if io_utils.is_remote(self.folder):
            return self  # no locks on object stores (module docstring)
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise FolderBusy(f"{self.folder} is in use by {describe_holder(holder)}: wait for it to end, or pass "
                             f"another output folder (lock file {self.path})") from None
        self._fd = fd
        previous = _read_holder(fd)
        if previous.get("pid") and previous.get("host") == socket.gethostname() \
                and not _process_alive(int(previous["pid"])):
            print(f"note: {self.folder}: taking over the lock of {describe_holder(previous)}, which ended without "
                  "releasing it (killed or crashed)", file=sys.stderr, flush=True)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a clean end: the next holder has nothing to take over
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
