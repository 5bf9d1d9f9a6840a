"""Repository core: init/open, chunks, indexes, manifests, listing."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import blake3
import pytest

from backupkit import errors
from backupkit.repo import DiskRecord, Index, Manifest, Repository
from backupkit.repo.repository import chunk_key
from tests.repo.helpers import CHUNK, MiB, at, make_backup, rand, text, write_image


def test_init_open_round_trip(tmp_path: Path) -> None:
    r = Repository.init(str(tmp_path / "new" / "repo"), chunk_size=CHUNK, compression_level=5)
    r2 = Repository.open(r.path)
    assert r2.chunk_size == CHUNK
    assert r2.compression_level == 5
    assert r2.hash_name == "blake3"  # the default for new repositories
    assert r2.config["version"] == 2
    assert r2.list_backups() == []


@pytest.mark.parametrize(("name", "expected"), [
    ("blake3", lambda b: blake3.blake3(b).digest()),
    ("sha256", lambda b: hashlib.sha256(b).digest()),
])
def test_chunks_are_named_by_the_repository_hash(tmp_path: Path, name: str,
                                                 expected: Any) -> None:
    r = Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK, hash_name=name)
    data = text(CHUNK)
    d, _ = r.put_chunk(data)
    assert d == expected(data) == r.digest(data)
    r.storage.flush()
    assert Path(r.path, chunk_key(d)).is_file()
    r2 = Repository.open(r.path)
    assert r2.hash_name == name and r2.get_chunk(d) == data
    assert r2.put_chunk(data) == (d, 0)  # dedup against what the first open wrote


def test_version_1_repository_is_sha256_and_still_works(tmp_path: Path) -> None:
    # What backupkit wrote before blake3: version 1, hash sha256.
    r = Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK, hash_name="sha256")
    cfg = Path(r.path, "config.json")
    doc = json.loads(cfg.read_text())
    doc["version"] = 1
    cfg.write_text(json.dumps(doc))
    old = Repository.open(r.path)
    assert old.hash_name == "sha256"
    data = rand(CHUNK, 5)
    d, _ = old.put_chunk(data)
    assert d == hashlib.sha256(data).digest()
    assert old.get_chunk(d) == data


def test_init_refuses_an_unknown_hash(tmp_path: Path) -> None:
    with pytest.raises(errors.UsageError, match="unknown chunk hash 'md5'"):
        Repository.init(str(tmp_path / "repo"), hash_name="md5")
    assert not (tmp_path / "repo").exists()


def test_init_refuses_non_empty_dir_and_existing_repo(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "file").write_text("x")
    with pytest.raises(errors.UsageError, match="not empty") as e:
        Repository.init(str(tmp_path / "d"))
    assert e.value.exit_code == 2
    Repository.init(str(tmp_path / "r"))
    with pytest.raises(errors.UsageError, match="already a backupkit repository"):
        Repository.init(str(tmp_path / "r"))
    Repository.init(str(tmp_path / "empty-ok"))  # missing dir is created


@pytest.mark.parametrize("size", [1000, 3 << 20])
def test_init_rejects_bad_chunk_size(tmp_path: Path, size: int) -> None:
    with pytest.raises(errors.UsageError, match="chunk size"):
        Repository.init(str(tmp_path / "r"), chunk_size=size)


def test_open_missing(tmp_path: Path) -> None:
    with pytest.raises(errors.NotFound) as e:
        Repository.open(str(tmp_path / "nope"))
    assert e.value.exit_code == 4
    (tmp_path / "plain").mkdir()
    with pytest.raises(errors.NotFound, match="not a backupkit repository"):
        Repository.open(str(tmp_path / "plain"))


def test_chunk_round_trip_dedup_and_zero(repo: Repository) -> None:
    comp = text(CHUNK)
    rnd = rand(CHUNK, 1)
    short = rand(1000, 2)
    d1, w1 = repo.put_chunk(comp)
    assert d1 == repo.digest(comp)
    assert 0 < w1 < CHUNK // 2  # compressed
    d2, w2 = repo.put_chunk(bytearray(rnd))
    assert w2 == CHUNK + 1  # incompressible: stored as is, plus the codec byte
    d3, _ = repo.put_chunk(memoryview(short))
    assert repo.put_chunk(comp) == (d1, 0)  # dedup
    assert repo.put_chunk(bytes(CHUNK)) == (None, 0)
    assert repo.put_chunk(bytes(100)) == (None, 0)
    assert repo.get_chunk(d1) == comp
    assert repo.get_chunk(d2) == rnd
    assert d3 is not None and repo.get_chunk(d3) == short
    buf = bytearray(CHUNK + 1)
    assert bytes(repo.read_chunk(d2, buf)) == rnd
    with pytest.raises(ValueError):
        repo.put_chunk(bytes(CHUNK + 1))


def test_put_chunk_threads(repo: Repository) -> None:
    datas = [rand(CHUNK, i % 8) for i in range(64)]
    results: list[tuple[bytes | None, int]] = []
    lock = threading.Lock()

    def work(part: list[bytes]) -> None:
        for d in part:
            r = repo.put_chunk(d)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=work, args=(datas[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 8 distinct chunks: each written exactly once, whatever the interleaving.
    assert sum(1 for _d, w in results if w) == 8
    for i in range(8):
        assert repo.get_chunk(repo.digest(rand(CHUNK, i))) == rand(CHUNK, i)
    repo.storage.flush()
    assert not list(repo.storage.leftovers())
    assert sum(1 for _ in repo.storage.list("chunks/")) == 8


def test_deferred_chunks_published_by_flush(repo: Repository) -> None:
    d, written = repo.put_chunk(rand(CHUNK, 9))
    assert d is not None and written
    path = Path(repo.path, chunk_key(d))
    assert not path.exists()  # not yet durable: not yet named
    assert len(list(repo.storage.leftovers())) == 1
    assert repo.has_chunk(d) and repo.put_chunk(rand(CHUNK, 9)) == (d, 0)
    repo.write_index("vm1", "id1", "vda", Index(CHUNK, CHUNK, [d]))  # publishes first
    assert path.exists() and not list(repo.storage.leftovers())
    assert repo.get_chunk(d) == rand(CHUNK, 9)


def test_get_chunk_damage(repo: Repository) -> None:
    d, _ = repo.put_chunk(text(CHUNK))
    assert d is not None
    repo.storage.flush()
    path = Path(repo.path, chunk_key(d))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(raw)
    with pytest.raises(errors.CorruptRepository) as e:
        repo.get_chunk(d)
    assert e.value.exit_code == 5
    assert d.hex() in str(e.value)
    path.unlink()
    with pytest.raises(errors.CorruptRepository, match="missing"):
        repo.get_chunk(d)


@pytest.mark.parametrize("extra", [1, 100, 4000])
def test_oversized_chunk_file_is_named_as_such_by_every_read(repo: Repository,
                                                             extra: int) -> None:
    d, _ = repo.put_chunk(rand(CHUNK, 3))
    assert d is not None
    repo.storage.flush()
    path = Path(repo.path, chunk_key(d))
    path.write_bytes(path.read_bytes() + bytes(extra))
    allowed = f"more than the {repo.chunk_size + 1} allowed"
    with pytest.raises(errors.CorruptRepository, match=allowed):
        repo.get_chunk(d)
    for buf in (bytearray(CHUNK + 1), repo.chunk_buffer()):  # buffered, O_DIRECT
        with pytest.raises(errors.CorruptRepository, match=allowed):
            repo.read_chunk(d, buf)


def test_flipped_byte_in_stored_chunk_detected(repo: Repository) -> None:
    data = rand(CHUNK, 3)  # stored uncompressed: decoding succeeds, the hash check fails
    d, _ = repo.put_chunk(data)
    assert d is not None
    repo.storage.flush()
    path = Path(repo.path, chunk_key(d))
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1
    path.write_bytes(raw)
    with pytest.raises(errors.CorruptRepository, match="does not match its hash"):
        repo.get_chunk(d)
    assert repo.get_chunk(d, verify=False) != data


def test_index_api() -> None:
    idx = Index(10 * CHUNK + 100, CHUNK)
    assert len(idx) == 11
    assert idx.data_bytes == 0
    d = hashlib.sha256(b"x").digest()
    idx[0] = d
    idx[10] = d
    assert idx.data_bytes == CHUNK + 100
    c = idx.copy()
    c[1] = d
    assert idx[1] is None and c[1] == d
    assert Index.from_bytes(c.to_bytes()) == c
    with pytest.raises(ValueError):
        idx[2] = b"short"
    with pytest.raises(ValueError):
        Index(100, CHUNK, [None, None])
    assert len(Index(0, CHUNK)) == 0


def test_backup_round_trip_and_listing(repo: Repository, tmp_path: Path) -> None:
    img = write_image(tmp_path / "a.raw", 2 * MiB + 4096, [(0, rand(100_000, 1)),
                                                            (MiB, text(300_000))])
    m1 = make_backup(repo, "vm1", {"vda": img}, now=at(2026, 1, 1))
    write_image(img, 2 * MiB + 4096, [(2 * MiB, rand(4096, 2))])
    m2 = make_backup(repo, "vm1", {"vda": img}, now=at(2026, 1, 2), parent=m1)
    m3 = make_backup(repo, "vm2", {"vda": img, "vdb": img}, now=at(2025, 12, 31))
    assert [m.id for m in repo.list_backups()] == [m3.id, m1.id, m2.id]
    assert [m.id for m in repo.list_backups("vm1")] == [m1.id, m2.id]
    assert repo.get_manifest("vm1", "latest").id == m2.id
    assert repo.get_manifest("vm1", m1.id) == m1
    assert m2.mode == "incremental" and m2.parent_id == m1.id
    assert m2.disks[0].stored_bytes < 10_000  # only the changed chunk was new
    idx = repo.load_index(m2, "vda")
    assert idx.data_bytes == m2.disks[0].data_bytes
    data = Path(img).read_bytes()
    out = bytearray(len(data))
    for slot, digest in idx.data_slots():
        chunk = repo.get_chunk(digest)
        out[slot * CHUNK:slot * CHUNK + len(chunk)] = chunk
    assert out == data
    assert Manifest.from_json(json.loads(json.dumps(m2.to_json()))) == m2


def test_not_found_errors(repo: Repository, tmp_path: Path) -> None:
    img = write_image(tmp_path / "a.raw", MiB, [(0, b"x")])
    m = make_backup(repo, "vm1", {"vda": img})
    with pytest.raises(errors.NotFound) as e:
        repo.get_manifest("vm1", "20990101T000000Z-000000")
    assert e.value.exit_code == 4
    with pytest.raises(errors.NotFound):
        repo.get_manifest("nosuchvm", "latest")
    with pytest.raises(errors.NotFound, match="disk"):
        repo.load_index(m, "vdz")


def test_commit_checks_indexes_and_refuses_twice(repo: Repository) -> None:
    bid = repo.new_backup_id(at(2026, 5, 1))
    assert bid.startswith("20260501T120000Z-")
    idx = Index(CHUNK * 2, CHUNK)
    rec = repo.write_index("vm1", bid, "vda", idx)
    disk = DiskRecord("vda", "/img", "raw", CHUNK * 2, 0, 0, 0, rec)
    m = Manifest(id=bid, domain="vm1", created="2026-05-01T12:00:00Z", mode="full",
                 reason="test", checkpoint=None, parent_checkpoint=None, parent_id=None,
                 started="2026-05-01T12:00:00Z", finished="2026-05-01T12:00:01Z",
                 duration_seconds=1.0, quiesced=False, freeze_seconds=None, domain_xml="<d/>",
                 checkpoint_xml=None, disks=[disk])
    bad = Manifest(**{**m.__dict__, "disks": [DiskRecord(**{**disk.__dict__, "name": "vdb"})]})
    with pytest.raises(errors.OperationFailed, match="index"):
        repo.commit(bad)
    repo.commit(m)
    with pytest.raises(errors.OperationFailed, match="already committed"):
        repo.commit(m)
    assert repo.list_backups() == [m]


@pytest.mark.parametrize("name", ["a/b", "..", "../x", ".hidden", "a\0b", "a\nb", "x" * 201, ""])
def test_bad_names_rejected(repo: Repository, name: str) -> None:
    for call in (lambda: repo.get_manifest(name, "latest"),
                 lambda: repo.get_manifest("vm1", name),
                 lambda: repo.write_index("vm1", "id1", name, Index(0, CHUNK)),
                 lambda: repo.lock_domain(name)):
        with pytest.raises(errors.InvalidName) as e:
            call()
        assert e.value.exit_code == 2
    assert not os.path.exists(os.path.join(repo.path, "backups", "x"))


def test_inspect_list_and_show(repo: Repository, tmp_path: Path) -> None:
    from backupkit.ops import inspect

    img = write_image(tmp_path / "a.raw", MiB, [(0, rand(3 * CHUNK, 1))])
    m1 = make_backup(repo, "vm1", {"vda": img, "vdb": img}, now=at(2026, 1, 1))
    m2 = make_backup(repo, "vm2", {"vda": img}, now=at(2026, 1, 2))
    doc = inspect.list_backups(repo, None)
    json.dumps(doc)
    assert [(b["domain"], b["id"]) for b in doc["backups"]] == [("vm1", m1.id), ("vm2", m2.id)]
    first = doc["backups"][0]
    assert first["disks"] == ["vda", "vdb"]
    assert first["logical_size"] == 2 * MiB
    assert first["stored_size"] == m1.stored_size > 0
    assert first["mode"] == "full" and first["created"] == "2026-01-01T12:00:00Z"
    assert inspect.list_backups(repo, "vm2")["backups"][0]["id"] == m2.id
    shown = inspect.show(repo, "vm1", "latest")
    json.dumps(shown)
    assert shown["id"] == m1.id and shown["version"] == 1
    assert shown["disks"][1]["name"] == "vdb" and shown["logical_size"] == 2 * MiB
    with pytest.raises(errors.NotFound):
        inspect.show(repo, "vm3", "latest")
