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
    # qemu-io exits 0 even when the pattern differs; check both what it said and its status.
    assert out.returncode == 0, out.stderr
    assert "read 65536/65536 bytes at offset 0" in out.stdout, out.stdout
    assert "Pattern verification failed" not in out.stdout
    # And the pattern check itself must be able to fail: a wrong byte is reported.
    bad = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x78 0 64k", str(p)],
                         capture_output=True, text=True)
    assert "Pattern verification failed" in bad.stdout


def test_private_ovirt_imageio_api_is_what_nbd_py_uses() -> None:
    """ovirt_imageio._internal.nbd is private and pinned; if an upgrade changes what
    backupkit.nbd relies on, fail here with a message naming it, not deep in a backup."""
    import importlib.metadata
    import inspect

    from ovirt_imageio._internal import nbd as private
    from ovirt_imageio._internal import nbdutil

    version = importlib.metadata.version("ovirt-imageio")
    hint = (f"ovirt-imageio {version}: its private NBD client changed; backupkit.nbd is "
            "written against the version pinned in pyproject.toml")
    for name in ("open", "Error", "STATE_HOLE", "STATE_ZERO", "EXTENT_DIRTY", "Client"):
        assert hasattr(private, name), f"{hint} (nbd.{name} is gone)"
    assert hasattr(nbdutil, "extents"), f"{hint} (nbdutil.extents is gone)"
    params = inspect.signature(private.open).parameters
    assert "dirty" in params, f"{hint} (nbd.open() takes no dirty=)"
    for method in ("readinto", "write", "zero", "flush", "close"):
        assert callable(getattr(private.Client, method, None)), \
            f"{hint} (Client.{method} is gone)"


def test_errors_are_translated(tmp_path: Path) -> None:
    with pytest.raises(NbdError, match="connect"):
        nbd.Client(str(tmp_path / "missing.sock"), "x")
    with pytest.raises(NotFound):
        nbd.QemuNbd(str(tmp_path / "nope.qcow2"), "qcow2", str(tmp_path / "s"))
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"not an image")
    with pytest.raises(CommandFailed, match="qemu-nbd"):
        nbd.QemuNbd(str(bad), "qcow2", str(tmp_path / "s")).start()
