"""Locks as objects in the store (docs/format.md, "Locks and gc"), on every store.

The rules (conflicts, Busy naming the holder, waiting, staleness by age and by a dead
pid on this host, the clock check) run against the local directory, the real S3
gateway and the in-memory store; the in-memory store's fake clock ages locks
without waiting.  Holders in other processes show that the locks work between
processes and, with another $BACKUPKIT_HOST, between "hosts".
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from backupkit import errors
from backupkit.ops.gc import gc
from backupkit.repo import Repository, locks
from backupkit.repo.storage import LocalStorage
from backupkit.repo.url import open_storage
from tests.repo.helpers import CHUNK
from tests.repo.memstore import MemoryStorage

ROOT = Path(__file__).resolve().parents[2]

Opener = Callable[[], Repository]  # each call: another client of the same repository


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["local", "memory", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "repo")
    elif request.param == "memory":
        yield "memory"
    else:
        yield request.getfixturevalue("s3_url")


@pytest.fixture
def opener(where: str) -> Opener:
    if where == "memory":
        objects: dict[str, bytes] = {}
        Repository.init(MemoryStorage(objects), chunk_size=CHUNK)
        return lambda: Repository.open(MemoryStorage(objects))
    Repository.init(where, chunk_size=CHUNK)
    return lambda: Repository.open(open_storage(where))


def lock_objects(repo: Repository) -> list[str]:
    return sorted(i.key for i in repo.storage.list("locks/"))


# -- the rules, in one process --------------------------------------------------------


def test_conflicts_and_busy_naming_the_holder(opener: Opener) -> None:
    a, b = opener(), opener()
    with a.lock_domain("vm1"):
        with pytest.raises(errors.Busy) as e, b.lock_domain("vm1"):
            pass
        assert e.value.exit_code == 3
        msg = str(e.value)
        assert msg.startswith(f"domain vm1 is locked by host {locks.host_name()} "
                              f"pid {os.getpid()} (")
        assert " since 20" in msg
        # Another domain, writers and gc go on beside it.
        with b.lock_domain("vm2"), b.lock_writer(), a.lock_writer(), b.lock_gc():
            with pytest.raises(errors.Busy, match="gc of repository"), a.lock_gc():
                pass
            with pytest.raises(errors.Busy), a.lock_exclusive():
                pass
    # The loser removed its own object; the holder removed its on release.
    assert lock_objects(a) == []
    with a.lock_exclusive():
        for cm in (b.lock_writer, b.lock_gc, lambda: b.lock_domain("vm3"), b.lock_exclusive):
            with pytest.raises(errors.Busy), cm():
                pass
        assert len(lock_objects(a)) == 1
    assert lock_objects(a) == []


def test_domain_uuids(opener: Opener) -> None:
    a, b = opener(), opener()
    with a.lock_domain("vm1", uuid="u1"):
        with b.lock_domain("vm1", uuid="u2"):  # two domains that share a name
            pass
        for other in ("u1", None):
            with pytest.raises(errors.Busy), b.lock_domain("vm1", uuid=other):
                pass
    with a.lock_domain("vm1"), pytest.raises(errors.Busy), b.lock_domain("vm1", uuid="u9"):
        pass


def test_writer_lock_is_reentrant_per_repository(opener: Opener) -> None:
    a = opener()
    with a.lock_writer() as w1, a.lock_shared() as w2:
        assert w1 is w2
        assert len(lock_objects(a)) == 1
    assert lock_objects(a) == []


def test_wait_polls_until_the_holder_releases(opener: Opener) -> None:
    a, b = opener(), opener()
    held = a.lock_domain("vm1")
    held.__enter__()
    threading.Timer(0.5, lambda: held.__exit__(None, None, None)).start()
    with b.lock_domain("vm1", wait=60):
        pass


def test_refresh_and_state(opener: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    a = opener()
    a.lock_settings = locks.Settings(lock_refresh=0.05, lock_stale=600)
    with a.lock_writer() as w:
        key = w.key
        (f,) = locks.read_locks(a.storage)
        assert f.key == key and f.body["kind"] == "writer" and f.body["state"] == "running"
        assert f.body["host"] == locks.host_name() and f.body["pid"] == os.getpid()
        assert f.body["boot_id"] == locks.boot_id() and f.body["command"]
        with w.committing_state():
            (f,) = locks.read_locks(a.storage)
            assert f.body["state"] == "committing"
        deadline = time.monotonic() + 30
        while "created" not in locks.read_locks(a.storage)[0].body:  # refreshed
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert locks.read_locks(a.storage)[0].body["state"] == "running"
    assert lock_objects(a) == []


# -- staleness ----------------------------------------------------------------------


def test_stale_by_age_on_the_store_clock(caplog: pytest.LogCaptureFixture) -> None:
    """A holder on another host that stops refreshing: stale after lock_stale, by the
    store's clock; the finder removes it with a warning; the holder, if it wakes
    up, finds its lock gone and says so."""
    objects: dict[str, bytes] = {}
    clock = Clock()
    Repository.init(MemoryStorage(objects, clock=clock), chunk_size=CHUNK)
    settings = locks.Settings(lock_refresh=3600, lock_stale=600, max_clock_skew=10 ** 9,
                              gc_grace=2 * 10 ** 9)
    a = Repository.open(MemoryStorage(objects, clock=clock))
    b = Repository.open(MemoryStorage(objects, clock=clock))
    a.lock_settings = b.lock_settings = settings
    held = a.lock_domain("vm1")
    lock = held.__enter__()
    lock.body["host"] = "elsewhere"  # its pid means nothing here
    a.storage.replace(lock.key, lock._encode())
    clock.t += 599
    with pytest.raises(errors.Busy, match="host elsewhere pid"), b.lock_domain("vm1"):
        pass
    clock.t += 2
    with caplog.at_level(logging.WARNING), b.lock_domain("vm1"):
        assert "removing stale lock" in caplog.text and "not refreshed for 60" in caplog.text
        assert lock.lost == 0
        lock.refresh()  # the stale holder wakes up: its object is gone
        assert lock.lost == 1
    held.__exit__(None, None, None)


def test_garbage_in_locks_is_a_lock_that_expires() -> None:
    objects: dict[str, bytes] = {}
    clock = Clock()
    Repository.init(MemoryStorage(objects, clock=clock), chunk_size=CHUNK)
    a = Repository.open(MemoryStorage(objects, clock=clock))
    a.lock_settings = locks.Settings(max_clock_skew=10 ** 9, gc_grace=2 * 10 ** 9)
    a.storage.put_if_absent("locks/exclusive-0123456789abcdef.json", b"\x00garbage")
    a.storage.put_if_absent("locks/README", b"not a lock")  # foreign names: ignored
    with pytest.raises(errors.Busy, match="unreadable lock"), a.lock_domain("vm1"):
        pass
    clock.t += 601
    with a.lock_domain("vm1"):
        pass
    assert lock_objects(a) == ["locks/README"]


def test_clock_skew_fails_with_one_line() -> None:
    objects: dict[str, bytes] = {}
    clock = Clock()
    clock.t += 1000  # the store's clock is 1000 s ahead of ours
    Repository.init(MemoryStorage(objects, clock=clock), chunk_size=CHUNK)
    a = Repository.open(MemoryStorage(objects, clock=clock))
    a.lock_settings = locks.Settings(max_clock_skew=300)
    with pytest.raises(errors.OperationFailed) as e, a.lock_writer():
        pass
    assert e.value.exit_code == 1
    assert "differs from the store's" in str(e.value) and "+1000 s" in str(e.value)
    assert "\n" not in str(e.value)
    assert lock_objects(a) == []  # nothing left behind
    a.lock_settings = locks.Settings(max_clock_skew=2000, gc_grace=4000)
    with a.lock_writer():
        pass


def test_a_tie_loses_on_both_sides() -> None:
    """S3 keeps whole seconds: two locks created in the same second cannot be ordered,
    so the second one loses even to a lock that has already won."""
    objects: dict[str, bytes] = {}
    clock = Clock()
    Repository.init(MemoryStorage(objects, clock=clock), chunk_size=CHUNK)
    a = Repository.open(MemoryStorage(objects, clock=clock))
    b = Repository.open(MemoryStorage(objects, clock=clock))
    with a.lock_gc(), pytest.raises(errors.Busy), b.lock_gc():
        pass


def test_settings_from_config_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BACKUPKIT_GC_GRACE")
    monkeypatch.delenv("BACKUPKIT_MAX_CLOCK_SKEW")
    assert locks.settings() == locks.Settings(60, 600, 300, 3600)
    assert locks.settings(lock_stale=30, lock_refresh=5).lock_stale == 30
    monkeypatch.setenv("BACKUPKIT_LOCK_STALE", "20")
    assert locks.settings(lock_stale=30, lock_refresh=5).lock_stale == 20
    with pytest.raises(errors.UsageError, match="at least twice"):
        locks.settings(gc_grace=100)
    with pytest.raises(errors.UsageError, match="at least twice lock_refresh"):
        locks.settings(lock_refresh=15)
    monkeypatch.setenv("BACKUPKIT_LOCK_STALE", "soon")
    with pytest.raises(errors.UsageError, match="BACKUPKIT_LOCK_STALE"):
        locks.settings()


# -- between processes (local and S3) -------------------------------------------------

HOLDER = """
import sys
from backupkit.repo import Repository
from backupkit.repo.url import open_storage
repo = Repository.open(open_storage(sys.argv[1]))
cm = {"domain": lambda: repo.lock_domain("vm1"), "writer": repo.lock_writer,
      "gc": repo.lock_gc, "exclusive": repo.lock_exclusive}[sys.argv[2]]()
