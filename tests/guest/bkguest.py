"""A small real Linux guest for backupkit's tests, built from Debian packages.

Build (idempotent, cached in $BACKUPKIT_GUEST_CACHE, default /var/tmp/backupkit-guest):
the Debian kernel (uncompressed from its vmlinuz: boots faster under TCG) and an
initramfs with busybox, qemu-ga, e2fsprogs and 12 modules.  `init.sh` beside this file
is the guest's /init.  Run it by hand with `python tests/guest/bkguest.py` or
`scripts/build-guest.sh`.

Domain helpers: start_guest(), boot_verify(), check_disk_on_host(), destroy_domain().
See docs/test-guest.md.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import json
import lzma
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"
BUILDER_VERSION = "1"  # bump to force rebuilding the initramfs

DEFAULT_CACHE = "/var/tmp/backupkit-guest"
URI = os.environ.get("BACKUPKIT_LIBVIRT_URI", "qemu:///system")

# Modules the guest loads; their dependencies are resolved from each .ko's modinfo.
ROOT_MODULES = [
    "virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4",
]
# Where to find them in the kernel package (a superset is fine).
MODULE_DIRS = ("kernel/drivers/virtio/", "kernel/drivers/block/", "kernel/drivers/char/",
               "kernel/fs/", "kernel/lib/", "kernel/crypto/")
HOST_BINARIES = ["/usr/sbin/mke2fs", "/usr/sbin/e2fsck"]


class GuestBuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"bkguest: {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("BACKUPKIT_GUEST_CACHE") or DEFAULT_CACHE)


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    try:
        return subprocess.run(cmd, **kw)
    except subprocess.CalledProcessError as e:
        raise GuestBuildError(f"{' '.join(cmd)} failed ({e.returncode}): {e.stderr.strip()}") from e
    except FileNotFoundError as e:
        raise GuestBuildError(f"{cmd[0]}: not found") from e


# ---------------------------------------------------------------- build

@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str
    cache: Path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _apt_download(pkg: str, dest: Path) -> Path:
    """`apt-get download PKG` into dest; on failure refresh the lists once and retry."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg]
    try:
        _run(cmd, cwd=dest)
    except GuestBuildError:
        log(f"apt-get download {pkg} failed; running apt-get update and retrying")
        _run(["apt-get", "update", "-qq"])
        _run(cmd, cwd=dest)
    debs = sorted(dest.glob(f"{pkg}_*.deb"), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise GuestBuildError(f"apt-get download {pkg} left no .deb in {dest}")
    return debs[-1]


def _kernel_package() -> str:
    name = os.environ.get("BACKUPKIT_GUEST_KERNEL_PKG")
    if name:
        return name
    for attempt in range(2):
        out = _run(["apt-cache", "depends", "linux-image-amd64"], check=False).stdout
        m = re.search(r"Depends:\s+(linux-image-\d\S*-amd64)\b", out)
        if m:
            return m.group(1)
        if attempt == 0:
            _run(["apt-get", "update", "-qq"])
    raise GuestBuildError("cannot resolve linux-image-amd64 to a kernel package (apt-cache)")


def _extract_from_deb(deb: Path, want: Any) -> dict[str, bytes]:
    """Stream the deb's data tar; return {member name: content} for names where want(name)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
            for m in tf:
                name = m.name.removeprefix("./")
                if m.isfile() and want(name):
                    f = tf.extractfile(m)
                    assert f is not None
                    found[name] = f.read()
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise GuestBuildError(f"dpkg-deb --fsys-tarfile {deb} failed")
    return found


def _decompress_vmlinuz(data: bytes) -> bytes:
    """The ELF vmlinux inside a bzImage (like the kernel's scripts/extract-vmlinux)."""
    magics: list[tuple[bytes, Any]] = [
        (b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ)),
        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
        (b"\x5d\x00\x00", lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE)),
    ]
    for magic, make in magics:
        pos = data.find(magic)
        while pos != -1:
            try:
                out = make().decompress(data[pos:])
            except (lzma.LZMAError, zlib.error, EOFError):
                out = b""
            if out[:4] == b"\x7fELF":
                return out
            pos = data.find(magic, pos + 1)
    raise GuestBuildError("no ELF kernel found inside vmlinuz (unsupported compression?)")


