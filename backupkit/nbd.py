"""NBD: the only module that touches ovirt-imageio's private NBD client.

ovirt_imageio._internal.nbd is not a public API; the version is pinned in
pyproject.toml and tests/test_nbd.py runs it against a real qemu-nbd.
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

from ovirt_imageio._internal import nbd as _nbd
from ovirt_imageio._internal import nbdutil as _nbdutil

from backupkit.errors import NbdError, NotFound
from backupkit.proc import Process

# NBD block status flags.
STATE_HOLE = _nbd.STATE_HOLE
STATE_ZERO = _nbd.STATE_ZERO
STATE_DIRTY = _nbd.EXTENT_DIRTY

MAX_REQUEST = 32 * 1024 * 1024
#: One block status request: 4 GiB less 1 MiB (NBD lengths are 32 bits; the step
#: stays aligned to any block size a server may announce).
EXTENTS_STEP = (1 << 32) - (1 << 20)


@dataclass(frozen=True)
class Extent:
    start: int
    length: int
    zero: bool
    dirty: bool

    @property
    def end(self) -> int:
        return self.start + self.length


class Client:
    """A connection to one NBD export (thin wrapper translating errors)."""

    def __init__(self, socket_path: str, export: str = "", dirty: bool = False) -> None:
        url = urllib.parse.urlparse(f"nbd:unix:{socket_path}:exportname={export}")
        try:
            self._c = _nbd.open(url, dirty=dirty)
        except (OSError, _nbd.Error) as e:
            raise NbdError(f"connect {socket_path} export {export!r}", str(e)) from e
        self.dirty = dirty
        self.export = export
        self.socket_path = socket_path
        if dirty and self._c.dirty_bitmap is None:
            self._c.close()
            raise NbdError(f"export {export!r}", "server exports no dirty bitmap")

    def clone(self) -> Client:
        """Another connection to the same export, without the dirty bitmap (for reads)."""
        return Client(self.socket_path, self.export)

    @property
    def size(self) -> int:
        return int(self._c.export_size)

    @property
    def dirty_bitmap(self) -> str | None:
        name = self._c.dirty_bitmap
        return str(name) if name is not None else None

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        try:
            self._c.readinto(offset, buf)
        except (OSError, _nbd.Error) as e:
            raise NbdError(f"read {len(buf)} bytes at {offset}", str(e)) from e

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        try:
            self._c.write(offset, data)
        except (OSError, _nbd.Error) as e:
            raise NbdError(f"write {len(data)} bytes at {offset}", str(e)) from e

    def zero(self, offset: int, length: int) -> None:
        try:
            self._c.zero(offset, length)
        except (OSError, _nbd.Error) as e:
            raise NbdError(f"zero {length} bytes at {offset}", str(e)) from e

    def flush(self) -> None:
        try:
            self._c.flush()
        except (OSError, _nbd.Error) as e:
            raise NbdError("flush", str(e)) from e

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Merged extents over the range; ``dirty`` only on a dirty connection.

        Block status is asked for in steps of almost 4 GiB (the most one NBD request
        may cover; ovirt-imageio's helper asks for 2 GiB), so an empty or clean
        stretch of a huge disk costs one round trip per 4 GiB.
        """
        pos = offset
        end = self.size if length is None else offset + length
        c = self._c
        cur: tuple[int, int] | None = None  # (length, flags) not yet yielded
        mask = STATE_ZERO | (STATE_DIRTY if self.dirty else 0)  # the flags Extent keeps
        try:
            while pos < end:
                step = min(end - pos, EXTENTS_STEP)
                res = c.extents(pos, step)
                if self.dirty:
                    got = _nbdutil.merged(res[_nbd.BASE_ALLOCATION], res[c.dirty_bitmap])
                else:
                    got = res[_nbd.BASE_ALLOCATION]
                for ext in got:
                    n = min(ext.length, end - pos)
                    flags = ext.flags & mask
                    pos += n
                    if cur is not None and cur[1] == flags:
                        cur = (cur[0] + n, flags)
                    else:
                        if cur is not None:
                            yield self._extent(pos - n - cur[0], *cur)
                        cur = (n, flags)
                    if pos == end:
                        break
            if cur is not None:
                yield self._extent(pos - cur[0], *cur)
        except (OSError, _nbd.Error) as e:
            raise NbdError(f"block status at {pos}", str(e)) from e

    def _extent(self, start: int, length: int, flags: int) -> Extent:
        return Extent(start, length, zero=bool(flags & STATE_ZERO),
                      dirty=bool(flags & STATE_DIRTY) if self.dirty else True)

    def close(self) -> None:
        with contextlib.suppress(OSError, _nbd.Error):
            self._c.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class QemuNbd(Process):
    """qemu-nbd serving one image on a unix socket; stops (then kills) on exit."""

    def __init__(
        self,
        image: str,
        fmt: str,
        socket_path: str,
        *,
        export: str = "",
        read_only: bool = True,
        bitmap: str | None = None,
        shared: int = 8,
        cache: str = "writeback",
        detect_zeroes: bool = False,
    ) -> None:
        if not os.path.exists(image):
            raise NotFound("image", image)
        cmd = [
            "qemu-nbd",
            "--persistent",
            f"--shared={shared}",
            f"--socket={socket_path}",
            f"--format={fmt}",
            f"--export-name={export}",
            f"--cache={cache}",
            "--aio=threads",
        ]
        if read_only:
            cmd.append("--read-only")
        else:
            cmd.append("--discard=unmap")
            if detect_zeroes:
                cmd.append("--detect-zeroes=unmap")
        if bitmap:
            cmd.append(f"--bitmap={bitmap}")
        cmd.append(image)
        super().__init__(cmd)
        self.socket_path = socket_path
        self.export = export

    def start(self, timeout: float = 10.0) -> QemuNbd:
        """Start and wait until the server completes an NBD handshake.

        qemu-nbd creates its socket before it opens the image (and leaves the
        socket behind when the open fails), so only a handshake proves it is ready.
        """
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        super().start()
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise self.error()
            if os.path.exists(self.socket_path):
                try:
                    Client(self.socket_path, self.export).close()
                    return self
                except NbdError:
                    if not self.running():
                        raise self.error() from None
            if time.monotonic() > deadline:
                self.stop()
                raise NbdError("qemu-nbd", f"not ready on {self.socket_path} after {timeout}s")
            time.sleep(0.01)

    def client(self, dirty: bool = False) -> Client:
        return Client(self.socket_path, self.export, dirty=dirty)

    def __enter__(self) -> QemuNbd:
        return self.start()

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
