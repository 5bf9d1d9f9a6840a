"""Measure the free space QEMU needs to store N persistent bitmaps when it closes a qcow2.

Not a test (root, ~10 minutes): ``.venv/bin/python -m tests.hygiene.measure_space [N]``
prints one JSON line per case; the figures are recorded in backupkit/bitmaps.py.

For each case: build the image (N bitmaps, ``dirty`` 64 KiB writes spread over
the disk, so every bitmap has ``dirty`` set bits), then find by bisection the
least free space with which a read-write open and close (qemu-io) leaves no
bitmap in-use: past the image's end on a block device (a loop device), and
free on an ext4 filesystem (a loop-mounted one, filled up to that point).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

CLUSTER = 65536


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def bitmaps_sound(path: str) -> bool:
    doc = json.loads(sh("qemu-img", "info", "-f", "qcow2", "--output=json", "-U", path).stdout)
    bms = doc.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return all("in-use" not in b["flags"] for b in bms)


def image_end(path: str) -> int:
    cp = sh("qemu-img", "check", "-f", "qcow2", "--output=json", "-U", path, check=False)
    return int(json.loads(cp.stdout)["image-end-offset"])


def build(path: str, size: int, n: int, granularity: int, dirty: int) -> None:
    sh("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
    for i in range(n):
        sh("qemu-img", "bitmap", "-f", "qcow2", "--add", "-g", str(granularity), path,
           f"backupkit.{i:03d}-20261206T000000Z")
    step = size // max(dirty, 1)
    args: list[str] = []
    for k in range(dirty):
        args += ["-c", f"write -P 1 {k * step} {CLUSTER}"]
    if args:
        sh("qemu-io", "-f", "qcow2", *args, path)


def open_close(path: str) -> bool:
    """Open read-write and close (QEMU stores every bitmap anew); True if none is lost."""
    cp = sh("qemu-io", "-f", "qcow2", "-c", "flush", path, check=False)
    return cp.returncode == 0 and bitmaps_sound(path)


def least(lo: int, hi: int, good: Callable[[int], bool]) -> int:
    """The least x in [lo, hi] for which good(x) holds (good is monotone)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if good(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def block_case(img: str, workdir: str) -> int:
    end = image_end(img)
    with open(img, "rb") as f:
        data = f.read()

    def good(free_clusters: int) -> bool:
        size = end + free_clusters * CLUSTER
        with tempfile.NamedTemporaryFile(dir=workdir) as f:
            f.truncate(size)
            dev = sh("losetup", "--find", "--show", f.name).stdout.strip()
            try:
                with open(dev, "r+b") as d:
                    d.write(data[:size])
                return open_close(dev)
            finally:
                sh("losetup", "-d", dev)

    return least(0, 256, good) * CLUSTER


def file_case(img: str, workdir: str) -> int:
    back = os.path.join(workdir, "fs.raw")
    with open(back, "wb") as f:
        f.truncate(64 << 20)
    sh("mkfs.ext4", "-q", "-F", "-m", "0", back)
    mnt = os.path.join(workdir, "mnt")
    os.makedirs(mnt, exist_ok=True)
    sh("mount", "-o", "loop", back, mnt)

    def attempt(blocks: int) -> tuple[bool, int]:
        for n in os.listdir(mnt):
            if n != "lost+found":
                os.unlink(os.path.join(mnt, n))
        path = os.path.join(mnt, "base.qcow2")
        sh("cp", "--sparse=always", img, path)
        os.sync()
        v = os.statvfs(mnt)
        left = v.f_bavail * v.f_frsize - blocks * 4096
        with open(os.path.join(mnt, "fill"), "wb") as f:
            while left > 0:
                k = min(left, 1 << 20)
                f.write(b"\1" * k)
                left -= k
        os.sync()
        v = os.statvfs(mnt)
        return open_close(path), v.f_bavail * v.f_frsize

    try:
        blocks = least(0, 512, lambda b: attempt(b)[0])
        return attempt(blocks)[1]
    finally:
        sh("umount", mnt)


CASES = [(1 << 30, 1, CLUSTER, 0), (1 << 30, 2, CLUSTER, 4), (1 << 30, 8, CLUSTER, 16),
         (1 << 30, 32, CLUSTER, 16), (16 << 30, 1, CLUSTER, 0), (16 << 30, 4, CLUSTER, 64),
         (100 << 30, 2, CLUSTER, 512), (100 << 30, 2, 1 << 20, 64), (1 << 40, 1, CLUSTER, 64)]


def main() -> None:
    cases = CASES[: int(sys.argv[1])] if len(sys.argv) > 1 else CASES
    with tempfile.TemporaryDirectory() as workdir:
        img = os.path.join(workdir, "m.qcow2")
        for size, n, granularity, dirty in cases:
            build(img, size, n, granularity, dirty)
            print(json.dumps({"size": size, "bitmaps": n, "granularity": granularity,
                              "dirty_writes": dirty,
                              "block_free_needed": block_case(img, workdir),
                              "file_free_needed": file_case(img, workdir)}), flush=True)
            os.unlink(img)


if __name__ == "__main__":
    main()
