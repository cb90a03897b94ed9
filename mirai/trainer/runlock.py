"""One trainer per run folder: an exclusive lock on ``<out_dir>/train.lock`` for the life of the run.

``RunLock(run_dir)`` (a context manager; rank 0 only, the other ranks belong to the same job) takes
``fcntl.flock(LOCK_EX | LOCK_NB)`` on the lock file and writes its holder into it (JSON: host, pid,
start time, command). A second trainer on the same folder fails at once with ``RunLocked`` (exit
code 5) naming that holder. The operating system releases the lock when the holding process ends
in any way, ``kill -9`` included (DataLoader workers forked from it share the lock until they notice
their parent is gone and exit, within seconds); the file itself stays and is reused.

Not guaranteed: on network filesystems the lock is only as good as their lock support (Linux NFS
clients map flock to NFS byte-range locks, which hold across hosts with NFSv4 or a working lockd;
some FUSE filesystems ignore locks); where the filesystem refuses locks outright the run continues
with a warning.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

from mirai.trainer.stop import EXIT_LOCKED, RunStop

LOCK_NAME = "train.lock"


class RunLocked(RunStop):
    exit_code = EXIT_LOCKED


class RunLock:
    """Exclusive lock of a run folder (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _describe(os.pread(fd, 4096, 0))
                os.close(fd)
                raise RunLocked(f"{self.path.parent}: another trainer is using this run folder ({holder}; lock "
                                f"{self.path}). Wait for it to end or stop it, or give this run another out_dir"
                                ) from None
            warnings.warn(f"{self.path}: the filesystem refuses locks ({err.strerror}); a second trainer on this "
                          "run folder would not be stopped", RuntimeWarning, stacklevel=2)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)               # still held: nobody reads a stale holder
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder not recorded yet"
