"""gc: frees what no committed backup references, leftovers of interrupted runs, nothing else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backupkit import errors
from backupkit.ops.gc import gc
from backupkit.ops.prune import Policy, prune
from backupkit.ops.restore import restore
from backupkit.ops.verify import verify
from backupkit.repo import Index, Repository
from tests.repo.helpers import CHUNK, MiB, at, make_backup, rand, write_image


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)


def chunk_files(repo: Repository) -> int:
    return sum(1 for _ in repo.storage.list("chunks/"))


def test_gc_after_prune(repo: Repository, tmp_path: Path) -> None:
    img = write_image(tmp_path / "a.raw", MiB, [(0, rand(2 * CHUNK, 1))])
    make_backup(repo, "vm1", {"vda": img}, now=at(2026, 1, 1))
    write_image(img, MiB, [(4 * CHUNK, rand(3 * CHUNK, 2))])
    m2 = make_backup(repo, "vm1", {"vda": img}, now=at(2026, 1, 2))
    assert chunk_files(repo) == 5
    assert gc(repo)["chunks_removed"] == 0
    prune(repo, "vm1", Policy(last=1))
    # The first backup's chunks are all still used by the second: nothing to free.
    assert gc(repo)["chunks_removed"] == 0
    write_image(img, MiB, [(0, bytes(2 * CHUNK))])
    make_backup(repo, "vm1", {"vda": img}, now=at(2026, 1, 3))
    prune(repo, "vm1", Policy(last=1))
    dry = gc(repo, dry_run=True)
    assert dry["chunks_removed"] == 2 and dry["chunk_bytes_freed"] > 2 * CHUNK
    assert chunk_files(repo) == 5
    res = gc(repo)
    varies = ("duration_seconds", "cutoff", "epoch")  # a dry run writes no epoch
    assert {k: v for k, v in res.items() if k not in varies} == \
        {k: v for k, v in dry.items() if k not in varies} | {"dry_run": False}
    assert dry["epoch"] is None and res["epoch"] == 3
    assert res["bytes_freed"] == res["chunk_bytes_freed"]
    assert chunk_files(repo) == 3
    verify(repo, data=True)
    restore(repo, "vm1", "latest", str(tmp_path / "out"), fmt="raw")
    assert Path(tmp_path / "out" / "vda.raw").read_bytes() == Path(img).read_bytes()
    assert m2.id not in {m.id for m in repo.list_backups()}


def test_gc_removes_leftovers(repo: Repository, tmp_path: Path) -> None:
    img = write_image(tmp_path / "a.raw", MiB, [(0, rand(CHUNK, 1))])
    m = make_backup(repo, "vm1", {"vda": img})
    # An interrupted backup: a chunk and an index, no manifest; plus tmp files.
    d, _ = repo.put_chunk(rand(CHUNK, 2))
    idx = Index(MiB, CHUNK)
    idx[0] = d
    repo.write_index("vm1", "20990101T000000Z-dead00", "vda", idx)
    Path(repo.path, "chunks", "00").mkdir(exist_ok=True)
    Path(repo.path, "chunks", "00", ".tmp-1-abc").write_bytes(b"x" * 100)
    Path(repo.path, "backups", "vm1", m.id, ".tmp-1-def").write_bytes(b"y" * 10)
    assert [x.id for x in repo.list_backups()] == [m.id]
    res = gc(repo)
    assert res["incomplete_backups_removed"] == ["vm1/20990101T000000Z-dead00"]
    assert res["chunks_removed"] == 1
    assert res["tmp_files_removed"] == 2 and res["tmp_bytes_freed"] == 110
    assert not Path(repo.path, "backups", "vm1", "20990101T000000Z-dead00").exists()
    assert not list(repo.storage.leftovers())
    verify(repo, data=True)


def test_gc_refuses_on_unreadable_manifest(repo: Repository, tmp_path: Path) -> None:
    img = write_image(tmp_path / "a.raw", MiB, [(0, rand(CHUNK, 1))])
    m = make_backup(repo, "vm1", {"vda": img})
    Path(repo.path, "backups", "vm1", m.id, "manifest.json").write_text("garbage")
    before = chunk_files(repo)
    with pytest.raises(errors.CorruptRepository, match="gc refuses") as e:
        gc(repo)
    assert e.value.exit_code == 5
    assert chunk_files(repo) == before
    assert os.path.exists(Path(repo.path, m.disks[0].index["key"]))


def test_gc_runs_beside_writers_but_not_beside_gc(repo: Repository) -> None:
    """gc no longer stops backups (docs/format.md, "Locks and gc"): a writer's and a
    domain lock let it run; another gc, or the exclusive lock, make it busy."""
    other = Repository.open(repo.path)
    with other.lock_writer(), other.lock_domain("vm1"):
        assert gc(repo)["chunks_removed"] == 0
    for cm in (other.lock_gc, other.lock_exclusive):
        with cm(), pytest.raises(errors.Busy) as e:
            gc(repo)
        assert e.value.exit_code == 3
        assert f"pid {os.getpid()} " in str(e.value)
