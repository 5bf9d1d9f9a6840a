"""Damage through the repository API: backup_parent, quarantine, delete_backup (issue 17)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backupkit import errors
from backupkit.repo import Repository
from backupkit.repo.repository import chunk_key
from tests.repo.helpers import CHUNK, MiB, at, make_backup, rand, write_image


def _two_backups(repo: Repository, tmp_path: Path) -> tuple[str, str]:
    img = write_image(tmp_path / "a.raw", MiB, [(0, rand(2 * CHUNK, 1))])
    first = make_backup(repo, "vm1", {"vda": img}, now=at(2026, 11, 1))
    write_image(img, MiB, [(4 * CHUNK, rand(CHUNK, 2))])
    second = make_backup(repo, "vm1", {"vda": img}, now=at(2026, 11, 2))
    return first.id, second.id


def test_backup_parent(repo: Repository, tmp_path: Path) -> None:
    assert repo.backup_parent("vm1") == (None, None)
    first, second = _two_backups(repo, tmp_path)
    latest, why = repo.backup_parent("vm1")
    assert latest is not None and latest.id == second and why is None
    # A chunk of the latest backup quarantined: no parent, and why.
    digest = repo.load_index(latest, "vda")[4]
    assert digest is not None
    assert repo.quarantine_chunk(digest) is None  # a good chunk goes back
    data = bytearray(Path(repo.path, chunk_key(digest)).read_bytes())
    data[-1] ^= 1
    Path(repo.path, chunk_key(digest)).write_bytes(bytes(data))
    key = repo.quarantine_chunk(digest)
    assert key is not None and key.startswith(f"quarantine/{digest.hex()}.")
    assert repo.lost_chunks() == {digest}
    parent, why = repo.backup_parent("vm1")
    assert parent is None and why is not None and "quarantined" in why and second in why
    with pytest.raises(errors.CorruptRepository, match="quarantined"):
        repo.get_chunk(digest)
    # The same data stored again: the chunk is no longer lost, the backup whole again.
    repo.put_chunk(rand(CHUNK, 2))
    repo.storage.flush()
    assert repo.lost_chunks() == set()
    assert repo.backup_parent("vm1")[0] is not None
    # An unreadable latest manifest: no parent, and why (naming it).
    Path(repo.path, "backups", "vm1", second, "manifest.json").write_bytes(b"[")
    parent, why = repo.backup_parent("vm1")
    assert parent is None and why is not None and second in why
    assert [m.id for m in repo.backups("vm1").manifests] == [first]


def test_delete_backup_whatever_its_manifest_is(repo: Repository, tmp_path: Path) -> None:
    first, second = _two_backups(repo, tmp_path)
    manifest = Path(repo.path, "backups", "vm1", first, "manifest.json")
    manifest.unlink()
    os.mkfifo(manifest)
    freed, damage = repo.delete_backup("vm1", first)
    assert damage is not None and "not a regular file" in damage and freed > 0
    assert not Path(repo.path, "backups", "vm1", first).exists()
    with pytest.raises(errors.NotFound):
        repo.delete_backup("vm1", first)
    freed, damage = repo.delete_backup("vm1", second)
    assert damage is None
    assert repo.backups().manifests == []
