"""Live hygiene (--domain): real running domains, libvirt checkpoints made by backups,
external snapshots, live blockcommit, then backup, restore and compare.

Each test builds its chain cold (stale bitmaps are added with qemu-img before
QEMU opens the base), then works only through libvirt while the domain runs.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from backupkit import virt
from backupkit.errors import EXIT_INTEGRITY, BitmapLost, UsageError
from backupkit.ops import backup as backup_op
from backupkit.ops import hygiene
from backupkit.ops import restore as restore_op
from backupkit.repo import Repository
from tests import rig
from tests.hygiene.helpers import GiB, MiB, add, bitmaps, create

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]


def do_backup(repo: Repository, conn: virt.Connection, td: rig.TestDomain,
              scratch: Path) -> dict[str, Any]:
    return backup_op.backup(repo, conn, backup_op.Request(domain=td.name,
                                                          scratch_dir=str(scratch)))


def over_base(td: rig.TestDomain, base: str, stale: int, size: int | None = None) -> str:
    """Make the domain's (shut-off) disk an overlay of BASE holding ``stale`` stale bitmaps."""
    disk = td.disk("vda")
    if size is not None:  # BASE is a block device: a fresh qcow2 written onto it
        create(base, size)
    else:
        os.rename(disk.path, base)
    for i in range(stale):
        add(base, f"stale-{i:03d}")
    disk.path.unlink(missing_ok=True)
    create(str(disk.path), backing=base)
    return str(disk.path)


def external_snapshot(td: rig.TestDomain, top: Path) -> None:
    xml = (f"<domainsnapshot><disks><disk name='vda' snapshot='external'>"
           f"<source file='{top}'/></disk></disks></domainsnapshot>")
    td.dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                             | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)


def blockcommit(td: rig.TestDomain, base: str) -> None:
    cp = subprocess.run(["virsh", "-c", rig.URI, "blockcommit", td.name, "vda", "--base", base,
                         "--active", "--pivot", "--wait"], capture_output=True, text=True,
                        timeout=120)
    assert cp.returncode == 0, cp.stderr


def live_bitmaps(conn: virt.Connection, td: rig.TestDomain) -> dict[str, dict[str, Any]]:
    """image -> {bitmap name: QEMU's in-memory state} of the running domain."""
    return {img: {b["name"]: b for b in bs}
            for img, bs in conn.domain(td.name).block_bitmaps().items()}


def snapshot_ref(td: rig.TestDomain, tmp: Path, label: str) -> Path:
    return td.disk("vda").snapshot_reference(tmp / f"ref-{label}.raw")


def restore_compare(repo: Repository, td: rig.TestDomain, backup_id: str, ref: Path,
                    tmp: Path) -> None:
    target = tmp / f"restore-{backup_id}"
    restore_op.restore(repo, td.name, backup_id, str(target), fmt="qcow2")
    rig.compare(ref, target / "vda.qcow2", "qcow2")