with cm:
    print("locked", flush=True)
    sys.stdin.read()
"""


@contextmanager
def holder(where: str, kind: str, env: dict[str, str] | None = None
           ) -> Iterator[subprocess.Popen[str]]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, where, kind, "backup", "vm1"],
                         cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "locked"
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdin, p.stdout):
            if f:
                f.close()


@pytest.fixture(params=["local", "s3"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A repository for several processes (the in-memory store lives in one)."""
    where = str(tmp_path / "repo") if request.param == "local" \
        else str(request.getfixturevalue("s3_url"))
    Repository.init(where, chunk_size=CHUNK)
    return where


def test_holder_in_another_process_and_kill_9(shared: str) -> None:
    repo = Repository.open(open_storage(shared))
    with holder(shared, "domain") as p:
        with pytest.raises(errors.Busy) as e, repo.lock_domain("vm1"):
            pass
        msg = str(e.value)
        assert f"host {locks.host_name()} pid {p.pid} (" in msg and "backup vm1" in msg
        with repo.lock_domain("vm2"), repo.lock_writer(), repo.lock_gc():
            pass
        # kill -9: no cleanup runs, the object stays; its pid is gone on this host
        # (same host name, same boot): the next taker removes it at once.
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert len(lock_objects(repo)) == 1
        with repo.lock_domain("vm1"):
            pass
    assert lock_objects(repo) == []


