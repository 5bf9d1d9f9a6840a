"""copy_disk against a real qemu-nbd export."""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from backupkit import nbd, qemu
from backupkit.errors import OperationFailed
from backupkit.ops.copy import copy_disk
from backupkit.ops.gc import gc
from backupkit.ops.restore import restore
from backupkit.ops.verify import verify
from backupkit.repo import DiskRecord, Index, Manifest, Repository
from backupkit.repo.index import MAX_PIECES

KiB = 1 << 10
MiB = 1 << 20


def test_parent_of_another_size_is_refused(tmp_path: Path) -> None:
    """A disk resized between choosing the mode and the export: never a broken index."""
    img = tmp_path / "d.qcow2"
    qemu.create(str(img), "qcow2", 4 * MiB)
    qemu.bitmap_add(str(img), "b", fmt="qcow2")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 3M 64k", str(img)],
                   check=True, capture_output=True)
    repo = Repository.init(str(tmp_path / "r"), chunk_size=1 * MiB)
    with nbd.QemuNbd(str(img), "qcow2", str(tmp_path / "s"), bitmap="b") as srv, \
            srv.client(dirty=True) as client:
        with pytest.raises(OperationFailed, match="changed size"):
            copy_disk(client, repo, parent=Index(2 * MiB, 1 * MiB))
        res = copy_disk(client, repo, parent=Index(4 * MiB, 1 * MiB))
    assert res.read_bytes == 64 * 1024
    # The 64 KiB written are a piece over slot 3 (a hole in that parent); nothing else.
    assert res.index[3] is None and res.index.pieces(3) == [
        (0, 64 * 1024, res.index.pieces(3)[0][2])]
    assert [s for s, _, _ in res.index.slots()] == [3]


def _commit(repo: Repository, n: int, index: Index, parent: Manifest | None) -> Manifest:
    bid = f"2026010{n}T000000Z-00000{n}"
    rec = repo.write_index("vm", bid, "vda", index)
    now = f"2026-01-0{n}T00:00:00Z"
    m = Manifest(id=bid, domain="vm", created=now, mode="incremental" if parent else "full",
                 reason="test", checkpoint=None, parent_checkpoint=None,
                 parent_id=parent.id if parent else None, started=now, finished=now,
                 duration_seconds=0.0, quiesced=False, freeze_seconds=None,
                 domain_xml="<domain/>", checkpoint_xml=None,
                 disks=[DiskRecord(name="vda", source="d.qcow2", format="qcow2",
                                   virtual_size=index.virtual_size, read_bytes=0,
                                   stored_bytes=0, data_bytes=index.data_bytes, index=rec)])
    repo.commit(m)
    return m


def _io(img: Path, *cmds: str) -> None:
    args = [a for c in cmds for a in ("-c", c)]
    subprocess.run(["qemu-io", "-f", "qcow2", *args, str(img)], check=True, capture_output=True)


