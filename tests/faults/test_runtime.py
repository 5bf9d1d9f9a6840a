"""Faults around a running backup: QEMU killed, domain destroyed, libvirtd restarted,
other backupkit commands at the same time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import rig
from tests.faults.conftest import (
    Bk,
    MakeDomain,
    MiB,
    guest_flush,
    one_line_error,
    paused_second_backup,
    qemu_pid,
    write_random,
)

pytestmark = pytest.mark.libvirt


def _wait_inactive(td: rig.TestDomain, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while td.dom.isActive():
        assert time.monotonic() < deadline, "domain still running"
        time.sleep(0.05)


def test_qemu_killed_next_backup_is_full_with_reason(make_domain: MakeDomain, bk: Bk,
                                                     libvirt_conn: object,
                                                     tmp_path: Path) -> None:
    td = make_domain([("qcow2", 32 * MiB)])
    td.write("vda", 0, 1 * MiB, 0x11)
    first = bk.backup(td)
    # Writes the lost bitmap would have recorded; a wrong incremental would miss them.
    write_random(td, "vda", 4 * MiB, 256 * 1024, 7, tmp_path)
    guest_flush(td, "vda")  # what the guest wrote and flushed must be in the next backup
    os.kill(qemu_pid(td.name), signal.SIGKILL)
    _wait_inactive(td)
    td.start()
    td.write("vda", 10 * MiB, 64 * 1024, 0x22)
    second = bk.backup(td)
    assert second["mode"] == "full", second
    assert first["checkpoint"] in second["reason"], second["reason"]
    bk.survivors(td)
    td.write("vda", 12 * MiB, 64 * 1024, 0x33)
    third = bk.backup(td)
    assert third["mode"] == "incremental", third["reason"]
    bk.survivors(td)
    bk.nothing_left(td, libvirt_conn)


def test_domain_destroyed_mid_backup(make_domain: MakeDomain, bk: Bk, libvirt_conn: object,
                                     tmp_path: Path) -> None:
    td = make_domain([("qcow2", 32 * MiB)])
    td.write("vda", 0, 1 * MiB, 0x11)
    bk.backup(td)
    write_random(td, "vda", 4 * MiB, 512 * 1024, 8, tmp_path)
    p = bk.stopped_at("before_first_chunk", "backup", td.name)
    td.dom.destroy()
    p.send_signal(signal.SIGCONT)
    _out, err = p.communicate(timeout=120)
    assert p.returncode == 1, err
    one_line_error(subprocess.CompletedProcess(p.args, p.returncode, _out, err))
    bk.survivors(td)
    # Shut off now: the next run is a cold one and finds the old checkpoint intact.
    nxt = bk.backup(td)
    assert nxt["mode"] == "incremental", nxt["reason"]
    bk.survivors(td)
    td.start()
    td.write("vda", 9 * MiB, 64 * 1024, 0x44)
    live = bk.backup(td)
    assert live["mode"] == "incremental", live["reason"]
    bk.survivors(td)
    bk.nothing_left(td, libvirt_conn)


def _libvirtd_up() -> bool:
    return subprocess.run(["virsh", "-c", rig.URI, "version"], capture_output=True,
                          timeout=30).returncode == 0


def _ensure_libvirtd() -> None:
    if not _libvirtd_up():
        subprocess.run(["scripts/start-libvirtd.sh"], check=False, timeout=60)
    assert _libvirtd_up(), "libvirtd did not come back"


def _restart_libvirtd() -> None:
    pid = int(Path("/var/run/libvirtd.pid").read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "libvirtd did not exit"
        time.sleep(0.05)
    subprocess.run(["libvirtd", "-d"], check=True, timeout=30)
    deadline = time.monotonic() + 30
    while not _libvirtd_up():
        assert time.monotonic() < deadline, "libvirtd did not answer"
        time.sleep(0.1)


@pytest.mark.slow
def test_libvirtd_restarted_mid_backup(make_domain: MakeDomain, bk: Bk,
                                       tmp_path: Path) -> None:
    import libvirt

    td, before, p = paused_second_backup(make_domain, bk, tmp_path, length=512 * 1024,
                                         seed=9, tag="r")
    try:
        _restart_libvirtd()
    finally:
        p.send_signal(signal.SIGCONT)
        _ensure_libvirtd()
    out, err = p.communicate(timeout=120)
    td.conn = libvirt.open(rig.URI)  # the old connection died with the daemon
    assert "Traceback" not in err
    ids = [b["id"] for b in bk.json("list", td.name)["backups"]]
    if p.returncode == 0:
        bk.refs[ids[-1]] = before
    else:
        assert p.returncode == 1, err
        one_line_error(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    bk.survivors(td)
    td.write("vda", 9 * MiB, 64 * 1024, 0x44)
    nxt = bk.backup(td)
    assert nxt["mode"] in ("incremental", "full") and nxt["reason"]
    bk.survivors(td)
    bk.nothing_left(td, td.conn)


def test_second_backup_gc_prune_while_backup_runs(make_domain: MakeDomain, bk: Bk,
                                                  libvirt_conn: object,
                                                  tmp_path: Path) -> None:
    td, before, p = paused_second_backup(make_domain, bk, tmp_path, length=512 * 1024,
                                         seed=10, tag="c")
    try:
        cp = bk.run("backup", td.name)
        assert cp.returncode == 3, cp.stderr
        assert "locked by" in one_line_error(cp)
        # gc runs beside the backup (docs/format.md, "Locks and gc"): the running
        # backup's chunks are newer than its writer lock, so gc keeps them.
        gc = bk.json("gc")
        assert gc["chunks_removed"] == 0, gc
        cp = bk.run("prune", td.name, "--keep-last", "1")
        assert cp.returncode == 3, cp.stderr
        one_line_error(cp)
        # Every domain: the one being backed up is locked, so it is skipped (exit 6,
        # partial), the shared lock being compatible with the backup's.
        cp = bk.run("--json", "prune", "--keep-last", "1", "--dry-run")
        assert cp.returncode == 6, cp.stderr
        err = json.loads(cp.stdout)["error"]
        assert err["kind"] == "partial", err
        assert [s["domain"] for s in err["result"]["skipped"]] == [td.name], err
        hy = bk.run("hygiene", "check", td.name)  # serialized with backups of the domain
        assert hy.returncode == 3, hy.stderr
        assert "locked by" in one_line_error(hy)
    finally:
        p.send_signal(signal.SIGCONT)
    _out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    ids = [b["id"] for b in bk.json("list", td.name)["backups"]]
    bk.refs[ids[-1]] = before
    bk.survivors(td)
    td.write("vda", 9 * MiB, 64 * 1024, 0x44)
    nxt = bk.backup(td)
    assert nxt["mode"] == "incremental", nxt["reason"]
    bk.survivors(td)
    bk.nothing_left(td, libvirt_conn)


def test_reattached_disk_loses_its_stale_bitmap(make_domain: MakeDomain, bk: Bk,
                                               libvirt_conn: object) -> None:
    """Detach a disk, back up, reattach it: the bitmap of the checkpoint deleted while
    the disk was away records for ever (a stale bitmap is what makes merges run out
    of space) unless a backup removes it (issue 17 item 8)."""
    from backupkit import virt

    td = make_domain([("qcow2", 16 * MiB), ("qcow2", 16 * MiB)], running=False)
    td.write("vda", 0, 1 * MiB, 0x11)
    td.write("vdb", 0, 1 * MiB, 0x12)
    first = bk.backup(td)
    vdb = td.disk("vdb").path
    assert list(rig.bitmaps(vdb)) == [first["checkpoint"]]

    subprocess.run(["virsh", "-c", rig.URI, "detach-disk", td.name, "vdb", "--config"],
                   check=True, capture_output=True)
    second = bk.json("backup", td.name)
    assert [d["name"] for d in second["disks"]] == ["vda"]
    assert list(rig.bitmaps(vdb)) == [first["checkpoint"]], "left behind on the detached disk"

    subprocess.run(["virsh", "-c", rig.URI, "attach-disk", td.name, str(vdb), "vdb",
                    "--driver", "qemu", "--subdriver", "qcow2", "--targetbus", "virtio",
                    "--config"], check=True, capture_output=True)
    td.start()
    third = bk.json("backup", td.name)
    assert third["mode"] == "full" and "vdb" in third["reason"], third["reason"]
    dom = virt.connect(rig.URI).domain(td.name)
    live = dom.block_bitmaps()
    for d in td.disks:
        names = [b["name"] for b in live[str(d.path)]]
        assert names == [third["checkpoint"]], (d.target, names)
    assert [c.name for c in dom.checkpoints()] == [third["checkpoint"]]
