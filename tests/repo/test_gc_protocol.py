"""gc beside running writers, step by step, on the in-memory store (pure logic).

The fault points of gc and of the commit (backupkit/faults.py) are replaced by
hooks, so one test runs a prune, a gc or a whole backup at an exact point of
another.  The same interleavings with real processes, real domains and the real
stores are in tests/ops/test_gc_fleet.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backupkit import errors, faults
from backupkit.ops.gc import DigestSet, gc
from backupkit.ops.prune import delete
from backupkit.ops.restore import restore
from backupkit.ops.verify import verify
from backupkit.repo import Repository, fleet, locks
from tests.repo.helpers import CHUNK, MiB, make_backup, rand, write_image
from tests.repo.memstore import MemoryStorage

# Clocks are faked here: no skew check, no grace (both are tested elsewhere).
SETTINGS = locks.Settings(lock_refresh=3600, lock_stale=600, max_clock_skew=10 ** 9,
                          gc_grace=0)


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


class Store:
    """One in-memory repository; open() gives another client (another "process")."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.clock = Clock()
        Repository.init(MemoryStorage(self.objects, clock=self.clock), chunk_size=CHUNK)

    def open(self) -> Repository:
        repo = Repository.open(MemoryStorage(self.objects, clock=self.clock))
        repo.lock_settings = SETTINGS
        return repo


@pytest.fixture
def store() -> Store:
    return Store()


Hooks = dict[str, Callable[[], None]]


@pytest.fixture
def hooks(monkeypatch: pytest.MonkeyPatch) -> Iterator[Hooks]:
    """Run hooks[name]() once at fault point name (in whichever thread reaches it)."""
    table: Hooks = {}

    def point(name: str) -> None:
        fn = table.pop(name, None)
        if fn is not None:
            fn()

    monkeypatch.setattr(faults, "point", point)
    yield table


def manifests(repo: Repository, domain: str) -> list[str]:
    return [m.id for m in repo.list_backups(domain)]


def restores_equal(repo: Repository, domain: str, img: Path, tmp: Path) -> None:
    out = tmp / f"out-{domain}"
    restore(repo, domain, "latest", str(out), fmt="raw")
    assert (out / "vda.raw").read_bytes() == img.read_bytes()


def test_gc_deletes_what_a_running_backup_reuses_the_backup_commits_nothing(
        store: Store, hooks: Hooks, tmp_path: Path) -> None:
    """vm2's disk equals vm1's: its backup stores no chunk and reuses vm1's.  Before
    it commits, vm1's backup is deleted and a gc removes those chunks.  The backup
    must then fail, commit nothing, and the next one store everything again."""
    img = Path(write_image(tmp_path / "a.raw", MiB, [(0, rand(3 * CHUNK, 1))]))
    writer, other = store.open(), store.open()
    m1 = make_backup(writer, "vm1", {"vda": img})
    store.clock.t += 100  # vm1's chunks are older than vm2's writer
    freed: list[int] = []

    def prune_and_gc() -> None:
        delete(other, "vm1", m1.id)
        freed.append(gc(other)["chunks_removed"])

    hooks["before_commit"] = prune_and_gc
    with pytest.raises(errors.OperationFailed) as e:
        make_backup(writer, "vm2", {"vda": img})
    assert freed == [3]
    assert str(e.value) == ("gc removed 3 chunks this backup reuses while it ran; nothing "
                            "was committed; run the backup again")
    assert e.value.exit_code == 1
    assert manifests(other, "vm2") == []
    gc(other)  # the failed run's directory goes
    assert not [k for k in store.objects if k.startswith("backups/")]
    make_backup(writer, "vm2", {"vda": img})
    verify(other, data=True)
    restores_equal(other, "vm2", img, tmp_path)
    assert [k for k in store.objects if k.startswith("locks/")] == []


