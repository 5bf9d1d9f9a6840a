"""Index pieces: merging, the per-slot cap, and the version 1/2/3 encodings (pure logic)."""

from __future__ import annotations

import struct

import pytest
import zstandard

from backupkit.errors import UnsupportedFormat
from backupkit.repo.index import (
    HEADER_SIZE,
    INDEX_MAGIC,
    MAX_PIECES,
    Index,
    IndexFormatError,
    piece_limit,
)

CS = 1 << 20
A, B, C = (bytes([n]) * 32 for n in (1, 2, 3))


def test_pieces_merge_and_drop_covered_ones() -> None:
    idx = Index(3 * CS, CS, [A, None, A])
    assert idx.add_pieces(0, [(0, 65536, B), (131072, 65536, None)])
    # A new piece that covers an old one completely replaces it; a partial overlap stays.
    assert idx.add_pieces(0, [(0, 131072, C), (150000, 10, B)])
    assert idx.pieces(0) == [(131072, 65536, None), (0, 131072, C), (150000, 10, B)]
    assert set(idx.slot_digests(0)) == {A, B, C}
    assert idx.digests() == {A, B, C}
    idx.add_pieces(1, [(0, 4096, B)])  # over a hole
    assert [s for s, _, _ in idx.slots()] == [0, 1, 2]
    assert idx.data_bytes == 2 * CS + 4096
    idx.add_pieces(1, [(2048, 4096, C), (8192, 100, None)])  # overlaps counted once
    assert idx.slot_data_bytes(1) == 6144 and idx.data_bytes == 2 * CS + 6144
    assert idx.npieces == 6
    idx[0] = A  # storing the slot whole drops its pieces
    assert idx.pieces(0) == [] and idx.digests() == {A, B, C} and idx.npieces == 3


def test_too_many_pieces_are_refused_unchanged() -> None:
    idx = Index(CS, CS, [A])
    for i in range(MAX_PIECES):
        assert idx.add_pieces(0, [(i * 4096, 4096, B)])
    assert not idx.can_add_pieces(0, [(CS - 4096, 4096, C)])
    assert not idx.add_pieces(0, [(CS - 4096, 4096, C)])
    assert len(idx.pieces(0)) == MAX_PIECES
    assert idx.can_add_pieces(0, [(0, CS, C)])  # covers them all


@pytest.mark.parametrize("piece", [(0, 0, A), (CS - 10, 11, A), (-1, 5, A)])
def test_pieces_must_fit_their_slot(piece: tuple[int, int, bytes]) -> None:
    with pytest.raises(ValueError):
        Index(CS, CS, [A]).add_pieces(0, [piece])


def test_old_versions_round_trip_and_read_as_the_new_one() -> None:
    """Versions 1 (no pieces) and 2 (pieces) are still read; version 3 is written."""
    idx = Index(2 * CS + 512, CS, [A, None, B])
    v1 = idx.to_bytes(version=1)
    assert struct.unpack_from("<I", v1, 8)[0] == 1
    assert Index.from_bytes(v1) == idx
    idx.add_pieces(2, [(0, 512, None)])
    idx.add_pieces(1, [(4096, 8192, C), (0, 100, A)])
    with pytest.raises(ValueError):
        idx.to_bytes(version=1)
    v2, v3 = idx.to_bytes(version=2), idx.to_bytes()
    assert struct.unpack_from("<I", v2, 8)[0] == 2 and struct.unpack_from("<I", v3, 8)[0] == 3
    for data in (v2, v3):
        back = Index.from_bytes(data)
        assert back == idx and back.pieces(1) == [(4096, 8192, C), (0, 100, A)]
        assert back.npieces == idx.npieces == 3
        assert back.copy() == idx
        assert list(back) == [A, None, B]


@pytest.mark.parametrize("entries", [
    [], [None], [A], [None, None, None], [A, A, None, B, None, None, C, C, C],
    [None, A, None, A, None], [A] * 5,
])
def test_version_3_round_trips(entries: list[bytes | None]) -> None:
    idx = Index(len(entries) * CS, CS, entries)
    back = Index.from_bytes(idx.to_bytes(), virtual_size=len(entries) * CS, chunk_size=CS)
    assert back == idx and list(back) == entries
    assert Index.from_bytes(idx.to_bytes(version=1)) == idx


