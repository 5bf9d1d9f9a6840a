"""Damaged backups and the backups after them (issue 17, items 2, 3, 8), on real domains.

A damaged chunk must not poison the backups after it: verify --data moves it to
quarantine, the next backup stores the data afresh (full, saying why), and
verify --repair mends the older backups from it.  A latest backup that cannot be
read makes the next backup full, never a failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backupkit.repo import Repository
from tests import rig
from tests.faults.conftest import Bk, MakeDomain, MiB, write_random

pytestmark = pytest.mark.libvirt

KiB = 1024


def _chunk_file(repo: Path, digest: bytes) -> Path:
    return repo / "chunks" / digest.hex()[:2] / digest.hex()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x08
    path.write_bytes(bytes(data))


def test_damaged_chunks_are_quarantined_then_stored_afresh_and_repaired(
        make_domain: MakeDomain, bk: Bk, libvirt_conn: object, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 16 * MiB)], running=False)
    # 1 MiB chunks: a 64 KiB write inside a slot becomes a piece over the slot's chunk.
    b = Bk(tmp_path, tmp_path / "repo1m", bk.scratch, bk.config)
    assert b.run("init").returncode == 0
    write_random(td, "vda", 0, 4 * MiB, 1, tmp_path)
    full = b.backup(td)
    write_random(td, "vda", MiB + 256 * KiB, 64 * KiB, 2, tmp_path)
    inc = b.backup(td)
    assert inc["mode"] == "incremental", inc["reason"]

    repo = Repository.open(str(b.repo))
    full_index = repo.load_index(repo.read_manifest(td.name, full["id"]), "vda")
    inc_index = repo.load_index(repo.read_manifest(td.name, inc["id"]), "vda")
    (piece,) = [d for _o, _n, d in inc_index.pieces(1) if d is not None]
    slot2 = full_index[2]
    assert slot2 is not None and inc_index[2] == slot2
    _flip(_chunk_file(b.repo, piece))  # only the incremental needs it
    _flip(_chunk_file(b.repo, slot2))  # both need it

    # verify --data names the damage and moves both chunks aside.
    cp = b.run("--json", "verify", "--data")
    assert cp.returncode == 5, cp.stderr
    report = json.loads(cp.stdout)["error"]["report"]
    assert {q["chunk"] for q in report["chunks_quarantined"]} == {piece.hex(), slot2.hex()}
    lacks = {x["id"]: set(x["disks"][0]["missing_chunks"]) for x in report["damaged"]}
    assert lacks == {full["id"]: {slot2.hex()}, inc["id"]: {piece.hex(), slot2.hex()}}
    assert not _chunk_file(b.repo, piece).exists()
    assert len(list((b.repo / "quarantine").iterdir())) == 2
    # Without --data too, the damaged backups name the chunks they lack.
    cp = b.run("verify", td.name, inc["id"])
    assert cp.returncode == 5 and "quarantined" in cp.stderr, cp.stderr

    # The operator's obvious fix: a new backup.  It cannot be an incremental over
    # chunks that are gone: it is full, says why, and restores equal to the disk.
    new = b.backup(td)
    assert new["mode"] == "full", new
    assert "quarantined" in new["reason"] and inc["id"] in new["reason"]
    target = tmp_path / "restore-new"
    b.json("restore", td.name, new["id"], "--target", str(target), "--format", "raw")
    rig.compare(b.refs[new["id"]]["vda"], target / "vda.raw", "raw")

    # The full backup stored slot 2's chunk again (the old backups have it back);
    # the piece lies inside a slot the full backup stored whole: --repair cuts it out.
    cp = b.run("--json", "verify", "--data")
    assert cp.returncode == 5, cp.stderr
    assert [x["id"] for x in json.loads(cp.stdout)["error"]["report"]["damaged"]] == [inc["id"]]
    repaired = b.json("verify", "--repair")
    assert repaired["chunks_repaired"] == [piece.hex()]
    b.survivors(td)  # every backup verifies with --data and restores equal to its disk
    gc = b.json("gc")
    assert gc["quarantined_removed"] == 2
    assert not list((b.repo / "quarantine").iterdir())
    nxt = b.backup(td)
    assert nxt["mode"] == "incremental", nxt["reason"]


@pytest.mark.parametrize("damage", ["manifest", "index"])
def test_unreadable_latest_backup_next_backup_is_full(
        make_domain: MakeDomain, bk: Bk, libvirt_conn: object, tmp_path: Path,
        damage: str) -> None:
    td = make_domain([("qcow2", 16 * MiB)], running=False)
    write_random(td, "vda", 0, MiB, 1, tmp_path)
    first = bk.backup(td)
    d = bk.repo / "backups" / td.name / first["id"]
    if damage == "manifest":
        (d / "manifest.json").write_bytes(b'{"version": 1, "id"')
    else:
        p = d / "vda.index"
        p.write_bytes(p.read_bytes()[:40])
    write_random(td, "vda", 2 * MiB, MiB, 2, tmp_path)
    cp = bk.run("backup", td.name, "--mode", "incremental")
    assert cp.returncode == 1 and first["id"] in cp.stderr, cp.stderr
    res = bk.backup(td)
    assert res["mode"] == "full"
    assert first["id"] in res["reason"], res["reason"]
    assert any(first["id"] in w for w in res["warnings"])
    # The damaged backup goes the supported way; everything else is as after any fault.
    bk.json("delete", td.name, first["id"])
    del bk.refs[first["id"]]
    bk.survivors(td)
    write_random(td, "vda", 4 * MiB, MiB, 3, tmp_path)
    assert bk.backup(td)["mode"] == "incremental"
    bk.survivors(td)
    bk.nothing_left(td, libvirt_conn)


def test_restore_define_checks_the_name_before_writing(
        make_domain: MakeDomain, bk: Bk, libvirt_conn: object, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 16 * MiB)], running=False)
    write_random(td, "vda", 0, MiB, 1, tmp_path)
    bk.backup(td)
    target = tmp_path / "restored"
    cp = bk.run("restore", td.name, "--target", str(target), "--define", "a/b")
    assert cp.returncode == 2, cp.stderr
    assert "invalid domain name 'a/b'" in cp.stderr
    assert not target.exists()
