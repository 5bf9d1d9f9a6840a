"""qcow2: write a new standalone qcow2 (version 3) image directly, without qemu.

Qcow2Writer lays out an image the way a restore produces it: guest data
arrives once per cluster, in any order, from several threads; the metadata
(L2 tables, L1 table, refcount blocks and table, header) is appended when the
data is complete.  The layout follows QEMU's docs/interop/qcow2.txt:

    cluster 0                  header (written last; zeros until then)
    clusters 1 .. D            guest data, in the order the writes arrived
    then                       one L2 table per L1 entry that maps data
    then                       the L1 table
    then                       refcount blocks covering every cluster above
    then                       the refcount table

Every cluster has refcount 1, so every L1 and L2 entry carries
QCOW_OFLAG_COPIED.  Guest clusters never written stay unallocated and read as
zeros (there is no backing file).  Until finish() writes the header, cluster 0
is all zeros: an interrupted writer leaves a file no qcow2 reader accepts.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from array import array

from backupkit.fileio import Buffer, Writeback, pwrite_all

MAGIC = b"QFI\xfb"
VERSION = 3
REFCOUNT_ORDER = 4  # 16-bit refcounts, QEMU's default
OFLAG_COPIED = 1 << 63
MIN_CLUSTER = 512
MAX_CLUSTER = 2 * 1024 * 1024  # QEMU's implementation limit
MAX_L1_BYTES = 32 * 1024 * 1024  # QEMU's implementation limit for the L1 table
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QEMU's implementation limit for the refcount table
SECTOR = 512  # QEMU sizes disks in sectors: it ignores a partial last sector of the size field

# Version 3 header through compression_type (byte 104), padded to 112 bytes as QEMU writes it:
# magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method,
# l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
# snapshots_offset, incompatible, compatible and autoclear features, refcount_order,
# header_length, compression_type (0: zlib), padding.
_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQIIB7x")
assert _HEADER.size == 112
_END_OF_EXTENSIONS = bytes(8)  # extension type 0, length 0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _big_endian(table: array[int]) -> bytes:
    if sys.byteorder == "little":
        table.byteswap()
    return table.tobytes()


def _layout(data_clusters: int, l2_tables: int, l1_size: int, cluster_size: int
            ) -> tuple[int, int, int]:
    """(refcount blocks, refcount table clusters, total clusters) of an image as laid out here.

    The one place that sizes the refcount structures: cluster 0 (the header),
    the data clusters, the L2 tables, the L1 table, then the refcount blocks
    (16-bit entries) and their table, which count themselves too: grown to a
    fixed point.  More data or L2 tables never need less, so the result for a
    disk whose every cluster holds data bounds every image of that disk.
    """
    rb_entries = cluster_size * 8 // (1 << REFCOUNT_ORDER)
    rb_start = 1 + data_clusters + l2_tables + _ceil_div(l1_size * 8, cluster_size)
    blocks = table_clusters = 0
    while True:
        total = rb_start + blocks + table_clusters
        need_blocks = _ceil_div(total, rb_entries)
        need_table = _ceil_div(need_blocks * 8, cluster_size)
        if (need_blocks, need_table) == (blocks, table_clusters):
            return blocks, table_clusters, total
        blocks, table_clusters = need_blocks, need_table


def check_geometry(virtual_size: int, cluster_size: int) -> None:
    """ValueError unless QEMU can open an image of this size with these clusters, even full.

    Checked before any data is written: the L1 table and, for a disk whose every
    cluster holds data (the worst case, sized by _layout as finish() sizes the
    real image), the refcount table must stay within QEMU's limits.
    """
    if cluster_size & (cluster_size - 1) or not MIN_CLUSTER <= cluster_size <= MAX_CLUSTER:
        raise ValueError(f"qcow2 cluster size must be a power of two between {MIN_CLUSTER} "
                         f"and {MAX_CLUSTER}, not {cluster_size}")
    if virtual_size < 0:
        raise ValueError(f"negative virtual size {virtual_size}")
    clusters = _ceil_div(virtual_size, cluster_size)
    l1_size = _ceil_div(clusters, cluster_size // 8)
    if l1_size * 8 > MAX_L1_BYTES:
        raise ValueError(f"a {virtual_size}-byte disk needs an L1 table larger than QEMU "
                         f"opens with {cluster_size}-byte clusters")
    _blocks, table_clusters, _total = _layout(clusters, l1_size, l1_size, cluster_size)
    if table_clusters * cluster_size > MAX_REFTABLE_BYTES:
        raise ValueError(f"a {virtual_size}-byte disk needs a refcount table larger than "
                         f"QEMU opens with {cluster_size}-byte clusters")


class Qcow2Writer:
    """Writes a new standalone qcow2 v3 image (no backing file): data first, metadata at finish.

    fd is a file opened for writing, empty (a new file: anything else is refused,
    since the image would keep whatever lies between its clusters); the caller
    closes it.  After a write failed, finish() refuses: the image lacks data.
    write() may be called from several threads at once.  Each write starts at a
    cluster boundary and covers whole clusters, except that the last cluster of
    a disk whose size is not cluster aligned may be written short; each guest
    cluster is written at most once.  finish() then writes the metadata, syncs
    the data and metadata to disk (fdatasync), and writes the header; the
    caller fsyncs once more to make the header durable.

    The size stored in the header is virtual_size rounded up to 512 bytes, as
    qemu-img create does: QEMU rounds the size field down to whole sectors, which
    would hide the end of a disk whose size is not a multiple of 512.
    """

    def __init__(self, fd: int, virtual_size: int, cluster_size: int = 65536) -> None:
        check_geometry(virtual_size, cluster_size)
        if os.fstat(fd).st_size:
            raise ValueError("a qcow2 image is written into an empty file only")
        self.fd = fd
        self.virtual_size = virtual_size
        self.cluster_size = cluster_size
        self._l2_entries = cluster_size // 8
        self._clusters = _ceil_div(virtual_size, cluster_size)
        self.l1_size = _ceil_div(self._clusters, self._l2_entries)
        # Guest -> host mapping as host cluster numbers (0: unallocated, since cluster 0 is
        # the header), one array per L2 table, made only when a write reaches it: 4 bytes
        # per guest cluster of the L2 ranges that hold data (32 MiB per TiB of data at
        # 64 KiB clusters), nothing for holes.
        bound = 2 * (self._clusters + self.l1_size) + 64  # > data + metadata clusters
        self._typecode = "I" if bound < 1 << 32 and array("I").itemsize == 4 else "Q"
        self._l2: dict[int, array[int]] = {}
        self._next = 1  # next free host cluster
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self._finished = False
        self._failed: BaseException | None = None
        self._writeback = Writeback(fd)  # the disk writes overlap the restore

    def write(self, offset: int, data: Buffer) -> None:
        """Write data at guest offset; allocates ceil(len/cluster) contiguous host clusters."""
        view = memoryview(data).cast("B")
        n = len(view)
        if n == 0:
            return
        cs = self.cluster_size
        end = offset + n
        if offset < 0 or offset % cs or end > self.virtual_size \
                or (end % cs and end != self.virtual_size):
            raise ValueError(f"qcow2 write of {n} bytes at {offset} is not cluster aligned "
                             f"inside a disk of {self.virtual_size} bytes")
        first = offset // cs
        count = _ceil_div(n, cs)
        with self._lock:
            if self._finished:
                raise ValueError("qcow2 image already finished")
            spans = list(self._spans(first, count))
            for l1, lo, hi in spans:
                table = self._l2.get(l1)
                if table is not None and table[lo:hi].count(0) != hi - lo:
                    raise ValueError(f"qcow2 guest cluster in {offset}..{end} written twice")
            host = self._next
            self._next += count
            h = host
            for l1, lo, hi in spans:
                table = self._l2.get(l1)
                if table is None:
                    table = self._l2[l1] = array(self._typecode, bytes(
                        self._l2_entries * array(self._typecode).itemsize))
                table[lo:hi] = array(self._typecode, range(h, h + hi - lo))
                h += hi - lo
            self._inflight += 1
        try:
            pwrite_all(self.fd, view, host * cs)
            self._writeback.wrote(n)
        except BaseException as e:
            with self._lock:
                self._failed = e
            raise
        finally:
            with self._lock:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.notify_all()

    def _spans(self, first: int, count: int) -> list[tuple[int, int, int]]:
        """(L1 index, first L2 index, end L2 index) of guest clusters first..first+count."""
        e = self._l2_entries
        out = []
        c, stop = first, first + count
        while c < stop:
            l1, lo = divmod(c, e)
            hi = min(e, lo + stop - c)
            out.append((l1, lo, hi))
            c += hi - lo
        return out

    def finish(self) -> None:
        """Write L2 tables, L1 table, refcount blocks and table, fdatasync, then the header."""
        with self._lock:
            if self._finished:
                raise ValueError("qcow2 image already finished")
            self._finished = True
            while self._inflight:
                self._idle.wait()
            if self._failed is not None:
                raise ValueError(f"a write to the qcow2 image failed ({self._failed}); "
                                 "refusing to finish an image that lacks data")
        cs = self.cluster_size
        rb_entries = cs * 8 // (1 << REFCOUNT_ORDER)
        l2_at = {l1: self._next + i for i, l1 in enumerate(sorted(self._l2))}
        l1_start = self._next + len(l2_at)
        l1_clusters = _ceil_div(self.l1_size * 8, cs)
        rb_start = l1_start + l1_clusters
        # Never more than check_geometry allowed for (same _layout, at most its worst case).
        blocks, table_clusters, total = _layout(self._next - 1, len(l2_at), self.l1_size, cs)
        assert rb_start + blocks + table_clusters == total
        rt_start = rb_start + blocks
        os.ftruncate(self.fd, total * cs)  # covers a short last data cluster and the holes

        for l1, host in l2_at.items():
            entries = array("Q", (c * cs | OFLAG_COPIED if c else 0 for c in self._l2[l1]))
            pwrite_all(self.fd, _big_endian(entries), host * cs)
        if self.l1_size:
            l1_table = array("Q", bytes(8 * self.l1_size))
            for l1, host in l2_at.items():
                l1_table[l1] = host * cs | OFLAG_COPIED
            pwrite_all(self.fd, _big_endian(l1_table), l1_start * cs)
        for b in range(blocks):
            pwrite_all(self.fd, b"\x00\x01" * min(rb_entries, total - b * rb_entries),
                        (rb_start + b) * cs)
        reftable = array("Q", ((rb_start + b) * cs for b in range(blocks)))
        pwrite_all(self.fd, _big_endian(reftable), rt_start * cs)
        # Everything the header points at reaches the disk before the header does.
        os.fdatasync(self.fd)
        size = _ceil_div(self.virtual_size, SECTOR) * SECTOR
        header = _HEADER.pack(
            MAGIC, VERSION, 0, 0, cs.bit_length() - 1, size, 0,
            self.l1_size, l1_start * cs, rt_start * cs, table_clusters, 0, 0,
            0, 0, 0, REFCOUNT_ORDER, _HEADER.size, 0)
        pwrite_all(self.fd, header + _END_OF_EXTENSIONS, 0)
