"""The repository's filesystem fills up; the NBD source returns read errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupkit.errors import NbdError
from backupkit.nbd import Client
from backupkit.ops.copy import copy_disk
from backupkit.repo import Repository
from tests.faults.conftest import CHUNK, Bk, MakeDomain, MiB, one_line_error, write_random


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB ext4 on a loop device, unmounted in teardown even on failure."""
    img = tmp_path / "fs.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "48M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        out = subprocess.run(["losetup", "-j", str(img)], capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)


@pytest.mark.libvirt
@pytest.mark.root
def test_repository_filesystem_full(small_fs: Path, make_domain: MakeDomain, bk: Bk,
                                    libvirt_conn: object, tmp_path: Path) -> None:
    full_bk = Bk(tmp_path, small_fs / "repo", bk.scratch, bk.config)
    assert full_bk.run("init", "--chunk-size", str(CHUNK)).returncode == 0
    td = make_domain([("qcow2", 64 * MiB)])
    write_random(td, "vda", 0, 1 * MiB, 1, tmp_path)
    full_bk.backup(td)
    # Leave ~4 MiB free, then give the backup 16 MiB of incompressible data.
    st = os.statvfs(small_fs)
    ballast = small_fs / "ballast"
    with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - 4 * MiB)
    write_random(td, "vda", 8 * MiB, 16 * MiB, 2, tmp_path)
    cp = full_bk.run("--json", "backup", td.name)
    assert cp.returncode == 1, cp.stderr
    assert "no space left" in one_line_error(cp)
    assert '"kind": "no_space"' in cp.stdout
    # No partial backup visible; what was committed verifies and restores.
    ballast.unlink()
    full_bk.survivors(td)
    # Space freed: the next run succeeds, incremental from the intact checkpoint.
    nxt = full_bk.backup(td)
    assert nxt["mode"] == "incremental", nxt["reason"]
    full_bk.survivors(td)
    full_bk.nothing_left(td, libvirt_conn)


@pytest.fixture
def nbdkit_error(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """An image with data, and a factory starting nbdkit's error filter in front of it."""
    if not shutil.which("nbdkit"):
        pytest.fail("nbdkit is required (HOST-FACTS: installed on every machine)")
    img = tmp_path / "src.raw"
    with open(img, "wb") as f:
        for i in range(32):
            f.write(bytes([i + 1]) * (128 * 1024))
    yield img, tmp_path


def _serve(img: Path, tmp: Path, *params: str) -> subprocess.Popen[bytes]:
    sock = tmp / "nbdkit.sock"
    with_sock = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "--filter=error",
                 "file", str(img), *params]
    p = subprocess.Popen(with_sock, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert time.monotonic() < deadline and p.poll() is None, "nbdkit did not start"
        time.sleep(0.02)
    return p


@pytest.mark.parametrize("params", [
    ("error=EIO", "error-pread-rate=1"),
    ("error=EIO", "error-pread-rate=0.2"),
    ("error=ENOSPC", "error-extents-rate=1"),
], ids=["every-read", "some-reads", "block-status"])
def test_nbd_read_errors(nbdkit_error: tuple[Path, Path], params: tuple[str, ...]) -> None:
    img, tmp = nbdkit_error
    repo = Repository.init(str(tmp / "repo"), chunk_size=CHUNK)
    p = _serve(img, tmp, *params)
    try:
        with Client(str(tmp / "nbdkit.sock")) as client, \
                pytest.raises(NbdError) as exc:
            copy_disk(client, repo, parent=None)
        msg = str(exc.value)
        assert "\n" not in msg and msg.startswith("NBD "), msg
        assert exc.value.exit_code == 1
    finally:
        p.terminate()
        p.wait()
    # Nothing committed: copy_disk raised before any index or manifest could be written.
    assert repo.list_backups() == []
    assert not list((tmp / "repo" / "backups").iterdir())
