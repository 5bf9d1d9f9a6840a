"""Small qemu-img / qemu-io helpers for the hygiene tests (independent of backupkit)."""

from __future__ import annotations

import json
import signal
import subprocess

MiB = 1 << 20
GiB = 1 << 30


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def must(*cmd: str) -> str:
    cp = run(*cmd)
    assert cp.returncode == 0, f"{' '.join(cmd)}: {cp.stderr}"
    return cp.stdout


def create(path: str, size: int | None = None, backing: str | None = None) -> None:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    cmd.append(path)
    if size is not None:
        cmd.append(str(size))
    must(*cmd)


def add(path: str, name: str, granularity: int | None = None, disabled: bool = False) -> None:
    cmd = ["qemu-img", "bitmap", "-f", "qcow2", "--add"]
    if granularity:
        cmd += ["-g", str(granularity)]
    if disabled:
        cmd.append("--disable")
    must(*cmd, path, name)


def write(path: str, byte: int, offset: int, length: int) -> None:
    must("qemu-io", "-f", "qcow2", "-c", f"write -P {byte} {offset} {length}", path)


def read_ok(path: str, byte: int, offset: int, length: int) -> bool:
    cp = run("qemu-io", "-f", "qcow2", "-c", f"read -P {byte} {offset} {length}", path)
    return cp.returncode == 0 and "Pattern verification failed" not in cp.stdout + cp.stderr


def commit(top: str, base: str) -> subprocess.CompletedProcess[str]:
    """Cold merge as vdsm does it: keep TOP (-d) so post-merge can read its bitmaps."""
    return run("qemu-img", "commit", "-q", "-f", "qcow2", "-t", "none", "-b", base, "-d", top)


def bitmaps(path: str) -> dict[str, dict[str, object]]:
    doc = json.loads(must("qemu-img", "info", "-f", "qcow2", "--output=json", "-U", path))
    data = doc.get("format-specific", {}).get("data", {})
    return {b["name"]: {"granularity": b["granularity"], "flags": sorted(b["flags"])}
            for b in data.get("bitmaps", [])}


def make_in_use(path: str) -> None:
    """Leave the image's current bitmaps in-use, as a QEMU killed with SIGKILL does.

    qemu-io opens the image read-write (which marks its bitmaps in-use on
    disk) and then kills itself with SIGKILL: deterministic, unlike killing
    a qemu-nbd from outside (that raced under load).
    """
    names = set(bitmaps(path))
    cp = run("qemu-io", "-f", "qcow2", "-c", "sigraise 9", path)
    assert cp.returncode == -signal.SIGKILL, cp
    after = bitmaps(path)
    assert all("in-use" in after[n]["flags"] for n in names), after


def dirty(path: str, name: str) -> list[tuple[int, int]]:
    """Dirty (offset, length) extents of bitmap NAME, read through qemu-nbd + nbdinfo."""
    out = must("nbdinfo", f"--map=qemu:dirty-bitmap:{name}", "--",
               "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name, path, "]")
    result = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "1":
            result.append((int(fields[0]), int(fields[1])))
    return result
