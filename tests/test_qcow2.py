"""Qcow2Writer: images written from several threads in random order, checked by real qemu-img."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from backupkit.ops.restore import restore
from backupkit.qcow2 import Qcow2Writer, check_geometry
from backupkit.repo import Repository
from tests.repo.helpers import KiB, MiB, allocated, make_backup, rand, write_image

Writes = list[tuple[int, bytes]]
K64 = 64 * KiB
GiB = 1024 * MiB


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=check)


def runs(size: int, cs: int, spans: list[tuple[int, int]], seed: int) -> Writes:
    """One write per (first cluster, clusters) span, cut short at the end of the disk."""
    out = []
    for i, (first, count) in enumerate(spans):
        off = first * cs
        out.append((off, rand(min(count * cs, size - off), seed * 1000 + i)))
    return out


def random_runs(size: int, cs: int, seed: int, longest: int, skip: float) -> Writes:
    """Writes of 1..longest clusters covering the disk, skipping a fraction of the runs."""
    r = random.Random(seed)
    clusters = -(-size // cs)
    spans = []
    c = 0
    while c < clusters:
        n = min(r.randint(1, longest), clusters - c)
        if r.random() >= skip:
            spans.append((c, n))
        c += n
    return runs(size, cs, spans, seed)


def write_qcow2(path: Path, size: int, cs: int, writes: Writes, *, threads: int = 4,
                finish: bool = True, seed: int = 0) -> None:
    order = list(writes)
    random.Random(seed).shuffle(order)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        w = Qcow2Writer(fd, size, cs)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda wr: w.write(*wr), order))
        if finish:
            w.finish()
    finally:
        os.close(fd)


def header(path: Path) -> dict[str, int]:
    with open(path, "rb") as f:
        raw = f.read(104)
    names = ("magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits",
             "size", "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
             "refcount_table_clusters", "nb_snapshots", "snapshots_offset", "incompatible",
             "compatible", "autoclear", "refcount_order", "header_length")
    values = struct.unpack(">IIQIIQIIQQIIQQQQII", raw)
    return dict(zip(names, values, strict=True))


def refcount_blocks(path: Path, h: dict[str, int]) -> int:
    cs = 1 << h["cluster_bits"]
    with open(path, "rb") as f:
        f.seek(h["refcount_table_offset"])
        raw = f.read(h["refcount_table_clusters"] * cs)
    return sum(1 for (e,) in struct.iter_unpack(">Q", raw) if e)


def check_image(tmp_path: Path, path: Path, size: int, cs: int, writes: Writes) -> None:
    """qemu-img check clean, info right, content equal to the writes on a zero disk."""
    cp = qemu_img("check", "--output=json", "-f", "qcow2", str(path), check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    report: dict[str, Any] = json.loads(cp.stdout)
    assert report["check-errors"] == 0
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    data_clusters = sum(-(-len(d) // cs) for _, d in writes)
    assert report.get("allocated-clusters", 0) == data_clusters

    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)  # probed
    rounded = -(-size // 512) * 512  # as qemu-img create stores it
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == rounded
    assert info["cluster-size"] == cs
    assert "backing-filename" not in info
    specific = info["format-specific"]["data"]
    assert specific["compat"] == "1.1" and specific["refcount-bits"] == 16
    assert not specific["corrupt"] and not info.get("dirty-flag")

    expected = Path(write_image(tmp_path / f"{path.name}.expected", rounded, writes))
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(expected), str(path))
    if rounded <= 16 * MiB:  # and byte for byte, through qemu's own reader
        back = tmp_path / f"{path.name}.back"
        qemu_img("convert", "-f", "qcow2", "-O", "raw", str(path), str(back))
        assert back.read_bytes() == expected.read_bytes()


CASES: dict[str, tuple[int, int, Callable[[int, int], Writes]]] = {
    "1MiB-every-other-cluster": (
        MiB, K64, lambda s, c: runs(s, c, [(i, 1) for i in range(0, 16, 2)], 1)),
    "not-cluster-aligned": (
        3 * K64 + 4608, K64, lambda s, c: runs(s, c, [(0, 1), (1, 2), (3, 1)], 2)),
    "not-sector-aligned": (
        200_000, K64, lambda s, c: runs(s, c, [(3, 1), (0, 1)], 3)),
    "no-writes": (8 * MiB, K64, lambda s, c: []),
    "zero-size": (0, K64, lambda s, c: []),
    # 3 L2 tables (512 MiB each at 64 KiB clusters); one write spans two of them.
    "sparse-1GiB-three-L2": (
        GiB + 1536, K64, lambda s, c: runs(s, c, [(0, 2), (8192 - 1, 2), (12000, 1),
                                                  (16384 - 3, 3), (16384, 1)], 4)),
    # 4 KiB clusters: L2 tables of 2 MiB, refcount blocks of 2048 clusters (8 MiB): two.
    "4K-clusters-several-refcount-blocks": (
        12 * MiB + 512, 4096, lambda s, c: random_runs(s, c, 5, 40, 0.1)),
    # 512-byte clusters: L1 of 6 clusters, 80 refcount blocks, refcount table of 2 clusters.
    "512-clusters-multi-cluster-tables": (
        10 * MiB + 300, 512, lambda s, c: random_runs(s, c, 6, 40, 0.05)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_qemu_img_accepts_and_reads_back(tmp_path: Path, case: str) -> None:
    size, cs, make = CASES[case]
    writes = make(size, cs)
    path = tmp_path / "img.qcow2"
    write_qcow2(path, size, cs, writes, seed=len(case))
    check_image(tmp_path, path, size, cs, writes)
    h = header(path)
    assert h["magic"] == 0x514649FB and h["version"] == 3 and h["header_length"] == 112
    assert (h["backing_file_offset"], h["nb_snapshots"], h["crypt_method"]) == (0, 0, 0)
    assert (h["incompatible"], h["compatible"], h["autoclear"]) == (0, 0, 0)
    assert h["refcount_order"] == 4
    assert os.path.getsize(path) % cs == 0
    if case == "sparse-1GiB-three-L2":
        assert h["l1_size"] == 3
        assert allocated(path) < 4 * MiB  # the holes stay holes in the file too
    if case == "4K-clusters-several-refcount-blocks":
        assert refcount_blocks(path, h) == 2
    if case == "512-clusters-multi-cluster-tables":
        assert h["l1_size"] * 8 > cs
        assert h["refcount_table_clusters"] > 1
        assert refcount_blocks(path, h) > cs // 8  # more than one table cluster holds


def test_many_threads_small_writes(tmp_path: Path) -> None:
    size, cs = 6 * MiB, 4096
    writes = random_runs(size, cs, 7, 3, 0.3)
    path = tmp_path / "img.qcow2"
    write_qcow2(path, size, cs, writes, threads=8, seed=7)
    check_image(tmp_path, path, size, cs, writes)


def test_interrupted_writer_is_not_a_qcow2(tmp_path: Path) -> None:
    size = 4 * MiB
    writes = runs(size, K64, [(0, 4), (10, 2), (63, 1)], 8)
    path = tmp_path / "img.qcow2"
    write_qcow2(path, size, K64, writes, finish=False)
    cp = qemu_img("info", "-f", "qcow2", str(path), check=False)
    assert cp.returncode != 0
    assert "not in qcow2 format" in cp.stderr
    assert qemu_img("check", "-f", "qcow2", str(path), check=False).returncode != 0
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    assert info["format"] == "raw"  # probing finds no qcow2 header
    with open(path, "rb") as f:
        assert f.read(K64) == bytes(K64)


def test_failure_before_the_header_leaves_no_qcow2(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """finish() writes the header only after the metadata is on disk."""
    def eio(fd: int) -> None:
        raise OSError(5, "Input/output error")

    path = tmp_path / "img.qcow2"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        w = Qcow2Writer(fd, MiB)
        w.write(0, rand(K64, 9))
        monkeypatch.setattr(os, "fdatasync", eio)
        with pytest.raises(OSError):
            w.finish()
    finally:
        os.close(fd)
    assert qemu_img("info", "-f", "qcow2", str(path), check=False).returncode != 0


def test_rejected_writes_leave_the_image_intact(tmp_path: Path) -> None:
    size = MiB + 4096
    path = tmp_path / "img.qcow2"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        w = Qcow2Writer(fd, size)
        writes = runs(size, K64, [(2, 2), (16, 1)], 10)
        for off, data in writes:
            w.write(off, data)
        bad: list[tuple[int, bytes]] = [
            (512, bytes(K64)),                    # offset not cluster aligned
            (0, bytes(K64 + 512)),                # length not whole clusters, not at the end
            (15 * K64, bytes(K64 + 8192)),        # past the end of the disk
            (-K64, bytes(K64)),                   # negative
            (3 * K64, b"x" * K64),                # cluster 3 written twice
            (0, b"x" * 3 * K64),                  # clusters 0..2: cluster 2 written twice
        ]
        for off, data in bad:
            with pytest.raises(ValueError):
                w.write(off, data)
        w.write(0, b"")  # an empty write is nothing
        w.finish()
        with pytest.raises(ValueError, match="finished"):
            w.write(8 * K64, bytes(K64))
        with pytest.raises(ValueError, match="finished"):
            w.finish()
    finally:
        os.close(fd)
    check_image(tmp_path, path, size, K64, writes)


@pytest.mark.parametrize("cs", [256, 1000, 4 * MiB])
def test_bad_cluster_size(tmp_path: Path, cs: int) -> None:
    with pytest.raises(ValueError, match="cluster size"):
        Qcow2Writer(-1, MiB, cs)


@pytest.mark.parametrize("size,cs,what", [
    (9 * 1024**4, 4096, "L1 table"),  # 8 TiB is the most 4 KiB clusters allow
    (2 * 1024**4, 512, "L1 table"),
    (64 * 1024**4, K64, None),
    (510 * 1024**3, 1024, "refcount table"),
])
def test_geometry_checked_before_any_write(size: int, cs: int, what: str | None) -> None:
    if what is None:
        check_geometry(size, cs)
        return
    with pytest.raises(ValueError, match=what):
        check_geometry(size, cs)
    with pytest.raises(ValueError, match=what):
        Qcow2Writer(-1, size, cs)


def test_restore_with_chunks_smaller_than_a_cluster(tmp_path: Path) -> None:
    """4 KiB chunks: restore uses 4 KiB clusters so every write stays cluster aligned."""
    repo = Repository.init(str(tmp_path / "repo"), chunk_size=4096)
    img = write_image(tmp_path / "a.raw", 2 * MiB + 4096 + 512,
                      [(4096, rand(12 * KiB, 11)), (MiB + 512, rand(100, 12)),
                       (2 * MiB, rand(4096 + 512, 13))])
    make_backup(repo, "vm1", {"vda": img})
    restore(repo, "vm1", "latest", str(tmp_path / "out"), fmt="qcow2", workers=3)
    out = tmp_path / "out" / "vda.qcow2"
    assert qemu_img("check", "-q", str(out), check=False).returncode == 0
    info = json.loads(qemu_img("info", "--output=json", str(out)).stdout)
    assert info["cluster-size"] == 4096
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", img, str(out))


@pytest.mark.parametrize("size,cs", [(0, K64), (3 * MiB + 4096, 4096)])
def test_qemu_keeps_writing_to_the_image(tmp_path: Path, size: int, cs: int) -> None:
    """A restored disk gets used: QEMU grows it and writes over data and into holes."""
    writes = runs(size, cs, [(0, 4), (-(-size // cs) - 1, 1)], 12) if size else []
    path = tmp_path / "img.qcow2"
    write_qcow2(path, size, cs, writes)
    qemu_img("resize", "-q", "-f", "qcow2", str(path), str(size + 64 * MiB))
    cp = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 8k",
                         "-c", f"write -P 0x66 {size + MiB} 1M", "-c", "read -P 0x55 0 8k",
                         "-c", f"read -P 0x66 {size + MiB} 1M", str(path)],
                        capture_output=True, text=True, check=True)
    assert "Pattern verification failed" not in cp.stdout + cp.stderr
    cp = qemu_img("check", "-f", "qcow2", str(path), check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr


# --- issue 17, item 9 ---------------------------------------------------------------


@pytest.mark.parametrize("cs,refused,accepted", [
    # The band the old estimate let through: finish() then needed a refcount table
    # larger than QEMU opens, after every byte had been written.
    (4096, 8778896465920, 8774618255360),
    (K64, 2251520641204224, 2251456216236032),
])
def test_geometry_band_refused_up_front(cs: int, refused: int, accepted: int) -> None:
    from backupkit import qcow2

    with pytest.raises(ValueError, match="refcount table"):
        check_geometry(refused, cs)
    check_geometry(accepted, cs)
    # What check_geometry accepts, a full disk's finish() lays out within QEMU's limits.
    clusters = -(-accepted // cs)
    l1 = -(-clusters // (cs // 8))
    _blocks, table, _total = qcow2._layout(clusters, l1, l1, cs)
    assert table * cs <= qcow2.MAX_REFTABLE_BYTES


def test_writer_refuses_a_file_that_is_not_empty(tmp_path: Path) -> None:
    path = tmp_path / "img.qcow2"
    path.write_bytes(b"precious")
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(ValueError, match="empty file"):
            Qcow2Writer(fd, MiB)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"precious"


@pytest.mark.root
def test_finish_refuses_after_a_failed_write(small_fs: Path) -> None:
    """A write that fails (here: the 1 MiB tmpfs is full) makes finish() refuse."""
    path = small_fs / "img.qcow2"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        w = Qcow2Writer(fd, 8 * MiB)
        with pytest.raises(OSError):
            for i in range(8):
                w.write(i * MiB, rand(MiB, i))
        with pytest.raises(ValueError, match="failed"):
            w.finish()
    finally:
        os.close(fd)
    assert qemu_img("info", "-f", "qcow2", str(path), check=False).returncode != 0


def test_restore_checks_the_qcow2_before_renaming_it(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer bug (here: one refcount made wrong after finish) never reaches <disk>.qcow2."""
    from backupkit.errors import CommandFailed

    repo = Repository.init(str(tmp_path / "repo"), chunk_size=K64)
    img = write_image(tmp_path / "a.raw", 2 * MiB, [(0, rand(3 * K64, 1))])
    make_backup(repo, "vm1", {"vda": img})
    finish = Qcow2Writer.finish

    def broken_finish(self: Qcow2Writer) -> None:
        finish(self)
        with open(f"/proc/self/fd/{self.fd}", "r+b") as f:
            f.seek(48)
            (table,) = struct.unpack(">Q", f.read(8))
            f.seek(table)
            (block,) = struct.unpack(">Q", f.read(8))
            f.seek(block)
            f.write(b"\x00\x05")  # cluster 0 (the header) counted 5 times: a leak

    monkeypatch.setattr(Qcow2Writer, "finish", broken_finish)
    out = tmp_path / "out"
    with pytest.raises(CommandFailed, match="qemu-img check"):
        restore(repo, "vm1", "latest", str(out), fmt="qcow2")
    assert sorted(os.listdir(out)) == []
