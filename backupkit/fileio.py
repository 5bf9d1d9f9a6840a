"""Small file I/O helpers over Linux system calls Python does not wrap."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Any

Buffer = bytes | bytearray | memoryview

_libc: Any = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL(None, use_errno=True)

_syncfs: Any = getattr(_libc, "syncfs", None)  # not glibc/Linux: os.sync()
_sync_file_range: Any = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                                 ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2


def syncfs(fd: int) -> None:
    """syncfs(2): write back and commit everything on fd's filesystem (os.sync() without it)."""
    if _syncfs is None:  # pragma: no cover
        os.sync()
        return
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


def pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    """os.pwrite until all of data is written at offset."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages to disk; do not wait.

    A hint only: errors are ignored (fsync or syncfs reports them later).
    Without it, a machine with a lot of RAM keeps gigabytes dirty until the
    final fsync, which then writes them in one burst while nothing else
    happens; started as the data is written, the disk writes overlap the work
    and the final sync finds little left to do.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


class Writeback:
    """Starts write-back of a whole file each time ``every`` more bytes were written to it.

    For files written by several threads at scattered offsets (a restore).  A
    sync_file_range per write hands the disk 1 MiB pieces in the order threads
    finish them; one call for the whole file every 32 MiB lets the kernel walk
    the dirty pages in file order and submit them as large sequential writes
    (restore of 8 GiB: see bench/RESULTS.md).  Thread-safe.
    """

    def __init__(self, fd: int, every: int = 32 * 1024 * 1024) -> None:
        self.fd = fd
        self.every = every
        self._pending = 0
        self._lock = threading.Lock()

    def wrote(self, n: int) -> None:
        with self._lock:
            self._pending += n
            if self._pending < self.every:
                return
            self._pending = 0
        start_writeback(self.fd)


def same_image(a: str, b: str) -> bool:
    """Whether two paths name the same image (files, symlinks, block devices)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    if sa.st_rdev and sb.st_rdev:  # block devices: same device number
        return sa.st_rdev == sb.st_rdev
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
