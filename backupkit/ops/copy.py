"""Copying one disk from an NBD export into the repository, chunk by chunk.

Full: every chunk slot of the disk; slots that block status reports as zero
are holes and are never read.  Incremental: only slots touched by the dirty
bitmap; a partly dirty slot starts from the parent backup's chunk (read from
the repository, hash-checked) and only the dirty ranges are read from NBD, so
bytes read stay close to bytes written whatever the chunk size.

Reads happen on the calling thread; hashing, compression and storing run on
``workers`` threads (hashlib and zstandard release the GIL) with a bounded
pool of reused buffers, so memory stays flat whatever the disk size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from backupkit import faults
from backupkit.nbd import Client, Extent
from backupkit.repo import Index, Repository

Progress = Callable[[int], None]


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


def slot_segments(extents: Iterable[Extent], chunk_size: int, dirty_only: bool
                  ) -> Iterator[tuple[int, list[Segment]]]:
    """Group extents into (slot, segments) pairs, splitting at chunk boundaries.

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
            end = min(ext.end, (slot + 1) * chunk_size)
            if slot != current:
                if segs:
                    yield current, segs
                current, segs = slot, []
            segs.append(Segment(pos, end - pos, ext.zero))
            pos = end
    if segs:
        yield current, segs


def copy_disk(client: Client, repo: Repository, *, parent: Index | None, workers: int = 2,
              progress: Progress | None = None) -> CopyResult:
    """Back up the export behind client; incremental when parent is given."""
    cs = repo.chunk_size
    size = client.size
    incremental = parent is not None
    index = parent.copy() if parent is not None else Index(size, cs)
    result = CopyResult(index)
    buffers: queue.Queue[bytearray] = queue.Queue()
    for _ in range(workers * 2 + 1):
        buffers.put(bytearray(cs))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def store(slot: int, buf: bytearray, length: int) -> None:
        try:
            digest, stored = repo.put_chunk(memoryview(buf)[:length])
            with lock:
                index[slot] = digest
                result.stored_bytes += stored
        except BaseException as e:
            errors.append(e)
            raise
        finally:
            buffers.put(buf)

    extents = client.extents()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chunk") as pool:
        pending: list[Future[None]] = []
        submitted = 0
        for slot, segs in slot_segments(extents, cs, dirty_only=incremental):
            if errors:
                break
            start = slot * cs
            length = min(cs, size - start)
            if all(s.zero for s in segs) and _covers(segs, start, length):
                index[slot] = None  # entirely zero now: a hole, nothing to read
                if progress:
                    progress(length)
                continue
            buf = buffers.get()
            view = memoryview(buf)[:length]
            if not _covers(segs, start, length):
                # Partly dirty: the clean part is the parent's chunk (hash-checked).
                old = index[slot] if incremental else None
                view[:] = repo.get_chunk(old) if old is not None else bytes(length)
            for s in segs:
                off = s.start - start
                if s.zero:
                    view[off:off + s.length] = bytes(s.length)
                else:
                    client.readinto(s.start, view[off:off + s.length])
                    result.read_bytes += s.length
            pending.append(pool.submit(store, slot, buf, length))
            submitted += 1
            if submitted == 2 and faults.armed("mid_data"):
                for f in pending:
                    f.result()
                faults.point("mid_data")
            if progress:
                progress(length)
            if len(pending) > workers * 4:
                pending = [f for f in pending if not f.done()]
        for f in pending:
            f.result()
    if errors:
        raise errors[0]
    return result


def _covers(segs: list[Segment], start: int, length: int) -> bool:
    """True if the segments cover [start, start+length) completely (they are sorted)."""
    pos = start
    for s in segs:
        if s.start != pos:
            return False
        pos = s.start + s.length
    return pos == start + length
