"""Files dubito writes and reads, safely.

- **Atomic writes**: every result is written to a uniquely named temporary file beside its target,
  flushed to disk, then renamed over it (:func:`atomic_path`, :func:`write_json`, :func:`save_torch`),
  so a crash never leaves a half-written file and two writers never interleave bytes.
- **Clear errors**: file-system errors (missing, not a folder, not writable, disk full), damaged
  JSON and unreadable torch files become a :class:`dubito.DubitoError` naming the path and what to
  do (:func:`file_errors`, :func:`read_json`, :func:`load_torch`).
- **Output folders**: :func:`check_output` refuses an output that cannot be a writable folder
  before anything is written; :func:`exclusive` holds an OS advisory lock on a folder for a whole
  command, so a second process writing there fails at once (a lock dies with its process).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dubito import DubitoError

__all__ = [
    "write_json",
    "read_json",
    "save_torch",
    "load_torch",
    "atomic_path",
    "file_errors",
    "describe_os_error",
    "check_output",
    "exclusive",
    "check_free",
    "OutputInUse",
    "LOCK_FILE",
    "relative_to",
    "resolve_in",
    "write_text",
    "copy_file",
    "private_dir",
]

LOCK_FILE = ".dubito.lock"


class OutputInUse(DubitoError):
    """Another process holds the output folder."""


# ----------------------------------------------------------------------------- errors
_HINTS = {
    errno.EACCES: "not writable (or not readable): check its permissions, or give another folder",
    errno.EPERM: "not permitted: check its permissions, or give another folder",
    errno.EROFS: "on a read-only file system: give a folder on writable storage",
    errno.ENOSPC: "the disk is full: free some space and run the same command again (what was recorded is kept)",
    errno.EDQUOT: "the disk quota is exhausted: free some space and run the same command again (what was recorded is kept)",
    errno.ENOTDIR: "a file is in the way where a folder is needed: give another path",
    errno.EEXIST: "already exists",
    errno.EISDIR: "is a folder, where a file is needed",
    errno.ENOENT: "not found",
    errno.ENAMETOOLONG: "the name is too long",
}


def describe_os_error(err: OSError, path: str | Path | None = None) -> str:
    """``PATH: what is wrong (and what to do)`` for an ``OSError``."""
    where = err.filename if err.filename is not None else path
    hint = _HINTS.get(err.errno or -1, err.strerror or str(err))
    other = f" (and {err.filename2})" if getattr(err, "filename2", None) else ""
    return f"{where}{other}: {hint}" if where is not None else f"{hint} ({err})"


@contextlib.contextmanager
def file_errors(path: str | Path | None = None) -> Iterator[None]:
    """Turn an ``OSError`` inside the block into a :class:`DubitoError` naming the file."""
    try:
        yield
    except OSError as err:
        raise DubitoError(describe_os_error(err, path)) from err


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A uniquely named temporary file beside ``path``; when the block ends without error it is
    flushed to disk and renamed onto ``path`` (atomic on one file system), else removed."""
    path = Path(path)
    with file_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:  # mkstemp's file is private (0600): give it the mode an ordinary file would have
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with file_errors(path):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def private_dir(parent: Path, prefix: str) -> Path:
    """A uniquely named new folder in ``parent`` (to be renamed into place), with the mode an
    ordinary folder would have (``mkdtemp`` makes it private)."""
    with file_errors(parent):
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".tmp"))
        os.chmod(folder, 0o777 & ~_umask())
    return folder


def write_text(path: str | Path, text: str) -> Path:
    """``text`` at ``path``, atomically (tables, reports)."""
    path = Path(path)
    with atomic_path(path) as tmp, file_errors(path):
        tmp.write_text(text)
    return path


def copy_file(source: str | Path, target: str | Path) -> Path:
    """A copy of ``source`` at ``target``, atomically (never a half-copied file)."""
    import shutil

    with atomic_path(target) as tmp, file_errors(source):
        shutil.copyfile(source, tmp)
    return Path(target)


