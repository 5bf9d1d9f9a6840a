"""Deduplication seeded from indexes: known chunks cost no request, unknown ones no HEAD
on an object store, and a quarantined chunk is never taken as known (issue 18, part 1)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from backupkit.errors import OperationFailed
from backupkit.fileio import Buffer
from backupkit.repo import Index, Manifest, Repository
from backupkit.repo.repository import chunk_key
from backupkit.repo.url import open_storage
from tests.repo.helpers import CHUNK, rand
from tests.repo.memstore import MemoryStorage


class CountingStorage(MemoryStorage):
    """The in-memory store, counting the existence checks and writes it serves."""

    def __init__(self) -> None:
        super().__init__()
        self.exists_calls = 0
        self.puts: list[str] = []

    def exists(self, key: str) -> bool:
        self.exists_calls += 1
        return super().exists(key)

    def put_if_absent(self, key: str, data: Buffer | Sequence[Buffer], *,
                      deferred: bool = False) -> bool:
        self.puts.append(key)
        return super().put_if_absent(key, data, deferred=deferred)


def _backup(repo: Repository, domain: str, chunks: list[bytes],
            start: bool = True) -> tuple[Manifest, Index]:
    """A committed backup of one disk holding chunks, as a backup run writes it."""
    if start:
        repo.start_known()
    index = Index(len(chunks) * CHUNK, CHUNK)
    for i, data in enumerate(chunks):
        index[i], _ = repo.put_chunk(data)
    bid = repo.new_backup_id()
    ref = repo.write_index(domain, bid, "vda", index)
    from backupkit.repo import DiskRecord
    m = Manifest(version=1, id=bid, domain=domain, created="2026-01-01T00:00:00Z",
                 mode="full", reason="test", checkpoint=None, parent_checkpoint=None,
                 parent_id=None, started="2026-01-01T00:00:00Z",
                 finished="2026-01-01T00:00:00Z", duration_seconds=0.0, quiesced=False,
                 freeze_seconds=None, domain_xml="<domain/>", checkpoint_xml=None,
                 disks=[DiskRecord(name="vda", source="/x", format="qcow2",
                                   virtual_size=len(chunks) * CHUNK, read_bytes=0,
                                   stored_bytes=0, data_bytes=0, index=ref)])
    repo.commit(m)
    repo.forget_known()
    return m, index


def test_known_chunks_cost_no_request_and_unknown_ones_no_lookup() -> None:
    store = CountingStorage()
    repo = Repository.init(store, chunk_size=CHUNK)
    data = [rand(CHUNK, i) for i in range(4)]
    m, _index = _backup(repo, "vm", data)
    # Stored earlier in the same run: known (no lookup, no second write).
    assert store.exists_calls == 0
    assert len([k for k in store.puts if k.startswith("chunks/")]) == 4

    again = Repository.open(store)  # a new run: nothing known until seeded
    store.exists_calls = 0
    again.start_known()
    again.seed_known(again.load_index(m, "vda"))
    assert store.exists_calls == 0  # the quarantine listing is no per-chunk lookup
    store.puts = []
    for d in data:
        digest, written = again.put_chunk(d)
        assert written == 0 and digest is not None
    assert store.exists_calls == 0 and store.puts == []
    # An unknown chunk is written create-if-absent at once: no lookup before it.
    digest, written = again.put_chunk(rand(CHUNK, 99))
    assert written > 0 and store.exists_calls == 0
    assert store.puts == [chunk_key(digest)]  # type: ignore[arg-type]
    # A chunk the store has but nobody told this run about: the PUT finds it (no HEAD).
    fresh = Repository.open(store)
    store.exists_calls, store.puts = 0, []
    d0, written = fresh.put_chunk(data[0])
    assert d0 is not None and written == 0
    assert store.exists_calls == 0 and store.puts == [chunk_key(d0)]


def test_outside_a_run_nothing_is_remembered() -> None:
    store = CountingStorage()
    repo = Repository.init(store, chunk_size=CHUNK)
    d, _ = repo.put_chunk(rand(CHUNK, 7))
    assert d is not None and not repo.knows_chunk(d)
    _m, index = _backup(repo, "vm", [rand(CHUNK, 8)])
    repo.seed_known(index)  # no run: ignored
    assert not repo.knows_chunk(index[0])  # type: ignore[arg-type]


def test_local_store_still_looks_before_compressing(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)
    d, _written = repo.put_chunk(rand(CHUNK, 1))
    repo.storage.flush()
    other = Repository.open(str(tmp_path / "repo"))
    assert other.put_chunk(rand(CHUNK, 1)) == (d, 0)


def test_a_quarantined_chunk_is_never_known() -> None:
    store = CountingStorage()
    repo = Repository.init(store, chunk_size=CHUNK)
    data = [rand(CHUNK, i) for i in range(3)]
    m, index = _backup(repo, "vm", data)
    bad = index[1]
    assert bad is not None
    store.objects[chunk_key(bad)] = b"\x00garbage"
    assert repo.quarantine_chunk(bad) is not None  # verify --data's move

    run = Repository.open(store)
    run.start_known()
    run.seed_known(run.load_index(m, "vda"))  # even if a caller seeds from that backup
    assert run.knows_chunk(index[0])  # type: ignore[arg-type]
    assert not run.knows_chunk(bad)
    digest, written = run.put_chunk(data[1])
    assert digest == bad and written > 0  # stored afresh
    run.storage.flush()
    assert run.get_chunk(bad) == data[1]


def test_a_chunk_quarantined_during_the_run_is_not_committed() -> None:
    store = CountingStorage()
    repo = Repository.init(store, chunk_size=CHUNK)
    data = [rand(CHUNK, i) for i in range(2)]
    m, index = _backup(repo, "vm", data)

    run = Repository.open(store)
    run.start_known()
    run.seed_known(run.load_index(m, "vda"))
    assert run.knows_chunk(index[0])  # type: ignore[arg-type]
    # verify --data, beside this run, finds chunk 0 damaged and moves it aside.
    store.objects[chunk_key(index[0])] = b"\x00garbage"  # type: ignore[arg-type]
    assert repo.quarantine_chunk(index[0]) is not None  # type: ignore[arg-type]
    with pytest.raises(OperationFailed, match="quarantined"):
        _backup(run, "vm", data, start=False)
    assert len(run.backups("vm").manifests) == 1
    # The next run stores it afresh.
    nxt = Repository.open(store)
    _m2, _ = _backup(nxt, "vm", data)
    assert nxt.get_chunk(index[0]) == data[0]  # type: ignore[arg-type]


def test_failed_run_forgets_what_it_queued() -> None:
    store = CountingStorage()
    repo = Repository.init(store, chunk_size=CHUNK)
    repo.start_known()
    d, _ = repo.put_chunk(rand(CHUNK, 5))
    assert repo.knows_chunk(d)  # type: ignore[arg-type]
    repo.discard_pending()
    assert not repo.knows_chunk(d)  # type: ignore[arg-type]
    _, written = repo.put_chunk(rand(CHUNK, 5))
    assert written > 0


def test_backup_to_s3_sends_no_head_for_known_chunks(s3_url: str) -> None:
    repo = Repository.init(s3_url, chunk_size=CHUNK)
    data = [rand(CHUNK, i) for i in range(6)]
    m, _ = _backup(repo, "vm", data)
    run = Repository.open(open_storage(s3_url))
    before = run.request_counts()
    assert before is not None
    run.start_known()
    run.seed_known(run.load_index(m, "vda"))
    for d in data:
        assert run.put_chunk(d)[1] == 0
    run.put_chunk(rand(CHUNK, 50))  # one new chunk: one PUT, no HEAD
    # A chunk the store has that this run does not know: one conditional PUT, answered 412.
    Repository.open(open_storage(s3_url)).put_chunk(data[0])
    run.storage.flush()
    after = run.request_counts()
    assert after is not None
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    assert "HEAD" not in delta, delta
    assert delta["PUT"] == 1, delta


def test_verify_of_an_s3_repository_lists_instead_of_one_head_per_chunk(
        s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from backupkit import errors
    from backupkit.ops import verify

    monkeypatch.setattr(verify, "LIST_MIN", 1)
    repo = Repository.init(s3_url, chunk_size=CHUNK)
    data = [rand(CHUNK, i) for i in range(5)]
    m, index = _backup(repo, "vm", data)
    run = Repository.open(open_storage(s3_url))
    before = run.request_counts() or {}
    rep = verify.verify(run)
    assert rep["ok"] and rep["chunks_checked"] == 5
    after = run.request_counts() or {}
    assert after.get("HEAD", 0) - before.get("HEAD", 0) == 0
    # A chunk gone from the store: the listing misses it, it is looked up and named.
    gone = index[3]
    assert gone is not None
    run.storage.delete(chunk_key(gone))
    with pytest.raises(errors.IntegrityError) as e:
        verify.verify(run)
    [dmg] = e.value.report["damaged"]
    assert dmg["id"] == m.id and gone.hex() in dmg["disks"][0]["missing_chunks"]
