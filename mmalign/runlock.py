"""One run per folder: ``RUN_DIR/train.lock`` records the process (pid, host, start time) training in that folder.

The file is locked with ``fcntl.lockf``, a POSIX record lock: it works across NFS clients, is not inherited by forked
DataLoader workers, and the kernel releases it when its process ends however it ends. So a record whose lock is free
was left by a run that died: it is stale and taken over with a warning. On a file system that cannot lock files the
record alone decides: a process that no longer runs on this host holds nothing.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from .errors import MMAlignError

log = logging.getLogger(__name__)

LOCK = "train.lock"
NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # lockf on a file system without locks


class RunLock:
    """``with RunLock(run_dir):`` trains in ``run_dir`` alone, or raises ``MMAlignError`` naming the process that
    holds it. Opening the lock file is also the check that the folder is writable."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MMAlignError(f"run directory {self.path.parent} is not writable ({e.strerror}): choose another "
                               f"run_dir or fix its permissions") from None
        holder = read_holder(fd)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in NO_LOCKING or _may_run(holder):
                os.close(fd)
                raise MMAlignError(f"run directory {self.path.parent} is in use by process {holder.get('pid', '?')} "
                                   f"on {holder.get('host', '?')} (since {holder.get('started', '?')}; lock file "
                                   f"{self.path}): wait for it or stop it, or set another run_dir") from None
        if holder:
            log.warning("took over the lock of process %s on %s (since %s), which no longer runs: %s",
                        holder.get("pid"), holder.get("host"), holder.get("started"), self.path)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as e:  # e.g. a full disk
            os.close(fd)
            raise MMAlignError(f"cannot write {self.path} ({e.strerror}): free some space or choose another "
                               f"run_dir") from None
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        """Clear the record, then close the file, which releases the lock."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def read_holder(fd: int) -> dict:
    """The record in an open lock file ({} when empty or unreadable: no holder)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _may_run(holder: dict) -> bool:
    """Whether the holder may still run: another host's process cannot be checked, so it counts as running."""
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True
