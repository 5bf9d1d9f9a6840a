"""Copying one disk from an NBD export into the repository, chunk by chunk.

Full: every chunk slot of the disk; slots that block status reports as zero
are holes and are never read.  Incremental: only slots touched by the dirty
bitmap.  A partly dirty slot keeps the parent's chunk and gets pieces: each
dirty range is read from NBD and stored as a chunk of its own, laid over the
parent's on restore (docs/format.md), so bytes read, hashed, compressed and
stored stay close to the bytes that changed whatever the chunk size.  A slot
that is (almost) all dirty, or that would carry more than MAX_PIECES pieces,
is read whole and stored as one chunk again.

Several NBD connections read different slots in parallel (libvirt's pull
export and qemu-nbd allow multi-conn); each reading thread hashes, compresses
and stores the chunk it read (BLAKE3/hashlib, zstandard, socket and file I/O release
the GIL), so reads, compression and writes of different chunks overlap.  Each
thread reuses one chunk buffer and slots are taken one at a time from the
streamed block status, so memory stays flat whatever the disk size; a stretch
of zeros is one step however many slots it spans (holes cost nothing).  Data
segments of a slot separated by small gaps are read in one request.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from backupkit import faults, proc
from backupkit.errors import Interrupted, OperationFailed
from backupkit.nbd import Client, Extent
from backupkit.repo import Index, Repository
from backupkit.repo.index import Piece
from backupkit.workers import run_threads

Progress = Callable[[int], None]

CONNECTIONS = 4  # NBD connections reading data per disk (plus one for block status)
COALESCE_GAP = 256 * 1024  # read across gaps up to this (and chunk/4) in one request


@dataclass
class CopyResult:
    index: Index
    read_bytes: int = 0
    stored_bytes: int = 0


@dataclass(frozen=True)
class Segment:
    start: int  # absolute offset
    length: int
    zero: bool


@dataclass(frozen=True)
class ZeroRun:
    """Slots first..end-1 read as zeros from start to end: holes, whatever their number."""

    first: int
    end: int


def slot_items(extents: Iterable[Extent], chunk_size: int, dirty_only: bool
               ) -> Iterator[tuple[int, list[Segment]] | ZeroRun]:
    """Group extents into (slot, segments) pairs, splitting at chunk boundaries; the
    whole slots inside one zero extent come as one ZeroRun, so the work on an empty
    stretch of the disk does not grow with its length.

    With dirty_only, clean extents are dropped and only touched slots appear.
    Slots are yielded in increasing order, each once.
    """
    current = -1
    segs: list[Segment] = []
    for ext in extents:
        if dirty_only and not ext.dirty:
            continue
        pos = ext.start
        while pos < ext.end:
            slot = pos // chunk_size
            if ext.zero and pos == slot * chunk_size and ext.end // chunk_size > slot:
                if segs:
                    yield current, segs
                    current, segs = -1, []
                yield ZeroRun(slot, ext.end // chunk_size)
                pos = ext.end // chunk_size * chunk_size
                continue
            end = min(ext.end, (slot + 1) * chunk_size)
            if slot != current:
                if segs:
                    yield current, segs
                current, segs = slot, []
            segs.append(Segment(pos, end - pos, ext.zero))
            pos = end
    if segs:
        yield current, segs


def slot_segments(extents: Iterable[Extent], chunk_size: int, dirty_only: bool
                  ) -> Iterator[tuple[int, list[Segment]]]:
    """slot_items with every zero run spelled out slot by slot."""
    for item in slot_items(extents, chunk_size, dirty_only):
        if isinstance(item, ZeroRun):
            for slot in range(item.first, item.end):
                yield slot, [Segment(slot * chunk_size, chunk_size, True)]
        else:
            yield item


def read_plan(segs: list[Segment], start: int, length: int, gap: int
              ) -> tuple[list[tuple[int, int]], bool]:
    """The NBD reads for one slot, as (absolute offset, length), and whether they cover it.

    Data segments closer than ``gap`` are read in one request (reading the
    gap too is always correct: the export shows the disk as it is now, and a
    clean gap holds what the parent chunk holds).  A slot whose segments
    leave at most ``gap`` bytes uncovered is read whole and stored as one
    chunk.  Zero segments outside the reads are filled with zeros by the caller.
    """
    covered = sum(s.length for s in segs)
    if covered < length and length - covered <= gap and not all(s.zero for s in segs):
        return [(start, length)], True
    reads: list[list[int]] = []
    for s in segs:
        if s.zero:
            continue
        if reads and s.start - reads[-1][1] <= gap:
            reads[-1][1] = s.start + s.length
        else:
            reads.append([s.start, s.start + s.length])
    return [(a, b - a) for a, b in reads], _covers(segs, start, length)


def copy_disk(client: Client, repo: Repository, *, parent: Index | None, workers: int = 2,
              connections: int = CONNECTIONS, progress: Progress | None = None,
              level: int | None = None, unchanged: bool = False) -> CopyResult:
    """Back up the export behind client; incremental when parent is given.

    ``unchanged`` (with parent): the caller knows that nothing was written since the
    parent (its checkpoint's bitmap is empty): the result is the parent's index, and
    the export is not asked for anything.

    ``connections`` NBD connections (clones of client) read in parallel, each
    on its own thread that also hashes, compresses and stores what it read;
    there are max(workers, connections) threads in all.  Block status goes
    over client alone, one slot at a time, under a lock.
    """
    cs = repo.chunk_size
    size = client.size
    incremental = parent is not None
    if parent is not None and parent.virtual_size != size:
        # The disk was resized after the mode was chosen: the parent's index cannot describe it.
        raise OperationFailed(f"disk {client.export} changed size during the backup "
                              f"({parent.virtual_size} -> {size} bytes); the next run is full")
    index = parent.copy() if parent is not None else Index(size, cs)
    result = CopyResult(index)
    if unchanged and parent is not None:
        if progress:
            progress(size)
        return result
    zeros = memoryview(bytes(cs))
    gap = min(COALESCE_GAP, cs // 4)
    lock = threading.Lock()  # the slot iterator, the index and the counters
    stop = threading.Event()
    stored_chunks = [0]
    reserved = [0]  # pieces promised to slots in flight (Index.can_add_pieces)
    slots = slot_items(client.extents(), cs, dirty_only=incremental)

    # client serves block status only; data is read over clones of it, so a thread
    # asking for the next slot never waits behind another thread's data read.
    clients: list[Client] = []
    try:
        for _ in range(max(1, connections)):
            clients.append(client.clone())
    except Exception:
        for c in clients:
            c.close()
        raise
    # One lock per connection: threads may outnumber connections.
    conns = [(c, threading.Lock()) for c in clients]
    nthreads = max(workers, len(conns))

    def next_slot() -> tuple[int, list[Segment]] | None:
        with lock:
            while True:
                item = next(slots, None)
                if not isinstance(item, ZeroRun):
                    return item
                # Whole slots of zeros: holes.  A new index has nothing there; an
                # incremental's copy of its parent's drops what it had (cost: that).
                if incremental:
                    index.clear_range(item.first, item.end)
                if progress:
                    progress(min(item.end * cs, size) - item.first * cs)

    def _done(length: int) -> None:
        if progress:
            with lock:
                progress(length)

    def copy_slot(conn: Client, conn_lock: threading.Lock, buf: bytearray,
                  scratch: bytearray, slot: int, segs: list[Segment]) -> None:
        start = slot * cs
        length = min(cs, size - start)
        if all(s.zero for s in segs) and _covers(segs, start, length):
            with lock:
                index[slot] = None  # entirely zero now: a hole, nothing to read
                if progress:
                    progress(length)
            return
        view = memoryview(buf)[:length]
        reads, covered = read_plan(segs, start, length, gap)
        if reads == [(start, length)]:
            covered = True  # the reads, bridging clean gaps, take in the whole slot
        pieces: list[Piece] | None = None
        grows = 0
        if not covered:
            # Partly dirty: the changed ranges become pieces over the parent's chunk.
            # Only this thread handles this slot, so what it sees holds until the end.
            with lock:
                base, old = index[slot], index.pieces(slot)
                pieces = _piece_plan(segs, reads, start, base is None and not old)
                fits = bool(pieces) and index.can_add_pieces(slot, pieces, reserved[0])
                if fits:
                    # Hold the room until add_pieces below: other threads add pieces too.
                    grows = max(0, index.pieces_added(slot, pieces) or 0)
                    reserved[0] += grows
            if not pieces:
                _done(length)  # only zeros written over a hole: nothing changes
                return
            if not fits:
                # Too many pieces: store the slot whole, its clean part read back from
                # the repository (hash-checked) so that only dirty ranges come from NBD.
                pieces = None
                repo.read_slot(base, old, view, scratch)
        if pieces is None and (len(reads) != 1 or reads[0][1] != length):
            for s in segs:
                if s.zero:
                    view[s.start - start:s.start - start + s.length] = zeros[:s.length]
        nread = 0
        with conn_lock:
            for off, n in reads:
                conn.readinto(off, view[off - start:off - start + n])
                nread += n
        stored = 0
        digest: bytes | None = None
        if pieces is None:
            digest, stored = repo.put_chunk(view, level)
        else:
            read_at = {off - start for off, _ in reads}
            for j, (off, n, _) in enumerate(pieces):
                if off in read_at:
                    d, k = repo.put_chunk(view[off:off + n], level)
                    stored += k
                    pieces[j] = (off, n, d)
        with lock:
            if pieces is None:
                index[slot] = digest
            else:
                reserved[0] -= grows
                if not index.add_pieces(slot, pieces):
                    raise AssertionError(f"slot {slot}: pieces no longer fit")
            result.read_bytes += nread
            result.stored_bytes += stored
            stored_chunks[0] += 1
            second = stored_chunks[0] == 2
            if progress:
                progress(length)
        if second and faults.armed("mid_data"):
            faults.point("mid_data")  # two chunks stored, others may be in flight

    def work(i: int) -> None:
        conn, conn_lock = conns[i % len(conns)]
        buf = bytearray(cs)  # reused for every chunk of this thread
        scratch = bytearray(repo.chunk_max)  # reading back a slot's chunks from the repository
        while not stop.is_set():
            # A stop signal reaches only the main thread: a backup running on a
            # worker thread (backup --jobs) learns of it here, chunk by chunk.
            stopped = proc.stop_requested()
            if stopped:
                raise Interrupted(stopped)
            item = next_slot()
            if item is None:
                return
            copy_slot(conn, conn_lock, buf, scratch, *item)

    try:
        with repo.storage.bulk():
            run_threads("copy", [functools.partial(work, i) for i in range(nthreads)],
                        stop=stop)
    finally:
        for c in clients:
            c.close()
    return result


def _piece_plan(segs: list[Segment], reads: list[tuple[int, int]], start: int,
                over_nothing: bool) -> list[Piece]:
    """The pieces of a partly dirty slot: one per read, one per zero segment outside them.

    Offsets are relative to the slot; digests are not known yet (None).  With
    over_nothing (a hole slot without pieces), zero segments are left out: they
    would change nothing.
    """
    pieces: list[Piece] = [(off - start, n, None) for off, n in reads]
    for s in segs:
        if s.zero and not over_nothing and not any(
                off <= s.start and s.start + s.length <= off + n for off, n in reads):
            pieces.append((s.start - start, s.length, None))
    pieces.sort()
    return pieces


def _covers(segs: list[Segment], start: int, length: int) -> bool:
    """True if the segments cover [start, start+length) completely (they are sorted)."""
    pos = start
    for s in segs:
        if s.start != pos:
            return False
        pos = s.start + s.length
    return pos == start + length
