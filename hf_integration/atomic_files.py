"""Atomic file and folder writes: a reader finds the old complete file or the new complete one, never a half-written one.

An interrupted save (pre-emption, full disk, a crash in the middle of serialization) must leave the previous file
intact rather than a truncated one that would poison a later resume: every file the library writes goes through
:func:`atomic_write` (a temporary sibling, flushed, then renamed over the destination) or :func:`atomic_write_dir`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_dir"]


def atomic_write(path: str | os.PathLike, writer_fn: Callable[[str], Any]) -> None:
    """Write ``path`` atomically: ``writer_fn(tmp_path)`` writes a temporary file that then replaces ``path``.

    The temporary file lives in the destination directory (so ``os.replace`` is a same-filesystem rename,
    which POSIX and Windows perform atomically) and is flushed to disk before the rename. If
    ``writer_fn`` raises, the temporary file is removed, the exception propagates, and any previous file
    at ``path`` is left untouched: a reader sees either the old complete file or the new complete one,
    never a half-written one.

    Args:
        path: Destination file. Its directory is created if missing.
        writer_fn: Called with the temporary path (a ``str``); must write the full content there (it may
            open the path itself, e.g. ``safetensors.torch.save_file(tensors, tmp_path)``).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        writer_fn(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp (and some writers, e.g. safetensors) create 0600: give the mode open() would, per the umask
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.remove(tmp_path)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask (reading it means setting it; the lock keeps our own threads from racing)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync_dir(directory: str) -> None:
    """Persist a rename in ``directory``; not possible on every platform/filesystem."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """:func:`atomic_write` of a text file."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_dir(path: str | os.PathLike, writer_fn: Callable[[str], Any]) -> None:
    """Write the folder ``path`` through a temporary sibling folder that then takes its place.

    ``writer_fn(tmp_dir)`` fills the temporary folder; if it raises, the folder is removed and a previous
    ``path`` stays untouched. A previous ``path`` is moved aside and deleted only once the new one is in
    place, so a reader finds the old complete folder or the new complete one (or, for an instant between
    the two renames, none), never a half-written one.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        writer_fn(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".old")
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
