"""The per-disk index: the chunk digest of every chunk_size slot of the disk that holds
data, plus pieces.

File format (docs/format.md): a 32-byte little-endian header, uncompressed, then
one zstd frame.  Version 3 (written now) lists only the slots that hold data, as
runs of consecutive slots and their digests, so an index of a 8 TiB disk holding
1 GiB is as small, and as quick to read and write, as one of a 1 GiB disk.
Versions 1 and 2 (still read) hold count * 32 bytes of chunk hashes, an all-zero
digest marking a hole.  Since version 2 a piece table follows in the same frame:
a piece is a chunk that covers part of a slot and is laid over the slot's chunk
(or hole) on restore, so an incremental backup stores only the ranges that
changed in a partly dirty slot.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence

import zstandard

from backupkit.errors import UnsupportedFormat

INDEX_MAGIC = b"BKINDEX\0"
INDEX_VERSION = 3  # the newest version this code reads and writes
DIGEST_SIZE = 32
HOLE = bytes(DIGEST_SIZE)
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, chunk_size, virtual_size, count
HEADER_SIZE = _HEADER.size
_PIECE = struct.Struct("<QII32s")  # slot, offset in the slot, length, digest (zeros: hole)
_COUNTS = struct.Struct("<QQ")  # version 3: runs, pieces
_RUN = struct.Struct("<QQ")  # version 3: first slot, number of slots
#: Pieces one slot may carry.  A writer that would need more stores the slot whole
#: again, which bounds what restoring one slot reads (its chunk and at most this many).
MAX_PIECES = 8


def piece_limit(count: int) -> int:
    """Pieces one index of ``count`` slots may hold in all.

    Bounds the index file (48 bytes a piece) and its memory whatever the disk
    size: half a piece per slot on average, plus room for small disks.
    """
    return count // 2 + 4096

#: (offset in the slot, length, digest); digest None: the range reads as zeros.
Piece = tuple[int, int, bytes | None]


class IndexFormatError(ValueError):
    """The index file is malformed (the repository turns it into CorruptRepository)."""


def slot_count(virtual_size: int, chunk_size: int) -> int:
    return -(-virtual_size // chunk_size)


class Index:
    """Chunk digests of one disk of one backup (None = hole), and the pieces over them.

    Sparse: only slots that hold a chunk are kept (``chunks``, slot -> digest), so an
    index costs memory and time in proportion to the data, never to the empty space
    of the disk.  ``overlays[i]``, if present, lists the pieces laid over slot i in
    order (a later piece wins where two overlap).  Assigning ``index[i] = digest``
    replaces the whole slot (its pieces go).
    """

    __slots__ = ("chunk_size", "chunks", "count", "npieces", "overlays", "virtual_size")

    def __init__(self, virtual_size: int, chunk_size: int,
                 entries: Sequence[bytes | None] | Mapping[int, bytes] | None = None) -> None:
        """``entries``: every slot's digest in order (None: a hole), or slot -> digest."""
        if virtual_size < 0 or chunk_size <= 0:
            raise ValueError(f"bad index geometry {virtual_size}/{chunk_size}")
        self.virtual_size = virtual_size
        self.chunk_size = chunk_size
        self.count = n = slot_count(virtual_size, chunk_size)
        self.chunks: dict[int, bytes] = {}
        if isinstance(entries, Mapping):
            items: Iterable[tuple[int, bytes | None]] = sorted(entries.items())
        elif entries is not None:
            if len(entries) != n:
                raise ValueError(f"index needs {n} entries, got {len(entries)}")
            items = enumerate(entries)
        else:
            items = ()
        for i, e in items:
            if e is None:
                continue
            if not 0 <= i < n:
                raise ValueError(f"slot {i} outside an index of {n} slots")
            if len(e) != DIGEST_SIZE or e == HOLE:
                raise ValueError("index entries must be 32-byte digests or None")
            self.chunks[i] = bytes(e)
        self.overlays: dict[int, list[Piece]] = {}
        self.npieces = 0  # pieces in overlays, kept up to date

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> bytes | None:
        if not 0 <= i < self.count:
            raise IndexError(f"slot {i} outside an index of {self.count} slots")
        return self.chunks.get(i)

    def __setitem__(self, i: int, digest: bytes | None) -> None:
        if not 0 <= i < self.count:
            raise IndexError(f"slot {i} outside an index of {self.count} slots")
        if digest is not None:
            if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
                raise ValueError("a digest is 32 bytes")
            if digest == HOLE:
                digest = None
        if digest is None:
            self.chunks.pop(i, None)
        else:
            self.chunks[i] = digest
        self._set_pieces(i, [])

    def clear_range(self, first: int, end: int) -> None:
        """Make slots first..end-1 holes without pieces, at a cost that follows what
        they held (never the number of slots)."""
        if end - first <= len(self.chunks) + len(self.overlays):
            for i in range(max(0, first), min(end, self.count)):
                if i in self.chunks or i in self.overlays:
                    self[i] = None
            return
        for i in [s for s in (*self.chunks, *self.overlays) if first <= s < end]:
            self[i] = None

    def __iter__(self) -> Iterator[bytes | None]:
        """Every slot's digest in order (None: a hole): costs the virtual size."""
        return (self.chunks.get(i) for i in range(self.count))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Index) and self.virtual_size == other.virtual_size
                and self.chunk_size == other.chunk_size and self.chunks == other.chunks
                and self.overlays == other.overlays)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Index(virtual_size={self.virtual_size}, chunk_size={self.chunk_size}, "
                f"data_slots={len(self.chunks)}/{len(self)}, "
                f"pieced_slots={len(self.overlays)})")

    def copy(self) -> Index:
        new = Index.__new__(Index)
        new.virtual_size = self.virtual_size
        new.chunk_size = self.chunk_size
        new.count = self.count
        new.chunks = dict(self.chunks)
        new.overlays = {i: list(p) for i, p in self.overlays.items()}
        new.npieces = self.npieces
        return new

    def slot_length(self, i: int) -> int:
        """Bytes of the disk covered by slot i (the last slot may be short)."""
        start = i * self.chunk_size
        return min(self.chunk_size, self.virtual_size - start)

    @property
    def data_bytes(self) -> int:
        """Bytes of the disk that are not holes (the sum of slot_data_bytes)."""
        n = len(self.chunks)
        total = n * self.chunk_size
        if self.count and self.count - 1 in self.chunks:
            total += self.slot_length(self.count - 1) - self.chunk_size
        for i in self.overlays:
            if i not in self.chunks:
                total += self.slot_data_bytes(i)
        return total

    def slot_data_bytes(self, i: int) -> int:
        """Bytes of slot i a restore writes: all of it over a chunk, else its data pieces'.

        For a hole slot, the union of its data pieces' ranges (zero pieces and
        overlaps counted once).
        """
        if i in self.chunks:
            return self.slot_length(i)
        total = end = 0
        for off, n in sorted((o, n) for o, n, d in self.overlays.get(i, ()) if d is not None):
            if off + n > end:
                total += off + n - max(off, end)
                end = off + n
        return total

    def data_slots(self) -> Iterator[tuple[int, bytes]]:
        """(slot, chunk digest) of every slot whose chunk is not a hole (pieces aside),
        in slot order."""
        chunks = self.chunks
        for i in sorted(chunks):
            yield i, chunks[i]

    def slots(self) -> Iterator[tuple[int, bytes | None, list[Piece]]]:
        """(slot, chunk digest or None, pieces) of every slot that may hold data, in order."""
        chunks, overlays = self.chunks, self.overlays
        for i in sorted(chunks.keys() | overlays.keys()):
            yield i, chunks.get(i), overlays.get(i, [])

    def pieces(self, i: int) -> list[Piece]:
        return list(self.overlays.get(i, ()))

    def slot_digests(self, i: int) -> Iterator[bytes]:
        """Every chunk slot i needs: its own and its data pieces'."""
        e = self.chunks.get(i)
        if e is not None:
            yield e
        for _, _, d in self.overlays.get(i, ()):
            if d is not None:
                yield d

    def digests(self) -> set[bytes]:
        """Every chunk this index references."""
        out = set(self.chunks.values())
        for pieces in self.overlays.values():
            out.update(d for _, _, d in pieces if d is not None)
        return out

    def _kept(self, i: int, new: list[Piece]) -> list[Piece]:
        """Slot i's pieces that survive new ones (those no new piece covers completely)."""
        return [p for p in self.overlays.get(i, ())
                if not any(o <= p[0] and p[0] + p[1] <= o + n for o, n, _ in new)]

    def pieces_added(self, i: int, new: list[Piece]) -> int | None:
        """How many pieces add_pieces(i, new) would add in all (negative: remove), or
        None if slot i would then carry more than MAX_PIECES."""
        n = len(self._kept(i, new)) + len(new)
        return n - len(self.overlays.get(i, ())) if n <= MAX_PIECES else None

    def can_add_pieces(self, i: int, new: list[Piece], reserved: int = 0) -> bool:
        """Whether add_pieces(i, new) would fit: MAX_PIECES for the slot, piece_limit in
        all, with ``reserved`` more pieces promised to other slots."""
        delta = self.pieces_added(i, new)
        return delta is not None and \
            self.npieces + reserved + delta <= piece_limit(len(self))

    def _set_pieces(self, i: int, pieces: list[Piece]) -> None:
        self.npieces += len(pieces) - len(self.overlays.get(i, ()))
        if pieces:
            self.overlays[i] = pieces
        else:
            self.overlays.pop(i, None)

    def add_pieces(self, i: int, new: list[Piece]) -> bool:
        """Lay new pieces over slot i; False (and no change) if it would need too many.

        Earlier pieces that a new one covers completely are dropped.  The caller
        then stores the slot whole instead (``index[i] = digest``).
        """
        length = self.slot_length(i)
        for off, n, d in new:
            if n <= 0 or off < 0 or off + n > length:
                raise ValueError(f"piece {off}+{n} outside slot {i} of {length} bytes")
            if d is not None and len(d) != DIGEST_SIZE:
                raise ValueError("a digest is 32 bytes")
        if not self.can_add_pieces(i, new):
            return False
        self._set_pieces(i, self._kept(i, new) + [(o, n, None if d == HOLE else d)
                                                  for o, n, d in new])
        return True

    # -- serialization -------------------------------------------------------

    def runs(self) -> list[tuple[int, int]]:
        """(first slot, number of slots) of each maximal run of consecutive data slots."""
        out: list[tuple[int, int]] = []
        for i in sorted(self.chunks):
            if out and out[-1][0] + out[-1][1] == i:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((i, 1))
        return out

    def to_bytes(self, level: int = 3, version: int = INDEX_VERSION) -> bytes:
        """The index file.  Version 3 (sparse) unless an older one is asked for (tests,
        and a tool writing for an older reader): versions 1 and 2 cost the virtual size."""
        if version not in (1, 2, 3):
            raise ValueError(f"cannot write index version {version}")
        if version == 1 and self.overlays:
            raise ValueError("a version 1 index cannot hold pieces")
        header = _HEADER.pack(INDEX_MAGIC, version, self.chunk_size, self.virtual_size,
                              self.count)
        piece_table = b"".join(_PIECE.pack(i, off, n, HOLE if d is None else d)
                               for i in sorted(self.overlays)
                               for off, n, d in self.overlays[i])
        cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        if version < 3:
            chunks = self.chunks
            payload = b"".join(chunks.get(i, HOLE) for i in range(self.count))
            return header + cctx.compress(payload + piece_table)
        runs = self.runs()
        parts = [_COUNTS.pack(len(runs), self.npieces)]
        parts += [_RUN.pack(first, n) for first, n in runs]
        chunks = self.chunks
        parts += [chunks[i] for i in sorted(chunks)]
        parts.append(piece_table)
        return header + cctx.compress(b"".join(parts))

    @classmethod
    def from_bytes(cls, data: bytes, *, virtual_size: int | None = None,
                   chunk_size: int | None = None) -> Index:
        """Parse an index file (versions 1 to 3); IndexFormatError / UnsupportedFormat
        on bad input.

        With virtual_size/chunk_size, a header that disagrees is rejected before
        anything is decompressed (so a damaged header cannot ask for a huge buffer).
        """
        if len(data) < HEADER_SIZE:
            raise IndexFormatError(f"truncated ({len(data)} bytes)")
        want_size, want_chunk = virtual_size, chunk_size
        magic, version, chunk_size, virtual_size, count = _HEADER.unpack_from(data)
        if magic != INDEX_MAGIC:
            raise IndexFormatError("not an index file (bad magic)")
        if version > INDEX_VERSION:
            raise UnsupportedFormat(
                f"index format version {version} is newer than this backupkit supports "
                f"({INDEX_VERSION}); upgrade backupkit", path="index")
        if version < 1:
            raise IndexFormatError(f"bad version {version}")
        if chunk_size <= 0 or count != slot_count(virtual_size, chunk_size):
            raise IndexFormatError(
                f"inconsistent header: {count} slots for {virtual_size} bytes "
                f"in chunks of {chunk_size}")
        if (want_size is not None and virtual_size != want_size) or \
                (want_chunk is not None and chunk_size != want_chunk):
            raise IndexFormatError(
                f"header says {virtual_size} bytes in chunks of {chunk_size}, expected "
                f"{want_size} in chunks of {want_chunk}")
        payload_in = memoryview(data)[HEADER_SIZE:]
        try:
            content = zstandard.frame_content_size(payload_in)
        except zstandard.ZstdError as e:
            raise IndexFormatError(f"bad compressed payload: {e}") from e
        limit = piece_limit(count)
        if version >= 3:
            # Checked against the largest payload the header allows, then exactly below.
            most = _COUNTS.size + count * (_RUN.size + DIGEST_SIZE) + limit * _PIECE.size
            if not _COUNTS.size <= content <= most:
                raise IndexFormatError(f"payload of {content} bytes does not fit {count} slots")
            payload = _decompress(payload_in, content)
            return cls._from_v3(payload, virtual_size, chunk_size, count)
        base = count * DIGEST_SIZE
        npieces = 0
        if version >= 2 and content > base:
            npieces, rest = divmod(content - base, _PIECE.size)
            if rest or npieces > limit:
                raise IndexFormatError(f"payload of {content} bytes does not fit {count} "
                                       "slots and a piece table")
        expected = base + npieces * _PIECE.size
        if content != expected:
            raise IndexFormatError(f"payload holds {content} bytes, header says {expected}")
        payload = _decompress(payload_in, expected)
        idx = cls(virtual_size, chunk_size)
        chunks = idx.chunks
        for i in range(count):
            d = payload[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]
            if d != HOLE:
                chunks[i] = d
        idx._read_pieces(payload[base:], npieces)
        return idx

    @classmethod
    def _from_v3(cls, payload: bytes, virtual_size: int, chunk_size: int, count: int
                 ) -> Index:
        nruns, npieces = _COUNTS.unpack_from(payload)
        if nruns > count or npieces > piece_limit(count):
            raise IndexFormatError(f"{nruns} runs and {npieces} pieces do not fit {count} slots")
        pos = _COUNTS.size
        table_end = pos + nruns * _RUN.size
        if table_end > len(payload):
            raise IndexFormatError("run table truncated")
        runs = list(_RUN.iter_unpack(payload[pos:table_end]))
        ndata = 0
        end = 0
        for first, n in runs:
            if n == 0 or first < end or first + n > count:
                raise IndexFormatError(f"run of {n} slots at {first} out of order or range")
            end = first + n
            ndata += n
        expected = table_end + ndata * DIGEST_SIZE + npieces * _PIECE.size
        if len(payload) != expected:
            raise IndexFormatError(f"payload holds {len(payload)} bytes, its tables say "
                                   f"{expected}")
        idx = cls(virtual_size, chunk_size)
        chunks = idx.chunks
        pos = table_end
        for first, n in runs:
            for i in range(first, first + n):
                d = payload[pos:pos + DIGEST_SIZE]
                if d == HOLE:
                    raise IndexFormatError(f"slot {i} listed as data has the hole digest")
                chunks[i] = d
                pos += DIGEST_SIZE
        idx._read_pieces(payload[pos:], npieces)
        return idx

    def _read_pieces(self, table: bytes, npieces: int) -> None:
        self.npieces = npieces
        last = -1
        count = self.count
        for slot, off, n, d in _PIECE.iter_unpack(table):
            if slot >= count or slot < last:
                raise IndexFormatError(f"piece for slot {slot} out of order or range")
            last = slot
            if n == 0 or off + n > self.slot_length(slot):
                raise IndexFormatError(f"piece {off}+{n} does not fit slot {slot}")
            pieces = self.overlays.setdefault(slot, [])
            if len(pieces) == MAX_PIECES:
                raise IndexFormatError(f"slot {slot} has more than {MAX_PIECES} pieces")
            pieces.append((off, n, None if d == HOLE else d))


def _decompress(payload_in: memoryview, expected: int) -> bytes:
    try:
        payload = zstandard.ZstdDecompressor().decompress(
            payload_in, max_output_size=expected, allow_extra_data=False)
    except (zstandard.ZstdError, MemoryError, OverflowError) as e:
        raise IndexFormatError(f"bad compressed payload: {e}") from e
    if len(payload) != expected:
        raise IndexFormatError("payload has the wrong size")
    return payload