def test_a_huge_sparse_index_costs_its_data_not_its_size() -> None:
    """8 TiB in 1 MiB slots, 1 GiB of data in 64 runs: the file and the object are small."""
    size = 8 << 40
    idx = Index(size, CS)
    data = {}
    for k in range(64):
        first = k * (len(idx) // 64) + 7
        for i in range(first, first + 16):
            data[i] = bytes([k + 1]) * 16 + i.to_bytes(16, "little")
            idx[i] = data[i]
    idx.add_pieces(len(idx) - 1, [(0, 4096, B)])
    assert len(idx) == 8 << 20 and idx.runs()[:2] == [(7, 16), (len(idx) // 64 + 7, 16)]
    blob = idx.to_bytes()
    assert len(blob) < 64 * 1024  # 1024 digests, 64 runs and a piece
    back = Index.from_bytes(blob, virtual_size=size, chunk_size=CS)
    assert back == idx and back.chunks == data
    assert [s for s, _, _ in back.slots()] == [*sorted(data), len(idx) - 1]
    assert back.data_bytes == 1024 * CS + 4096
    back.clear_range(0, len(back))  # one step, whatever the number of slots
    assert back.chunks == {} and back.overlays == {} and back.npieces == 0


def _v3(count: int, runs: list[tuple[int, int]], digests: bytes, pieces: bytes = b"",
        npieces: int | None = None) -> bytes:
    header = struct.pack("<8sIIQQ", INDEX_MAGIC, 3, CS, count * CS, count)
    payload = struct.pack("<QQ", len(runs), len(pieces) // 48 if npieces is None else npieces)
    payload += b"".join(struct.pack("<QQ", f, n) for f, n in runs) + digests + pieces
    return header + zstandard.ZstdCompressor(write_content_size=True).compress(payload)


@pytest.mark.parametrize("runs, digests, pieces, npieces, match", [
    ([(0, 2), (1, 1)], A * 3, b"", None, "out of order or range"),
    ([(3, 2)], A * 2, b"", None, "out of order or range"),
    ([(0, 0)], b"", b"", None, "out of order or range"),
    ([(0, 2)], A, b"", None, "tables say"),
    ([(0, 1)], A + B, b"", None, "tables say"),
    ([(0, 1)], bytes(32), b"", None, "hole digest"),
    ([(0, 1)], A, struct.pack("<QII32s", 0, 0, 10, B), 2, "tables say"),
    ([(0, 1)], A, struct.pack("<QII32s", 9, 0, 10, B), None, "out of order or range"),
    ([(0, 1)] * 5, A * 5, b"", None, "do not fit"),
])
def test_bad_version_3_tables_are_format_errors(
        runs: list[tuple[int, int]], digests: bytes, pieces: bytes, npieces: int | None,
        match: str) -> None:
    with pytest.raises(IndexFormatError, match=match):
        Index.from_bytes(_v3(4, runs, digests, pieces, npieces))


def _v2(count: int, size: int, table: bytes, version: int = 2) -> bytes:
    header = struct.pack("<8sIIQQ", INDEX_MAGIC, version, CS, size, count)
    payload = A * count + table
    return header + zstandard.ZstdCompressor(write_content_size=True).compress(payload)


@pytest.mark.parametrize("table, match", [
    (struct.pack("<QII32s", 5, 0, 10, B), "out of order or range"),
    (struct.pack("<QII32s", 1, 0, 10, B) + struct.pack("<QII32s", 0, 0, 10, B),
     "out of order or range"),
    (struct.pack("<QII32s", 0, CS - 1, 2, B), "does not fit"),
    (struct.pack("<QII32s", 0, 0, 0, B), "does not fit"),
    (struct.pack("<QII32s", 0, 0, 10, B)[:-1], "does not fit"),
    (struct.pack("<QII32s", 0, 0, 10, B) * (MAX_PIECES + 1), "more than"),
    (struct.pack("<QII32s", 1, 0, 10, B) * (piece_limit(2) + 1), "does not fit"),
])
def test_bad_piece_tables_are_format_errors(table: bytes, match: str) -> None:
    with pytest.raises(IndexFormatError, match=match):
        Index.from_bytes(_v2(2, 2 * CS, table))


def test_pieces_in_a_version_1_index_are_not_read_as_pieces() -> None:
    with pytest.raises(IndexFormatError, match="payload holds"):
        Index.from_bytes(_v2(2, 2 * CS, struct.pack("<QII32s", 0, 0, 10, B), version=1))


def test_newer_version_is_refused() -> None:
    with pytest.raises(UnsupportedFormat, match="version 4 is newer"):
        Index.from_bytes(_v2(1, CS, b"", version=4))
    assert HEADER_SIZE == 32


def test_pieces_in_all_are_capped_per_index() -> None:
    """piece_limit bounds the index file and its memory whatever the disk size."""
    count = 2 * 4096 + 1000
    idx = Index(count * 4096, 4096, [A] * count)
    limit = piece_limit(count)
    for i in range(limit):
        assert idx.add_pieces(i, [(0, 100, B)])
    assert idx.npieces == limit
    assert not idx.can_add_pieces(limit, [(0, 100, B)])
    assert idx.can_add_pieces(0, [(0, 100, C)])  # replaces one: no growth
    assert not idx.can_add_pieces(0, [(0, 100, C), (200, 10, C)])
    assert not idx.can_add_pieces(0, [(0, 100, C)], reserved=1)  # promised to others
    idx[0] = C
    assert idx.npieces == limit - 1 and idx.can_add_pieces(limit, [(0, 100, B)])
    back = Index.from_bytes(idx.to_bytes(), virtual_size=count * 4096, chunk_size=4096)
    assert back == idx and back.npieces == limit - 1


def test_geometry_is_checked_before_decompressing() -> None:
    data = Index(3 * CS, CS, [A, B, C]).to_bytes()
    with pytest.raises(IndexFormatError, match="expected"):
        Index.from_bytes(data, virtual_size=2 * CS)
    with pytest.raises(IndexFormatError, match="expected"):
        Index.from_bytes(data, chunk_size=CS // 2)
    assert len(Index.from_bytes(data, virtual_size=3 * CS, chunk_size=CS)) == 3
