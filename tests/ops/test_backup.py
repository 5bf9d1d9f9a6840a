"""Backups of real libvirt domains (running and shut off), restored and compared.

Every test ends with qemu-img compare of a restore against the reference: the
disk as it was when that backup started.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backupkit import virt
from backupkit.errors import Busy, ModeUnavailable
from backupkit.ops import backup as op
from backupkit.ops import restore as restore_op
from backupkit.repo import Repository
from tests import rig
from tests.conftest import run_cli

pytestmark = pytest.mark.libvirt
MiB = rig.MiB


def do_backup(repo: Repository, conn: virt.Connection, td: rig.TestDomain, scratch: Path,
              hooks: op.Hooks | None = None, **kw: Any) -> dict[str, Any]:
    return op.backup(repo, conn, op.Request(domain=td.name, scratch_dir=str(scratch), **kw),
                     hooks)


def check_restore(repo: Repository, td: rig.TestDomain, backup_id: str,
                  refs: dict[str, Path], tmp: Path, fmt: str = "qcow2") -> None:
    target = tmp / f"restore-{backup_id}-{fmt}"
    restore_op.restore(repo, td.name, backup_id, str(target), fmt=fmt)
    for disk, ref in refs.items():
        rig.compare(ref, target / f"{disk}.{fmt}", fmt)


def snapshot(td: rig.TestDomain, tmp: Path, label: str) -> dict[str, Path]:
    return {d.target: d.snapshot_reference(tmp / f"ref-{label}-{d.target}.raw")
            for d in td.disks}


def test_running_full_then_incremental_multi_disk(
        make_domain: Callable[..., rig.TestDomain], repo: Repository, conn: virt.Connection,
        scratch_dir: Path, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 64 * MiB), ("qcow2", 32 * MiB), ("raw", 16 * MiB)])
    td.write("vda", 0, 3 * MiB, 0x41)
    td.write("vdb", 5 * MiB, 1 * MiB, 0x42)
    td.write("vdc", 2 * MiB, 1 * MiB, 0x43)
    ref1 = snapshot(td, tmp_path, "1")
    full = do_backup(repo, conn, td, scratch_dir)
    assert full["mode"] == "full"
    assert full["reason"] == "no previous backup in the repository"
    assert {d["name"] for d in full["disks"]} == {"vda", "vdb", "vdc"}
    # Only allocated data is read: 5 MiB written over 112 MiB of disks.
    assert full["read_bytes"] < 8 * MiB

    td.write("vda", 40 * MiB + 4096, 1 * MiB, 0x51)
    td.write("vdb", 0, 64 * 1024, 0x52)
    ref2 = snapshot(td, tmp_path, "2")
    inc = do_backup(repo, conn, td, scratch_dir)
    assert inc["mode"] == "incremental", inc["reason"]
    assert inc["parent_checkpoint"] == full["checkpoint"]
    disks = {d["name"]: d for d in inc["disks"]}
    assert disks["vdc"]["mode"] == "full"
    assert "raw disk cannot hold bitmaps" in disks["vdc"]["reason"]
    # Read bytes close to what was written (bitmap granularity 64 KiB), not the disk size.
    assert disks["vda"]["read_bytes"] <= 1 * MiB + 128 * 1024
    assert disks["vdb"]["read_bytes"] <= 128 * 1024

    # Exactly one backupkit checkpoint remains: the new one.
    names = [c.name for c in conn.domain(td.name).checkpoints()]
    assert names == [inc["checkpoint"]]

    check_restore(repo, td, full["id"], ref1, tmp_path)
    check_restore(repo, td, inc["id"], ref2, tmp_path)
    check_restore(repo, td, inc["id"], ref2, tmp_path, fmt="raw")


def test_writes_during_backup_go_to_the_next_one(
        make_domain: Callable[..., rig.TestDomain], repo: Repository, conn: virt.Connection,
        scratch_dir: Path, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 32 * MiB)])
    td.write("vda", 0, 2 * MiB, 0x11)
    ref1 = snapshot(td, tmp_path, "1")
    during = op.Hooks(job_started=lambda: td.write("vda", 1 * MiB, 2 * MiB, 0x22))
    b1 = do_backup(repo, conn, td, scratch_dir, during)
    ref2 = snapshot(td, tmp_path, "2")
    b2 = do_backup(repo, conn, td, scratch_dir)
    assert b2["mode"] == "incremental"
    check_restore(repo, td, b1["id"], ref1, tmp_path)
    check_restore(repo, td, b2["id"], ref2, tmp_path)


def test_shut_off_full_and_incremental(
        make_domain: Callable[..., rig.TestDomain], repo: Repository, conn: virt.Connection,
        scratch_dir: Path, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 32 * MiB), ("raw", 8 * MiB)], running=False)
    td.write("vda", 1 * MiB, 1 * MiB, 0x61)
    td.write("vdb", 0, 1 * MiB, 0x62)
    ref1 = snapshot(td, tmp_path, "1")
    full = do_backup(repo, conn, td, scratch_dir)
    assert full["mode"] == "full"
    assert full["checkpoint"] in rig.bitmaps(td.disk("vda").path)
    td.write("vda", 20 * MiB, 512 * 1024, 0x63)
    ref2 = snapshot(td, tmp_path, "2")
    inc = do_backup(repo, conn, td, scratch_dir)
    assert inc["mode"] == "incremental", inc["reason"]
    assert inc["disks"][0]["read_bytes"] == 512 * 1024
    # The old bitmap is gone from the image; libvirt knows only the new checkpoint.
    assert list(rig.bitmaps(td.disk("vda").path)) == [inc["checkpoint"]]
    assert [c.name for c in conn.domain(td.name).checkpoints()] == [inc["checkpoint"]]
    check_restore(repo, td, full["id"], ref1, tmp_path)
    check_restore(repo, td, inc["id"], ref2, tmp_path)

    # The checkpoint made while shut off serves an incremental once the domain runs.
    td.start()
    td.write("vda", 0, 64 * 1024, 0x64)
    ref3 = snapshot(td, tmp_path, "3")
    live = do_backup(repo, conn, td, scratch_dir)
    assert live["mode"] == "incremental", live["reason"]
    check_restore(repo, td, live["id"], ref3, tmp_path)


def test_failure_mid_backup_keeps_previous_checkpoint_usable(
        make_domain: Callable[..., rig.TestDomain], repo: Repository, conn: virt.Connection,
        scratch_dir: Path, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 32 * MiB)])
    td.write("vda", 0, 1 * MiB, 0x71)
    b1 = do_backup(repo, conn, td, scratch_dir)

    def boom() -> None:
        td.write("vda", 8 * MiB, 1 * MiB, 0x72)
        raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected"):
        do_backup(repo, conn, td, scratch_dir, op.Hooks(before_commit=boom))
    dom = conn.domain(td.name)
    assert [c.name for c in dom.checkpoints()] == [b1["checkpoint"]]
    assert not dom.backup_job_active()
    assert list(scratch_dir.iterdir()) == []
    assert [b.id for b in repo.list_backups(td.name)] == [b1["id"]]

    ref = snapshot(td, tmp_path, "after")
    b2 = do_backup(repo, conn, td, scratch_dir)
    assert b2["mode"] == "incremental"
    check_restore(repo, td, b2["id"], ref, tmp_path)


def test_fallbacks_on_real_domain(
        make_domain: Callable[..., rig.TestDomain], repo: Repository, conn: virt.Connection,
        scratch_dir: Path, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 32 * MiB)])
    td.write("vda", 0, 1 * MiB, 0x01)
    b1 = do_backup(repo, conn, td, scratch_dir)

    # Checkpoint deleted with its bitmap: full, and --mode incremental refuses.
    conn.domain(td.name).delete_checkpoint(b1["checkpoint"])
    with pytest.raises(ModeUnavailable, match="missing"):
        do_backup(repo, conn, td, scratch_dir, mode="incremental")
    b2 = do_backup(repo, conn, td, scratch_dir)
    assert b2["mode"] == "full"
    assert "missing" in b2["reason"]

    # Checkpoint metadata lost but the bitmap intact: redefined, still incremental.
    conn.domain(td.name).delete_checkpoint(b2["checkpoint"], metadata_only=True)
    td.write("vda", 4 * MiB, 1 * MiB, 0x02)
    ref = snapshot(td, tmp_path, "3")
    b3 = do_backup(repo, conn, td, scratch_dir)
    assert b3["mode"] == "incremental", b3["reason"]
    assert any("redefined" in w for w in b3.get("warnings", []))
    check_restore(repo, td, b3["id"], ref, tmp_path)

    # Disk resized: full with that reason.
    td.dom.blockResize("vda", 48 * MiB, 0)
    b4 = do_backup(repo, conn, td, scratch_dir)
    assert b4["mode"] == "full"
    assert "resized" in b4["reason"]


def test_same_domain_concurrency_exits_3(
        make_domain: Callable[..., rig.TestDomain], repo: Repository, repo_path: Path,
        scratch_dir: Path) -> None:
    td = make_domain([("qcow2", 16 * MiB)])
    with repo.lock_domain(td.name):
        cp = run_cli("--repo", str(repo_path), "--json", "backup", td.name)
    assert cp.returncode == 3, cp.stderr
    assert "locked by" in cp.stderr
    assert '"kind": "busy"' in cp.stdout
    with pytest.raises(Busy), repo.lock_domain(td.name), repo.lock_domain(td.name):
        pass


def test_cli_backup_json_and_unknown_domain(
        make_domain: Callable[..., rig.TestDomain], repo: Repository, repo_path: Path,
        conn: virt.Connection, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 16 * MiB)])
    cfg = tmp_path / "bk.toml"
    cfg.write_text(f'scratch_dir = "{tmp_path / "s"}"\n')
    cp = run_cli("--config", str(cfg), "--repo", str(repo_path), "--json", "backup", td.name)
    assert cp.returncode == 0, cp.stderr
    import json

    doc = json.loads(cp.stdout)
    # The values, not only the keys: what the repository recorded, and what they must be.
    # What only the run knows (chunks it stored; S3 requests) beside what was recorded.
    assert doc.pop("stored_chunks") == 0  # an empty disk: nothing to store
    assert "requests" not in doc  # a local repository
    assert doc == op.summary(repo.get_manifest(td.name, doc["id"]))
    assert (doc["domain"], doc["mode"], doc["reason"]) == (
        td.name, "full", "no previous backup in the repository")
    assert doc["checkpoint"] == op.checkpoint_prefix(repo) + doc["id"]
    assert [c.name for c in conn.domain(td.name).checkpoints()] == [doc["checkpoint"]]
    assert (doc["parent_checkpoint"], doc["parent_id"]) == (None, None)
    assert (doc["quiesced"], doc["freeze_seconds"]) == (False, None)
    assert doc["duration_seconds"] > 0
    [disk] = doc["disks"]
    assert (disk["name"], disk["format"], disk["virtual_size"]) == ("vda", "qcow2", 16 * MiB)
    assert (disk["mode"], disk["reason"]) == ("full", doc["reason"])
    assert 0 <= disk["read_bytes"] <= 16 * MiB
    assert (doc["read_bytes"], doc["stored_bytes"]) == (disk["read_bytes"],
                                                        disk["stored_bytes"])
    cp = run_cli("--config", str(cfg), "--repo", str(repo_path), "backup", "no-such-vm")
    assert cp.returncode == 4
    assert cp.stderr.strip().endswith("domain not found: no-such-vm")
    assert "Traceback" not in cp.stderr


def test_excluded_and_unknown_disks(
        make_domain: Callable[..., rig.TestDomain], repo: Repository, conn: virt.Connection,
        scratch_dir: Path) -> None:
    td = make_domain([("qcow2", 16 * MiB), ("qcow2", 16 * MiB)])
    res = do_backup(repo, conn, td, scratch_dir, exclude=("vdb",))
    assert [d["name"] for d in res["disks"]] == ["vda"]
    from backupkit.errors import NotFound

    with pytest.raises(NotFound):
        do_backup(repo, conn, td, scratch_dir, disks=("vdz",))


def test_several_domains_one_failure_exits_6(
        make_domain: Callable[..., rig.TestDomain], repo: Repository, repo_path: Path,
        tmp_path: Path) -> None:
    a = make_domain([("qcow2", 16 * MiB)])
    b = make_domain([("qcow2", 16 * MiB)], running=False)
    cfg = tmp_path / "bk.toml"
    cfg.write_text(f'repository = "{repo_path}"\nscratch_dir = "{tmp_path / "s"}"\n')
    cp = run_cli("--config", str(cfg), "--json", "backup", a.name, "no-such-vm", b.name)
    assert cp.returncode == 6, cp.stderr
    import json

    doc = json.loads(cp.stdout)["error"]
    assert doc["kind"] == "partial"
    assert [r["domain"] for r in doc["result"]["backups"]] == [a.name, b.name]
    assert [f["domain"] for f in doc["result"]["failed"]] == ["no-such-vm"]
    assert doc["result"]["failed"][0]["exit_code"] == 4
    # Human form: one row per domain with its outcome.
    cp = run_cli("--config", str(cfg), "backup", a.name, "no-such-vm")
    assert cp.returncode == 6
    rows = [line for line in cp.stdout.splitlines() if a.name in line or "no-such-vm" in line]
    assert len(rows) == 2, cp.stdout


def test_journal_gets_one_line_per_backup(make_domain: Callable[..., rig.TestDomain],
                                          tmp_path: Path) -> None:
    """Under systemd (stderr and stdout are the journal stream): one info line per
    backup, no result summary; an error line names the domain once."""
    import os
    import subprocess
    import sys

    td = make_domain([("qcow2", 16 * MiB), ("qcow2", 16 * MiB)])
    td.write("vda", 0, MiB, 0x11)
    cfg = tmp_path / "bk.toml"
    cfg.write_text(f'repository = "{tmp_path / "repo"}"\nscratch_dir = "{tmp_path / "s"}"\n')
    assert run_cli("--config", str(cfg), "init").returncode == 0

    def journal_run(*args: str) -> tuple[int, list[str]]:
        out = tmp_path / "journal"
        with open(out, "w+") as f:
            st = os.fstat(f.fileno())
            env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPKIT_")}
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            cp = subprocess.run([sys.executable, "-m", "backupkit", "--config", str(cfg),
                                 *args], stdout=f, stderr=f, env=env, timeout=120)
        return cp.returncode, out.read_text().splitlines()

    rc, lines = journal_run("backup", td.name)
    assert rc == 0, lines
    info = [ln for ln in lines if ln.startswith("<6>")]
    assert len(info) == 1 and info[0].startswith(f"<6>{td.name}: backup ") \
        and "done" in info[0], lines
    assert all(ln.startswith("<") for ln in lines), lines  # no summary on stdout

    td2 = make_domain([("qcow2", 16 * MiB)])
    rc, lines = journal_run("backup", "--mode", "incremental", td2.name)
    assert rc == 1, lines
    (err,) = [ln for ln in lines if ln.startswith("<3>")]
    assert err.startswith(f"<3>{td2.name}: backup failed: incremental backup impossible"), err
    assert err.count(td2.name) == 1, err