def _modinfo_depends(ko: bytes) -> list[str]:
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)", ko)
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def _build_kernel(dest: Path) -> str:
    """Download and unpack the kernel: dest/vmlinux, dest/modules/*.ko, dest/version."""
    pkg = _kernel_package()
    deb = _apt_download(pkg, dest.parent / "debs")
    log(f"extracting {deb.name}")
    roots = set(ROOT_MODULES)

    def want(name: str) -> bool:
        if re.fullmatch(r"boot/vmlinuz-[^/]+", name):
            return True
        m = re.fullmatch(r"lib/modules/[^/]+/(kernel/.+)/([^/]+)\.ko", name)
        return bool(m) and (m.group(1) + "/").startswith(MODULE_DIRS)

    files = _extract_from_deb(deb, want)
    vmlinuz = [n for n in files if n.startswith("boot/vmlinuz-")]
    if len(vmlinuz) != 1:
        raise GuestBuildError(f"{deb.name}: expected one vmlinuz, found {vmlinuz}")
    version = vmlinuz[0].removeprefix("boot/vmlinuz-")
    mods = {Path(n).stem.replace("-", "_"): data for n, data in files.items() if n.endswith(".ko")}

    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in stack:
            raise GuestBuildError(f"module dependency cycle: {(*stack, name)}")
        if name not in mods:
            raise GuestBuildError(f"module {name} not found in {deb.name}")
        for dep in _modinfo_depends(mods[name]):
            visit(dep, (*stack, name))
        order.append(name)

    for r in sorted(roots):
        visit(r, ())
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "modules").mkdir(parents=True)
    (tmp / "vmlinux").write_bytes(_decompress_vmlinuz(files[vmlinuz[0]]))
    for name in order:
        (tmp / "modules" / f"{name}.ko").write_bytes(mods[name])
    (tmp / "modules" / "load-order").write_text("\n".join(order) + "\n")
    (tmp / "version").write_text(version + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    deb.unlink()  # 70 MB, no longer needed: everything used is in dest
    log(f"kernel {version}, modules: {' '.join(order)}")
    return version


def _deb_file(pkg: str, member: str, debs: Path) -> bytes:
    existing = sorted(debs.glob(f"{pkg}_*.deb"))
    deb = existing[-1] if existing else _apt_download(pkg, debs)
    files = _extract_from_deb(deb, lambda n: n == member)
    if member not in files:
        raise GuestBuildError(f"{deb.name} has no {member}")
    return files[member]


def _ldd(binary: Path) -> list[str]:
    """Absolute paths of the shared libraries (and loader) binary needs, from the host."""
    out = _run(["ldd", str(binary)], check=False)
    libs = []
    for line in out.stdout.splitlines():
        if "not found" in line:
            raise GuestBuildError(f"{binary}: {line.strip()} (install it on the host)")
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    if not libs:
        raise GuestBuildError(f"ldd {binary}: no libraries found: {out.stdout}{out.stderr}")
    return libs


class _Cpio:
    """A newc cpio archive written in memory (the host has no cpio)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"",
               rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.buf.write(hdr + name.encode() + b"\0")
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.seen:
                self.seen.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        name = name.strip("/")
        if name in self.seen:
            return
        self.dir(os.path.dirname(name))
        self.seen.add(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self.seen.add(name.strip("/"))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def _build_initrd(cache: Path, out: Path) -> None:
    debs = cache / "debs"
    cpio = _Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp",
              "data", "etc", "lib/modules"):
        cpio.dir(d)
    cpio.symlink("var/run", "/run")
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("init", INIT_SCRIPT.read_bytes())
    cpio.file("bin/busybox", _deb_file("busybox-static", "bin/busybox", debs))
    with tempfile.TemporaryDirectory() as td:
        qga = Path(td) / "qemu-ga"
        qga.write_bytes(_deb_file("qemu-guest-agent", "usr/sbin/qemu-ga", debs))
        qga.chmod(0o755)
        cpio.file("usr/sbin/qemu-ga", qga.read_bytes())
        libs = set(_ldd(qga))
    for b in HOST_BINARIES:
        cpio.file(b, Path(b).read_bytes())
        libs.update(_ldd(Path(b)))
    for lib in sorted(libs):
        cpio.file(lib, Path(lib).read_bytes())  # follows symlinks: the real content
    if Path("/etc/mke2fs.conf").exists():
        cpio.file("etc/mke2fs.conf", Path("/etc/mke2fs.conf").read_bytes(), 0o644)
    cpio.file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n", 0o644)
    for ko in sorted((cache / "kernel" / "modules").iterdir()):
        cpio.file(f"lib/modules/{ko.name}", ko.read_bytes(), 0o644)
    # Uncompressed: unpacking is cheaper for TCG than decompressing.
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(cpio.finish())
    tmp.rename(out)


def _initrd_key(kernel_version: str) -> str:
    h = hashlib.sha256()
    h.update(BUILDER_VERSION.encode())
    h.update(kernel_version.encode())
    h.update(INIT_SCRIPT.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def build_guest(cache: Path | None = None) -> GuestImage:
    """Build (or reuse) the guest kernel and initramfs. Idempotent; safe in parallel."""
    cache = Path(cache) if cache else cache_dir()
    with _locked(cache):
        kdir = cache / "kernel"
        if not (kdir / "version").exists():
            t = time.monotonic()
            _build_kernel(kdir)
            log(f"kernel ready in {time.monotonic() - t:.1f}s")
        version = (kdir / "version").read_text().strip()
        initrd = cache / "initrd.img"
        key_file = cache / "initrd.key"
        key = _initrd_key(version)
        if not initrd.exists() or not key_file.exists() or key_file.read_text() != key:
            t = time.monotonic()
            _build_initrd(cache, initrd)
            key_file.write_text(key)
            log(f"initramfs {initrd.stat().st_size // 1024} KiB built in "
                f"{time.monotonic() - t:.1f}s")
        return GuestImage(kernel=kdir / "vmlinux", initrd=initrd, kernel_version=version,
                          cache=cache)


# ---------------------------------------------------------------- domains

def _libvirt() -> Any:
    import libvirt  # lazily: building needs no libvirt

    # Errors still raise; only libvirt's default printing to stderr (noise while
    # polling the agent) is turned off.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def _agent_command(dom: Any, cmd: dict[str, Any], timeout: int = 5) -> Any:
    _libvirt()
    import libvirt_qemu

    return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), timeout, 0))


def _domcaps_has_kvm(conn: Any) -> bool:
    try:
        xml = conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
    except Exception:
        return False
    return "<domain>kvm</domain>" in xml


def choose_virt_type(conn: Any, image: GuestImage) -> str:
    """'kvm' if this host's KVM runs a Linux guest, else 'qemu' (TCG).

    BACKUPKIT_GUEST_VIRT=kvm|qemu forces one; =probe ignores a cached answer.
    Nested KVM through kvm_pvm runs no-OS domains but not Linux, so KVM is chosen only
    when a Linux boot under it was seen to work (probed once, cached beside the image).
    """
    forced = os.environ.get("BACKUPKIT_GUEST_VIRT", "")
    if forced in ("kvm", "qemu"):
        return forced
    if not _domcaps_has_kvm(conn):
        return "qemu"
    cache = image.cache / f"virt-probe-{image.kernel_version}.json"
    if forced != "probe":
        if Path("/sys/module/kvm_pvm").exists():
            return "qemu"  # known: Linux hangs or QEMU aborts under kvm_pvm
        with contextlib.suppress(OSError, ValueError, KeyError):
            return str(json.loads(cache.read_text())["virt"])
    ok = _probe_kvm(conn, image)
    virt = "kvm" if ok else "qemu"
    cache.write_text(json.dumps({"virt": virt}))
    return virt


def _probe_kvm(conn: Any, image: GuestImage, timeout: float = 20.0) -> bool:
    with tempfile.TemporaryDirectory(prefix="bk-probe-") as td:
        name = new_name("bk-probe")
        console = Path(td) / "console.log"
        xml = domain_xml(name, image, None, console, virt_type="kvm", cmdline="probe=1",
                         agent=False)
        try:
            conn.createXML(xml, 0)
        except Exception as e:
            log(f"kvm probe: could not start: {e}")
            return False
        try:
            return _wait_console(console, "BKGUEST: probe ok", timeout) is not None
        finally:
            destroy_domain(conn, name)


def domain_xml(name: str, image: GuestImage, data_disk: Path | None, console_log: Path, *,
               virt_type: str = "qemu", cmdline: str = "", memory_mib: int = 256,
               agent: bool = True, disk_format: str = "qcow2", readonly: bool = False) -> str:
    disk = ""
    if data_disk is not None:
        ro = "\n      <readonly/>" if readonly else ""
        disk = f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{disk_format}'/>
      <source file='{escape(str(data_disk))}'/>
      <target dev='vda' bus='virtio'/>
      <serial>data</serial>{ro}
    </disk>"""
    channel = ""
    if agent:
        channel = """
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>"""
    full_cmdline = f"console=ttyS0 quiet loglevel=4 panic=-1 mitigations=off {cmdline}".strip()
    return f"""<domain type='{virt_type}'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(full_cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>{disk}
    <serial type='file'>
      <source path='{escape(str(console_log))}'/>
      <target port='0'/>
    </serial>{channel}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _wait_console(console: Path, needle: str, timeout: float,
                  dom: Any = None) -> str | None:
    """Wait until needle is in the console log; the log's text, or None on timeout or if
    dom stops running first."""
    deadline = time.monotonic() + timeout
    while True:
        text = _read(console)
        if needle in text:
            return text
        if time.monotonic() > deadline:
            return None
        if dom is not None and not _is_active(dom):
            text = _read(console)
            return text if needle in text else None
        time.sleep(0.2)


def _is_active(dom: Any) -> bool:
    try:
        return bool(dom.isActive())
    except Exception:
        return False


def destroy_domain(conn: Any, name: str) -> None:
    """Destroy and undefine a domain (with its checkpoint/snapshot metadata), if it exists."""
    libvirt = _libvirt()
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    flags = 0
    for f in ("VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA",
              "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA", "VIR_DOMAIN_UNDEFINE_NVRAM"):
        flags |= getattr(libvirt, f, 0)
    with contextlib.suppress(libvirt.libvirtError):  # gone already if it was transient
        if dom.isPersistent():
            dom.undefineFlags(flags)


def new_name(prefix: str = "bk-guest") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def create_data_disk(path: Path, size_mib: int = 256) -> Path:
    _run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M"])
    return path


@dataclass
class Guest:
    name: str
    dom: Any
    data_disk: Path
    console_log: Path
    virt_type: str
    boot_seconds: float = 0.0  # start to the agent answering guest-ping
    conn: Any = field(default=None, repr=False)

    def console(self) -> str:
        return _read(self.console_log)

    def agent(self, execute: str, arguments: dict[str, Any] | None = None,
              timeout: int = 10) -> Any:
        """Run one guest-agent command; its "return" value."""
        cmd: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            cmd["arguments"] = arguments
        return _agent_command(self.dom, cmd, timeout).get("return")

    def wait_manifest(self, at_least: int, timeout: float = 60.0) -> int:
        """The number of files the guest's writer has listed, once it is at least
        ``at_least`` (or the timeout has passed: the caller asserts)."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.manifest_count()
            if n >= at_least or time.monotonic() > deadline:
                return n
            time.sleep(0.3)

    def manifest_count(self) -> int:
        """Number of files the writer has completed (read through the agent)."""
        out = self.exec(["/bin/sh", "-c", "wc -l < /data/MANIFEST"])
        return int(out.strip() or 0)

    def exec(self, argv: list[str], timeout: float = 30) -> str:
        """Run a command in the guest through the agent (guest-exec); its stdout."""
        pid = self.agent("guest-exec", {"path": argv[0], "arg": argv[1:],
                                        "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            st = self.agent("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                if st.get("exitcode", 0) != 0:
                    raise RuntimeError(f"guest {argv} exited {st.get('exitcode')}: "
                                       f"{base64.b64decode(st.get('err-data', '')).decode()}")
                return base64.b64decode(st.get("out-data", "")).decode()
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest {argv} did not finish in {timeout}s")
            time.sleep(0.1)

    def destroy(self) -> None:
        destroy_domain(self.conn, self.name)


def wait_for_agent(dom: Any, timeout: float = 90.0, console_log: Path | None = None) -> None:
    """Until the guest agent answers guest-ping; TimeoutError (with the console) if not."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not _is_active(dom):
            break
        try:
            _agent_command(dom, {"execute": "guest-ping"}, 2)
            return
        except Exception as e:
            last = e
        time.sleep(0.3)
    tail = _read(console_log)[-3000:] if console_log else ""
    state = "running" if _is_active(dom) else "not running"
    raise TimeoutError(f"guest agent did not answer guest-ping within {timeout}s "
                       f"(domain {state}; last error: {last})\n--- console ---\n{tail}")


def start_guest(conn: Any, image: GuestImage, workdir: Path, *, name: str | None = None,
                data_disk: Path | None = None, disk_size_mib: int = 256,
                writer: bool = True, agent: bool = True, persistent: bool = True,
                cmdline: str = "", virt_type: str | None = None,
                timeout: float = 90.0) -> Guest:
    """Start a guest on a qcow2 data disk (created in workdir unless given).

    Waits for the agent's guest-ping (or, with agent=False, the "BKGUEST: ready" line).
    On any failure the domain is destroyed and undefined before the error propagates.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    name = name or new_name()
    if data_disk is None:
        data_disk = create_data_disk(workdir / f"{name}-data.qcow2", disk_size_mib)
    console = workdir / f"{name}-console.log"
    virt = virt_type or choose_virt_type(conn, image)
    args = f"writer={int(writer)} agent={int(agent)} {cmdline}".strip()
    xml = domain_xml(name, image, data_disk, console, virt_type=virt, cmdline=args, agent=agent)
    t0 = time.monotonic()
    if persistent:
        dom = conn.defineXML(xml)
        try:
            dom.create()
        except Exception:
            destroy_domain(conn, name)
            raise
    else:
        dom = conn.createXML(xml, 0)
    guest = Guest(name=name, dom=dom, data_disk=data_disk, console_log=console,
                  virt_type=virt, conn=conn)
    try:
        if agent:
            wait_for_agent(dom, timeout, console)
        elif _wait_console(console, "BKGUEST: ready", timeout, dom) is None:
            raise TimeoutError(f"guest not ready in {timeout}s\n{_read(console)[-3000:]}")
    except BaseException:
        destroy_domain(conn, name)
        raise
    guest.boot_seconds = time.monotonic() - t0
    return guest


VERIFY_RE = re.compile(r"BKGUEST-VERIFY: (PASS|FAIL)\b.*")


def boot_verify(conn: Any, disk_path: str | Path, timeout: float = 120.0, *,
                mode: str = "strict", image: GuestImage | None = None,
                disk_format: str | None = None, workdir: Path | None = None,
                ) -> tuple[bool, str]:
    """Boot a throwaway domain on disk_path with verify=1 and read its verdict.

    mode "strict": `e2fsck -n -f` must be clean before anything mounts the filesystem
    (what a quiesced backup must give); "replay": mount first so the journal is
    replayed (a crash-consistent copy).  Then every file in /data/MANIFEST must have
    its checksum.  Returns (passed, console text).  strict attaches the disk read-only;
    replay writes to it (the journal replay).  The domain is always destroyed.
    """
    if mode not in ("strict", "replay"):
        raise ValueError(f"mode must be strict or replay, not {mode!r}")
    image = image or build_guest()
    disk_path = Path(disk_path)
    if disk_format is None:
        info = json.loads(_run(["qemu-img", "info", "-U", "--output=json",
                                str(disk_path)]).stdout)
        disk_format = info["format"]
    name = new_name("bk-verify")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bk-verify-")))
        console = workdir / f"{name}-console.log"
        verify = "1" if mode == "strict" else "replay"
        xml = domain_xml(name, image, disk_path, console, virt_type=choose_virt_type(conn, image),
                         cmdline=f"writer=0 agent=0 verify={verify}", agent=False,
                         disk_format=disk_format, readonly=mode == "strict")
        dom = conn.createXML(xml, 0)
        try:
            text = _wait_console(console, "BKGUEST-VERIFY:", timeout, dom)
        finally:
            destroy_domain(conn, name)
        text = text if text is not None else _read(console)
    m = VERIFY_RE.search(text)
    return (bool(m and m.group(1) == "PASS"), text)


@dataclass
class DiskCheck:
    ok: bool
    fsck_clean: bool  # e2fsck -n -f was clean before any journal replay
    files: int  # manifest entries whose file has the recorded checksum
    bad: list[str]
    detail: str


def expected_content(n: int, wsize_kib: int = 64) -> bytes:
    """What the guest's writer puts in /data/f<n>."""
    line = f"backupkit f{n}\n".encode()
    size = (n % wsize_kib + 1) * 1024
    return (line * (size // len(line) + 1))[:size]


def check_disk_on_host(disk_path: str | Path, *, replay: bool = True) -> DiskCheck:
    """Check a data disk without booting: a raw scratch copy, `e2fsck -n -f`, then (with
    replay) `e2fsck -fy` on the copy to replay the journal, then every manifest file's
    checksum and content via debugfs.  The disk itself is never written."""
    disk_path = Path(disk_path)
    with tempfile.TemporaryDirectory(prefix="bk-check-") as td:
        raw = Path(td) / "disk.raw"
        _run(["qemu-img", "convert", "-U", "-O", "raw", str(disk_path), str(raw)])
        r = subprocess.run(["e2fsck", "-n", "-f", str(raw)], capture_output=True, text=True)
        # -n skips a pending journal recovery with only a warning (and may exit 0).
        clean = r.returncode == 0 and "recovery" not in (r.stdout + r.stderr).lower()
        detail = f"e2fsck -n -f: rc={r.returncode}\n{r.stdout}{r.stderr}"
        if not clean and replay:
            r2 = subprocess.run(["e2fsck", "-fy", str(raw)], capture_output=True, text=True)
            detail += f"e2fsck -fy: rc={r2.returncode}\n{r2.stdout}{r2.stderr}"
            if r2.returncode not in (0, 1):
                return DiskCheck(False, clean, 0, [], detail)
        out = Path(td) / "out"
        out.mkdir()
        r3 = subprocess.run(["debugfs", "-R", f"rdump / {out}", str(raw)],
                            capture_output=True, text=True)
        manifest = out / "MANIFEST"
        if not manifest.exists():
            return DiskCheck(False, clean, 0, ["no MANIFEST"], detail + r3.stderr)
        data = manifest.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1] != b"":
            lines = lines[:-1]  # the last line was being appended: not a completed file
        bad: list[str] = []
        ok = 0
        for line in lines:
            if not line:
                continue
            m = re.fullmatch(rb"(\d+) ([0-9a-f]{64})", line)
            if not m:
                bad.append(f"malformed manifest line {line!r}")
                continue
            n, want = int(m.group(1)), m.group(2).decode()
            f = out / f"f{n}"
            got = hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else "missing"
            if got != want:
                bad.append(f"f{n}: want {want} got {got}")
            elif hashlib.sha256(expected_content(n)).hexdigest() != want:
                bad.append(f"f{n}: content is not the writer's pattern")
            else:
                ok += 1
        return DiskCheck(not bad and (clean or replay), clean, ok, bad, detail)


def main() -> int:
    t = time.monotonic()
    try:
        img = build_guest()
    except GuestBuildError as e:
        log(f"error: {e}")
        return 1
    print(f"kernel={img.kernel}\ninitrd={img.initrd}\nversion={img.kernel_version}")
    log(f"done in {time.monotonic() - t:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
