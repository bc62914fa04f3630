"""Filesystem durability primitives: fsync of files and folders, and batched syncs.

A single ``fsync`` per file caps any design near the disk's flush rate; ``sync_many`` makes
many freshly written files durable with one ``syncfs`` of their filesystem where Linux
offers it, and falls back to one ``fsync`` per file elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterable
from pathlib import Path

_libc = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _syncfs = getattr(_libc, "syncfs", None)
except OSError:  # pragma: no cover - non-glibc platforms
    _syncfs = None


def fsync_dir(path: Path | str) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_many(fds: Iterable[int]) -> None:
    """Make the data of every open file descriptor durable, batching where possible.

    Descriptors on the same filesystem share one ``syncfs``; an error is raised as
    ``OSError`` (EIO from a flush is not retried: the data may be gone).
    """
    fds = list(fds)
    if len(fds) <= 1 or _syncfs is None:
        for fd in fds:
            os.fsync(fd)
        return
    by_device: dict[int, int] = {}
    for fd in fds:
        by_device.setdefault(os.fstat(fd).st_dev, fd)
    for fd in by_device.values():
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_renameat2 = getattr(_libc, "renameat2", None) if _libc is not None else None


def rename_noreplace(src: Path | str, dst: Path | str) -> None:
    """Rename ``src`` to ``dst`` atomically, failing with EEXIST if ``dst`` exists.

    A published file must never replace another one a consumer has not taken yet. Linux's
    ``renameat2(RENAME_NOREPLACE)`` does that atomically; where it is missing (or the
    filesystem refuses it) the fallback checks first, which is safe while names are unique.
    """
    if _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                        _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst))
    os.rename(src, dst)


def write_new_file(path: Path, data: bytes | Iterable[bytes], mode: int = 0o644) -> int:
    """Create ``path`` exclusively (never following a link) and write ``data`` (bytes, or
    chunks written one after the other, so a body shared by many files is not copied for
    each); returns the fd. The caller syncs and closes the descriptor.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        for chunk in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                view = view[written:]
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    return fd
