"""verify: finds damage, names exactly the affected backups, disks and byte ranges."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from backupkit import errors
from backupkit.ops.verify import verify
from backupkit.repo import Repository
from backupkit.repo.repository import chunk_key
from tests.repo.helpers import CHUNK, MiB, at, make_backup, rand, write_image


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)


@pytest.fixture
def setup(repo: Repository, tmp_path: Path) -> dict[str, Any]:
    """vm1: two backups sharing chunk A; vm2: one backup without it."""
    a = rand(CHUNK, 1)
    img1 = write_image(tmp_path / "1.raw", 2 * MiB, [(0, a), (MiB, rand(CHUNK, 2))])
    b1 = make_backup(repo, "vm1", {"vda": img1}, now=at(2026, 1, 1))
    write_image(img1, 2 * MiB, [(MiB + CHUNK, rand(CHUNK, 3))])
    b2 = make_backup(repo, "vm1", {"vda": img1, "vdb": img1}, now=at(2026, 1, 2))
    img2 = write_image(tmp_path / "2.raw", MiB, [(0, rand(3 * CHUNK, 4))])
    b3 = make_backup(repo, "vm2", {"vda": img2}, now=at(2026, 1, 3))
    return {"a": a, "b1": b1, "b2": b2, "b3": b3}


def flip(repo: Repository, data: bytes) -> None:
    p = Path(repo.path, chunk_key(repo.digest(data)))
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    p.write_bytes(raw)


def test_clean_repository(repo: Repository, setup: dict[str, Any]) -> None:
    for data in (False, True):
        rep = verify(repo, data=data)
        assert rep["ok"] and rep["backups_checked"] == 3 and rep["disks_checked"] == 4
        assert rep["chunks_checked"] == 6  # shared chunks counted once
    assert verify(repo, data=True)["bytes_read"] == 6 * CHUNK
    assert verify(repo, "vm2")["backups_checked"] == 1
    assert verify(repo, "vm1", "latest")["backups_checked"] == 1


def test_flipped_byte_names_affected_backups_only(repo: Repository,
                                                  setup: dict[str, Any]) -> None:
    flip(repo, setup["a"])
    assert verify(repo)["ok"]  # existence check does not read data
    with pytest.raises(errors.IntegrityError) as e:
        verify(repo, data=True)
    err = e.value
    assert err.exit_code == 5
    rep = err.report
    b1, b2 = setup["b1"], setup["b2"]
    assert {(d["domain"], d["id"]) for d in rep["damaged"]} == {("vm1", b1.id), ("vm1", b2.id)}
    assert b1.id in str(err) and b2.id in str(err) and "vm2" not in str(err)
    for d in rep["damaged"]:
        for disk in d["disks"]:
            assert disk["ranges"] == [{"offset": 0, "length": CHUNK}]
            assert "does not match its hash" in disk["problems"][0]
        assert {x["name"] for x in d["disks"]} == ({"vda"} if d["id"] == b1.id else {"vda", "vdb"})
    assert rep["chunks_damaged"] == 1
    assert rep["backups_checked"] == 3
    doc = err.to_json()
    assert doc["exit_code"] == 5 and doc["report"] == rep
    json.dumps(doc)
    # Only vm2 selected: clean.
    assert verify(repo, "vm2", data=True)["ok"]


def test_missing_chunk_merged_ranges_and_bad_manifest(repo: Repository, tmp_path: Path,
                                                      setup: dict[str, Any]) -> None:
    b3 = setup["b3"]
    index = repo.load_index(b3, "vda")
    for slot in (1, 2):
        digest = index[slot]
        assert digest is not None
        os.unlink(Path(repo.path, chunk_key(digest)))
    Path(repo.path, "backups", "vm1", setup["b1"].id, "manifest.json").write_text("{")
    with pytest.raises(errors.IntegrityError) as e:
        verify(repo)
    rep = e.value.report
    by_id = {d["id"]: d for d in rep["damaged"]}
    assert set(by_id) == {setup["b1"].id, b3.id}
    assert "not valid JSON" in by_id[setup["b1"].id]["problems"][0]
    disk = by_id[b3.id]["disks"][0]
    assert disk["ranges"] == [{"offset": CHUNK, "length": 2 * CHUNK}]
    assert disk["chunks"] == 2 and "missing" in disk["problems"][0]
    assert rep["backups_checked"] == 3  # the damage did not stop the rest


def test_damaged_index_reported(repo: Repository, setup: dict[str, Any]) -> None:
    b2 = setup["b2"]
    p = Path(repo.path, b2.disks[1].index["key"])
    p.write_bytes(p.read_bytes()[:-1] + b"!")
    with pytest.raises(errors.IntegrityError) as e:
        verify(repo, data=True)
    (d,) = e.value.report["damaged"]
    assert d["id"] == b2.id and [x["name"] for x in d["disks"]] == ["vdb"]
    assert d["disks"][0]["ranges"] == [{"offset": 0, "length": 2 * MiB}]


def test_verify_not_found(repo: Repository, setup: dict[str, Any]) -> None:
    with pytest.raises(errors.NotFound):
        verify(repo, "vm1", "20000101T000000Z-000000")


def test_a_newer_index_is_not_damage(repo: Repository, setup: dict[str, Any]) -> None:
    """A backup written by a newer backupkit: exit 1 (upgrade), never exit 5 (damaged)."""
    import hashlib
    import struct

    m = setup["b3"]
    key = Path(repo.path, m.disks[0].index["key"])
    raw = key.read_bytes()
    data = raw[:8] + struct.pack("<I", 9) + raw[12:]
    key.write_bytes(data)
    p = Path(repo.path, "backups", m.domain, m.id, "manifest.json")
    doc = json.loads(p.read_bytes())
    doc["disks"][0]["index"].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    p.write_text(json.dumps(doc))
    with pytest.raises(errors.UnsupportedFormat, match="version 9 is newer"):
        verify(repo)


def test_each_distinct_chunk_is_checked_once_and_the_progress_total_is_their_lengths(
        repo: Repository, setup: dict[str, Any]) -> None:
    """verify's ChunkTable (issue 21) counts what the dict of chunk -> length counted."""
    lengths: dict[bytes, int] = {}  # the oracle: as verify collected them before
    for m in repo.backups().manifests:
        for rec in m.disks:
            index = repo.load_index(m, rec.name)
            for _slot, digest, pieces in index.slots():
                if digest is not None:
                    lengths.setdefault(digest, index.chunk_size)
                for _, n, p in pieces:
                    if p is not None:
                        lengths.setdefault(p, n)
    started: list[tuple[str, int]] = []
    done: list[int] = []

    def progress_start(label: str, total: int) -> Any:
        started.append((label, total))
        return done.append

    rep = verify(repo, data=True, progress_start=progress_start)
    assert rep["ok"] and rep["chunks_checked"] == len(lengths)
    assert started == [("verify", sum(lengths.values()))]
    assert len(done) == len(lengths) and sum(done) == rep["bytes_read"]
    assert verify(repo)["chunks_checked"] == len(lengths)
