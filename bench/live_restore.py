"""Time to a running guest: restore --live against a full restore followed by a start.

    .venv/bin/python -m bench.live_restore [--size-gib 4] [--data-gib 2]

The real Linux test guest (tests/guest, TCG or KVM as the host allows) on a data disk
of --size-gib with --data-gib of files (half random, half text) made on the host with
``mkfs.ext4 -d``.  It boots once (its writer adds files), is backed up quiesced, and
destroyed.  Then, with page caches dropped before each:

- full: ``backupkit restore --define`` (qcow2), start, wait for the agent's guest-ping;
- live: ``backupkit restore --live --detach --define``, wait for guest-ping; then
  ``restore-status`` until the disk no longer depends on the export.

Prints one JSON document with the times.  Needs root, libvirtd and nbdkit-plugin-python.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import libvirt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backupkit.ops import live  # noqa: E402
from tests.guest import bkguest  # noqa: E402

URI = "qemu:///system"


def cli(cfg: Path, *args: str) -> dict[str, Any]:
    env = {**os.environ, "BACKUPKIT_CONFIG": str(cfg)}
    cp = subprocess.run([sys.executable, "-m", "backupkit", "--json", *args], env=env,
                        capture_output=True, text=True, check=False)
    if cp.returncode != 0:
        raise SystemExit(f"backupkit {' '.join(args)}: exit {cp.returncode}: {cp.stderr}")
    doc: dict[str, Any] = json.loads(cp.stdout)
    return doc


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_disk(work: Path, size_gib: int, data_gib: float) -> Path:
    src = work / "src"
    src.mkdir()
    rnd = random.Random(1)
    n = int(data_gib * 1024 / 16)  # 16 MiB files
    words = b"backup chunk qemu libvirt index manifest restore drill\n"
    for i in range(n):
        with open(src / f"file{i:04d}", "wb") as f:
            if i % 2:
                f.write(os.urandom(16 << 20))
            else:
                line = words * ((16 << 20) // len(words) + 1)
                f.write(bytes(line[:16 << 20]))
    (src / "seed").write_bytes(rnd.randbytes(1000))
    raw = work / "data.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(raw), f"{size_gib}G"],
                   check=True)
    shutil.rmtree(src)
    disk = work / "data.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], check=True)
    raw.unlink()
    return disk


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=int, default=4)
    ap.add_argument("--data-gib", type=float, default=2.0)
    ap.add_argument("--workdir", default="/var/tmp")
    a = ap.parse_args()
    conn = libvirt.open(URI)
    image = bkguest.build_guest()
    work = Path(tempfile.mkdtemp(prefix="bk-live-bench-", dir=a.workdir))
    os.chmod(work, 0o711)
    names: list[str] = []
    out: dict[str, Any] = {"size_gib": a.size_gib, "data_gib": a.data_gib}
    try:
        disk = make_disk(work, a.size_gib, a.data_gib)
        guest = bkguest.start_guest(conn, image, work, data_disk=disk)
        names.append(guest.name)
        out["virt_type"] = guest.virt_type
        out["original_boot_seconds"] = round(guest.boot_seconds, 2)
        time.sleep(2)  # a few files from the writer
        scratch = work / "scratch"
        cfg = work / "bk.toml"
        cfg.write_text(f'repository = "{work / "repo"}"\nscratch_dir = "{scratch}"\n')
        cli(cfg, "init")
        b = cli(cfg, "backup", "--quiesce", guest.name)
        out["backup_seconds"] = b["duration_seconds"]
        out["backup_data_bytes"] = sum(d["read_bytes"] for d in b["disks"])
        guest.destroy()

        # full restore, then start, then the agent
        drop_caches()
        full = f"{guest.name}-full"
        names.append(full)
        t0 = time.monotonic()
        r = cli(cfg, "restore", guest.name, "--target", str(work / "full"), "--define", full)
        t_restore = time.monotonic() - t0
        dom = conn.lookupByName(full)
        dom.create()
        t_started = time.monotonic() - t0
        bkguest.wait_for_agent(dom, 300)
        out["full"] = {"restore_seconds": round(t_restore, 2),
                       "seconds_to_start": round(t_started, 2),
                       "seconds_to_agent": round(time.monotonic() - t0, 2),
                       "restored_bytes": r["data_bytes"]}
        bkguest.destroy_domain(conn, full)

        # live restore
        drop_caches()
        lv = f"{guest.name}-live"
        names.append(lv)
        t0 = time.monotonic()
        doc = cli(cfg, "restore", guest.name, "--target", str(work / "live"), "--define", lv,
                  "--live", "--detach")
        t_started = time.monotonic() - t0
        bkguest.wait_for_agent(conn.lookupByName(lv), 300)
        t_agent = time.monotonic() - t0
        while (st := cli(cfg, "restore-status", lv))["state"] == "copying":
            time.sleep(0.5)
        out["live"] = {"seconds_to_start": round(t_started, 2),
                       "reported_seconds_to_start": doc["seconds_to_start"],
                       "seconds_to_agent": round(t_agent, 2),
                       "state": st["state"],
                       "seconds_to_independence": st.get("seconds_to_independence")}
        out["agent_speedup"] = round(out["full"]["seconds_to_agent"] / t_agent, 2)
        out["start_speedup"] = round(out["full"]["seconds_to_start"] / t_started, 2)
    finally:
        for n in names:
            live.abort(n, remove_files=False)
            bkguest.destroy_domain(conn, n)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
