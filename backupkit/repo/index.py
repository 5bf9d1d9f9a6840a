"""The per-disk index: one chunk digest per chunk_size slot of the disk.

File format (docs/format.md): a 32-byte little-endian header, uncompressed,
then one zstd frame holding count * 32 bytes of SHA-256 digests; an all-zero
digest marks a hole (a chunk that reads as zeros and is stored as nothing).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import zstandard

from backupkit.errors import UnsupportedFormat

INDEX_MAGIC = b"BKINDEX\0"
INDEX_VERSION = 1
DIGEST_SIZE = 32
HOLE = bytes(DIGEST_SIZE)
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, chunk_size, virtual_size, count
HEADER_SIZE = _HEADER.size


class IndexFormatError(ValueError):
    """The index file is malformed (the repository turns it into CorruptRepository)."""


def slot_count(virtual_size: int, chunk_size: int) -> int:
    return -(-virtual_size // chunk_size)


class Index:
    """Chunk digests of one disk of one backup (None = hole)."""

    __slots__ = ("chunk_size", "entries", "virtual_size")

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

    def __iter__(self) -> Iterator[bytes | None]:
        return iter(self.entries)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Index) and self.virtual_size == other.virtual_size
                and self.chunk_size == other.chunk_size and self.entries == other.entries)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Index(virtual_size={self.virtual_size}, chunk_size={self.chunk_size}, "
                f"data_slots={sum(e is not None for e in self.entries)}/{len(self)})")

    def copy(self) -> Index:
        new = Index.__new__(Index)
        new.virtual_size = self.virtual_size
        new.chunk_size = self.chunk_size
        new.entries = list(self.entries)
        return new

    def slot_length(self, i: int) -> int:
        """Bytes of the disk covered by slot i (the last slot may be short)."""
        start = i * self.chunk_size
        return min(self.chunk_size, self.virtual_size - start)

    @property
    def data_bytes(self) -> int:
        """Bytes of the disk that are not holes."""
        n = sum(e is not None for e in self.entries)
        if n and self.entries and self.entries[-1] is not None:
            return (n - 1) * self.chunk_size + self.slot_length(len(self.entries) - 1)
        return n * self.chunk_size

    def data_slots(self) -> Iterator[tuple[int, bytes]]:
        for i, e in enumerate(self.entries):
            if e is not None:
                yield i, e

    # -- serialization -------------------------------------------------------

    def to_bytes(self, level: int = 3) -> bytes:
        header = _HEADER.pack(INDEX_MAGIC, INDEX_VERSION, self.chunk_size, self.virtual_size,
                              len(self.entries))
        payload = b"".join(HOLE if e is None else e for e in self.entries)
        cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        return header + cctx.compress(payload)

    @classmethod
    def from_bytes(cls, data: bytes) -> Index:
        """Parse an index file; IndexFormatError / UnsupportedFormat on bad input."""
        if len(data) < HEADER_SIZE:
            raise IndexFormatError(f"truncated ({len(data)} bytes)")
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
        expected = count * DIGEST_SIZE
        payload_in = memoryview(data)[HEADER_SIZE:]
        try:
            content = zstandard.frame_content_size(payload_in)
        except zstandard.ZstdError as e:
            raise IndexFormatError(f"bad compressed payload: {e}") from e
        if content != expected:
            raise IndexFormatError(f"payload holds {content} bytes, header says {expected}")
        try:
            payload = zstandard.ZstdDecompressor().decompress(
                payload_in, max_output_size=expected, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise IndexFormatError(f"bad compressed payload: {e}") from e
        if len(payload) != expected:
            raise IndexFormatError("payload has the wrong size")
        entries: list[bytes | None] = [
            None if (d := payload[i:i + DIGEST_SIZE]) == HOLE else d
            for i in range(0, expected, DIGEST_SIZE)
        ]
        idx = cls.__new__(cls)
        idx.virtual_size = virtual_size
        idx.chunk_size = chunk_size
        idx.entries = entries
        return idx
