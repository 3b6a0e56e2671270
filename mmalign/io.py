"""Crash-safe file output: every file or folder becomes visible only once it is complete, and can prove it.

Writes go to hidden temporary names (``.NAME.tmp-*``) renamed into place when complete; deletions rename first
(``.NAME.old-*``). A process killed at any moment leaves at most such hidden entries, which ``remove_stale_temps``
deletes and nothing else ever reads. A folder written with a manifest (``write_manifest``, last inside
``atomic_dir``) lists the size and SHA-256 of each of its files, so ``verify_manifest`` finds one that was cut short,
changed or added later. A write the disk refuses (full, over quota, read-only) becomes one ``MMAlignError`` line
(``writing``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from .errors import MMAlignError

MANIFEST = "manifest.json"
# Failures of a write that come from the disk or its permissions, not from what was written.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


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
    """Test hook: SIGKILL this process here when the environment sets ``MMALIGN_KILL_AT`` to ``name``; raise the
    ``OSError`` a full or read-only disk would when it sets ``MMALIGN_FAIL_AT`` to ``name:ERRNO`` (e.g.
    ``checkpoint:6:ENOSPC``).

    Lets a test fail a run at an exact point, as ``kill -9``, a power cut or a full disk would (e.g. ``checkpoint:6``:
    in the middle of writing the step-6 checkpoint). Does nothing without those variables.
    """
    if os.environ.get("MMALIGN_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    point, _, code = os.environ.get("MMALIGN_FAIL_AT", "").rpartition(":")
    if point == name:
        number = getattr(errno, code)
        raise OSError(number, os.strerror(number))


# ----------------------------------------------------------------------------------------------- manifests


def file_digest(path: Path) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def write_manifest(folder: Path, outside: Mapping[str, dict] | None = None) -> None:
    """Write ``folder/manifest.json``: the size and SHA-256 of every file below ``folder``, and the given digests of
    files ``outside`` it that it refers to (paths relative to ``folder``, e.g. weights shared by several folders).

    Call it last inside ``atomic_dir``, so the manifest is written once every file is complete."""
    files = {p.relative_to(folder).as_posix(): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    write_json(folder / MANIFEST, {"files": files, "outside": dict(outside or {})})


def verify_manifest(folder: Path) -> str | None:
    """Why ``folder`` does not match its manifest (the first problem found), or None when every file does."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        listed = {**manifest["files"], **manifest["outside"]}
    except FileNotFoundError:
        return f"no {MANIFEST} (written last: the folder is incomplete)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e.__class__.__name__}: {e})"
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    if unlisted := sorted(present - set(manifest["files"])):
        return f"{unlisted[0]} is not in {MANIFEST}"
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        found = file_digest(path)
        if found["size"] != expected.get("size"):
            return f"{name} has {found['size']} bytes, {MANIFEST} says {expected.get('size')}"
        if found["sha256"] != expected.get("sha256"):
            return f"{name} does not match its SHA-256 in {MANIFEST}"
    return None


def manifest_outside(folder: Path) -> list[Path] | None:
    """The files outside ``folder`` that its manifest refers to; None when the manifest cannot be read."""
    try:
        return [folder / name for name in json.loads((folder / MANIFEST).read_text())["outside"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------- full disks


def failed_errno(exc: BaseException) -> int | None:
    """The errno behind a failed write: of the ``OSError`` itself or one in its chain (``torch.save`` into an open
    file raises a ``RuntimeError`` from it), or the code safetensors puts in its message (``os error 28``)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"os error (\d+)", str(exc))
    return int(match.group(1)) if match else None


@contextmanager
def writing(target: Path, needed: int | None = None) -> Iterator[None]:
    """Turn a write to ``target`` that the disk refuses (full, over quota, read-only, no permission) into one
    ``MMAlignError`` line saying how much space the write needed (``needed`` bytes) and how much is free."""
    try:
        yield
    except MMAlignError:
        raise
    except Exception as e:
        code = failed_errno(e)
        if code not in DISK_ERRNOS:
            raise
        message = f"cannot write {target}: {os.strerror(code)}"
        if needed is not None:
            existing = next(p for p in (Path(target), *Path(target).parents) if p.exists())
            message += f"; it needs about {megabytes(needed)}, {megabytes(shutil.disk_usage(existing).free)} free"
        raise MMAlignError(message) from None


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old-{os.getpid()}")