def test_live_pre_merge_blockcommit_post_merge_then_incremental(
        make_domain: Callable[..., rig.TestDomain], repo: Repository, repo_path: Path,
        conn: virt.Connection, scratch_dir: Path, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 64 * MiB)], running=False)
    base = str(tmp_path / "base.qcow2")
    mid = over_base(td, base, stale=4)
    td.start()
    td.write("vda", 0, 1 * MiB, 0x11)
    do_backup(repo, conn, td, scratch_dir)
    td.write("vda", 8 * MiB, 1 * MiB, 0x22)
    b2 = do_backup(repo, conn, td, scratch_dir)
    assert b2["mode"] == "incremental", b2["reason"]
    cp = b2["checkpoint"]

    top = tmp_path / "top.qcow2"
    external_snapshot(td, top)          # libvirt carries cp into the new overlay
    td.write("vda", 16 * MiB, 1 * MiB, 0x33)
    lb = live_bitmaps(conn, td)
    assert cp in lb[str(top)] and cp in lb[mid]
    assert set(lb[base]) == {f"stale-{i:03d}" for i in range(4)}

    # BASE not below TOP: refused.
    with pytest.raises(UsageError):
        hygiene.pre_merge(base, str(top), domain=td.name, disk="vda", connect=rig.URI)

    dry = hygiene.pre_merge(str(top), base, domain=td.name, disk="vda", connect=rig.URI,
                            dry_run=True)
    assert len(dry["removed"]) == 4
    pre = hygiene.pre_merge(str(top), base, domain=td.name, disk="vda", connect=rig.URI,
                            repo=str(repo_path))
    assert sorted(r["name"] for r in pre["removed"]) == [f"stale-{i:03d}" for i in range(4)]
    assert {r["method"] for r in pre["removed"]} == {hygiene.M_REDEFINE}
    assert all(r["reason"] == "stale: not in top" for r in pre["removed"])
    lb = live_bitmaps(conn, td)
    assert lb[base] == {}
    assert cp in lb[str(top)] and cp in lb[mid]          # the checkpoint is untouched
    assert [c.name for c in conn.domain(td.name).checkpoints()] == [cp]
    again = hygiene.pre_merge(str(top), base, domain=td.name, disk="vda", connect=rig.URI)
    assert again["removed"] == []

    blockcommit(td, base)
    td.write("vda", 24 * MiB, 1 * MiB, 0x44)
    post = hygiene.post_merge(str(top), base, domain=td.name, disk="vda", connect=rig.URI,
                              repo=str(repo_path))
    assert post["deleted_checkpoints"] == []
    assert [m["checkpoint"] for m in post["merged"]] == [cp]
    assert post["chain"] == [base]
    assert post["space"]["fits"]
    assert hygiene.post_merge(str(top), base, domain=td.name, disk="vda",
                              connect=rig.URI)["merged"] == post["merged"]
    # TOP is still the active layer before a merge: post-merge refuses.
    assert bitmaps(base) == {}  # on disk nothing yet: QEMU stores bitmaps at close

    ref = snapshot_ref(td, tmp_path, "3")
    b3 = do_backup(repo, conn, td, scratch_dir)
    assert b3["mode"] == "incremental", b3["reason"]
    assert b3["parent_checkpoint"] == cp
    # Exactly the writes since b2: 16 MiB (made in TOP, merged) and 24 MiB (in BASE).
    assert b3["disks"][0]["read_bytes"] == 2 * MiB
    restore_compare(repo, td, b3["id"], ref, tmp_path)
    hygiene.check(domain=td.name, connect=rig.URI, repo=str(repo_path))


def test_live_base_too_small_post_merge_deletes_checkpoint(
        make_domain: Callable[..., rig.TestDomain], loop_volume: Callable[[int], str],
        repo: Repository, repo_path: Path, conn: virt.Connection, scratch_dir: Path,
        tmp_path: Path) -> None:
    """HOST-FACTS' measurement: 1 GiB base on a 128 MiB volume, 32 stale bitmaps, 120 MiB."""
    td = make_domain([("qcow2", 1 * GiB)], running=False)
    base = loop_volume(128 * MiB)
    top = over_base(td, base, stale=32, size=1 * GiB)
    td.start()
    b1 = do_backup(repo, conn, td, scratch_dir)
    cp = b1["checkpoint"]
    td.write("vda", 0, 120 * MiB, 0x55)
    blockcommit(td, base)   # libvirt reports success...
    lb = live_bitmaps(conn, td)
    assert lb[base][cp]["recording"] and not lb[base][cp].get("inconsistent")  # ...looks fine

    with pytest.raises(BitmapLost) as e:
        hygiene.post_merge(top, base, domain=td.name, disk="vda", connect=rig.URI,
                           repo=str(repo_path))
    assert e.value.exit_code == EXIT_INTEGRITY
    report = e.value.report
    assert not report["space"]["fits"], report["space"]
    assert report["space"]["kind"] == "block_device"
    assert [d["checkpoint"] for d in report["deleted_checkpoints"]] == [cp]
    assert "cannot store its bitmaps" in report["deleted_checkpoints"][0]["reason"]
    assert conn.domain(td.name).checkpoints() == []
    # Idempotent: nothing left to delete.
    again = hygiene.post_merge(top, base, domain=td.name, disk="vda", connect=rig.URI)
    assert again["deleted_checkpoints"] == []

    # Restart: QEMU closes the image (this is where the bitmaps would have been lost).
    td.stop()
    td.start()
    td.write("vda", 200 * MiB, 1 * MiB, 0x66)
    ref = snapshot_ref(td, tmp_path, "after")
    b2 = do_backup(repo, conn, td, scratch_dir)
    assert b2["mode"] == "full"
    assert cp in b2["reason"] and "missing" in b2["reason"], b2["reason"]
    restore_compare(repo, td, b2["id"], ref, tmp_path)


