"""Fault-injection rig: real CLI runs against real domains, and the three checks.

Every fault test ends with the same three questions (docs/reliability.md):

1. ``survivors``: every backup complete before the fault verifies with
   ``verify --data`` and restores equal to its reference;
2. ``next_run``: the next backup succeeds without manual repair, in the mode we
   expect, and restores equal to the disk as it was;
3. ``nothing_left``: no lock held, no libvirt backup job, no stale checkpoint,
   no scratch file, and ``gc`` leaves nothing an interrupted run left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import rig
from tests.conftest import IN_CI, run_cli

MiB = rig.MiB
CHUNK = 64 * 1024


@pytest.fixture
def libvirt_conn() -> Iterator[object]:
    """A connection per test: one test restarts libvirtd, which kills every open one."""
    try:
        import libvirt
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"libvirt is required in CI: {e}", pytrace=False)
        pytest.skip(f"libvirt not available: {e}")
    try:
        conn = libvirt.open(rig.URI)
    except libvirt.libvirtError as e:
        if IN_CI:
            pytest.fail(f"libvirt is required in CI: {e}", pytrace=False)
        pytest.skip(f"libvirt not available: {e}")
    yield conn
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


def qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


def write_random(td: rig.TestDomain, target: str, offset: int, length: int, seed: int,
                 tmp: Path) -> None:
    """Write incompressible data into a disk (guest write or cold), mirrored to the reference."""
    data = b"".join(hashlib.sha256(f"{seed}-{i}".encode()).digest()
                    for i in range((length + 31) // 32))[:length]
    src = tmp / f"rand-{seed}"
    src.write_bytes(data)
    disk = td.disk(target)
    cmd = f"write -s {src} {offset} {length}"
    if td.dom.isActive():
        import libvirt_qemu

        index = ord(target[-1]) - ord("a")
        hmp = f'qemu-io -d /machine/peripheral/virtio-disk{index}/virtio-backend "{cmd}"'
        out = libvirt_qemu.qemuMonitorCommand(
            td.dom, hmp, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        assert "error" not in out.lower() and "fail" not in out.lower(), out
    else:
        subprocess.run(["qemu-io", "-f", disk.format, "-c", cmd, str(disk.path)],
                       check=True, capture_output=True)
    with open(disk.reference, "r+b") as f:
        f.seek(offset)
        f.write(data)
    src.unlink()


def guest_flush(td: rig.TestDomain, target: str) -> None:
    """Flush the guest's writes to the image (before killing QEMU, like a guest fsync)."""
    import libvirt_qemu

    index = ord(target[-1]) - ord("a")
    hmp = f'qemu-io -d /machine/peripheral/virtio-disk{index}/virtio-backend "flush"'
    libvirt_qemu.qemuMonitorCommand(td.dom, hmp,
                                    libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root (locks excluded) -> sha256; symlinks by their target."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(filenames + [d for d in dirnames
                                     if os.path.islink(os.path.join(dirpath, d))]):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if rel.startswith("locks"):
                continue
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            else:
                out[rel] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def one_line_error(cp: subprocess.CompletedProcess[str]) -> str:
    """The error a failed command printed: exactly one line, no traceback."""
    assert "Traceback" not in cp.stderr, cp.stderr
    lines = [ln for ln in cp.stderr.splitlines()
             if ln.strip() and " INFO " not in ln and " WARNING " not in ln]
    assert len(lines) == 1, cp.stderr
    return lines[0]