def test_holder_on_another_host(shared: str) -> None:
    """Another host's holder is never judged by its pid: only by its age.  While it
    refreshes it holds; once it stops (SIGSTOP), its lock is stale after lock_stale."""
    repo = Repository.open(open_storage(shared))
    env = {"BACKUPKIT_HOST": "other-host", "BACKUPKIT_LOCK_REFRESH": "1",
           "BACKUPKIT_LOCK_STALE": "4"}
    repo.lock_settings = locks.Settings(lock_refresh=1, lock_stale=4, max_clock_skew=0,
                                        gc_grace=0)
    with holder(shared, "domain", env) as p:
        os.kill(p.pid, signal.SIGKILL)  # dead, but on "another host": not judged by pid
        p.wait()
        with pytest.raises(errors.Busy, match="host other-host pid"), repo.lock_domain("vm1"):
            pass
        with repo.lock_domain("vm1", wait=60):  # stale after lock_stale
            pass
    with holder(shared, "exclusive", env) as p:
        time.sleep(6)  # longer than lock_stale: the refreshes keep it live
        with pytest.raises(errors.Busy, match="host other-host"), repo.lock_writer():
            pass
        os.kill(p.pid, signal.SIGSTOP)
        try:
            with repo.lock_writer(wait=60):
                pass
        finally:
            os.kill(p.pid, signal.SIGCONT)


def test_old_flock_files_are_ignored_and_gc_removes_them(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    repo = Repository.init(str(path), chunk_size=CHUNK)
    for name in ("repository.lock", "domain.vm1.lock"):
        (path / "locks" / name).write_text("pid 1 (backupkit backup vm1) since 2025\n")
        os.utime(path / "locks" / name, (1, 1))
    with repo.lock_domain("vm1"), repo.lock_writer():
        pass
    assert gc(repo)["tmp_files_removed"] == 2
    assert os.listdir(path / "locks") == []


def test_lock_object_format(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)
    with repo.lock_domain("vm1", uuid="abc") as lock:
        (name,) = os.listdir(tmp_path / "repo" / "locks")
        # domain-<8 hex of SHA-256 of the name>-<16 random hex>.json
        assert name.startswith("domain-7b11e3d1-") and name.endswith(".json")
        assert len(name) == 37
        body = json.loads((tmp_path / "repo" / "locks" / name).read_text())
        assert set(body) >= {"kind", "host", "pid", "boot_id", "command", "started",
                             "domain", "uuid", "state"}
        assert body["domain"] == "vm1" and body["uuid"] == "abc"
        assert lock.key == f"locks/{name}"
    assert isinstance(repo.storage, LocalStorage)
