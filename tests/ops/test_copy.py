"""copy_disk against a real qemu-nbd export."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from backupkit import nbd, qemu
from backupkit.errors import OperationFailed
from backupkit.ops.copy import copy_disk
from backupkit.repo import Index, Repository

MiB = 1 << 20


def test_parent_of_another_size_is_refused(tmp_path: Path) -> None:
    """A disk resized between choosing the mode and the export: never a broken index."""
    img = tmp_path / "d.qcow2"
    qemu.create(str(img), "qcow2", 4 * MiB)
    qemu.bitmap_add(str(img), "b")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 3M 64k", str(img)],
                   check=True, capture_output=True)
    repo = Repository.init(str(tmp_path / "r"), chunk_size=1 * MiB)
    with nbd.QemuNbd(str(img), "qcow2", str(tmp_path / "s"), bitmap="b") as srv, \
            srv.client(dirty=True) as client:
        with pytest.raises(OperationFailed, match="changed size"):
            copy_disk(client, repo, parent=Index(2 * MiB, 1 * MiB))
        res = copy_disk(client, repo, parent=Index(4 * MiB, 1 * MiB))
    assert res.read_bytes == 64 * 1024
    assert res.index[3] is not None and res.index[0] is None