def test_gc_between_start_and_commit_that_spares_the_chunks(
        store: Store, hooks: Hooks, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The epoch moved, but the chunks the backup reuses are still there: it checks
    them and commits."""
    img = Path(write_image(tmp_path / "a.raw", MiB, [(0, rand(3 * CHUNK, 2))]))
    writer, other = store.open(), store.open()
    make_backup(writer, "vm1", {"vda": img})
    store.clock.t += 100
    hooks["before_commit"] = lambda: gc(other) and None
    with caplog.at_level("INFO"):
        make_backup(writer, "vm2", {"vda": img})
    assert "all 3 chunks it references are present" in caplog.text
    assert fleet.read_epoch(other.storage) == fleet.Epoch(1, False)
    verify(other, data=True)
    restores_equal(other, "vm2", img, tmp_path)


def test_backup_committed_while_gc_is_stopped_after_the_mark(
        store: Store, hooks: Hooks, tmp_path: Path) -> None:
    """gc marks (vm1's chunks are unreferenced: candidates), then a backup reusing
    them commits before gc bumps the epoch: step 7 finds it and keeps its chunks."""
    img = Path(write_image(tmp_path / "a.raw", MiB, [(0, rand(3 * CHUNK, 3))]))
    writer, gcer = store.open(), store.open()
    m1 = make_backup(writer, "vm1", {"vda": img})
    delete(writer, "vm1", m1.id)
    store.clock.t += 100
    hooks["gc_after_mark"] = lambda: make_backup(writer, "vm2", {"vda": img}) and None
    res = gc(gcer)
    assert res["chunks_rescued"] == 3 and res["chunks_removed"] == 0
    verify(gcer, data=True)
    restores_equal(gcer, "vm2", img, tmp_path)


def test_gc_waits_for_a_committing_writer(store: Store, hooks: Hooks, tmp_path: Path) -> None:
    """A writer that read the old epoch and is committing: gc (step 6) waits for it,
    then finds its manifest (step 7)."""
    img = Path(write_image(tmp_path / "a.raw", MiB, [(0, rand(3 * CHUNK, 4))]))
    writer, gcer = store.open(), store.open()
    m1 = make_backup(writer, "vm1", {"vda": img})
    delete(writer, "vm1", m1.id)
    store.clock.t += 100
    in_commit, go = threading.Event(), threading.Event()

    def stall() -> None:
        in_commit.set()
        assert go.wait(60)

    hooks["commit_after_epoch"] = stall
    errs: list[BaseException] = []

    def run(fn: Callable[[], object]) -> threading.Thread:
        def body() -> None:
            try:
                fn()
            except BaseException as e:
                errs.append(e)
        t = threading.Thread(target=body)
        t.start()
        return t

    tw = run(lambda: make_backup(writer, "vm2", {"vda": img}))
    assert in_commit.wait(60)
    result: dict[str, int] = {}
    tg = run(lambda: result.update(gc(gcer)))
    deadline = time.monotonic() + 60
    while not fleet.read_epoch(gcer.storage).sweeping:  # gc is at step 6 now
        assert time.monotonic() < deadline and not errs
        time.sleep(0.01)
    go.set()
    tw.join(60)
    tg.join(60)
    assert not errs, errs
    assert result["waited_for_commits"] == 1 and result["chunks_rescued"] == 3
    assert result["chunks_removed"] == 0
    verify(gcer, data=True)
    restores_equal(gcer, "vm2", img, tmp_path)


def test_a_writer_waits_for_a_sweep_then_checks(store: Store, hooks: Hooks, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A backup that commits while a gc sweeps waits for the sweep to end."""
    img = Path(write_image(tmp_path / "a.raw", MiB, [(0, rand(3 * CHUNK, 5))]))
    writer, gcer = store.open(), store.open()
    make_backup(writer, "vm1", {"vda": img})
    store.clock.t += 100
    order: list[str] = []
    threads: list[threading.Thread] = []

    def backup_now() -> None:
        t = threading.Thread(target=lambda: (make_backup(writer, "vm2", {"vda": img}),
                                             order.append("committed")))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 60
        while "waiting for it to finish" not in caplog.text:  # at the commit, waiting
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.01)
        order.append("sweep ends")

    hooks["gc_after_sweep"] = backup_now
    with caplog.at_level("INFO"):
        gc(gcer)
        threads[0].join(60)
    assert order == ["sweep ends", "committed"]
    restores_equal(gcer, "vm2", img, tmp_path)


def test_a_dead_gc_leaves_sweeping_behind_and_writers_go_on(
        store: Store, tmp_path: Path) -> None:
    """kill -9 of gc mid-sweep leaves "sweeping": true and no live gc lock: writers
    check their chunks and commit; the next gc finishes."""
    img = Path(write_image(tmp_path / "a.raw", MiB, [(0, rand(3 * CHUNK, 6))]))
    writer = store.open()
    fleet.write_epoch(writer.storage, fleet.Epoch(7, True))
    make_backup(writer, "vm1", {"vda": img})
    make_backup(writer, "vm1", {"vda": img})
    res = gc(store.open())
    assert res["epoch"] == 8 and fleet.read_epoch(writer.storage) == fleet.Epoch(8, False)
    restores_equal(writer, "vm1", img, tmp_path)


def test_cutoff_keeps_fresh_uploads_of_running_writers(store: Store) -> None:
    """Chunks younger than the oldest running writer (minus gc_grace) stay: they may
    belong to its backup, not committed yet."""
    writer, gcer = store.open(), store.open()
    old, _ = writer.put_chunk(rand(CHUNK, 7))
    writer.storage.flush()
    store.clock.t += 100
    with writer.lock_writer():
        store.clock.t += 100
        new, _ = writer.put_chunk(rand(CHUNK, 8))
        writer.storage.flush()
        res = gc(gcer)
        assert res["chunks_removed"] == 1 and res["chunks_too_new"] == 1
        assert writer.has_chunk(new) and old is not None and not writer.has_chunk(old)
        gcer.lock_settings = locks.Settings(max_clock_skew=10 ** 9, gc_grace=150)
        assert gc(gcer, dry_run=True)["chunks_removed"] == 0
    assert gc(gcer)["chunks_removed"] == 0  # younger than gc_grace
    gcer.lock_settings = SETTINGS
    assert gc(gcer)["chunks_removed"] == 1  # the writer is gone: unreferenced


def test_digest_set_is_compact_and_exact_enough() -> None:
    s = DigestSet()
    s.MERGE_MIN = 4  # type: ignore[misc]  # many merges, in every bucket
    ds = [rand(32, i) for i in range(5000)]
    s.update(ds[:2500])
    s.update(ds[:3000])  # repeats are merged away
    s.update(ds[1000:1500])
    assert len(s) == 3000
    assert all(d in s for d in ds[:3000])
    assert not any(d in s for d in ds[3000:])
    s.update(ds[4000:4100])  # added after a len(): still found, from the waiting sets too
    assert all(d in s for d in ds[4000:4100]) and len(s) == 3100
    assert s.itemsize == 8
    assert all(list(a) == sorted(set(a)) for a in s._sorted)
