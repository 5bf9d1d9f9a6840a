"""slot_segments: splitting extents at chunk boundaries (pure)."""

from __future__ import annotations

from backupkit.nbd import Extent
from backupkit.ops.copy import Segment, slot_segments

CS = 1024


def test_full_splits_at_chunk_boundaries() -> None:
    exts = [Extent(0, 1500, zero=False, dirty=True), Extent(1500, 1572, zero=True, dirty=True)]
    got = list(slot_segments(exts, CS, dirty_only=False))
    assert got == [
        (0, [Segment(0, 1024, False)]),
        (1, [Segment(1024, 476, False), Segment(1500, 548, True)]),
        (2, [Segment(2048, 1024, True)]),
    ]


def test_dirty_only_skips_clean_slots() -> None:
    exts = [Extent(0, 4096, zero=False, dirty=False), Extent(4096, 100, zero=False, dirty=True),
            Extent(4196, 8000, zero=True, dirty=False)]
    assert list(slot_segments(exts, CS, dirty_only=True)) == [
        (4, [Segment(4096, 100, False)])]
