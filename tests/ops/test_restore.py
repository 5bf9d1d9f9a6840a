"""restore from synthetic backups: equal to the source (qemu-img compare), sparse, safe."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from backupkit import errors
from backupkit.ops.restore import restore
from backupkit.repo import Repository
from tests.repo.helpers import CHUNK, KiB, MiB, allocated, at, make_backup, rand, text, write_image


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)


def compare(a: str | Path, b: str | Path) -> None:
    subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)], check=True)


def qemu_info(path: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    doc: dict[str, object] = json.loads(out)
    return doc


@pytest.fixture
def three_backups(repo: Repository, tmp_path: Path) -> list[tuple[str, bytes, bytes]]:
    """Three points in time of a two-disk domain: (id, vda bytes, vdb bytes)."""
    vda = write_image(tmp_path / "vda.raw", 8 * MiB + 12 * KiB,
                      [(0, rand(300 * KiB, 1)), (3 * MiB + 5, text(700 * KiB)),
                       (8 * MiB, rand(12 * KiB, 2))])
    vdb = write_image(tmp_path / "vdb.raw", 4 * MiB, [(MiB, rand(64 * KiB, 3))])
    points = []
    parent = None
    for i, writes in enumerate([[], [(100 * KiB, rand(8 * KiB, 4)), (6 * MiB, text(KiB, 5))],
                                [(0, bytes(300 * KiB)), (7 * MiB, rand(MiB, 6))]]):
        write_image(vda, 8 * MiB + 12 * KiB, writes)
        write_image(vdb, 4 * MiB, [(2 * MiB + i, b"gen%d" % i)])
        parent = make_backup(repo, "vm1", {"vda": vda, "vdb": vdb}, now=at(2026, 1, 1 + i),
                             parent=parent)
        points.append((parent.id, Path(vda).read_bytes(), Path(vdb).read_bytes()))
    return points


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_every_point_in_time_restores_equal(repo: Repository, tmp_path: Path,
                                            three_backups: list[tuple[str, bytes, bytes]],
                                            fmt: str) -> None:
    done: list[int] = []
    for bid, vda, vdb in three_backups:
        out = tmp_path / f"out-{bid}"
        res = restore(repo, "vm1", bid, str(out), fmt=fmt, progress=done.append)
        assert {d["name"] for d in res["disks"]} == {"vda", "vdb"}
        assert sorted(os.listdir(out)) == [f"vda.{fmt}", f"vdb.{fmt}"]  # no tmp left
        for name, expected in (("vda", vda), ("vdb", vdb)):
            path = out / f"{name}.{fmt}"
            (tmp_path / "expected.raw").write_bytes(expected)
            compare(tmp_path / "expected.raw", path)
            info = qemu_info(path)
            assert info["format"] == fmt
            assert info["virtual-size"] == len(expected)
            assert "backing-filename" not in info
    assert sum(done) > 0


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_restore_is_sparse(repo: Repository, tmp_path: Path, fmt: str) -> None:
    img = write_image(tmp_path / "big.raw", 256 * MiB, [(10 * MiB, rand(MiB, 1)),
                                                        (200 * MiB + 4 * KiB, b"x" * 100)])
    make_backup(repo, "vm1", {"vda": img})
    res = restore(repo, "vm1", "latest", str(tmp_path / "out"), fmt=fmt)
    path = tmp_path / "out" / f"vda.{fmt}"
    assert allocated(path) < 3 * MiB
    assert res["disks"][0]["virtual_size"] == 256 * MiB
    compare(img, path)


def test_refuses_to_overwrite_and_force(repo: Repository, tmp_path: Path) -> None:
    img = write_image(tmp_path / "a.raw", MiB, [(0, rand(KiB, 1))])
    make_backup(repo, "vm1", {"vda": img})
    out = tmp_path / "out"
    out.mkdir()
    (out / "vda.raw").write_bytes(b"precious")
    with pytest.raises(errors.UsageError, match="already exists") as e:
        restore(repo, "vm1", "latest", str(out), fmt="raw")
    assert "\n" not in str(e.value)
    assert (out / "vda.raw").read_bytes() == b"precious"
    assert os.listdir(out) == ["vda.raw"]
    restore(repo, "vm1", "latest", str(out), fmt="raw", force=True)
    compare(img, out / "vda.raw")


def test_failed_restore_leaves_nothing(repo: Repository, tmp_path: Path) -> None:
    img = write_image(tmp_path / "a.raw", 2 * MiB, [(0, rand(MiB, 1))])
    m = make_backup(repo, "vm1", {"vda": img, "vdb": img})
    digest = repo.load_index(m, "vda")[5]
    assert digest is not None
    os.unlink(Path(repo.path, "chunks", digest.hex()[:2], digest.hex()))
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"out-{fmt}"
        with pytest.raises(errors.CorruptRepository, match="missing"):
            restore(repo, "vm1", m.id, str(out), fmt=fmt)
        assert os.listdir(out) == []


def test_disk_selection_and_not_found(repo: Repository, tmp_path: Path) -> None:
    img = write_image(tmp_path / "a.raw", MiB, [(0, b"abc")])
    m = make_backup(repo, "vm1", {"vda": img, "vdb": img})
    res = restore(repo, "vm1", m.id, str(tmp_path / "o"), fmt="raw", disks=["vdb"])
    assert [d["name"] for d in res["disks"]] == ["vdb"]
    assert os.listdir(tmp_path / "o") == ["vdb.raw"]
    with pytest.raises(errors.NotFound) as e:
        restore(repo, "vm1", m.id, str(tmp_path / "o2"), disks=["vdz"])
    assert e.value.exit_code == 4
    with pytest.raises(errors.NotFound):
        restore(repo, "vm1", "20200101T000000Z-abcdef", str(tmp_path / "o3"))
    with pytest.raises(errors.UsageError):
        restore(repo, "vm1", m.id, str(tmp_path / "o4"), fmt="vmdk")
    assert not (tmp_path / "o2").exists()


def test_empty_disk(repo: Repository, tmp_path: Path) -> None:
    img = write_image(tmp_path / "a.raw", 3 * MiB)
    make_backup(repo, "vm1", {"vda": img})
    for fmt in ("raw", "qcow2"):
        restore(repo, "vm1", "latest", str(tmp_path / fmt), fmt=fmt)
        compare(img, tmp_path / fmt / f"vda.{fmt}")


@pytest.mark.root
def test_restore_into_full_filesystem(repo: Repository, tmp_path: Path,
                                      small_fs: Path) -> None:
    img = write_image(tmp_path / "a.raw", 4 * MiB, [(0, rand(3 * MiB, 1))])
    make_backup(repo, "vm1", {"vda": img})
    with pytest.raises(errors.NoSpace, match="no space left"):
        restore(repo, "vm1", "latest", str(small_fs), fmt="raw")
    assert os.listdir(small_fs) == []


@pytest.mark.parametrize(("cpus", "want"), [(1, 2), (2, 2), (6, 6), (64, 8)])
def test_default_workers_follow_the_usable_cpus(monkeypatch: pytest.MonkeyPatch, cpus: int,
                                                want: int) -> None:
    from backupkit.ops import restore as restore_mod

    monkeypatch.setattr(restore_mod.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert restore_mod.default_workers() == want
