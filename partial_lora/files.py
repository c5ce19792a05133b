"""File plumbing shared by the run store and the ratio cache: atomic JSON writes, tolerant reads, file locks.

A leaf of the package (it imports only the project's errors), so the algorithm layer (``ratios``) and the
harness (``results``) both build on it without importing each other.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from partial_lora.errors import StorageError

log = logging.getLogger(__name__)
LOCKS = ".locks"  # the folder of lock files beside what they guard; JSON readers take *.json files only


# Room a file system keeps no more of: a full disk, an exhausted quota.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def file_name(name: str) -> str:
    """``name`` (made of config values: ``backbone.name`` may be ``../x``, ``method.name`` may hold ``/``) as one
    file name: characters other than letters, digits and ``._+=-`` become ``-``, leading dots are dropped (record
    readers skip dot files, which are temporary)."""
    return re.sub(r"[^\w.+=-]", "-", name).lstrip(".") or "-"


def no_space(what: str | os.PathLike) -> StorageError:
    """The error for a write (of ``what``: a path, or which files) that found no space left."""
    return StorageError(f"no space is left on the device to write {what}: free space there, or point the setting "
                        "naming that folder at another disk, and launch the same command again; files written "
                        "before are kept.")


@contextmanager
def no_space_reported(what: str) -> Iterator[None]:
    """Turn a full disk or quota met inside the block into :func:`no_space`'s error (``what``: the files written)."""
    try:
        yield
    except OSError as error:
        if error.errno not in NO_SPACE:
            raise
        raise no_space(error.filename or what) from None


def write_record(record: dict[str, Any], directory: str | os.PathLike, name: str) -> Path:
    """Write ``record`` to ``directory/<name>.json`` (``name`` made a plain file name) through a temporary file
    and an atomic rename; a disk without space raises :class:`StorageError` and leaves any earlier file whole.

    The file's mode follows the umask, as for any file the user writes (``mkstemp`` would make it 0600):
    a store shared by a group stays readable to it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = file_name(name)
    target = directory / f"{name}.json"
    temporary = directory / f".{name}.{secrets.token_hex(6)}.tmp"
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(record, stream, indent=2, sort_keys=True, default=str)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            raise no_space(target) from None
        raise
    return target


def read_json(path: Path) -> tuple[Any, str | None]:
    """The JSON value ``path`` holds and ``None``, or ``None`` and why it cannot be read; never raises."""
    try:
        return json.loads(path.read_bytes()), None
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
        return None, f"it is unreadable ({type(error).__name__}: {error})"


_reported: set[tuple[str, str]] = set()


def valid_files(paths: Iterable[Path], problem: Callable[[Any], str | None], kind: str) -> Iterator[tuple[Path, Any]]:
    """``(path, value)`` for each file of ``paths`` holding JSON that ``problem`` accepts (returns ``None`` for).

    Any other file is skipped, never fatal: one bad file must not stop every launch against a shared store.
    It is reported once per process (path and reason), not at every run of a sweep that reads the store.
    """
    for path in paths:
        value, reason = read_json(path)
        reason = reason or problem(value)
        if reason is None:
            yield path, value
        elif (str(path), reason) not in _reported:
            _reported.add((str(path), reason))
            log.warning("%s %s is skipped: %s.", kind, path, reason)


@contextmanager
def file_lock(path: Path, wait: bool) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block. Yields ``True`` once held;
    with ``wait=False``, ``False`` at once when another process holds it. The kernel releases it if we die."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.is_symlink():
        raise StorageError(f"lock folder {path.parent} is a symbolic link, which could point the locks anywhere: "
                           "remove it (it holds only lock files) and launch again.")
    # Read-only suffices for flock: anyone who can read the lock file (the group sharing the store) can lock.
    # O_NOFOLLOW: in a shared store, a link planted at the lock's name must not make us create files elsewhere.
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise StorageError(f"lock file {path} is a symbolic link: remove it (lock files hold nothing) and launch "
                           "again.") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(descriptor)  # closing releases the lock