@dataclass
class Bk:
    """One repository, one scratch dir, one config; runs the real CLI."""

    tmp: Path
    repo: Path
    scratch: Path
    config: Path
    refs: dict[str, dict[str, Path]] = field(default_factory=dict)  # backup id -> disk -> ref

    def args(self) -> list[str]:
        return ["--config", str(self.config), "--repo", str(self.repo)]

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_cli(*self.args(), *args, env=env, timeout=timeout)

    def json(self, *args: str, rc: int = 0, env: dict[str, str] | None = None) -> Any:
        cp = self.run("--json", *args, env=env)
        assert cp.returncode == rc, f"{args}: exit {cp.returncode}: {cp.stderr}"
        return json.loads(cp.stdout)

    def backup(self, td: rig.TestDomain, *extra: str) -> dict[str, Any]:
        """A backup that must succeed; remembers the reference for later restores."""
        n = len(list(self.tmp.glob("ref-*")))  # unique even after a backup is deleted
        refs = {d.target: d.snapshot_reference(self.tmp / f"ref-{n}-{d.target}")
                for d in td.disks}
        res = self.json("backup", td.name, *extra)
        self.refs[res["id"]] = refs
        return dict(res)

    def spawn(self, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
        full = {k: v for k, v in os.environ.items()
                if k not in ("BACKUPKIT_CONFIG", "BACKUPKIT_REPO", "JOURNAL_STREAM")}
        full.update(env)
        return subprocess.Popen([sys.executable, "-m", "backupkit", *self.args(), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=full)

    def killed_at(self, point: str, *args: str) -> None:
        """Run the CLI with a fault point; it must die of SIGKILL there."""
        cp = self.run(*args, env={"BACKUPKIT_FAULT_POINT": point})
        assert cp.returncode == -signal.SIGKILL, \
            f"expected SIGKILL at {point}, got exit {cp.returncode}: {cp.stderr}"

    def stopped_at(self, point: str, *args: str) -> subprocess.Popen[str]:
        """Start the CLI and wait until it has stopped itself at a fault point."""
        p = self.spawn(*args, env={"BACKUPKIT_FAULT_POINT": point,
                                   "BACKUPKIT_FAULT_ACTION": "stop"})
        return rig.wait_stopped(p, point, 60)

    # -- the three checks ---------------------------------------------------

    def survivors(self, td: rig.TestDomain) -> None:
        """(1) every committed backup verifies with --data and restores equal to its reference."""
        listed = [b["id"] for b in self.json("list", td.name)["backups"]]
        assert sorted(listed) == sorted(self.refs), "a backup appeared or vanished"
        self.json("verify", "--data")
        for bid, refs in self.refs.items():
            target = self.tmp / f"restore-{bid}"
            self.json("restore", td.name, bid, "--target", str(target), "--format", "raw")
            for disk, ref in refs.items():
                rig.compare(ref, target / f"{disk}.raw", "raw")
            subprocess.run(["rm", "-rf", str(target)], check=True)

    def next_run(self, td: rig.TestDomain, conn: Any) -> dict[str, Any]:
        """(2) and (3): the next backup needs no repair and is incremental; then every
        backup is sound and nothing is left behind."""
        nxt = self.backup(td)
        assert nxt["mode"] == "incremental", nxt["reason"]
        self.survivors(td)
        self.nothing_left(td, conn)
        return nxt

    def nothing_left(self, td: rig.TestDomain, conn: Any) -> None:
        """(3) no lock, no job, no stale checkpoint, no scratch file; gc removes the rest."""
        from backupkit import virt

        dom = virt.connect(rig.URI).domain(td.name)
        assert not dom.backup_job_active(), "a libvirt backup job is still running"
        latest = self.json("show", td.name, "latest")
        cps = [c.name for c in dom.checkpoints()]
        assert cps == [latest["checkpoint"]], f"checkpoints {cps}, latest {latest['checkpoint']}"
        for d in td.disks:
            if d.format == "qcow2" and not td.dom.isActive():
                assert list(rig.bitmaps(d.path)) == [latest["checkpoint"]]
        assert sorted(os.listdir(self.scratch)) == [], os.listdir(self.scratch)
        self.json("gc")
        # No lock object is left: released ones are deleted, and gc removes those of
        # processes that were killed (stale at once: their pid is gone on this host).
        assert os.listdir(self.repo / "locks") == [], os.listdir(self.repo / "locks")
        again = self.json("gc", "--dry-run")
        assert again["bytes_freed"] == 0 and again["chunks_removed"] == 0, again
        assert not [p for p in self.repo.rglob(".tmp-*")]


@pytest.fixture
def bk(tmp_path: Path) -> Bk:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cfg = tmp_path / "backupkit.toml"
    cfg.write_text(f'scratch_dir = "{scratch}"\n')
    b = Bk(tmp_path, tmp_path / "repo", scratch, cfg)
    cp = b.run("init", "--chunk-size", str(CHUNK))
    assert cp.returncode == 0, cp.stderr
    return b


MakeDomain = Callable[..., rig.TestDomain]


def paused_second_backup(make_domain: MakeDomain, bk: Bk, tmp_path: Path, *, length: int,
                         seed: int, tag: str
                         ) -> tuple[rig.TestDomain, dict[str, Path], subprocess.Popen[str]]:
    """A 32 MiB domain backed up once; then ``length`` random bytes written at 4 MiB
    (``seed``), the disks' references after them (ref-TAG-DISK), and a second backup
    stopped before its first chunk: (domain, references, that backup's process)."""
    td = make_domain([("qcow2", 32 * MiB)])
    td.write("vda", 0, 1 * MiB, 0x11)
    bk.backup(td)
    write_random(td, "vda", 4 * MiB, length, seed, tmp_path)
    before = {d.target: d.snapshot_reference(tmp_path / f"ref-{tag}-{d.target}")
              for d in td.disks}
    return td, before, bk.stopped_at("before_first_chunk", "backup", td.name)


@dataclass
class S3Bk(Bk):
    """Bk (tests/faults/conftest.py) on an S3 repository; ``env`` goes to every run
    (AWS_ENDPOINT_URL_S3 of a gateway of the test's own)."""

    url: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def args(self) -> list[str]:
        return ["--config", str(self.config), "--repo", self.url]

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return super().run(*args, env={**self.env, **(env or {})}, timeout=timeout)

    def spawn(self, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
        return super().spawn(*args, env={"BACKUPKIT_CONFIG": "/dev/null", **self.env, **env})

    def nothing_left(self, td: rig.TestDomain, conn: Any) -> None:
        """(3) on S3: no job, no stale checkpoint, no scratch file; no lock held (gc
        gets the exclusive lock at once); gc removes every leftover, a second gc finds
        nothing; no incomplete multipart upload."""
        from backupkit import virt

        dom = virt.connect(rig.URI).domain(td.name)
        assert not dom.backup_job_active(), "a libvirt backup job is still running"
        latest = self.json("show", td.name, "latest")
        cps = [c.name for c in dom.checkpoints()]
        assert cps == [latest["checkpoint"]], f"checkpoints {cps}, latest {latest['checkpoint']}"
        assert sorted(os.listdir(self.scratch)) == [], os.listdir(self.scratch)
        self.json("gc")
        again = self.json("gc", "--dry-run")
        assert again["bytes_freed"] == 0 and again["chunks_removed"] == 0, again
        assert again["incomplete_backups_removed"] == [] and again["tmp_files_removed"] == 0
        from tests.s3rig import split, uploads

        assert uploads(*split(self.url)) == []


@pytest.fixture
def s3bk(tmp_path: Path, s3_url: str) -> S3Bk:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cfg = tmp_path / "backupkit.toml"
    cfg.write_text(f'scratch_dir = "{scratch}"\n')
    b = S3Bk(tmp_path, tmp_path / "unused", scratch, cfg, url=s3_url)
    cp = b.run("init", "--chunk-size", str(CHUNK))
    assert cp.returncode == 0, cp.stderr
    return b
