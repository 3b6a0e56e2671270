"""Crash-safe file output: every file or folder becomes visible only once it is complete.

Writes go to hidden temporary names (``.NAME.tmp-*``) renamed into place when complete; deletions rename first
(``.NAME.old-*``). A process killed at any moment leaves at most such hidden entries, which ``remove_stale_temps``
deletes and nothing else ever reads.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` by rename (old copy removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = _old_name(path)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def remove_dir(path: str | Path) -> None:
    """Delete a folder so that it disappears at once: renamed to a hidden name, then removed."""
    path = Path(path)
    old = _old_name(path)
    os.rename(path, old)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the hidden temporaries a killed write or delete left in ``folder``; returns what was removed."""
    folder = Path(folder)
    stale = sorted([*folder.glob(".*.tmp-*"), *folder.glob(".*.old-*")]) if folder.is_dir() else []
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process here when the environment sets ``MMALIGN_KILL_AT`` to ``name``.

    Lets a test kill a run at an exact point, as ``kill -9`` or a power cut would (e.g. ``checkpoint:6``: in the
    middle of writing the step-6 checkpoint). Does nothing without that variable.
    """
    if os.environ.get("MMALIGN_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old-{os.getpid()}")
