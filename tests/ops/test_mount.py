"""mount / umount: a backup's filesystems read-only (real nbdkit, nbdfuse, loop, mount)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from backupkit import errors
from backupkit.ops import mount, serve
from backupkit.repo import Repository
from tests.conftest import run_cli
from tests.repo.helpers import CHUNK, MiB, at, make_backup, write_image

NEEDS = ("nbdfuse", "fusermount3", "sfdisk", "losetup", "blkid", "mkfs.ext4", "mkfs.xfs",
         "mkfs.vfat")
pytestmark = pytest.mark.skipif(
    not os.environ.get("CI") and (os.geteuid() != 0 or not os.path.exists("/dev/fuse")
                                  or any(shutil.which(t) is None for t in NEEDS)),
    reason="needs root, /dev/fuse and nbdfuse/sfdisk/mkfs (scripts/setup.sh)")


def _files(seed: int) -> dict[str, bytes]:
    r = random.Random(seed)
    return {"etc/hostname": b"guest%d\n" % seed, "data/blob.bin": r.randbytes(300_000),
            "data/small.txt": b"backupkit\n" * 100}


def _populate(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _ext4(tmp: Path, size: int, files: dict[str, bytes]) -> bytes:
    src = tmp / "ext4-src"
    _populate(src, files)
    img = tmp / "ext4.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(img), f"{size // 1024}K"],
                   check=True)
    return img.read_bytes()


def _kernel_has(fstype: str) -> bool:
    return any(line.split()[-1:] == [fstype]
               for line in Path("/proc/filesystems").read_text().splitlines())


def _make_fs(disk: Path, offset: int, size: int, mkfs: list[str], tmp: Path,
             files: dict[str, bytes] | None) -> None:
    """mkfs on a loop device over part of disk, then (if files) mount it and write them."""
    dev = subprocess.run(["losetup", "--find", "--show", "--offset", str(offset),
                          "--sizelimit", str(size), str(disk)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        subprocess.run([*mkfs, dev], check=True, capture_output=True)
        if files is not None:
            mnt = tmp / f"fill-{offset}"
            mnt.mkdir()
            subprocess.run(["mount", dev, str(mnt)], check=True)
            try:
                _populate(mnt, files)
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert _sha((root / rel).read_bytes()) == _sha(data), rel


def _nothing_left(mnt: Path, state: str) -> None:
    assert not os.path.ismount(mnt)
    assert list(mnt.iterdir()) == []
    assert not os.path.exists(state)
    loops = subprocess.run(["losetup", "--list", "--json"], capture_output=True, text=True,
                           check=True).stdout
    assert state not in loops


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)


@pytest.mark.parametrize("label", ["gpt", "dos"])
def test_partitions_mount_read_only_and_umount_undoes_everything(
        repo: Repository, tmp_path: Path, label: str) -> None:
    """ext4, xfs (300 MiB: mkfs.xfs's minimum) and vfat partitions; the kernel here may
    lack vfat: then it is reported as skipped with the mount error, not a failure."""
    parts = [(1, 32, "ext4", ["mkfs.ext4", "-q", "-F"], _files(1)),
             (33, 300, "xfs", ["mkfs.xfs", "-q", "-f"], _files(2)),
             (333, 24, "vfat", ["mkfs.vfat"], None)]
    size = 360 * MiB
    disk = tmp_path / "disk.raw"
    write_image(disk, size)
    types = {"gpt": ("linux", "linux", "uefi"), "dos": ("83", "83", "c")}[label]
    layout = f"label: {label}\n" + "".join(
        f"start={start * 2048}, size={n * 2048}, type={t}\n"
        for (start, n, *_), t in zip(parts, types, strict=True))
    subprocess.run(["sfdisk", "-q", str(disk)], input=layout.encode(), check=True)
    for start, n, _fs, mkfs, files in parts:
        _make_fs(disk, start * MiB, n * MiB, mkfs, tmp_path, files)
    m = make_backup(repo, "vm1", {"vdb": disk}, now=at(2026, 3, 1))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    base = ("--repo", str(tmp_path / "repo"), "--json")
    doc = json.loads(run_cli(*base, "mount", "vm1", str(mnt), check=True).stdout)
    state = mount.state_dir(str(mnt))
    try:
        assert doc["id"] == m.id and doc["disk"] == "vdb"
        fss = {f["partition"]: f for f in doc["filesystems"]}
        assert fss[1]["type"] == "ext4" and "noload" in fss[1]["options"]
        assert fss[2]["type"] == "xfs" and "norecovery" in fss[2]["options"]
        if _kernel_has("vfat"):
            assert fss[3]["type"] == "vfat"
        else:
            assert doc["skipped"][0]["partition"] == 3
            assert "vfat" in doc["skipped"][0]["reason"]
        _check(mnt / "part1", parts[0][4] or {})
        _check(mnt / "part2", parts[1][4] or {})
        with pytest.raises(OSError):  # read-only
            (mnt / "part1" / "new").write_bytes(b"x")
        # a second mount on the same directory is refused
        again = run_cli(*base, "mount", "vm1", str(mnt))
        assert again.returncode == errors.EXIT_USAGE, again.stderr
    finally:
        out = run_cli(*base, "umount", str(mnt))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["unmounted"] is True
    _nothing_left(mnt, state)
    assert not serve.alive(doc["server_pid"])
    # nothing to undo any more: not found
    assert run_cli(*base, "umount", str(mnt)).returncode == errors.EXIT_NOT_FOUND


def test_bare_filesystem_mounts_on_the_mount_point(repo: Repository, tmp_path: Path) -> None:
    files = _files(3)
    disk = tmp_path / "bare.raw"
    disk.write_bytes(_ext4(tmp_path, 16 * MiB, files))
    make_backup(repo, "vm1", {"vda": disk, "vdb": disk}, now=at(2026, 3, 2))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = mount.mount(repo, str(tmp_path / "repo"), None, "vm1", "latest", str(mnt),
                      disk="vdb")
    try:
        assert [f["path"] for f in res["filesystems"]] == [str(mnt)]
        _check(mnt, files)
    finally:
        mount.umount(str(mnt))
    _nothing_left(mnt, mount.state_dir(str(mnt)))


def test_nothing_to_mount_fails_clearly_and_leaves_nothing(repo: Repository,
                                                           tmp_path: Path) -> None:
    disk = write_image(tmp_path / "noise.raw", 4 * MiB, [(0, random.Random(5).randbytes(MiB))])
    make_backup(repo, "vm1", {"vda": disk}, now=at(2026, 3, 3))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cp = run_cli("--repo", str(tmp_path / "repo"), "mount", "vm1", "latest", str(mnt))
    assert cp.returncode == errors.EXIT_FAILED
    assert "nothing to mount" in cp.stderr and "no filesystem found" in cp.stderr
    _nothing_left(mnt, mount.state_dir(str(mnt)))


@pytest.mark.skipif(shutil.which("pvcreate") is None, reason="lvm2 not installed")
def test_lvm_inside_the_guest_is_named_as_not_yet_supported(repo: Repository,
                                                            tmp_path: Path) -> None:
    disk = write_image(tmp_path / "pv.raw", 16 * MiB)
    dev = subprocess.run(["losetup", "--find", "--show", disk], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        subprocess.run(["pvcreate", "-ff", "-y", "--config",
                        "devices { obtain_device_list_from_udev=0 }", dev],
                       check=True, capture_output=True)
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)
    make_backup(repo, "vm1", {"vda": disk}, now=at(2026, 3, 4))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cp = run_cli("--repo", str(tmp_path / "repo"), "mount", "vm1", "latest", str(mnt))
    assert cp.returncode == errors.EXIT_FAILED
    assert "LVM" in cp.stderr and "may come later" in cp.stderr, cp.stderr
    _nothing_left(mnt, mount.state_dir(str(mnt)))
