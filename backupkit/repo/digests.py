"""A compact, exact table of chunk digests (issue 21, "millions of chunks").

``verify`` checks each distinct chunk a selection of backups references once,
by its full digest: it used to hold a dict of ``bytes`` (~120 bytes per chunk,
160 MiB at 1M chunks).  ``ChunkTable`` holds the same set in ~32 bytes per
distinct chunk: 256 buckets (by the digest's first byte), each a ``bytearray``
of its sorted, unique 32-byte digests.  Added digests are appended to the
bucket's pending part (digest + length, 40 bytes) and merged into the sorted
part (deduplicated, sorted) when the pending part passes a bound: 512 records,
or a quarter of the bucket's sorted part, so that merging costs a bounded
number of record copies per digest added and the pending part stays under
~10 bytes per distinct chunk plus 5 MiB (256 x 512 records of 40 bytes).  A
merge holds one bucket's digests as Python objects for a moment (1/256 of the
table).

Unlike gc's ``DigestSet`` (8-byte prefixes: a collision only keeps a chunk),
nothing here is approximate: membership is by the whole digest.

The lengths are not stored per chunk: only the total of the distinct chunks'
lengths (for progress), counted when a digest is merged in the first time (a
chunk has one length; were a digest added with several, the first one counts).
Once added, a table can be iterated (digests in ascending order) and, for the
digests an object-store listing shows, marked (one bit per digest) so that
the unmarked ones can be iterated alone; adding after marking is refused.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Iterator
from itertools import repeat
from operator import itemgetter

DIGEST = 32  # bytes of a chunk digest (its name: docs/format.md)
_PENDING = struct.Struct(f">{DIGEST}sQ")  # a pending record: digest, length
_KEY = struct.Struct(f"{DIGEST}s")
_first = itemgetter(0)


class _Keys:
    """A sorted bucket as a read-only sequence of digests (for bisect)."""

    __slots__ = ("_buf",)

    def __init__(self, buf: bytearray) -> None:
        self._buf = buf

    def __len__(self) -> int:
        return len(self._buf) // DIGEST

    def __getitem__(self, i: int) -> bytes:
        return bytes(self._buf[i * DIGEST:(i + 1) * DIGEST])


class ChunkTable:
    """Distinct chunk digests with the total of their lengths; ~32 bytes per digest."""

    MERGE_MIN = 512  # pending records a bucket holds before a merge, at least
    MERGE_RATIO = 4  # ... or its sorted part's records / this

    def __init__(self) -> None:
        self._keys = [bytearray() for _ in range(256)]
        self._pending = [bytearray() for _ in range(256)]
        self._marks: list[bytearray] | None = None  # a bit per sorted digest, once marking
        self._cursor = [0] * 256  # per bucket: the record after the last one marked
        self._limit = [_PENDING.size * self.MERGE_MIN] * 256  # pending bytes that merge
        self._count = 0
        self._total = 0

    def add(self, digest: bytes, length: int) -> None:
        """Record a chunk (again, maybe): a digest already in counts once."""
        self.update(((digest, length),))

    def add_all(self, digests: Iterable[bytes], length: int) -> None:
        """add() each digest, all of one length."""
        self.update(zip(digests, repeat(length)))

    def update(self, records: Iterable[tuple[bytes, int]]) -> None:
        """add() each (digest, length)."""
        if self._marks is not None:
            raise RuntimeError("the table is being marked: no more digests")
        pending, limit, pack = self._pending, self._limit, _PENDING.pack
        for digest, length in records:
            if len(digest) != DIGEST:
                raise ValueError(f"a chunk digest has {DIGEST} bytes, not {len(digest)}")
            b = digest[0]
            part = pending[b]
            part += pack(digest, length)
            if len(part) >= limit[b]:
                self._merge(b)

    def _merge(self, b: int) -> None:
        pending = self._pending[b]
        if not pending:
            return
        records = list(_PENDING.iter_unpack(pending))
        records.reverse()
        new = dict(records)  # digest -> length, deduplicated: the first one added counts
        del records
        self._pending[b] = bytearray()
        keys = self._keys[b]
        old = list(map(_first, _KEY.iter_unpack(keys)))  # sorted
        fresh = sorted(new.keys() - set(old))
        if not fresh:
            return
        self._count += len(fresh)
        self._total += sum(map(new.__getitem__, fresh))
        old += fresh
        old.sort()  # two sorted runs: one linear merge
        keys[:] = b"".join(old)
        self._limit[b] = _PENDING.size * max(self.MERGE_MIN, len(old) // self.MERGE_RATIO)

    def _merge_all(self) -> None:
        for b in range(256):
            self._merge(b)

    def __len__(self) -> int:
        """Distinct digests."""
        self._merge_all()
        return self._count

    @property
    def total_length(self) -> int:
        """The sum of the distinct chunks' lengths (each counted once)."""
        self._merge_all()
        return self._total

    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, bytes | bytearray) or len(digest) != DIGEST:
            return False
        b = digest[0]
        self._merge(b)
        keys = _Keys(self._keys[b])
        i = bisect.bisect_left(keys, bytes(digest))
        return i < len(keys) and keys[i] == digest

    def __iter__(self) -> Iterator[bytes]:
        """Every digest once, ascending."""
        self._merge_all()
        for keys in self._keys:
            yield from map(_first, _KEY.iter_unpack(bytes(keys)))

    def mark(self, digest: bytes) -> bool:
        """Mark a digest as seen; False if it is not in the table.

        Fast when the digests come in ascending order (an S3 listing of
        ``chunks/``): each bucket remembers where the last mark was.
        """
        if self._marks is None:
            self._merge_all()
            self._marks = [bytearray((len(k) // DIGEST + 7) // 8) for k in self._keys]
        if len(digest) != DIGEST:
            return False
        b = digest[0]
        buf = self._keys[b]
        i = self._cursor[b]
        if buf[i * DIGEST:(i + 1) * DIGEST] != digest:
            keys = _Keys(buf)
            i = bisect.bisect_left(keys, digest)
            if i >= len(keys) or keys[i] != digest:
                return False
        self._marks[b][i >> 3] |= 1 << (i & 7)
        self._cursor[b] = i + 1
        return True

    def unmarked(self) -> Iterator[bytes]:
        """The digests not marked, ascending (all of them before any mark)."""
        if self._marks is None:
            yield from self
            return
        for keys, marks in zip(self._keys, self._marks, strict=True):
            n = len(keys) // DIGEST
            for byte, bits in enumerate(marks):
                if bits == 0xFF:
                    continue  # all 8 seen: the common case
                for i in range(byte * 8, min(byte * 8 + 8, n)):
                    if not bits & (1 << (i & 7)):
                        yield bytes(keys[i * DIGEST:(i + 1) * DIGEST])