def test_incremental_chain_of_pieces_restores_every_point(tmp_path: Path) -> None:
    """Partly dirty slots become pieces over the parent's chunk; every backup restores equal.

    Covers data and zero pieces, a piece replacing an older one, a short last slot,
    a slot stored whole again, and the MAX_PIECES cap forcing a whole-slot read.
    Then the full backup is removed and gc run: the pieced backups still restore.
    """
    size = 4 * MiB + 192 * KiB
    raw = tmp_path / "src.raw"
    raw.write_bytes(random.Random(1).randbytes(size))
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(img)],
                   check=True)
    repo = Repository.init(str(tmp_path / "r"), chunk_size=1 * MiB)
    sock = str(tmp_path / "s")
    # Slot 0 gets three separate 64 KiB pieces per step (gaps > 256 KiB are not coalesced).
    spread = [f"write -P {n} {o}k 64k" for n, o in ((11, 0), (12, 384), (13, 768))]
    steps: list[list[str]] = [
        [],  # the full backup
        ["write -P 1 3136k 64k", "write -z 1152k 64k", "write -P 2 2M 1M",
         "write -P 3 4M 64k", *spread],
        ["write -P 4 3072k 256k", "write -P 5 1216k 64k",
         *(c.replace("-P 1", "-P 2") for c in spread)],
        [f"write -P 6 {o}k 64k" for o in (128, 512, 896)],
        [f"write -P 7 {o}k 64k" for o in (192, 576, 960)] + ["write -z 4160k 32k"],
    ]
    expected: list[bytes] = []
    manifests: list[Manifest] = []
    index: Index | None = None
    reads: list[int] = []
    for n, cmds in enumerate(steps, 1):
        if cmds:
            _io(img, *cmds)
        dirty = n > 1
        with nbd.QemuNbd(str(img), "qcow2", sock, bitmap="b" if dirty else None) as srv, \
                srv.client(dirty=dirty) as client:
            res = copy_disk(client, repo, parent=index)
        if dirty:
            qemu.bitmap_remove(str(img), "b", fmt="qcow2")
        qemu.bitmap_add(str(img), "b", fmt="qcow2")  # a fresh bitmap: tracks the next step's writes
        reads.append(res.read_bytes)
        index = res.index
        manifests.append(_commit(repo, n, index, manifests[-1] if manifests else None))
        expected.append(_raw(img, tmp_path))
        assert len(index.pieces(0)) <= MAX_PIECES
    assert index is not None
    # Step 2: slot 2 was written whole (a chunk again); slot 0 has the three pieces.
    second = repo.load_index(manifests[1], "vda")
    assert second.pieces(2) == [] and second[2] != repo.load_index(manifests[0], "vda")[2]
    assert len(second.pieces(0)) == 3 and len(second.pieces(1)) == 1
    assert second.pieces(1)[0][2] is None  # the zeroed range, stored as nothing
    # Step 3's 256 KiB write covers step 2's piece in slot 3: one piece left there.
    assert len(repo.load_index(manifests[2], "vda").pieces(3)) == 1
    # Step 5 would have put a ninth piece on slot 0: the slot was stored whole again, its
    # clean part read back from the repository, so NBD still served only the dirty ranges.
    assert index.pieces(0) == [] and index[0] != second[0]
    # Slot 0's three writes, and the short tail slot whole (its clean part is within the gap).
    assert reads[4] == 3 * 64 * KiB + 192 * KiB
    assert reads[1] < 2 * MiB  # only the dirty ranges (and slot 2, all dirty) were read
    assert verify(repo, data=True)["ok"]

    for m, want in zip(manifests, expected, strict=True):
        for fmt in ("raw", "qcow2"):
            out = tmp_path / f"out-{m.id}-{fmt}"
            done: list[int] = []
            res = restore(repo, "vm", m.id, str(out), fmt=fmt, progress=done.append)
            assert sum(done) == res["data_bytes"]  # progress ends at 100 %
            got = _raw(out / f"vda.{fmt}", tmp_path, fmt)
            assert got == want, f"{m.id} as {fmt} differs"

    # gc frees exactly the chunks no remaining backup names as a slot's chunk or a piece.
    indexes = [repo.load_index(m, "vda") for m in manifests]
    for k in range(3):
        repo.remove_backup(manifests[k])
        still = set().union(*(i.digests() for i in indexes[k + 1:]))
        assert gc(repo)["chunks_removed"] == len(indexes[k].digests() - still)
        assert verify(repo, data=True)["ok"]
    out = tmp_path / "last"
    restore(repo, "vm", manifests[-1].id, str(out), fmt="raw")
    assert (out / "vda.raw").read_bytes() == expected[-1]
    assert verify(repo, data=True)["ok"]


def test_zeros_over_a_hole_change_nothing(tmp_path: Path) -> None:
    """Zeroing part of a hole slot adds no piece; data over a hole is a piece over nothing."""
    img = tmp_path / "d.qcow2"
    qemu.create(str(img), "qcow2", 2 * MiB)
    repo = Repository.init(str(tmp_path / "r"), chunk_size=1 * MiB)
    sock = str(tmp_path / "s")
    with nbd.QemuNbd(str(img), "qcow2", sock) as srv, srv.client() as client:
        full = copy_disk(client, repo, parent=None).index
    assert list(full.slots()) == []
    qemu.bitmap_add(str(img), "b", fmt="qcow2")
    _io(img, "write -z 64k 64k", "write -P 9 1088k 64k")
    with nbd.QemuNbd(str(img), "qcow2", sock, bitmap="b") as srv, \
            srv.client(dirty=True) as client:
        inc = copy_disk(client, repo, parent=full)
    assert inc.index.pieces(0) == [] and inc.index[0] is None
    assert [(o, n) for o, n, _ in inc.index.pieces(1)] == [(64 * KiB, 64 * KiB)]
    assert inc.index.data_bytes == 64 * KiB and inc.read_bytes == 64 * KiB


def _raw(path: Path, tmp: Path, fmt: str = "qcow2") -> bytes:
    out = tmp / f"conv-{time.monotonic_ns()}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out)],
                   check=True)
    data = out.read_bytes()
    os.unlink(out)
    return data
