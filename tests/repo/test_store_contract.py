"""The Storage contract, run against every store: the local directory, the in-memory one
(for pure logic tests) and S3 on the real Ceph gateway of scripts/start-s3.sh (skipped
when it is down, a failure under CI=true).  Tests of LocalStorage internals live in
test_storage.py."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backupkit import errors
from backupkit.repo import Repository
from backupkit.repo import storage as storage_mod
from backupkit.repo.importer import import_raw_images
from backupkit.repo.storage import (
    LocalStorage,
    ObjectInfo,
    Storage,
    StoreProperties,
    aligned_buffer,
    list_all,
    list_chunks,
    list_many,
)
from backupkit.repo.url import open_storage
from tests.repo.helpers import CHUNK, rand
from tests.repo.memstore import MemoryStorage

StoreFactory = Callable[[], Storage]  # each call: another client of the same location


@pytest.fixture(params=["local", "memory", "s3"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    if request.param == "local":
        root = str(tmp_path / "store")
        yield lambda: LocalStorage(root)
    elif request.param == "memory":
        objects: dict[str, bytes] = {}
        yield lambda: MemoryStorage(objects)
    else:
        url = request.getfixturevalue("s3_url")
        yield lambda: open_storage(url)


@pytest.fixture
def store(stores: StoreFactory) -> Storage:
    st = stores()
    st.create("config.json")
    return st


def test_properties_and_location(store: Storage) -> None:
    p = store.properties
    assert isinstance(p, StoreProperties)
    assert p.atomic_create and p.concurrency >= 1
    assert isinstance(store.location, str) and store.location


def test_put_if_absent_keeps_the_first(store: Storage) -> None:
    assert store.put_if_absent("a/b", b"first")
    assert not store.put_if_absent("a/b", b"second")
    assert store.get("a/b", 100) == b"first"
    assert store.exists("a/b") and store.size("a/b") == 5


def test_pieces_are_joined(store: Storage) -> None:
    assert store.put_if_absent("k", [b"\x01", memoryview(b"abc"), bytearray(b"de")])
    assert store.get("k", 10) == b"\x01abcde"


def test_missing_objects(store: Storage) -> None:
    assert not store.exists("no/such")
    with pytest.raises(errors.NotFound):
        store.get("no/such", 10)
    with pytest.raises(errors.NotFound):
        store.get_into("no/such", bytearray(10))
    with pytest.raises(errors.NotFound):
        store.size("no/such")
    assert not store.delete("no/such")


def test_children_delete_tree_and_move(store: Storage) -> None:
    """The verbs damage handling uses: names under a prefix, a backup removed whole,
    a chunk set aside (quarantine) and brought back."""
    for key in ("backups/d1/b1/manifest.json", "backups/d1/b1/vda.index",
                "backups/d1/b2/manifest.json", "backups/d2/b3/manifest.json", "top"):
        store.replace(key, b"12345")
    assert store.children("backups/") == ["d1", "d2"]
    assert store.children("backups/d1/") == ["b1", "b2"]
    assert store.children("backups/d1/b1/") == ["manifest.json", "vda.index"]
    assert store.children("nothing/here/") == []
    assert store.delete_tree("backups/d1/b1") == 10
    assert store.children("backups/d1/") == ["b2"]
    assert store.delete_tree("backups/d1/none") == 0
    assert store.delete_tree("top") == 5 and not store.exists("top")
    store.move("backups/d1/b2/manifest.json", "quarantine/m.1")
    assert not store.exists("backups/d1/b2/manifest.json")
    assert store.get("quarantine/m.1", 10) == b"12345"
    store.replace("backups/d1/b2/manifest.json", b"new")
    with pytest.raises(errors.OperationFailed, match="exists"):
        store.move("backups/d1/b2/manifest.json", "quarantine/m.1")  # never replaces
    assert store.get("quarantine/m.1", 10) == b"12345"
    with pytest.raises(errors.NotFound):
        store.move("no/such", "quarantine/m.2")


def test_size_limits_are_damage(store: Storage) -> None:
    store.put_if_absent("big", b"x" * 100)
    with pytest.raises(errors.CorruptRepository):
        store.get("big", 99)
    with pytest.raises(errors.CorruptRepository):
        store.get_into("big", bytearray(99))
    with pytest.raises(errors.CorruptRepository):
        store.get_into("big", bytearray(200), 50)
    assert store.get("big", 100) == b"x" * 100


@pytest.mark.parametrize("aligned", [False, True])
def test_get_into(store: Storage, aligned: bool) -> None:
    data = rand(300_000, 1)
    store.put_if_absent("chunks/ab/x", data)
    buf = aligned_buffer(400_000) if aligned else bytearray(400_000)
    view = store.get_into("chunks/ab/x", buf)
    assert bytes(view) == data


def test_invalid_keys(store: Storage) -> None:
    for key in ("", "a//b", "../x", "a/./b", "/abs"):
        with pytest.raises(errors.OperationFailed):
            store.put_if_absent(key, b"x")


def test_list_by_prefix(store: Storage) -> None:
    keys = {"backups/a/1/manifest.json": 3, "backups/a/1/vda.index": 5,
            "backups/ab/2/manifest.json": 7, "chunks/00/00aa": 11, "config.json": 2}
    for k, n in keys.items():
        store.put_if_absent(k, b"z" * n)
    assert {(i.key, i.size) for i in store.list("")} == set(keys.items())
    assert {i.key for i in store.list("backups/a/")} == {"backups/a/1/manifest.json",
                                                         "backups/a/1/vda.index"}
    assert {i.key for i in store.list("chunks/")} == {"chunks/00/00aa"}
    assert list(store.list("nothing/")) == []
    assert list(store.leftovers("")) == []


def _listing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("storage-list-")]


def test_chunks_listed_across_prefixes(store: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    """list_chunks (gc, verify, a commit's check) gives exactly what storage.list("chunks/")
    gives, keys, sizes and mtimes, in any order: on a remote store (memory, S3) the
    chunk directories are listed concurrently, handed over a few objects at a time
    here (a small LIST_BATCH); no listing thread is left afterwards."""
    monkeypatch.setattr(storage_mod, "LIST_BATCH", 2)
    stored = {f"chunks/{h:02x}/{h:02x}{i:062x}": 1 + (h * 3 + i) % 17
              for h in range(0, 256, 5) for i in range(h % 4)}
    stored["chunks/zz/not-a-chunk"] = 4  # anything else under chunks/ is listed too (gc
    stored["chunks/README"] = 6          # names it), an object right under it included
    for k, n in stored.items():
        assert store.put_if_absent(k, b"c" * n)
    store.put_if_absent("backups/d/1/manifest.json", b"m")  # outside chunks/: not listed
    whole = {i.key: i for i in store.list("chunks/")}
    assert {k: i.size for k, i in whole.items()} == stored
    got = list(list_chunks(store))
    assert len(got) == len(stored)  # each once
    assert {i.key: i.size for i in got} == stored
    # mtimes by the store's clock, as list() gives them (the object right under
    # chunks/ is never a chunk: gc only names it, and a remote store gives it mtime 0).
    assert {i for i in got if i.key != "chunks/README"} == {
        i for k, i in whole.items() if k != "chunks/README"}
    dirs = sorted({k.rsplit("/", 1)[0] + "/" for k in stored if k.count("/") == 2})
    assert sorted(list_many(store, dirs)) == sorted(
        i for k, i in whole.items() if k != "chunks/README")
    assert list(list_many(store, ["chunks/no/", "chunks/such/"])) == []
    # The whole store (the metrics' recount): each object once, top-level ones included.
    everything = list(list_all(store))
    assert len(everything) == len({i.key for i in everything})
    assert {i.key: i.size for i in everything} == {i.key: i.size for i in store.list("")}
    # A consumer that stops early (close()) leaves no thread behind.
    it = list_chunks(store)
    assert isinstance(next(it), ObjectInfo)
    it.close()
    assert _listing_threads() == []


def test_repository_stats_on_every_store(stores: StoreFactory) -> None:
    """The metrics' count of a repository (after gc, a first backup) lists it through
    Repository.list_objects (concurrently on a remote store): the same totals as one
    plain listing."""
    from backupkit import metrics

    repo = Repository.init(stores(), chunk_size=CHUNK)
    for i in range(5):
        repo.put_chunk(rand(CHUNK, seed=i))
    repo.storage.flush()
    repo.storage.replace("backups/d/1/manifest.json", b"{}")
    plain = list(repo.storage.list(""))
    assert metrics.repository_stats(repo) == {
        "size_bytes": sum(i.size for i in plain),
        "chunks": sum(1 for i in plain if i.key.startswith("chunks/")),
        "backups": 1}


def test_chunk_listing_holds_a_few_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """The listing threads hand over a page at a time through a bounded queue: however
    slow the consumer, objects listed but not yet consumed stay within a few pages per
    thread (never a whole prefix's listing)."""
    monkeypatch.setattr(storage_mod, "LIST_BATCH", 3)
    monkeypatch.setattr(storage_mod, "ONE_PAGE", 1)  # fan out (the first object is dropped)
    store = MemoryStorage()
    for h in range(64):
        for i in range(40):
            store.put_if_absent(f"chunks/{h:02x}/{h:02x}{i:062x}", b"x")
    pulled = 0
    lock = threading.Lock()
    inner = store.list

    def counted(prefix: str) -> Iterator[ObjectInfo]:
        nonlocal pulled
        for info in inner(prefix):
            with lock:
                pulled += 1
            yield info

    monkeypatch.setattr(store, "list", counted)
    workers = store.properties.concurrency
    consumed = ahead = 0
    for _info in list_chunks(store):
        consumed += 1
        with lock:
            ahead = max(ahead, pulled - consumed)
    assert consumed == 64 * 40
    # queue (workers pages) + one page in each thread's hands + the page being consumed
    assert ahead <= (2 * workers + 1) * 3 + 1
    assert _listing_threads() == []


def test_delete(store: Storage) -> None:
    store.put_if_absent("backups/d/1/manifest.json", b"m")
    assert store.delete("backups/d/1/manifest.json")
    assert not store.exists("backups/d/1/manifest.json")
    assert not store.delete("backups/d/1/manifest.json")
    assert list(store.list("backups/")) == []
    # A deleted key can be created again.
    assert store.put_if_absent("backups/d/1/manifest.json", b"n")


def test_mtime_by_the_store_clock(store: Storage) -> None:
    """list() gives each object's modification time; a replace renews it (locks and
    gc judge age by it).  S3 keeps whole seconds."""
    import time

    before = time.time()
    store.put_if_absent("locks/a.json", b"1")
    (info,) = store.list("locks/")
    assert abs(info.mtime - before) < 60  # the store's clock is this host's here
    time.sleep(1.1)
    store.replace("locks/a.json", b"2")
    (again,) = store.list("locks/")
    assert again.mtime > info.mtime


def test_delete_many(store: Storage) -> None:
    keys = [f"chunks/{i % 7:02x}/{i:064x}" for i in range(1005)]  # more than one S3 batch
    for k in keys:
        store.put_if_absent(k, b"c")
    store.put_if_absent("config.json", b"{}")
    assert store.delete_many(keys[:1003]) == 1003
    assert {i.key for i in store.list("")} == {*keys[1003:], "config.json"}
    store.delete_many([*keys[1003:], "chunks/00/gone"])
    assert [i.key for i in store.list("")] == ["config.json"]
    assert store.delete_many([]) == 0


def test_replace(store: Storage) -> None:
    store.replace("backups/d/1/vda.index", b"one")
    assert store.get("backups/d/1/vda.index", 10) == b"one"
    store.replace("backups/d/1/vda.index", b"two!")
    assert store.get("backups/d/1/vda.index", 10) == b"two!"
    assert store.size("backups/d/1/vda.index") == 4


def test_deferred_puts(stores: StoreFactory) -> None:
    st = stores()
    st.create("config.json")
    bufs = [bytearray(rand(50_000, i)) for i in range(20)]
    want = [bytes(b) for b in bufs]
    for i, b in enumerate(bufs):
        assert st.put_if_absent(f"chunks/{i:02x}/c{i}", [b"\x00", b], deferred=True)
        b[:] = bytes(len(b))  # the caller reuses its buffer at once
        assert st.exists(f"chunks/{i:02x}/c{i}")
        assert st.size(f"chunks/{i:02x}/c{i}") == 50_001
    # Deferred: a store may answer True before it learns that the key exists (S3 does
    # not ask first); the first object is kept either way.
    st.put_if_absent("chunks/00/c0", b"again", deferred=True)
    st.flush()
    other = stores()  # another process sees them after flush
    for i in range(20):
        assert other.get(f"chunks/{i:02x}/c{i}", 60_000) == b"\x00" + want[i]
    assert len(list(other.list("chunks/"))) == 20
    st.flush()  # nothing pending: a no-op


def test_discard_pending_leaves_a_usable_store(store: Storage) -> None:
    for i in range(5):
        store.put_if_absent(f"chunks/{i:02x}/d{i}", b"x" * 1000, deferred=True)
    store.discard_pending()
    store.flush()
    assert store.put_if_absent("after", b"ok")
    assert store.get("after", 10) == b"ok"


def test_create_if_absent_is_atomic_across_clients(stores: StoreFactory) -> None:
    """Eight writers race for one key, each through its own client: exactly one wins."""
    stores().create("config.json")
    clients = [stores() for _ in range(8)]
    start = threading.Barrier(len(clients))
    won: list[int] = []

    def race(i: int) -> None:
        start.wait()
        if clients[i].put_if_absent("backups/d/1/manifest.json", f"writer {i}".encode()):
            won.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert clients[0].get("backups/d/1/manifest.json", 100) == f"writer {won[0]}".encode()


def test_create_refuses_a_used_location(stores: StoreFactory) -> None:
    st = stores()
    st.create("config.json")
    st.put_if_absent("something/else", b"x")
    with pytest.raises(errors.UsageError, match="not empty"):
        stores().create("config.json")
    st.replace("config.json", b"{}")
    with pytest.raises(errors.UsageError, match="already a backupkit repository"):
        stores().create("config.json")


def test_repository_on_every_store(stores: StoreFactory, tmp_path: Path) -> None:
    """The repository works through the contract alone: init, backup, commit, reopen."""
    repo = Repository.init(stores(), chunk_size=CHUNK)
    image = tmp_path / "vda.raw"
    data = rand(3 * CHUNK, 7)
    image.write_bytes(data)
    m = import_raw_images(repo, "vm1", {"vda": str(image)})
    with pytest.raises(errors.OperationFailed, match="already committed"):
        repo.commit(m)

    again = Repository.open(stores())
    assert [b.id for b in again.list_backups("vm1")] == [m.id]
    idx = again.load_index(again.get_manifest("vm1", "latest"), "vda")
    got = b"".join(again.get_chunk(d) for _slot, d, _p in idx.slots() if d is not None)
    assert got == data
    with pytest.raises(errors.UsageError, match="already a backupkit repository"):
        Repository.init(stores(), chunk_size=CHUNK)


def test_racing_inits_make_one_repository(stores: StoreFactory) -> None:
    results: list[str] = []
    start = threading.Barrier(4)

    def init() -> None:
        start.wait()
        try:
            results.append(Repository.init(stores(), chunk_size=CHUNK).config["id"])
        except errors.UsageError:
            results.append("refused")

    threads = [threading.Thread(target=init) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r != "refused"]
    assert len(winners) == 1
    assert Repository.open(stores()).config["id"] == winners[0]
