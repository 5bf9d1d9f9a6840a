"""Tampering with an encrypted repository, found through the real command line: a flipped
bit in a chunk, an index or a manifest, a chunk swapped for another valid chunk, and a
manifest moved to another domain's place.  Each is exit 5 naming the backup hit, and
every other backup still verifies and restores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from backupkit.repo import Manifest, Repository, crypto
from backupkit.repo.repository import chunk_key, index_key, manifest_key
from tests.conftest import run_cli
from tests.repo.helpers import CHUNK, make_backup, rand, write_image


def flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x04
    path.write_bytes(bytes(data))


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        (tmp_path / "pass").write_text("tamper test\n")
        self.repo = Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK,
                                    encryption=crypto.Passphrase(file=str(tmp_path / "pass")))
        self.root = Path(self.repo.path)
        self.images = {
            "dom-a": write_image(tmp_path / "a.raw", 4 * CHUNK,
                                 [(0, rand(2 * CHUNK, 1)), (3 * CHUNK, rand(CHUNK, 2))]),
            "dom-b": write_image(tmp_path / "b.raw", 4 * CHUNK,
                                 [(0, rand(3 * CHUNK, 3))]),
        }
        self.backups: dict[str, Manifest] = {
            d: make_backup(self.repo, d, {"vda": img}) for d, img in self.images.items()}

    def cli(self, *args: str) -> tuple[int, Any]:
        cp = run_cli("--repo", str(self.root), "--passphrase-file", str(self.tmp / "pass"),
                     "--json", *args)
        return cp.returncode, json.loads(cp.stdout)

    def chunks(self, domain: str) -> list[bytes]:
        m = self.backups[domain]
        return sorted(d for d in self.repo.load_index(m, "vda").digests() if d)

    def restores(self, domain: str) -> bool:
        target = self.tmp / f"restore-{domain}"
        shutil.rmtree(target, ignore_errors=True)
        rc, _ = self.cli("restore", domain, "latest", "--target", str(target),
                         "--format", "raw")
        if rc:
            return False
        return (target / "vda.raw").read_bytes() == Path(self.images[domain]).read_bytes()


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def damaged(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(d["domain"], d["id"]) for d in doc["error"]["report"]["damaged"]]


def test_flipped_bit_in_a_chunk(rig: Rig) -> None:
    victim = rig.chunks("dom-a")[0]
    flip(rig.root / chunk_key(victim))
    rc, doc = rig.cli("verify", "--data")
    assert rc == 5, doc
    assert damaged(doc) == [("dom-a", rig.backups["dom-a"].id)]
    assert "fails authentication" in json.dumps(doc)
    assert rig.restores("dom-b")
    rc, _ = rig.cli("restore", "dom-a", "latest", "--target", str(rig.tmp / "x"))
    assert rc == 5


def test_chunk_swapped_for_another_valid_chunk(rig: Rig) -> None:
    a, b = rig.chunks("dom-a")[0], rig.chunks("dom-b")[0]
    shutil.copyfile(rig.root / chunk_key(b), rig.root / chunk_key(a))
    rc, doc = rig.cli("verify", "--data")
    assert rc == 5, doc
    assert damaged(doc) == [("dom-a", rig.backups["dom-a"].id)]
    assert f"chunk {a.hex()} fails authentication" in json.dumps(doc)
    assert rig.restores("dom-b")


def test_flipped_bit_in_an_index(rig: Rig) -> None:
    m = rig.backups["dom-a"]
    flip(rig.root / index_key("dom-a", m.id, "vda"))
    rc, doc = rig.cli("verify")
    assert rc == 5, doc
    assert damaged(doc) == [("dom-a", m.id)]
    assert "index" in json.dumps(doc)
    assert rig.restores("dom-b")


def test_flipped_bit_in_a_manifest(rig: Rig) -> None:
    m = rig.backups["dom-a"]
    flip(rig.root / manifest_key("dom-a", m.id))
    rc, doc = rig.cli("verify")
    assert rc == 5, doc
    assert damaged(doc) == [("dom-a", m.id)]
    assert "manifest" in json.dumps(doc) and "fails authentication" in json.dumps(doc)
    rc, listing = rig.cli("list")
    assert rc == 0 and [b["domain"] for b in listing["backups"]] == ["dom-b"]
    assert [d["id"] for d in listing["damaged"]] == [m.id]
    assert rig.restores("dom-b")


def test_manifest_moved_to_another_domains_place(rig: Rig) -> None:
    a, b = rig.backups["dom-a"], rig.backups["dom-b"]
    # dom-a's backup directory, manifest and indexes, put among dom-b's backups.
    shutil.copytree(rig.root / "backups" / "dom-a" / a.id, rig.root / "backups" / "dom-b" / a.id)
    rc, doc = rig.cli("verify", "dom-b")
    assert rc == 5, doc
    assert damaged(doc) == [("dom-b", a.id)]
    assert "fails authentication" in json.dumps(doc)
    # The real backups of both domains are untouched.
    rc, doc = rig.cli("verify", "dom-b", b.id)
    assert rc == 0, doc
    assert rig.restores("dom-a")
    rc, _ = rig.cli("restore", "dom-b", b.id, "--target", str(rig.tmp / "rb"), "--format", "raw")
    assert rc == 0
