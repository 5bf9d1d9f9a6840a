"""backupkit benchmark harness: one command, one run, every number next to its baseline.

    .venv/bin/python -m bench.run [--size 4G] [--chunk-size 1M] [--sweep 256K,512K,1M,4M]
                                  [--repeat 2]

Creates a running test domain with one qcow2 disk of ``--size`` and a fixed,
seeded layout (about half never written, a quarter compressible text, a quarter
random data, in runs of 256 KiB..8 MiB spread over the disk), written with
``qemu-io`` into the image before the domain starts.  Then, in one run:

- full backup (the CLI, as a child process) vs ``nbdcopy`` of the same libvirt
  pull-mode export to a local file (the copy limit), timed in ``--repeat``
  pairs (the fastest of each counts: cold reads on this machine swing 2x;
  the pairs take turns at which side goes first);
- incrementals after 1 % and 10 % of the disk were rewritten by the guest in
  scattered 64 KiB..1 MiB writes: time as a fraction of the full backup's time,
  per-byte rate vs the full's, and read amplification (bytes read / bytes dirty);
- a no-change incremental, wall time including process start (cold and warm cache);
- restore to qcow2 and raw vs ``qemu-img convert`` of the same disk into the
  same format (both fsynced), also in ``--repeat`` pairs;
- ``verify --data`` throughput; peak RSS and CPU seconds (user + system) of every
  backupkit command and every baseline (/usr/bin/time): CPU seconds near
  cores x wall seconds mark a step as CPU-bound;
- repository size vs allocated data;
- virtnbdbackup (if installed) on an identical clone domain: full with and
  without ``-z``, incrementals after the same writes, virtnbdrestore;
- a chunk-size sweep: full speed, index size, read amplification, stored bytes.

Page caches are dropped before every timed read of a disk or repository
(``--warm`` keeps them).  Results: a table on stdout and JSON in bench/out/.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402
import libvirt_qemu  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MB = 1_000_000
URI = os.environ.get("BACKUPKIT_TEST_URI", "qemu:///system")

GOALS = {
    "full_vs_copy": 1.5,        # full backup time / nbdcopy time
    "full_vs_peer_z": 1 / 2.5,  # full backup time / virtnbdbackup -z time
    "noop_seconds": 1.0,
    "read_amp": 3.0,
    "restore_vs_convert": 1.25,
    "restore_vs_peer": 1 / 4,
    "inc_vs_peer": 1 / 2,
    "rss_mib": 512,
    "encrypted_vs_plain": 1.15,  # encrypted full backup / restore time / unencrypted (issue 20)
    "s3_full_vs_local": 1.5,     # full backup to S3 / the same to a local repository (issue 18)
    "s3_inc_vs_local": 2.0,      # incremental after 1 % rewritten, S3 / local
    "s3_restore_vs_local": 1.5,  # restore from S3 / from a local repository
}


# --- small helpers -------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t[-1:] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def human(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def in_turn(i: int, a: str, b: str) -> tuple[str, str]:
    """Pair i's two timed steps in order: a first in even pairs, b first in odd ones.

    Whichever step runs first inherits the disk's backlog from the step before
    the pair (a 2 GiB write still being flushed below the guest), so neither
    side may always go first.
    """
    return (a, b) if i % 2 == 0 else (b, a)


def drop_caches(enabled: bool) -> None:
    if not enabled:
        return
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        log(f"cannot drop caches ({e}); timings are warm")


def du(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of a file or a tree."""
    if path.is_file():
        st = path.stat()
        return st.st_size, st.st_blocks * 512
    apparent = allocated = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


@dataclass
class Run:
    argv: list[str]
    seconds: float
    rc: int
    max_rss_kib: int
    cpu_seconds: float  # user + system time of the command and its children
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run(argv: list[str], *, env: dict[str, str] | None = None, check: bool = True) -> Run:
    """Run a child, timing it (wall clock) and reading its peak RSS and CPU time."""
    # ru_maxrss survives exec: a child forked from this (big) process would report at
    # least our own RSS.  /usr/bin/time is small, so the RSS it reports is the command's.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as rss:
        timed = ["/usr/bin/time", "-f", "%M %U %S", "-o", rss.name, *argv]
        t0 = time.monotonic()
        p = subprocess.run(timed, stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL,
                           check=False)
        seconds = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        # A failed command's report starts with "Command exited with non-zero status".
        text = rss.read().split()[-3:]
        kib, cpu = (int(text[0]), float(text[1]) + float(text[2])) if len(text) == 3 else (0, 0.0)
        r = Run(argv, seconds, p.returncode, kib, cpu,
                out.read().decode(errors="replace"), err.read().decode(errors="replace"))
    if check and r.rc != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.rc}:\n{r.stderr[-3000:]}"
                           f"\n{r.stdout[-2000:]}")
    return r


# --- the disk layout -----------------------------------------------------------------


