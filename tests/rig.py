"""Test rig: real libvirt domains with qcow2/raw disks, guest writes, references.

Domains have no guest OS: writes into their disks go through QEMU's block layer
with HMP ``qemu-io`` (shared/HOST-FACTS.md), and every write is mirrored into a
sparse raw *reference* file so a restore can be compared with
``qemu-img compare`` against the disk as it was at any moment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import libvirt_qemu

# Tests report libvirt errors themselves; silence libvirt's default stderr handler.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

URI = os.environ.get("BACKUPKIT_TEST_URI", "qemu:///system")
MiB = 1 << 20
GiB = 1 << 30


def wait_stopped(p: subprocess.Popen[str], point: str, timeout: float,
                 what: str = "") -> subprocess.Popen[str]:
    """Return *p* once it has stopped itself (SIGSTOP, state ``T``) at fault *point*.

    It must not exit first; it must get there within *timeout* seconds (else it is
    killed). *what* names the run in the failure message.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            _out, err = p.communicate()
            raise AssertionError(f"{what}exited {p.returncode} before {point}: {err}")
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{p.pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "T":
                return p
        time.sleep(0.02)
    p.kill()
    raise AssertionError(f"never reached {point}")


def virt_type() -> str:
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"


@dataclass
class TestDisk:
    target: str
    path: Path
    format: str
    size: int
    reference: Path  # raw sparse file mirroring every write

    def snapshot_reference(self, dest: Path) -> Path:
        """A copy of the reference as the disk is now (sparse)."""
        subprocess.run(["cp", "--sparse=always", str(self.reference), str(dest)], check=True)
        return dest


def pattern(byte: int, length: int) -> bytes:
    return bytes([byte]) * length


@dataclass
class TestDomain:
    conn: libvirt.virConnect
    name: str
    workdir: Path
    disks: list[TestDisk] = field(default_factory=list)

    @property
    def dom(self) -> libvirt.virDomain:
        return self.conn.lookupByName(self.name)

    def disk(self, target: str) -> TestDisk:
        return next(d for d in self.disks if d.target == target)

    def start(self) -> None:
        if not self.dom.isActive():
            self.dom.create()

    def stop(self) -> None:
        if self.dom.isActive():
            self.dom.destroy()

    def write(self, target: str, offset: int, length: int, byte: int) -> None:
        """Write a pattern into the disk, as the guest (running) or cold (shut off)."""
        disk = self.disk(target)
        cmd = f"write -P {byte:#x} {offset} {length}"
        if self.dom.isActive():
            index = ord(target[-1]) - ord("a")
            hmp = f'qemu-io -d /machine/peripheral/virtio-disk{index}/virtio-backend "{cmd}"'
            out = libvirt_qemu.qemuMonitorCommand(
                self.dom, hmp, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
            if "error" in out.lower() or "fail" in out.lower():
                raise RuntimeError(f"guest write failed: {out}")
        else:
            subprocess.run(["qemu-io", "-f", disk.format, "-c", cmd, str(disk.path)],
                           check=True, capture_output=True)
        with open(disk.reference, "r+b") as f:
            f.seek(offset)
            f.write(pattern(byte, length))

    def cleanup(self) -> None:
        try:
            dom = self.conn.lookupByName(self.name)
        except libvirt.libvirtError:
            return
        with contextlib.suppress(libvirt.libvirtError):
            dom.abortJob()
        if dom.isActive():
            dom.destroy()
        try:
            for cp in dom.listAllCheckpoints(0):
                with contextlib.suppress(libvirt.libvirtError):
                    cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        except libvirt.libvirtError:
            pass
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


def domain_xml(name: str, disks: list[TestDisk], memory_mib: int = 128) -> str:
    devs = []
    for d in disks:
        devs.append(
            f"<disk type='file' device='disk'><driver name='qemu' type='{d.format}'/>"
            f"<source file='{d.path}'/><target dev='{d.target}' bus='virtio'/>"
            f"<serial>{d.target}</serial></disk>")
    return (
        f"<domain type='{virt_type()}'><name>{name}</name>"
        f"<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
        "<on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash>"
        "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
        + "".join(devs)
        + "<interface type='user'><model type='virtio'/></interface>"
        "<memballoon model='none'/></devices></domain>"
    )


def create_domain(conn: libvirt.virConnect, workdir: Path,
                  disks: list[tuple[str, int]], *, running: bool = True,
                  prefix: str = "bk-test") -> TestDomain:
    """Define (persistent) and optionally start a domain with disks [(format, size)]."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True, exist_ok=True)
    tdisks = []
    for i, (fmt, size) in enumerate(disks):
        target = "vd" + chr(ord("a") + i)
        path = workdir / f"{name}-{target}.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
        ref = workdir / f"{name}-{target}.ref.raw"
        with open(ref, "wb") as f:
            f.truncate(size)
        tdisks.append(TestDisk(target, path, fmt, size, ref))
    conn.defineXML(domain_xml(name, tdisks))
    td = TestDomain(conn, name, workdir, tdisks)
    if running:
        td.start()
    return td


def compare(reference: Path, image: Path, fmt: str) -> None:
    """Assert that image has the same guest-visible content as the raw reference."""
    cp = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt,
                         str(reference), str(image)], capture_output=True, text=True)
    assert cp.returncode == 0, f"{image} differs from {reference}: {cp.stdout}{cp.stderr}"


def remove_domain(conn: libvirt.virConnect, name: str) -> None:
    """Destroy (if running) and undefine domain ``name``; nothing if it does not exist."""
    with contextlib.suppress(libvirt.libvirtError):
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def leftover_domains(conn: libvirt.virConnect, prefix: str = "bk-") -> Iterator[str]:
    for d in conn.listAllDomains(0):
        if d.name().startswith(prefix):
            yield d.name()


def bitmaps(image: Path) -> dict[str, list[str]]:
    """name -> flags of the bitmaps stored in one image (cold, or -U)."""
    import json

    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)],
                         check=True, capture_output=True).stdout
    fs = json.loads(out).get("format-specific", {}).get("data", {})
    return {b["name"]: b["flags"] for b in fs.get("bitmaps", [])}


def have_tools() -> bool:
    return all(shutil.which(t) for t in ("qemu-img", "qemu-io", "qemu-nbd"))
