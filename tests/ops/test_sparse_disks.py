"""Huge sparse disks on a real running domain: holes cost nothing (issue 21).

A 2 TiB qcow2 disk with a few written extents is backed up (full, then
incremental), restored as qcow2 and raw, and compared with the reference (the
written regions hold their data, everything else reads as zeros); the restored
files and the index stay as small as the data.  Correctness only: the timings are
in bench/ (``python -m bench.run --sparse 2T,8T``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backupkit import virt
from backupkit.ops import backup as op
from backupkit.ops import restore as restore_op
from backupkit.ops import verify as verify_op
from backupkit.repo import Repository
from tests import rig

pytestmark = pytest.mark.libvirt
MiB, GiB, TiB = rig.MiB, rig.GiB, 1 << 40


@pytest.fixture
def conn(libvirt_conn: Any) -> virt.Connection:
    return virt.connect(rig.URI)


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_two_tib_sparse_disk_round_trip(
        make_domain: Callable[..., rig.TestDomain], repo_path: Path, conn: virt.Connection,
        scratch_dir: Path, tmp_path: Path) -> None:
    repo = Repository.init(str(repo_path), chunk_size=1 << 20)
    td = make_domain([("qcow2", 2 * TiB)])
    writes = [(0, 3 * MiB, 0x41), (700 * GiB + 4096, MiB, 0x42),
              (1536 * GiB + 5 * MiB, 2 * MiB + 512, 0x43), (2 * TiB - MiB, MiB, 0x44)]
    for off, n, byte in writes:
        td.write("vda", off, n, byte)
    ref1 = td.disk("vda").snapshot_reference(tmp_path / "ref1.raw")
    req = op.Request(domain=td.name, scratch_dir=str(scratch_dir))
    full = op.backup(repo, conn, req)
    assert full["mode"] == "full"
    # Only the data is read, and the index lists only the slots that hold it.
    assert full["read_bytes"] <= 9 * MiB
    m1 = repo.read_manifest(td.name, full["id"])
    index_file = repo_path / m1.disks[0].index["key"]
    assert struct.unpack_from("<I", index_file.read_bytes(), 8)[0] == 3
    assert index_file.stat().st_size < 4096
    idx = repo.load_index(m1, "vda")
    assert len(idx) == 2 * TiB // MiB and len(idx.chunks) <= 10
    assert idx.data_bytes == m1.disks[0].data_bytes <= 10 * MiB

    # A write into a hole, a rewrite of data, and data overwritten with zeros.
    td.write("vda", 1 * TiB, 64 * 1024, 0x51)
    td.write("vda", 700 * GiB + 4096, 4096, 0x52)
    td.write("vda", 0, MiB, 0x00)
    ref2 = td.disk("vda").snapshot_reference(tmp_path / "ref2.raw")
    inc = op.backup(repo, conn, req)
    assert inc["mode"] == "incremental", inc["reason"]
    assert inc["read_bytes"] <= 2 * MiB

    for bid, ref in ((full["id"], ref1), (inc["id"], ref2)):
        for fmt in ("qcow2", "raw"):
            target = tmp_path / f"restore-{bid}-{fmt}"
            restore_op.restore(repo, td.name, bid, str(target), fmt=fmt)
            out = target / f"vda.{fmt}"
            rig.compare(ref, out, fmt)
            # Sparse: what is on disk follows the data (plus qcow2 metadata), not 2 TiB.
            assert _allocated(out) <= 16 * MiB, (fmt, _allocated(out))
    res = verify_op.verify(repo, data=True)
    assert res["ok"], res


def test_a_disk_of_zeros_backs_up_to_an_empty_index(
        make_domain: Callable[..., rig.TestDomain], repo_path: Path, conn: virt.Connection,
        scratch_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 TiB never written: nothing is read or stored, the incremental changes nothing
    and, its checkpoint's bitmap being empty, asks the export for no block status."""
    from backupkit import nbd

    repo = Repository.init(str(repo_path), chunk_size=1 << 20)
    td = make_domain([("qcow2", 8 * TiB)])
    req = op.Request(domain=td.name, scratch_dir=str(scratch_dir))
    full = op.backup(repo, conn, req)
    assert full["read_bytes"] == 0 and full["disks"][0]["data_bytes"] == 0
    asked: list[int] = []
    real = nbd.Client.extents

    def counted(self: nbd.Client, *a: Any, **kw: Any) -> Any:
        asked.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(nbd.Client, "extents", counted)
    inc = op.backup(repo, conn, req)
    assert inc["mode"] == "incremental" and inc["read_bytes"] == 0
    assert asked == []
    # One write, and block status is back: the next incremental reads just that.
    td.write("vda", 5 * TiB, 4096, 0x61)
    inc2 = op.backup(repo, conn, req)
    assert asked and 0 < inc2["read_bytes"] <= 1 << 20
    monkeypatch.undo()
    idx = repo.load_index(repo.read_manifest(td.name, inc["id"]), "vda")
    assert idx.chunks == {} and idx.overlays == {}
    target = tmp_path / "out"
    restore_op.restore(repo, td.name, inc["id"], str(target), fmt="raw")
    assert (target / "vda.raw").stat().st_size == 8 * TiB
    assert _allocated(target / "vda.raw") == 0
    target = tmp_path / "out2"
    restore_op.restore(repo, td.name, "latest", str(target), fmt="qcow2")
    ref = td.disk("vda").snapshot_reference(tmp_path / "ref.raw")
    rig.compare(ref, target / "vda.qcow2", "qcow2")