def text_pool(rnd: random.Random, size: int) -> bytes:
    """Seeded text-like data (words from a vocabulary): zstd compresses it ~3x."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 6, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2, 1.9,
               1.5, 1, 0.8, 0.2, 0.2, 0.1, 0.1]
    vocab = ["".join(rnd.choices(letters, weights, k=rnd.randint(2, 11))) for _ in range(20000)]
    words = rnd.choices(vocab, k=size // 5)
    out = bytearray()
    for i in range(0, len(words), 16):
        out += " ".join(words[i:i + 16]).encode() + (b"\n" if i % 64 else b".\n")
        if len(out) >= size:
            break
    return bytes(out[:size])


def layout(size: int, seed: int) -> list[tuple[int, int, str]]:
    """(offset, length, kind) runs covering the disk; kind: zero | text | random."""
    rnd = random.Random(seed)
    runs = []
    pos = 0
    while pos < size:
        length = min(rnd.randrange(256 * KiB, 8 * MiB + 1, 64 * KiB), size - pos)
        kind = rnd.choices(("zero", "text", "random"), (2, 1, 1))[0]
        runs.append((pos, length, kind))
        pos += length
    return runs


def fill_image(image: Path, size: int, seed: int, tmp: Path,
               pool: bytes | None = None) -> dict[str, int]:
    """Write the seeded layout into the qcow2 with qemu-io (the domain is not running).

    ``pool``: the text to draw text runs from (default: made from the seed, 32 MiB)."""
    rnd = random.Random(seed + 1)
    if pool is None:
        pool = text_pool(rnd, 32 * MiB)
    stats = {"zero": 0, "text": 0, "random": 0}
    batch: list[str] = []
    files: list[Path] = []

    def flush() -> None:
        if batch:
            args = ["qemu-io", "-f", "qcow2"]
            for c in batch:
                args += ["-c", c]
            subprocess.run([*args, str(image)], check=True, capture_output=True)
        for f in files:
            f.unlink()
        batch.clear()
        files.clear()

    for off, length, kind in layout(size, seed):
        stats[kind] += length
        if kind == "zero":
            continue
        if kind == "text":
            start = rnd.randrange(0, len(pool) - length)
            data = pool[start:start + length]
        else:
            data = rnd.randbytes(length)
        f = tmp / f"fill-{off}"
        f.write_bytes(data)
        files.append(f)
        batch.append(f"write -q -s {f} {off} {length}")
        if len(batch) >= 48:
            flush()
    flush()
    return stats


def scattered_writes(size: int, fraction: float, seed: int) -> list[tuple[int, int]]:
    """Guest writes of 64 KiB..1 MiB (4 KiB aligned) until fraction of the disk is written."""
    rnd = random.Random(seed)
    writes = []
    total = 0
    while total < fraction * size:
        length = rnd.randrange(64 * KiB, MiB + 1, 4 * KiB)
        off = rnd.randrange(0, size - length, 4 * KiB)
        writes.append((off, length))
        total += length
    return writes


def union_bytes(ranges: list[tuple[int, int]], gran: int = 1) -> int:
    spans = sorted((o // gran * gran, -(-(o + n) // gran) * gran) for o, n in ranges)
    total = 0
    cur_s, cur_e = -1, -1
    for s, e in spans:
        if s > cur_e:
            total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s)


# --- domains ---------------------------------------------------------------------------


def domain_xml(name: str, image: Path) -> str:
    virt = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
    return (
        f"<domain type='{virt}'><name>{name}</name><memory unit='MiB'>128</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
        "<on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash><devices>"
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{image}'/><target dev='vda' bus='virtio'/><serial>vda</serial></disk>"
        "<memballoon model='none'/></devices></domain>")


class Conn:
    """A libvirt connection that reconnects when libvirtd was restarted under us."""

    def __init__(self) -> None:
        self._c = libvirt.open(URI)

    def get(self) -> Any:
        try:
            self._c.getLibVersion()
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                self._c.close()
            for _ in range(300):
                try:
                    self._c = libvirt.open(URI)
                    break
                except libvirt.libvirtError:
                    time.sleep(0.2)
        return self._c


@dataclass
class BenchDomain:
    conns: Conn
    name: str
    image: Path

    @property
    def conn(self) -> Any:
        return self.conns.get()

    @property
    def dom(self) -> Any:
        return self.conn.lookupByName(self.name)

    def guest_write(self, off: int, length: int, source: Path) -> None:
        cmd = f"write -q -s {source} {off} {length}"
        hmp = f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "{cmd}"'
        for attempt in range(30):  # the same write again is harmless
            try:
                out = libvirt_qemu.qemuMonitorCommand(
                    self.dom, hmp, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
                break
            except libvirt.libvirtError:  # libvirtd restarted by someone else
                if attempt == 29:
                    raise
                time.sleep(2)
        if "error" in out.lower() or "fail" in out.lower():
            raise RuntimeError(f"guest write failed: {out}")

    def cleanup(self) -> None:
        try:
            dom = self.conn.lookupByName(self.name)
        except libvirt.libvirtError:
            return
        with contextlib.suppress(libvirt.libvirtError):
            dom.abortJob()
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            for cp in dom.listAllCheckpoints(0):
                with contextlib.suppress(libvirt.libvirtError):
                    cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


@contextlib.contextmanager
def pull_export(d: BenchDomain, work: Path) -> Iterator[str]:
    """A libvirt pull-mode export of vda (no checkpoint): the NBD URI.

    QEMU runs unprivileged (libvirt-qemu): the socket and scratch file go in a
    directory owned by the user of the domain's DAC label, as backupkit does.
    """
    from backupkit.virt import Domain

    run = work / f"pull-{d.name}"
    run.mkdir(mode=0o700)
    user = Domain(d.dom).qemu_user()
    if user is not None:
        os.chown(run, user.uid, user.gid)
    sock = run / "sock"
    scratch = run / "vda.scratch"
    xml = (f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/><disks>"
           f"<disk name='vda' backup='yes' type='file'><scratch file='{scratch}'/></disk>"
           "</disks></domainbackup>")
    d.dom.backupBegin(xml, None, 0)
    try:
        yield f"nbd+unix:///vda?socket={sock}"
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            d.dom.abortJob()
        shutil.rmtree(run, ignore_errors=True)


def allocated_bytes(image: Path) -> int:
    out = subprocess.run(["qemu-img", "map", "-f", "qcow2", "-U", "--output=json", str(image)],
                         check=True, capture_output=True).stdout
    return sum(e["length"] for e in json.loads(out) if e.get("data"))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


GATEWAY_PIDS = "/run/backupkit-test-s3"  # rgw.pid, osd.pid, mon.pid of scripts/start-s3.sh


def gateway_cpu() -> float:
    """CPU seconds the test gateway's processes (RGW, OSD, MON) have used so far."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for name in ("rgw.pid", "osd.pid", "mon.pid"):
        try:
            with open(os.path.join(GATEWAY_PIDS, name)) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return total


def s3_remove(url: str) -> None:
    """Delete every object under an s3://bucket/prefix (1000 per request)."""
    from backupkit.repo.url import parse as parse_url

    _, bucket, prefix = parse_url(url)
    import boto3

    client = boto3.client("s3")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                              Prefix=prefix + "/")
    for page in pages:
        keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def scale_run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """--scale: generate a repository of N chunks (bench.scale), time the commands, for
    each N in turn (one repository, extended from one N to the next)."""
    from bench import scale

    counts = sorted(parse_count(x) for x in args.scale.split(",") if x)
    where = args.scale_repo
    made_dir = None
    if where is None or not where.startswith("s3://"):
        made_dir = Path(where or tempfile.mkdtemp(prefix="bkscale-", dir="/var/tmp"))
        url = str(made_dir / "repo")
    else:
        url = where.rstrip("/") + f"/bkscale-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k not in ("BACKUPKIT_REPO", "JOURNAL_STREAM")}
    env["PYTHONPATH"] = str(ROOT)
    out = []
    try:
        for n in counts:
            log(f"scale: generating {n} chunks in {url}")
            info = scale.generate(url, n, log=log)
            log(f"scale {n}: generated in {info['generate_seconds']}s; timing the commands")
            rows = scale.measure(url, info, run, env)
            for r in rows:
                log(f"scale {n}: {r['step']}: {r['seconds']}s, {r['rss_mib']} MiB"
                    + (f" FAILED: {r.get('error')}" if r["rc"] else ""))
            out.append({"n": n, "store": "s3" if url.startswith("s3://") else "local",
                        "info": info, "rows": rows})
    finally:
        if url.startswith("s3://"):
            s3_remove(url)
        elif made_dir is not None and not args.keep:
            shutil.rmtree(made_dir, ignore_errors=True)
    return out