def _plain(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null (bare NaN is not JSON), numpy scalars become floats."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON at ``path``, atomically; NaN/inf are written as null."""
    path = Path(path)
    text = json.dumps(_plain(data), indent=2, default=lambda v: _plain(float(v)), allow_nan=False)
    with atomic_path(path) as tmp, file_errors(path):
        tmp.write_text(text)
    return path


def read_json(
    path: str | Path, hint: str = "dubito wrote it: delete it to redo the step that wrote it"
) -> Any:
    """The JSON at ``path``; a missing, truncated or damaged file raises a :class:`DubitoError`
    naming it and saying what to do (``hint``)."""
    path = Path(path)
    with file_errors(path):
        text = path.read_bytes()
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        where = f"line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "bytes that are not UTF-8"
        raise DubitoError(f"{path}: damaged or truncated JSON ({where}); {hint}") from None


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically and durably (fsync before the rename)."""
    import torch

    path = Path(path)
    with atomic_path(path) as tmp, file_errors(path):
        torch.save(obj, tmp)
    return path


def load_torch(path: str | Path, what: str = "file", map_location: Any = "cpu", hint: str = "") -> Any:
    """``torch.load(path, weights_only=True)``; a missing, truncated or foreign file raises a
    :class:`DubitoError` naming it (dubito never loads pickled code: no advice to do so is passed on)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DubitoError(f"{path}: {what} not found" + (f"; {hint}" if hint else ""))
    try:
        with file_errors(path):
            return torch.load(path, map_location=map_location, weights_only=True)
    except DubitoError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ...
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unpickl" in type(err).__name__:
            reason = "it holds objects other than tensors and plain values, which dubito never loads"
        elif "zip" in text.lower() or "EOF" in type(err).__name__ or "central directory" in text:
            reason = "the file is truncated or damaged"
        else:
            reason = text[:200]
        raise DubitoError(
            f"{path}: not a readable {what} ({reason})" + (f"; {hint}" if hint else "")
        ) from None


# ----------------------------------------------------------------------------- paths kept relative
def relative_to(path: str | Path, folder: str | Path) -> str:
    """``path`` as written in a record kept in ``folder``: relative to it when inside it (a copied or
    moved folder then resolves its own files), else as given."""
    path, folder = Path(path), Path(folder)
    try:
        return str(path.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path)


def resolve_in(path: str | Path, folder: str | Path) -> Path:
    """A path from a record kept in ``folder``: relative ones are relative to ``folder``."""
    path = Path(path)
    return path if path.is_absolute() else Path(folder) / path


# ----------------------------------------------------------------------------- output folders
def check_output(path: str | Path, flag: str = "--output") -> Path:
    """Refuse an output that cannot be a writable folder, before anything is written: a file in the
    way, a folder (or the nearest existing parent) that is not writable."""
    path = Path(path)
    if not str(path):
        raise DubitoError(f"{flag}: give a folder")
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise DubitoError(f"{flag} {path}: {probe} is a broken link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "names a file" if probe == path else f"is inside {probe}, which is a file"
        raise DubitoError(f"{flag} {path} {what}; give a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" ({probe}, where it would be created)"
        raise DubitoError(
            f"{flag} {path}{where} is not writable: check its permissions, or give another folder"
        )
    return path


_HELD: dict[Path, list[int]] = {}  # resolved folder -> [lock file descriptor, depth] (this process)


def _owner(fd: int) -> str:
    for _ in range(20):  # the holder writes its line right after locking
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace").strip()
        if text:
            try:
                info = json.loads(text)
                return f"process {info['pid']} since {info['since']}"
            except (ValueError, KeyError, TypeError):
                break
        time.sleep(0.01)
    return "another process"


def _lock(folder: Path, create: bool) -> int:
    """The lock file of ``folder``, opened and locked (a descriptor), or :class:`OutputInUse`. The
    file is opened without following a link (a link there could make dubito overwrite its target)."""
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if create else 0), 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DubitoError(f"{path}: a link where dubito keeps its lock file; remove it") from None
        raise DubitoError(describe_os_error(err, path)) from None
    import stat

    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DubitoError(f"{path}: not a regular file where dubito keeps its lock file; remove it")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        owner = _owner(fd) if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
        os.close(fd)
        if owner is None:
            raise DubitoError(describe_os_error(err, path)) from None
        raise OutputInUse(
            f"{folder} is in use by {owner}: wait for it to end, or give another folder"
        ) from None
    return fd


def check_free(folder: str | Path) -> None:
    """Raise :class:`OutputInUse` when another process holds ``folder``, writing nothing (for a
    command that must do slow work, such as starting Ray, before it takes the lock)."""
    folder = Path(folder)
    if folder.resolve() in _HELD or not (folder / LOCK_FILE).is_file():
        return
    fd = _lock(folder, create=False)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def exclusive(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive OS advisory lock on ``folder`` (created if missing) while the block runs.

    A second process fails at once with ``FOLDER is in use by process PID since TIME``
    (:class:`OutputInUse`); the lock is the kernel's, so a killed process never leaves it behind.
    Re-entrant within one process (a study locking a folder a nested step locks again)."""
    folder = Path(folder)
    key = folder.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield folder
        finally:
            _HELD[key][1] -= 1
        return
    with file_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    fd = _lock(folder, create=True)
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(
            fd,
            (
                json.dumps({"pid": os.getpid(), "since": since, "command": " ".join(sys.argv)[:500]}) + "\n"
            ).encode(),
        )
        _HELD[key] = [fd, 1]
        yield folder
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