def test_check_fix_on_domain(
        make_domain: Callable[..., rig.TestDomain], repo: Repository, repo_path: Path,
        conn: virt.Connection, scratch_dir: Path, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 32 * MiB)], running=False)
    base = str(tmp_path / "base.qcow2")
    active = over_base(td, base, stale=1)      # "stale-000": orphan in the base
    td.start()
    td.write("vda", 0, 1 * MiB, 0x11)
    b1 = do_backup(repo, conn, td, scratch_dir)
    dom = conn.domain(td.name)
    # A leftover checkpoint from an interrupted run (no committed backup uses it).
    dom.raw.checkpointCreateXML(
        "<domaincheckpoint><name>backupkit.leftover</name><disks>"
        "<disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>", 0)
    # A checkpoint whose bitmap is gone (removed behind libvirt's back).
    dom.raw.checkpointCreateXML(
        "<domaincheckpoint><name>other</name><disks>"
        "<disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>", 0)
    node = next(n["node-name"] for n in dom.block_nodes()
                if n["drv"] == "qcow2" and n["file"] == active)
    dom.remove_bitmap_qmp(node, "other")

    with pytest.raises(BitmapLost) as e:
        hygiene.check(domain=td.name, connect=rig.URI, repo=str(repo_path))
    kinds = {(p["kind"], p["name"]) for p in e.value.report["remaining"]}
    assert kinds == {("orphan", "stale-000"), ("leftover_checkpoint", "backupkit.leftover"),
                     ("checkpoint_without_bitmap", "other")}, kinds
    assert {c.name for c in dom.checkpoints()} == {b1["checkpoint"], "backupkit.leftover",
                                                   "other"}

    fixed = hygiene.check(domain=td.name, fix=True, connect=rig.URI, repo=str(repo_path))
    assert fixed["clean"] and fixed["remaining"] == []
    assert {d["checkpoint"] for d in fixed["deleted_checkpoints"]} == {"backupkit.leftover",
                                                                       "other"}
    assert [(r["name"], r["method"]) for r in fixed["removed"]] == [
        ("stale-000", hygiene.M_REDEFINE)]
    assert [c.name for c in dom.checkpoints()] == [b1["checkpoint"]]
    second = hygiene.check(domain=td.name, fix=True, connect=rig.URI, repo=str(repo_path))
    assert second["problems"] == [] and second["removed"] == []
    assert second["deleted_checkpoints"] == []

    # The fixed domain still takes a correct incremental.
    td.write("vda", 4 * MiB, 1 * MiB, 0x22)
    ref = snapshot_ref(td, tmp_path, "2")
    b2 = do_backup(repo, conn, td, scratch_dir)
    assert b2["mode"] == "incremental", b2["reason"]
    restore_compare(repo, td, b2["id"], ref, tmp_path)