def parse_count(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 1000, "M": 1_000_000}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


# --- the benchmark -----------------------------------------------------------------


@dataclass
class Row:
    name: str
    seconds: float
    nbytes: int  # bytes the MB/s column is computed from
    baseline: str = ""
    baseline_seconds: float | None = None
    ratio: float | None = None
    goal: str = ""
    ok: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mbps(self) -> float:
        return self.nbytes / MB / self.seconds if self.seconds > 0 else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = parse_size(args.size)
        self.cold = not args.warm
        self.conns = Conn()  # first: no work directory is left behind when libvirtd is down
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="bkbench-", dir="/var/tmp"))
        self.work.mkdir(parents=True, exist_ok=True)
        # QEMU runs as libvirt-qemu: it must reach the images (mkdtemp makes 0700).
        self.work.chmod(0o711)
        self.rows: list[Row] = []
        self.rss: dict[str, int] = {}
        # label -> (CPU seconds, wall seconds) of the fastest run with that label
        self.cpu: dict[str, tuple[float, float]] = {}
        self.info: dict[str, Any] = {}
        self.sweep: list[dict[str, Any]] = []
        self.scale: list[dict[str, Any]] = []
        self.domains: list[BenchDomain] = []
        self.peer = (not args.no_peer) and shutil.which("virtnbdbackup") is not None
        cfg = self.work / "backupkit.toml"
        cfg.write_text(f'scratch_dir = "{self.work / "scratch"}"\n')
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("BACKUPKIT_REPO", "JOURNAL_STREAM")}
        self.env["BACKUPKIT_CONFIG"] = str(cfg)
        self.env["PYTHONPATH"] = str(ROOT)
        self.env["BACKUPKIT_PASSPHRASE"] = "bench"  # only the --encrypted repositories use it
        # Time commands as an installed package runs them: with bytecode (an editable
        # install has none, and PYTHONDONTWRITEBYTECODE would make every start compile).
        compileall.compile_dir(str(ROOT / "backupkit"), quiet=1)

    # -- helpers -------------------------------------------------------------

    def cli(self, label: str, repo: Path | str, *args: str, cold: bool = True) -> Run:
        argv = [sys.executable, "-m", "backupkit", "--repo", str(repo), "--json", "-q", *args]
        drop_caches(self.cold and cold)
        r = run(argv, env=self.env, check=False)
        if r.rc != 0 and "libvirt" in r.stderr.lower():
            # Other users of this machine restart libvirtd: note it and try once more.
            log(f"{label} failed ({r.stderr.strip()[-200:]}); retrying once")
            self.info.setdefault("retried", []).append(label)
            time.sleep(5)
            drop_caches(self.cold and cold)
            r = run(argv, env=self.env, check=False)
        if r.rc != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {r.rc}:\n{r.stderr[-3000:]}")
        self.rss[label] = max(self.rss.get(label, 0), r.max_rss_kib)
        self.note_cpu(label, r)
        return r

    def note_cpu(self, label: str, r: Run) -> None:
        if label not in self.cpu or r.seconds < self.cpu[label][1]:
            self.cpu[label] = (r.cpu_seconds, r.seconds)

    def peer_run(self, label: str, argv: list[str], out: Path | None) -> Run:
        """Run a virtnbdbackup/virtnbdrestore command; once more if libvirtd went away."""
        r = run(argv, check=False)
        if r.rc != 0 and "libvirt" in r.stderr.lower():
            log(f"{label} failed ({r.stderr.strip()[-200:]}); retrying once")
            self.info.setdefault("retried", []).append(label)
            time.sleep(5)
            if out is not None:  # a full or a restore starts over in an empty directory
                shutil.rmtree(out, ignore_errors=True)
            drop_caches(self.cold)
            r = run(argv, check=False)
        if r.rc != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {r.rc}:\n{r.stderr[-3000:]}")
        self.note_cpu(label, r)
        return r

    def sync_after(self, path: Path) -> float:
        """Seconds a syncfs of path's filesystem takes right after a peer command.

        virtnbdbackup never fsyncs what it writes; backupkit's times include making
        its chunks durable.  This is the part of the peer's work still in the page cache.
        """
        t0 = time.monotonic()
        subprocess.run(["sync", "-f", str(path)], check=True)
        return round(time.monotonic() - t0, 2)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        log(f"{row.name}: {row.seconds:.2f}s"
            + (f" ({row.baseline} {row.baseline_seconds:.2f}s, ratio {row.ratio:.2f})"
               if row.baseline_seconds else ""))
        return row

    def apply_writes(self, fraction: float, seed: int) -> tuple[int, int]:
        writes = scattered_writes(self.size, fraction, seed)
        src = self.work / "write-source.bin"
        if not src.exists():
            src.write_bytes(random.Random(7).randbytes(MiB))
        t0 = time.monotonic()
        for d in self.domains:
            for off, length in writes:
                d.guest_write(off, length, src)
        log(f"{len(writes)} guest writes ({fraction:.0%}) on {len(self.domains)} domain(s) "
            f"in {time.monotonic() - t0:.1f}s")
        return union_bytes(writes), union_bytes(writes, 64 * KiB)

    # -- setup -------------------------------------------------------------------

    def setup(self) -> None:
        t0 = time.monotonic()
        name = f"bkbench-{uuid.uuid4().hex[:8]}"
        image = self.work / f"{name}-vda.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(self.size)],
                       check=True)
        fill = self.work / "fill"
        fill.mkdir(exist_ok=True)
        stats = fill_image(image, self.size, self.args.seed, fill)
        fill.rmdir()
        self.info["layout"] = stats
        self.info["allocated_bytes"] = allocated_bytes(image)
        images = [(name, image)]
        if self.peer:
            clone = self.work / f"{name}-peer-vda.qcow2"
            subprocess.run(["cp", "--sparse=always", str(image), str(clone)], check=True)
            images.append((f"{name}-peer", clone))
        for n, img in images:
            self.conns.get().defineXML(domain_xml(n, img))
            d = BenchDomain(self.conns, n, img)
            self.domains.append(d)
            d.dom.create()
        (self.work / "scratch").mkdir(exist_ok=True)
        self.info["setup_seconds"] = round(time.monotonic() - t0, 2)
        log(f"domain {name} ({human(self.size)}, {human(self.info['allocated_bytes'])} allocated: "
            f"{human(stats['text'])} text, {human(stats['random'])} random) ready in "
            f"{self.info['setup_seconds']}s; peer clone: {self.peer}")

    # -- the measurements -----------------------------------------------------------

    def main_run(self) -> None:
        main = self.domains[0]
        alloc = self.info["allocated_bytes"]
        repo = self.work / "repo"
        cs = self.args.chunk_size

        # The copy limit, nbdcopy of the same pull-mode export to a local file, and the
        # full backup, in pairs: this machine's cold reads swing 2x between minutes
        # (nbdcopy 3.9-8.1 s), so each is timed --repeat times and the fastest counts.
        # Every pair but the last backs up into a scratch repository.
        out = self.work / "nbdcopy.raw"
        copies: list[float] = []
        fulls: list[Run] = []
        level = (["--compression-level", str(self.args.compression_level)]
                 if self.args.compression_level is not None else [])
        for i in range(self.args.repeat):
            last = i == self.args.repeat - 1
            target = repo if last else self.work / f"repo-pair-{i}"

            for step in in_turn(i, "copy", "full"):
                if step == "copy":
                    with pull_export(main, self.work) as uri:
                        drop_caches(self.cold)
                        r = run(["nbdcopy", "--flush", uri, str(out)])
                        self.note_cpu("nbdcopy", r)
                        copies.append(r.seconds)
                    out.unlink()
                else:
                    self.cli("init", target, "init", "--chunk-size", cs, *level)
                    fulls.append(self.cli("backup full", target, "backup", main.name))
            if not last:
                shutil.rmtree(target)
            log(f"pair {i + 1}/{self.args.repeat}: nbdcopy {copies[-1]:.2f}s, "
                f"full backup {fulls[-1].seconds:.2f}s")
        copy_s = min(copies)
        self.add(Row("nbdcopy export -> file (copy limit)", copy_s, alloc,
                     extra={"samples": [round(c, 2) for c in copies]}))
        full = min(fulls, key=lambda f: f.seconds)
        fj = fulls[-1].json()
        assert fj["mode"] == "full", fj
        full_s = full.seconds
        self.add(Row("backupkit full backup", full_s, alloc, "nbdcopy", copy_s,
                     full_s / copy_s, f"<= {GOALS['full_vs_copy']}",
                     full_s / copy_s <= GOALS["full_vs_copy"],
                     {"read_bytes": fj["read_bytes"], "stored_bytes": fj["stored_bytes"],
                      "internal_seconds": full.json()["duration_seconds"],
                      "samples": [round(f.seconds, 2) for f in fulls]}))
        apparent, on_disk = du(repo)
        self.info["repo_after_full"] = {"apparent": apparent, "allocated": on_disk,
                                        "vs_allocated_data": round(apparent / alloc, 3)}

        peer_dir = self.work / "peer-z"
        if self.peer:
            peer = self.domains[1]
            nz = self.work / "peer-plain"
            drop_caches(self.cold)
            r = self.peer_run("virtnbdbackup full", [
                "virtnbdbackup", "-d", peer.name, "-l", "full", "-o", str(nz), "-n",
                "-S", str(self.work / "scratch")], nz)
            synced = self.sync_after(nz)
            self.info["peer_full_plain_size"] = du(nz)[0]
            self.add(Row("virtnbdbackup -l full", r.seconds, alloc,
                         extra={"output_bytes": du(nz)[0], "then_sync_s": synced}))
            shutil.rmtree(nz)
            drop_caches(self.cold)
            r = self.peer_run("virtnbdbackup full -z", [
                "virtnbdbackup", "-d", peer.name, "-l", "full", "-z", "-o", str(peer_dir),
                "-n", "-S", str(self.work / "scratch")], peer_dir)
            pz_s = r.seconds
            synced = self.sync_after(peer_dir)
            self.info["peer_full_z_size"] = du(peer_dir)[0]
            self.add(Row("virtnbdbackup -l full -z", pz_s, alloc,
                         extra={"output_bytes": du(peer_dir)[0], "then_sync_s": synced}))
            ratio = full_s / pz_s
            self.add(Row("backupkit full vs virtnbdbackup -z", full_s, alloc,
                         "virtnbdbackup -z", pz_s, ratio, "<= 0.4 (2.5x faster)",
                         ratio <= GOALS["full_vs_peer_z"],
                         {"ratio_vs_peer_then_sync": round(full_s / (pz_s + synced), 2)}))

        full_rate = full_s / alloc  # seconds per byte
        inc_rows: list[Row] = []
        for frac, seed in ((0.01, 101), (0.10, 110)):
            dirty, dirty64 = self.apply_writes(frac, self.args.seed + seed)
            inc = self.cli(f"backup inc {frac:.0%}", repo, "backup", main.name)
            ij = inc.json()
            assert ij["mode"] == "incremental", ij
            amp = ij["read_bytes"] / dirty
            label = f"incremental after {frac:.0%} rewritten"
            inc_rows.append(self.add(Row(
                label, inc.seconds, dirty, "full backup", full_s, inc.seconds / full_s,
                f"read amp <= {GOALS['read_amp']}; per-byte <= full's", None,
                {"dirty_bytes": dirty, "dirty_bytes_64k": dirty64,
                 "read_bytes": ij["read_bytes"], "stored_bytes": ij["stored_bytes"],
                 "read_amplification": round(amp, 3)})))
            if self.peer:
                drop_caches(self.cold)
                r = self.peer_run(f"virtnbdbackup inc {label}", [
                    "virtnbdbackup", "-d", self.domains[1].name, "-l", "inc", "-z",
                    "-o", str(peer_dir), "-n", "-S", str(self.work / "scratch")], None)
                synced = self.sync_after(peer_dir)
                ratio = inc.seconds / r.seconds
                self.add(Row(f"{label} vs virtnbdbackup -l inc -z", inc.seconds, dirty,
                             "virtnbdbackup inc", r.seconds, ratio, "<= 0.5 (2x faster)",
                             ratio <= GOALS["inc_vs_peer"],
                             {"peer_then_sync_s": synced,
                              "ratio_vs_peer_then_sync": round(
                                  inc.seconds / (r.seconds + synced), 2)}))

        noop_cold = self.cli("backup no-change", repo, "backup", main.name)
        noop_warm = self.cli("backup no-change", repo, "backup", main.name, cold=False)
        for tag, r in (("cold cache", noop_cold), ("warm cache", noop_warm)):
            assert r.json()["mode"] == "incremental"
            self.add(Row(f"no-change incremental (CLI, {tag})", r.seconds, 0, goal="<= 1 s",
                         ok=r.seconds <= GOALS["noop_seconds"],
                         extra={"read_bytes": r.json()["read_bytes"]}))

        # Beyond the fixed cost of a no-change run, time grows with the dirty bytes.
        # The incrementals run with caches dropped, so their fixed cost is the cold run's.
        fixed = noop_cold.seconds if self.cold else noop_warm.seconds
        for row in inc_rows:
            per_byte = (row.seconds - fixed) / row.nbytes / full_rate
            row.extra["per_byte_vs_full"] = round(per_byte, 3)
            row.ok = row.extra["read_amplification"] <= GOALS["read_amp"] and per_byte <= 1.0

        apparent, on_disk = du(repo)
        self.info["repo_final"] = {"apparent": apparent, "allocated": on_disk,
                                   "vs_allocated_data": round(apparent / alloc, 3)}
        if self.peer:
            self.info["peer_final_z_size"] = du(peer_dir)[0]

        # Restore vs qemu-img convert of the same content (the disk now) into the same format.
        # Timed in --repeat pairs like the full backup; the fastest of each counts.
        for fmt in ("qcow2", "raw"):
            target = self.work / f"restore-{fmt}"
            conv = self.work / f"convert.{fmt}"
            restores: list[float] = []
            converts: list[float] = []
            for i in range(self.args.repeat):
                if i:
                    shutil.rmtree(target)
                    conv.unlink()

                for step in in_turn(i, "restore", "convert"):
                    if step == "restore":
                        restores.append(self.cli(
                            f"restore {fmt}", repo, "restore", main.name, "latest",
                            "--target", str(target), "--format", fmt).seconds)
                    else:
                        drop_caches(self.cold)
                        t0 = time.monotonic()
                        r = run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", fmt,
                                 str(main.image), str(conv)])
                        fsync_path(conv)
                        r.seconds = time.monotonic() - t0
                        self.note_cpu(f"qemu-img convert -O {fmt}", r)
                        converts.append(r.seconds)
            same = subprocess.run(["qemu-img", "compare", "-q", "-U", "-f", fmt, "-F", fmt,
                                   str(conv), str(target / f"vda.{fmt}")]).returncode == 0
            restore_s, conv_s = min(restores), min(converts)
            ratio = restore_s / conv_s
            self.add(Row(f"restore {fmt}", restore_s, alloc, f"qemu-img convert -O {fmt}",
                         conv_s, ratio, f"<= {GOALS['restore_vs_convert']}",
                         ratio <= GOALS["restore_vs_convert"] and same,
                         {"identical_to_convert": same,
                          "samples": [round(x, 2) for x in restores],
                          "convert_samples": [round(x, 2) for x in converts]}))
            conv.unlink()
            if fmt == "qcow2":
                restore_qcow2_s = restore_s
            shutil.rmtree(target)
        if self.peer:
            out_dir = self.work / "peer-restore"
            drop_caches(self.cold)
            r = self.peer_run("virtnbdrestore", [
                "virtnbdrestore", "-i", str(peer_dir), "-o", str(out_dir), "-n"], out_dir)
            synced = self.sync_after(out_dir)
            ratio = restore_qcow2_s / r.seconds
            self.add(Row("restore qcow2 vs virtnbdrestore", restore_qcow2_s, alloc,
                         "virtnbdrestore", r.seconds, ratio, "<= 0.25 (4x faster)",
                         ratio <= GOALS["restore_vs_peer"],
                         {"peer_then_sync_s": synced,
                          "ratio_vs_peer_then_sync": round(
                              restore_qcow2_s / (r.seconds + synced), 2)}))
            shutil.rmtree(out_dir)

        v = self.cli("verify --data", repo, "verify", "--data")
        vj = v.json()
        self.add(Row("verify --data", v.seconds, vj["bytes_read"],
                     extra={"chunks": vj["chunks_checked"], "ok": vj["ok"]}))
        if not self.args.keep:
            shutil.rmtree(repo)

    def encrypted_run(self) -> None:
        """Full backup and raw restore into an encrypted and an unencrypted repository.

        Same domain, same content, in --repeat pairs taking turns at going first; the
        fastest of each counts (goal: encrypted within 1.15x, issue 20).
        """
        main = self.domains[0]
        alloc = self.info["allocated_bytes"]
        cs = self.args.chunk_size
        times: dict[str, list[float]] = {}
        for i in range(self.args.repeat):
            repos = {"plain": self.work / f"repo-plain-{i}",
                     "encrypted": self.work / f"repo-enc-{i}"}
            for kind in in_turn(i, "plain", "encrypted"):
                self.cli(f"{kind} init", repos[kind], "init", "--chunk-size", cs,
                         *(["--encryption"] if kind == "encrypted" else []))
                r = self.cli(f"{kind} backup full", repos[kind], "backup", main.name,
                             "--mode", "full")
                times.setdefault(f"{kind} full", []).append(r.seconds)
            for kind in in_turn(i, "plain", "encrypted"):
                target = self.work / f"restore-{kind}"
                r = self.cli(f"{kind} restore raw", repos[kind], "restore", main.name,
                             "latest", "--target", str(target), "--format", "raw")
                times.setdefault(f"{kind} restore", []).append(r.seconds)
                shutil.rmtree(target)
            for repo in repos.values():
                shutil.rmtree(repo)
        for what in ("full", "restore"):
            plain, enc = min(times[f"plain {what}"]), min(times[f"encrypted {what}"])
            ratio = enc / plain
            self.add(Row(f"encrypted {'full backup' if what == 'full' else 'restore raw'}",
                         enc, alloc, f"unencrypted {what}", plain, ratio,
                         f"<= {GOALS['encrypted_vs_plain']}",
                         ratio <= GOALS["encrypted_vs_plain"],
                         {"samples": [round(x, 2) for x in times[f"encrypted {what}"]],
                          "plain_samples": [round(x, 2) for x in times[f"plain {what}"]]}))

    def s3_run(self) -> None:
        """The same domain backed up to S3 (--repo s3://...) and to a local repository.

        Full backups in --repeat pairs (taking turns at going first), then a no-change
        incremental, an incremental after 1 % rewritten and a raw restore from each;
        the requests each S3 backup sent, by kind, from its result JSON.
        """
        main = self.domains[0]
        alloc = self.info["allocated_bytes"]
        cs = self.args.chunk_size
        base = self.args.repo.rstrip("/") + f"/bkbench-{uuid.uuid4().hex[:8]}"
        times: dict[str, list[float]] = {}
        repos: dict[str, str] = {}
        requests: dict[str, Any] = {}
        gw: dict[str, list[float]] = {}  # label -> gateway CPU seconds of each run

        def timed(label: str, where: str, *args: str, cold: bool = True) -> Run:
            g0 = gateway_cpu()
            r = self.cli(label, where, *args, cold=cold)
            if label.startswith("s3 "):
                gw.setdefault(label, []).append(round(gateway_cpu() - g0, 2))
            return r

        try:
            for i in range(self.args.repeat):
                pair = {"local": str(self.work / f"repo-s3cmp-{i}"), "s3": f"{base}-{i}"}
                repos.update(pair)
                for kind in in_turn(i, "local", "s3"):
                    self.cli(f"{kind} init", pair[kind], "init", "--chunk-size", cs)
                    r = timed(f"{kind} backup full", pair[kind], "backup", main.name,
                              "--mode", "full")
                    times.setdefault(f"{kind} full", []).append(r.seconds)
                    if kind == "s3":
                        requests["full"] = r.json().get("requests")
                if i < self.args.repeat - 1:
                    shutil.rmtree(pair["local"])
                    s3_remove(pair["s3"])
            # No-change incrementals (warm, as the nightly run meets them), then 1 %.
            for kind in ("local", "s3"):
                r = timed(f"{kind} backup noop", repos[kind], "backup", main.name, cold=False)
                times[f"{kind} noop"] = [r.seconds]
                if kind == "s3":
                    requests["no-change incremental"] = r.json().get("requests")
            self.apply_writes(0.01, self.args.seed + 77)
            for kind in in_turn(1, "local", "s3"):
                r = timed(f"{kind} backup inc 1%", repos[kind], "backup", main.name)
                times[f"{kind} inc"] = [r.seconds]
                j = r.json()
                if kind == "s3":
                    requests["incremental 1%"] = j.get("requests")
                    requests["incremental 1% stored_chunks"] = j.get("stored_chunks")
            for i in range(self.args.repeat):
                for kind in in_turn(i, "local", "s3"):
                    target = self.work / f"restore-s3cmp-{kind}"
                    r = timed(f"{kind} restore raw", repos[kind], "restore", main.name,
                              "latest", "--target", str(target), "--format", "raw")
                    times.setdefault(f"{kind} restore", []).append(r.seconds)
                    shutil.rmtree(target)
        finally:
            for kind, where in repos.items():
                if kind == "s3":
                    s3_remove(where)
                else:
                    shutil.rmtree(where, ignore_errors=True)
        for what, goal_key, title in (
                ("full", "s3_full_vs_local", "S3 full backup"),
                ("inc", "s3_inc_vs_local", "S3 incremental after 1% rewritten"),
                ("restore", "s3_restore_vs_local", "S3 restore raw")):
            s3s, loc = min(times[f"s3 {what}"]), min(times[f"local {what}"])
            ratio = s3s / loc
            self.add(Row(title, s3s, alloc if what != "inc" else 0,
                         f"local {'incremental 1%' if what == 'inc' else what}", loc, ratio,
                         f"<= {GOALS[goal_key]}", ratio <= GOALS[goal_key],
                         {"samples": [round(x, 2) for x in times[f"s3 {what}"]],
                          "local_samples": [round(x, 2) for x in times[f"local {what}"]]}))
        noop = times["s3 noop"][0]
        self.add(Row("S3 no-change incremental (CLI, warm cache)", noop, 0,
                     "local no-change incremental", times["local noop"][0],
                     noop / times["local noop"][0], f"<= {GOALS['noop_seconds']} s",
                     noop <= GOALS["noop_seconds"]))
        # Per backup, one HEAD per disk is the commit's check that the disk's index is
        # stored and one the commit's check that its writer lock is still there
        # (docs/format.md, "Locks and gc"); any more would be lookups of chunks.
        heads = max(((r or {}).get("HEAD", 0) for r in requests.values()
                     if isinstance(r, dict)), default=0)
        self.add(Row("S3 requests per backup", 0, 0,
                     goal="HEAD per known chunk: 0 (per backup: 1 per disk, the index check "
                          "at commit, and 1 for the writer lock)",
                     ok=heads <= 2, extra=dict(requests)))
        self.info["s3_requests"] = requests
        self.info["gateway_cpu_seconds"] = gw

    def chunk_sweep(self) -> None:
        main = self.domains[0]
        alloc = self.info["allocated_bytes"]
        for i, spec in enumerate(s for s in self.args.sweep.split(",") if s):
            cs_text, _, level = spec.partition(":")  # "1M:1": chunk size 1M, zstd level 1
            cs = parse_size(cs_text)
            repo = self.work / f"repo-sweep-{i}"
            # Labels of their own: the main run's peak RSS and CPU lines stay its own.
            self.cli(f"sweep {spec} init", repo, "init", "--chunk-size", str(cs),
                     *(["--compression-level", level] if level else []))
            full = self.cli(f"sweep {spec} backup full", repo, "backup", main.name)
            fj = full.json()
            dirty, _ = self.apply_writes(0.01, self.args.seed + 1000 + i)
            inc = self.cli(f"sweep {spec} backup inc 1%", repo, "backup", main.name)
            ij = inc.json()
            index = next((repo / "backups" / main.name).glob(f"{fj['id']}/vda.index"))
            entry = {
                "chunk_size": cs, "compression_level": int(level) if level else None,
                "full_seconds": round(full.seconds, 3),
                "full_mbps": round(alloc / MB / full.seconds, 1),
                "full_rss_mib": round(full.max_rss_kib / 1024, 1),
                "index_bytes": index.stat().st_size,
                "repo_bytes_after_full": du(repo)[0],
                "inc_seconds": round(inc.seconds, 3), "dirty_bytes": dirty,
                "read_amplification": round(ij["read_bytes"] / dirty, 3),
                "stored_amplification": round(ij["stored_bytes"] / dirty, 3),
            }
            self.sweep.append(entry)
            log(f"sweep {spec}: {entry}")
            shutil.rmtree(repo)

    def cleanup(self) -> None:
        for d in self.domains:
            d.cleanup()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- report ---------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        doc = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "args": vars(self.args),
            "machine": machine(),
            "info": self.info,
            "rows": [{**asdict(r), "mbps": round(r.mbps, 1)} for r in self.rows],
            "peak_rss_mib": {k: round(v / 1024, 1) for k, v in self.rss.items()},
            "rss_ok": all(v / 1024 < GOALS["rss_mib"] for v in self.rss.values()),
            "cpu": {k: {"cpu_seconds": round(c, 2), "seconds": round(w, 2)}
                    for k, (c, w) in self.cpu.items()},
            "chunk_sweep": self.sweep,
            "scale": self.scale,
        }
        return doc


