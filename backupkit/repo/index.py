"""The per-disk index: one chunk digest per chunk_size slot of the disk, plus pieces.

File format (docs/format.md): a 32-byte little-endian header, uncompressed,
then one zstd frame holding count * 32 bytes of chunk hashes; an all-zero
digest marks a hole (a chunk that reads as zeros and is stored as nothing).
Version 2 appends a piece table to the same frame: a piece is a chunk that
covers part of a slot and is laid over the slot's chunk (or hole) on restore,
so an incremental backup stores only the ranges that changed in a partly
dirty slot.  An index without pieces is written as version 1.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import zstandard

from backupkit.errors import UnsupportedFormat

INDEX_MAGIC = b"BKINDEX\0"
INDEX_VERSION = 2  # the newest version this code reads and writes
DIGEST_SIZE = 32
HOLE = bytes(DIGEST_SIZE)
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, chunk_size, virtual_size, count
HEADER_SIZE = _HEADER.size
_PIECE = struct.Struct("<QII32s")  # slot, offset in the slot, length, digest (zeros: hole)
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

    ``entries[i]`` is slot i's chunk; ``overlays[i]``, if present, lists the
    pieces laid over it in order (a later piece wins where two overlap).
    Assigning ``index[i] = digest`` replaces the whole slot (its pieces go).
    """

    __slots__ = ("chunk_size", "entries", "npieces", "overlays", "virtual_size")

    def __init__(self, virtual_size: int, chunk_size: int,
                 entries: list[bytes | None] | None = None) -> None:
        if virtual_size < 0 or chunk_size <= 0:
            raise ValueError(f"bad index geometry {virtual_size}/{chunk_size}")
        self.virtual_size = virtual_size
        self.chunk_size = chunk_size
        n = slot_count(virtual_size, chunk_size)
        if entries is None:
            self.entries: list[bytes | None] = [None] * n
        else:
            if len(entries) != n:
                raise ValueError(f"index needs {n} entries, got {len(entries)}")
            for e in entries:
                if e is not None and (len(e) != DIGEST_SIZE or e == HOLE):
                    raise ValueError("index entries must be 32-byte digests or None")
            self.entries = list(entries)
        self.overlays: dict[int, list[Piece]] = {}
        self.npieces = 0  # pieces in overlays, kept up to date

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> bytes | None:
        return self.entries[i]

    def __setitem__(self, i: int, digest: bytes | None) -> None:
        if digest is not None:
            if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
                raise ValueError("a digest is 32 bytes")
            if digest == HOLE:
                digest = None
        self.entries[i] = digest
        self._set_pieces(i, [])

    def __iter__(self) -> Iterator[bytes | None]:
        return iter(self.entries)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Index) and self.virtual_size == other.virtual_size
                and self.chunk_size == other.chunk_size and self.entries == other.entries
                and self.overlays == other.overlays)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Index(virtual_size={self.virtual_size}, chunk_size={self.chunk_size}, "
                f"data_slots={sum(e is not None for e in self.entries)}/{len(self)}, "
                f"pieced_slots={len(self.overlays)})")

    def copy(self) -> Index:
        new = Index.__new__(Index)
        new.virtual_size = self.virtual_size
        new.chunk_size = self.chunk_size
        new.entries = list(self.entries)
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
        n = sum(e is not None for e in self.entries)
        total = n * self.chunk_size
        if n and self.entries and self.entries[-1] is not None:
            total += self.slot_length(len(self.entries) - 1) - self.chunk_size
        for i in self.overlays:
            if self.entries[i] is None:
                total += self.slot_data_bytes(i)
        return total

    def slot_data_bytes(self, i: int) -> int:
        """Bytes of slot i a restore writes: all of it over a chunk, else its data pieces'.

        For a hole slot, the union of its data pieces' ranges (zero pieces and
        overlaps counted once).
        """
        if self.entries[i] is not None:
            return self.slot_length(i)
        total = end = 0
        for off, n in sorted((o, n) for o, n, d in self.overlays.get(i, ()) if d is not None):
            if off + n > end:
                total += off + n - max(off, end)
                end = off + n
        return total

    def data_slots(self) -> Iterator[tuple[int, bytes]]:
        """(slot, chunk digest) of every slot whose chunk is not a hole (pieces aside)."""
        for i, e in enumerate(self.entries):
            if e is not None:
                yield i, e

    def slots(self) -> Iterator[tuple[int, bytes | None, list[Piece]]]:
        """(slot, chunk digest or None, pieces) of every slot that may hold data."""
        overlays = self.overlays
        for i, e in enumerate(self.entries):
            pieces = overlays.get(i)
            if pieces is not None:
                yield i, e, pieces
            elif e is not None:
                yield i, e, []

    def pieces(self, i: int) -> list[Piece]:
        return list(self.overlays.get(i, ()))

    def slot_digests(self, i: int) -> Iterator[bytes]:
        """Every chunk slot i needs: its own and its data pieces'."""
        if self.entries[i] is not None:
            yield self.entries[i]  # type: ignore[misc]
        for _, _, d in self.overlays.get(i, ()):
            if d is not None:
                yield d

    def digests(self) -> set[bytes]:
        """Every chunk this index references."""
        out = {e for e in self.entries if e is not None}
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

    def to_bytes(self, level: int = 3) -> bytes:
        # Version 1 when there are no pieces: older readers can read it.
        version = 2 if self.overlays else 1
        header = _HEADER.pack(INDEX_MAGIC, version, self.chunk_size, self.virtual_size,
                              len(self.entries))
        payload = b"".join(HOLE if e is None else e for e in self.entries)
        if self.overlays:
            payload += b"".join(_PIECE.pack(i, off, n, HOLE if d is None else d)
                                for i in sorted(self.overlays)
                                for off, n, d in self.overlays[i])
        cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        return header + cctx.compress(payload)

    @classmethod
    def from_bytes(cls, data: bytes, *, virtual_size: int | None = None,
                   chunk_size: int | None = None) -> Index:
        """Parse an index file; IndexFormatError / UnsupportedFormat on bad input.

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
        base = count * DIGEST_SIZE
        payload_in = memoryview(data)[HEADER_SIZE:]
        try:
            content = zstandard.frame_content_size(payload_in)
        except zstandard.ZstdError as e:
            raise IndexFormatError(f"bad compressed payload: {e}") from e
        npieces = 0
        if version >= 2 and content > base:
            npieces, rest = divmod(content - base, _PIECE.size)
            if rest or npieces > piece_limit(count):
                raise IndexFormatError(f"payload of {content} bytes does not fit {count} "
                                       "slots and a piece table")
        expected = base + npieces * _PIECE.size
        if content != expected:
            raise IndexFormatError(f"payload holds {content} bytes, header says {expected}")
        try:
            payload = zstandard.ZstdDecompressor().decompress(
                payload_in, max_output_size=expected, allow_extra_data=False)
        except (zstandard.ZstdError, MemoryError, OverflowError) as e:
            raise IndexFormatError(f"bad compressed payload: {e}") from e
        if len(payload) != expected:
            raise IndexFormatError("payload has the wrong size")
        entries: list[bytes | None] = [
            None if (d := payload[i:i + DIGEST_SIZE]) == HOLE else d
            for i in range(0, base, DIGEST_SIZE)
        ]
        idx = cls.__new__(cls)
        idx.virtual_size = virtual_size
        idx.chunk_size = chunk_size
        idx.entries = entries
        idx.overlays = {}
        idx.npieces = npieces
        last = -1
        for slot, off, n, d in _PIECE.iter_unpack(payload[base:]):
            if slot >= count or slot < last:
                raise IndexFormatError(f"piece for slot {slot} out of order or range")
            last = slot
            if n == 0 or off + n > idx.slot_length(slot):
                raise IndexFormatError(f"piece {off}+{n} does not fit slot {slot}")
            pieces = idx.overlays.setdefault(slot, [])
            if len(pieces) == MAX_PIECES:
                raise IndexFormatError(f"slot {slot} has more than {MAX_PIECES} pieces")
            pieces.append((off, n, None if d == HOLE else d))
        return idx
