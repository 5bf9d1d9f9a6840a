"""backupkit.nbd against a real qemu-nbd (ovirt-imageio's private client is pinned)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from backupkit import nbd, qemu
from backupkit.errors import CommandFailed, NbdError, NotFound

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.qcow2"
    qemu.create(str(p), "qcow2", 8 * MiB)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 1M 1M", str(p)],
                   check=True, capture_output=True)
    return p


def test_read_and_extents(image: Path, tmp_path: Path) -> None:
    with nbd.QemuNbd(str(image), "qcow2", str(tmp_path / "s"), export="vda") as srv, \
            srv.client() as c:
        assert c.size == 8 * MiB
        exts = list(c.extents())
        assert sum(e.length for e in exts) == 8 * MiB
        data = [e for e in exts if not e.zero]
        assert (data[0].start, data[0].length) == (1 * MiB, 1 * MiB)
        buf = bytearray(4096)
        c.readinto(1 * MiB, buf)
        assert buf == b"\x55" * 4096
    assert not (tmp_path / "s").exists()


def test_dirty_bitmap_export(image: Path, tmp_path: Path) -> None:
    qemu.bitmap_add(str(image), "b1", fmt="qcow2")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x66 4M 64k", str(image)],
                   check=True, capture_output=True)
    with nbd.QemuNbd(str(image), "qcow2", str(tmp_path / "s"), bitmap="b1") as srv, \
            srv.client(dirty=True) as c:
        dirty = [(e.start, e.length) for e in c.extents() if e.dirty]
    assert dirty == [(4 * MiB, 64 * 1024)]


def test_write_through_nbd(tmp_path: Path) -> None:
    p = tmp_path / "out.qcow2"
    qemu.create(str(p), "qcow2", 4 * MiB)
    with nbd.QemuNbd(str(p), "qcow2", str(tmp_path / "s"), read_only=False) as srv, \
            srv.client() as c:
        c.write(0, b"\x77" * 65536)
        c.flush()
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x77 0 64k", str(p)],
                         capture_output=True, text=True)
    assert "Pattern verification failed" not in out.stdout


def test_errors_are_translated(tmp_path: Path) -> None:
    with pytest.raises(NbdError, match="connect"):
        nbd.Client(str(tmp_path / "missing.sock"), "x")
    with pytest.raises(NotFound):
        nbd.QemuNbd(str(tmp_path / "nope.qcow2"), "qcow2", str(tmp_path / "s"))
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"not an image")
    with pytest.raises(CommandFailed, match="qemu-nbd"):
        nbd.QemuNbd(str(bad), "qcow2", str(tmp_path / "s")).start()