def render_scale(scale: list[dict[str, Any]]) -> str:
    lines = ["| chunks | store | backups | step | s | peak RSS MiB | CPU s | notes |",
             "|" + "---|" * 8]
    for sc in scale:
        info = sc["info"]
        for r in sc["rows"]:
            notes = (f"failed: {r['error']}" if r["rc"] else
                     (f"removed {r['chunks_removed']}" if r.get("chunks_removed") else ""))
            lines.append(f"| {sc['n']:,} | {sc['store']} | {info['backups']} | {r['step']} | "
                         f"{r['seconds']:.2f} | {r['rss_mib']} | {r['cpu_seconds']} | {notes} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), "")
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * KiB

    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "absent"

    return {"cpus": os.cpu_count(), "cpu": cpu, "memory": human(mem),
            "python": sys.version.split()[0], "kernel": os.uname().release,
            "qemu": version(["qemu-img", "--version"]),
            "libvirt": version(["virsh", "--version"]),
            "nbdcopy": version(["nbdcopy", "--version"]),
            "virtnbdbackup": version(["virtnbdbackup", "--version"])}


def render(doc: dict[str, Any]) -> str:
    lines = []
    a = doc["args"]
    info = doc["info"]
    m = doc["machine"]
    if "allocated_bytes" not in info:  # a scale scenario: its rows say what they measured
        info = {**info, "allocated_bytes": 0, "layout": {"text": 0, "random": 0}}
    kinds = (f"{human(info['layout']['real'])} of /usr files in an ext4 image"
             if "real" in info["layout"] else f"{human(info['layout']['text'])} text")
    lines.append(f"disk {a['size']} ({human(info['allocated_bytes'])} allocated: "
                 f"{kinds}, {human(info['layout']['random'])} "
                 f"random), chunk size {a['chunk_size']}, zstd level "
                 f"{a['compression_level'] or 'default (1)'}, caches "
                 f"{'warm' if a['warm'] else 'dropped before each timed step'}")
    lines.append(f"machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory']}, {m['qemu']}, "
                 f"libvirt {m['libvirt']}, Python {m['python']}")
    lines.append("")
    hdr = ("| step | s | MB/s | baseline | baseline s | ratio | goal | met | notes |")
    lines.append(hdr)
    lines.append("|" + "---|" * 9)
    for r in doc["rows"]:
        notes = ", ".join(f"{k}={human(v) if k.endswith('bytes') and isinstance(v, int) else v}"
                          for k, v in r["extra"].items())
        met = "" if r["ok"] is None else ("yes" if r["ok"] else "**no**")
        lines.append(
            f"| {r['name']} | {r['seconds']:.2f} | {r['mbps']:.0f} | {r['baseline']} | "
            + (f"{r['baseline_seconds']:.2f}" if r["baseline_seconds"] else "")
            + " | " + (f"{r['ratio']:.2f}" if r["ratio"] is not None else "")
            + f" | {r['goal']} | {met} | {notes} |")
    lines.append("")
    lines.append("Peak RSS (MiB) per backupkit command: "
                 + ", ".join(f"{k} {v}" for k, v in doc["peak_rss_mib"].items())
                 + f" — goal < {GOALS['rss_mib']}: {'met' if doc['rss_ok'] else 'NOT met'}")
    if doc.get("cpu"):
        lines.append(
            "CPU seconds (user + system) / wall seconds, fastest run of each; the export's "
            "QEMU not counted: "
            + ", ".join(f"{k} {v['cpu_seconds']:.2f}/{v['seconds']:.2f}"
                        for k, v in doc["cpu"].items()))
    rf = info.get("repo_final", {})
    ra = info.get("repo_after_full", {})
    lines.append(
        f"Repository after full: {human(ra.get('apparent', 0))} "
        f"({ra.get('vs_allocated_data')} x allocated data); after all incrementals: "
        f"{human(rf.get('apparent', 0))}"
        + (f"; virtnbdbackup -z: {human(info['peer_full_z_size'])} after full, "
           f"{human(info['peer_final_z_size'])} after incrementals; without -z: "
           f"{human(info['peer_full_plain_size'])}" if "peer_full_z_size" in info else
           "; virtnbdbackup: not run"))
    comp = info.get("compressors")
    if comp:
        lines.append("")
        lines.append(f"Compressors on {human(comp['sample_bytes'])} of the real data "
                     "(1 MiB chunks, one core):")
        lines.append("")
        lines.append("| codec | ratio | stored / data | MB/s | decompress MB/s |")
        lines.append("|---|---|---|---|---|")
        for c in comp["rows"]:
            lines.append(f"| {c['codec']} | {c['ratio'] or ''} | {c.get('stored_fraction', '')}"
                         f" | {c['mbps']} | {c.get('decompress_mbps', '')} |")
    if doc["chunk_sweep"]:
        lines.append("")
        lines.append("| chunk size | zstd level | full s | full MB/s | full RSS MiB | "
                     "index bytes | repo after full+inc | inc 1% s | read amp | stored / dirty |")
        lines.append("|" + "---|" * 10)
        for s in doc["chunk_sweep"]:
            lines.append(
                f"| {human(s['chunk_size'])} | {s['compression_level'] or 'default'} | "
                f"{s['full_seconds']:.2f} | {s['full_mbps']} | "
                f"{s['full_rss_mib']} | {s['index_bytes']} | {human(s['repo_bytes_after_full'])}"
                f" | {s['inc_seconds']:.2f} | {s['read_amplification']} | "
                f"{s['stored_amplification']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="4G", help="virtual disk size (default 4G)")
    p.add_argument("--chunk-size", default="1M", help="chunk size of the main run (default 1M)")
    p.add_argument("--compression-level", type=int, default=None,
                   help="zstd level of the main run's repository (default: backupkit's)")
    p.add_argument("--sweep", default="256K,512K,1M,4M",
                   help="comma-separated chunk sizes to sweep, SIZE:LEVEL for a zstd level "
                        "('' for none)")
    p.add_argument("--repeat", type=int, default=2,
                   help="time nbdcopy/full backup and convert/restore in this many pairs, "
                        "taking turns at going first; the fastest of each counts (default 2)")
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--no-peer", action="store_true", help="skip virtnbdbackup")
    p.add_argument("--encrypted", action="store_true",
                   help="also time full backup and restore on an encrypted repository "
                        "against an unencrypted one")
    p.add_argument("--repo", metavar="URL",
                   help="also back up to this S3 repository location (s3://BUCKET/PREFIX; "
                        "a fresh prefix under it per run) and compare with a local one: full, "
                        "no-change and 1%% incrementals, restore, requests per backup")
    p.add_argument("--only", choices=("s3", "scale"),
                   help="run only the S3 comparison (with --repo) or only the chunk-count "
                        "scaling (with --scale; needs no libvirt)")
    p.add_argument("--scale", metavar="N,N,...",
                   help="chunk-count scaling: generate a repository of N chunks (100K, 1M, "
                        "...) and time list, prune --dry-run, gc, verify, verify --data")
    p.add_argument("--scale-repo", metavar="URL|DIR",
                   help="where --scale builds its repository: s3://BUCKET/PREFIX or a "
                        "directory (default: a new one in /var/tmp)")
    p.add_argument("--warm", action="store_true", help="do not drop page caches")
    p.add_argument("--workdir", help="work directory (default: a new one in /var/tmp)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory and the main run's repository")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"), help="JSON output directory")
    s = p.add_argument_group("scale scenarios (issue 21; any of them replaces the main run)")
    s.add_argument("--sparse", default="",
                   help="huge sparse disks: comma-separated virtual sizes, e.g. 2T,8T")
    s.add_argument("--sparse-data", default="1G",
                   help="data on each sparse disk (default 1G)")
    s.add_argument("--sparse-extents", type=int, default=64,
                   help="extents the data of a sparse disk is spread in (default 64)")
    s.add_argument("--many", type=int, default=0, metavar="N",
                   help="N running domains backed up with --jobs 1, 2, 4 (e.g. 16)")
    s.add_argument("--many-size", default="1G", help="disk size of each --many domain")
    s.add_argument("--many-jobs", type=lambda t: [int(x) for x in t.split(",")],
                   default=[1, 2, 4], help="--jobs values to time (default 1,2,4)")
    r = p.add_argument_group("real-world data (replaces the synthetic layout of the main run)")
    r.add_argument("--real-data", action="store_true",
                   help="disk built from an ext4 image of this machine's /usr, random "
                        "and never-written regions")
    r.add_argument("--real-fs", default="2G", help="bytes of /usr files copied (default 2G)")
    r.add_argument("--compressors", action="store_true",
                   help="with --real-data: zstd level table (ratio, speed) on the real data")
    r.add_argument("--compressor-levels", type=lambda t: [int(x) for x in t.split(",")],
                   default=[-7, -5, -3, -1, 1, 2, 3, 6],
                   help="zstd levels for --compressors (default -7,-5,-3,-1,1,2,3,6)")
    r.add_argument("--compressor-sample", type=parse_size, default=512 * MiB,
                   help="bytes of data sampled for --compressors (default 512M)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.repo is not None and not args.repo.startswith("s3://"):
        p.error("--repo takes an s3://BUCKET/PREFIX location")
    if args.only == "s3" and args.repo is None:
        p.error("--only s3 needs --repo")
    if args.only == "scale" and not args.scale:
        p.error("--only scale needs --scale")
    if args.compressors and not args.real_data:
        p.error("--compressors needs --real-data")
    return args


def scale_flags(args: argparse.Namespace) -> bool:
    return bool(args.sparse or args.many)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.only == "scale":
        return main_scale(args)
    try:
        b = Bench(args)
    except libvirt.libvirtError as e:
        print(f"bench: cannot connect to libvirt at {URI}: {e} "
              "(start it with: sudo bash scripts/start-libvirtd.sh)", file=sys.stderr)
        return 2
    failed: BaseException | None = None
    try:
        if scale_flags(args):
            from bench import huge
            for size in (x for x in args.sparse.split(",") if x):
                huge.sparse_run(b, size)
            if args.many:
                huge.many_run(b)
        else:
            if args.real_data:
                from bench import huge
                huge.real_setup(b)
            else:
                b.setup()
            if args.only is None:
                b.main_run()
            if args.repo:
                b.s3_run()
            if args.only is None:
                if args.encrypted:
                    b.encrypted_run()
                b.chunk_sweep()
            if args.scale:
                b.scale = scale_run(args)
    except BaseException as e:  # still report what was measured
        failed = e
    finally:
        b.cleanup()
    doc = b.report()
    if failed is not None:
        doc["failed"] = repr(failed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    what = "huge" if scale_flags(args) else args.size
    path = out / f"bench-{what}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    try:
        print(render(doc))
    except (KeyError, TypeError) as e:  # a partial run: the JSON has what was measured
        print(f"(no table: the run stopped early, {e!r})")
    if doc["scale"]:
        print("\n" + render_scale(doc["scale"]))
    print(f"\nJSON: {path}")
    if failed is not None:
        raise failed
    return 0


def main_scale(args: argparse.Namespace) -> int:
    """--only scale: the chunk-count scaling alone (no domain, no libvirt)."""
    failed: BaseException | None = None
    scale: list[dict[str, Any]] = []
    try:
        scale = scale_run(args)
    except BaseException as e:
        failed = e
    doc: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args),
                           "machine": machine(), "scale": scale}
    if failed is not None:
        doc["failed"] = repr(failed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-scale-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    if scale:
        from bench.plot import scale_svg

        svg = path.with_suffix(".svg")
        svg.write_text(scale_svg(scale))
        print(render_scale(scale))
        print(f"\nCurves: {svg}")
    print(f"\nJSON: {path}")
    if failed is not None:
        raise failed
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