def test_live_base_too_small_bitmaps_really_lost_at_restart(
        make_domain: Callable[..., rig.TestDomain], loop_volume: Callable[[int], str],
        repo: Repository, repo_path: Path, conn: virt.Connection, scratch_dir: Path,
        tmp_path: Path) -> None:
    """The space check predicts a real loss: a dry run keeps the checkpoint, QEMU restarts
    and the bitmap is gone; post-merge then deletes the checkpoint (bitmap missing)."""
    td = make_domain([("qcow2", 1 * GiB)], running=False)
    base = loop_volume(128 * MiB)
    top = over_base(td, base, stale=32, size=1 * GiB)
    td.start()
    cp = do_backup(repo, conn, td, scratch_dir)["checkpoint"]
    td.write("vda", 0, 120 * MiB, 0x55)
    blockcommit(td, base)
    with pytest.raises(BitmapLost) as e:
        hygiene.post_merge(top, base, domain=td.name, disk="vda", connect=rig.URI,
                           dry_run=True)
    assert not e.value.report["space"]["fits"]
    assert [c.name for c in conn.domain(td.name).checkpoints()] == [cp]  # dry run

    td.stop()   # QEMU closes BASE: the bitmaps cannot be written
    on_disk = bitmaps(base)
    assert cp not in on_disk or "in-use" in on_disk[cp]["flags"], on_disk
    td.start()
    with pytest.raises(BitmapLost) as e:
        hygiene.post_merge(top, base, domain=td.name, disk="vda", connect=rig.URI,
                           repo=str(repo_path))
    lost = e.value.report["deleted_checkpoints"]
    assert [d["checkpoint"] for d in lost] == [cp], lost
    td.write("vda", 300 * MiB, 1 * MiB, 0x77)
    b2 = do_backup(repo, conn, td, scratch_dir)
    assert b2["mode"] == "full" and cp in b2["reason"], b2["reason"]
    # check --fix cleans what the lost close left behind (in-use stale copies).
    hygiene.check(domain=td.name, fix=True, connect=rig.URI, repo=str(repo_path))
    hygiene.check(domain=td.name, connect=rig.URI, repo=str(repo_path))


def test_check_fix_on_shut_off_domain(
        make_domain: Callable[..., rig.TestDomain], repo: Repository, repo_path: Path,
        conn: virt.Connection, scratch_dir: Path, tmp_path: Path) -> None:
    """Shut off: the chain is read with qemu-img, repairs are qemu-img and metadata."""
    td = make_domain([("qcow2", 16 * MiB)], running=False)
    base = str(tmp_path / "base.qcow2")
    active = over_base(td, base, stale=1)
    td.write("vda", 0, 1 * MiB, 0x11)
    b1 = do_backup(repo, conn, td, scratch_dir)
    add(active, "backupkit.leftover")
    conn.domain(td.name).redefine_checkpoint(
        "<domaincheckpoint><name>backupkit.leftover</name><creationTime>1</creationTime>"
        "<disks><disk name='vda' checkpoint='bitmap' bitmap='backupkit.leftover'/></disks>"
        "</domaincheckpoint>")
    with pytest.raises(BitmapLost) as e:
        hygiene.check(domain=td.name, connect=rig.URI, repo=str(repo_path))
    assert {(p["kind"], p["name"]) for p in e.value.report["remaining"]} == {
        ("orphan", "stale-000"), ("leftover_checkpoint", "backupkit.leftover")}
    fixed = hygiene.check(domain=td.name, fix=True, connect=rig.URI, repo=str(repo_path))
    assert fixed["clean"]
    assert set(bitmaps(active)) == {b1["checkpoint"]} and bitmaps(base) == {}
    assert [c.name for c in conn.domain(td.name).checkpoints()] == [b1["checkpoint"]]
    assert hygiene.check(domain=td.name, connect=rig.URI, repo=str(repo_path))["problems"] == []
