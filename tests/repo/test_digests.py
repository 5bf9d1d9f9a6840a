"""ChunkTable (backupkit/repo/digests.py): verify's compact, exact set of chunk digests."""

from __future__ import annotations

import hashlib
import random

import pytest

from backupkit.repo.digests import DIGEST, ChunkTable


def digest(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "big"), digest_size=DIGEST).digest()


def length(d: bytes) -> int:
    return 1 + int.from_bytes(d[-3:], "big")  # one length per chunk, as in a repository


def small() -> ChunkTable:
    t = ChunkTable()
    t.MERGE_MIN = 3  # merge often: many merges per bucket
    t.MERGE_RATIO = 2
    t._limit = [t._limit[0] // 512 * 3] * 256
    return t


def test_dedupes_within_pending_and_across_merges_and_buckets() -> None:
    t = small()
    ds = [digest(i) for i in range(3000)]
    for d in ds[:2000]:
        t.add(d, length(d))
    t.add_all(ds[1000:3000][::-1], 7)  # already-in ones keep their length; new ones: 7
    t.update((d, length(d)) for d in ds)  # all repeats
    assert len(t) == 3000
    assert t.total_length == sum(length(d) for d in ds[:2000]) + 7 * 1000
    assert list(t) == sorted(ds)
    assert len(t) == 3000  # iterating changes nothing


def test_many_random_digests_against_a_set() -> None:
    rng = random.Random(21)
    oracle: dict[bytes, int] = {}
    t = small()
    pool = [rng.randbytes(DIGEST) for _ in range(20000)]
    # Digests that share long prefixes: a table of prefixes would take them for one.
    base = rng.randbytes(DIGEST - 1)
    pool += [base + bytes([i]) for i in range(256)]
    pool += [bytes([0] * 31 + [i]) for i in range(40)] + [b"\xff" * DIGEST]
    for _ in range(60000):
        d = rng.choice(pool)
        oracle.setdefault(d, length(d))
        t.add(d, length(d))
        if rng.random() < 0.001:
            assert len(t) == len(oracle)
    assert len(t) == len(oracle)
    assert t.total_length == sum(oracle.values())
    assert list(t) == sorted(oracle)
    for d in pool + [rng.randbytes(DIGEST) for _ in range(2000)]:
        assert (d in t) == (d in oracle)
    assert b"short" not in t and 5 not in t


def test_default_thresholds_hold_a_large_table_in_about_32_bytes_per_digest() -> None:
    t = ChunkTable()
    ds = [digest(i) for i in range(200_000)]
    for r in range(3):  # each digest added three times, as by overlapping backups
        t.add_all(ds[r * 1000:] + ds[:r * 1000], 4096)
    assert len(t) == 200_000 and t.total_length == 200_000 * 4096
    assert sum(len(k) for k in t._keys) == 32 * 200_000
    assert not any(t._pending)  # merged by len()
    # A merge never leaves a bucket's pending part above its bound.
    assert max(t._limit) <= 40 * max(t.MERGE_MIN, 200_000 // 256 // t.MERGE_RATIO + 1)
    it = iter(t)
    assert next(it) == min(ds)


def test_marking_leaves_the_unlisted_digests_in_order() -> None:
    rng = random.Random(5)
    t = small()
    ds = sorted({rng.randbytes(DIGEST) for _ in range(5000)})
    t.add_all(ds, 1)
    t.add_all(ds[::3], 1)
    assert list(t.unmarked()) == ds  # before any mark: all of them
    listed = [d for d in ds if rng.random() < 0.9]
    strangers = [rng.randbytes(DIGEST) for _ in range(50)]
    # Mostly ascending, as an S3 listing, with some out of order and some unknown.
    order = listed + strangers + listed[:100]
    for d in order:
        assert t.mark(d) == (d not in strangers)
    assert t.mark(b"\x00" * DIGEST) is False and t.mark(b"short") is False
    seen = set(listed)
    assert list(t.unmarked()) == [d for d in ds if d not in seen]
    assert len(t) == len(ds)
    with pytest.raises(RuntimeError):
        t.add(ds[0], 1)


def test_marking_in_random_order_and_everything() -> None:
    rng = random.Random(9)
    t = ChunkTable()
    ds = [rng.randbytes(DIGEST) for _ in range(3000)]
    t.add_all(ds, 1)
    shuffled = ds[:]
    rng.shuffle(shuffled)
    assert all(t.mark(d) for d in shuffled[:2999])
    assert list(t.unmarked()) == [shuffled[2999]]
    assert t.mark(shuffled[2999])
    assert list(t.unmarked()) == []


def test_a_digest_of_another_size_is_refused() -> None:
    t = ChunkTable()
    with pytest.raises(ValueError, match="32 bytes"):
        t.add(b"\x01" * 31, 1)
    assert len(t) == 0 and list(t) == [] and list(t.unmarked()) == []
