"""Issue 25 on running domains: live hooks delete a checkpoint only when its bitmap is
really lost (or certainly will be), say so with exit 5, and never keep one that is.

Checkpoints are made with libvirt's checkpoint API directly (no backup needed);
chains are built cold before QEMU opens them, then changed only through libvirt.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backupkit.errors import EXIT_INTEGRITY, BitmapLost
from backupkit.ops import checkpoint as checkpoint_op
from backupkit.ops import hygiene
from tests import rig
from tests.hygiene.helpers import MiB, add, bitmaps, create, make_in_use
from tests.hygiene.test_live import blockcommit

pytestmark = [pytest.mark.libvirt, pytest.mark.root]

MakeDomain = Callable[..., rig.TestDomain]


def make_checkpoint(td: rig.TestDomain, name: str) -> None:
    td.dom.checkpointCreateXML(
        f"<domaincheckpoint><name>{name}</name><disks><disk name='vda' checkpoint='bitmap'/>"
        "</disks></domaincheckpoint>", 0)


def redefine_checkpoint(td: rig.TestDomain, name: str) -> None:
    import libvirt

    td.dom.checkpointCreateXML(
        f"<domaincheckpoint><name>{name}</name><creationTime>1</creationTime><disks>"
        f"<disk name='vda' checkpoint='bitmap' bitmap='{name}'/></disks></domaincheckpoint>",
        libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)


def checkpoints(td: rig.TestDomain) -> list[str]:
    return sorted(c.getName() for c in td.dom.listAllCheckpoints(0))


def overlay_on(td: rig.TestDomain, base: str, size: int) -> str:
    """Make the (shut-off) domain's disk a fresh overlay of a new BASE at ``base``."""
    create(base, size)
    disk = td.disk("vda")
    disk.path.unlink()
    create(str(disk.path), backing=base)
    return str(disk.path)


def fill(fs: Path, leave: int) -> None:
    """Fill the filesystem until ``leave`` bytes are free (4 KiB steps)."""
    v = os.statvfs(fs)
    left = v.f_bavail * v.f_frsize - leave
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while left > 0:
            left -= os.write(fd, b"\1" * min(left, 65536))
    finally:
        os.close(fd)


@pytest.mark.parametrize("free", [400 * 1024, 128 * 1024], ids=["400K", "128K"])
def test_live_post_merge_deletes_only_what_qemu_cannot_store(
        make_domain: MakeDomain, small_fs: Path, libvirt_conn: Any, free: int) -> None:
    """Item 4: BASE's filesystem nearly full.  With 400 KiB free the old estimate
    (458,752 bytes for 2 bitmaps) deleted both checkpoints, yet QEMU stores them: they
    are kept (with a warning).  With 128 KiB it cannot: a dry run says so, and the
    shutdown really loses them."""
    td = make_domain([("qcow2", 16 * MiB)], running=False)
    base = str(small_fs / "base.qcow2")
    top = overlay_on(td, base, 16 * MiB)
    td.start()
    make_checkpoint(td, "cp1")
    td.write("vda", 0, 64 * 1024, 0x11)
    make_checkpoint(td, "cp2")
    td.write("vda", 8 * MiB, 64 * 1024, 0x22)
    blockcommit(td, base)
    fill(small_fs, free)

    if free < 200 * 1024:
        with pytest.raises(BitmapLost) as e:
            hygiene.post_merge(top, base, domain=td.name, disk="vda", connect=rig.URI,
                               dry_run=True)
        space = e.value.report["space"]
        assert not space["fits"] and space["free"] < space["needed_min"], space
        assert "needs at least" in e.value.report["deleted_checkpoints"][0]["reason"]
        assert checkpoints(td) == ["cp1", "cp2"]  # dry run
        td.stop()
        assert bitmaps(base) == {}, bitmaps(base)  # the prediction was right
        return

    res = hygiene.post_merge(top, base, domain=td.name, disk="vda", connect=rig.URI)
    space = res["space"]
    assert res["deleted_checkpoints"] == [], res
    assert [m["checkpoint"] for m in res["merged"]] == ["cp1", "cp2"]
    assert space["kind"] == "file" and space["fits"]
    assert space["free"] <= 400 * 1024 < 458752          # what the old estimate needed
    assert space["needed_min"] <= space["free"] < space["predicted"]
    assert "may be lost" in space["warning"]
    assert checkpoints(td) == ["cp1", "cp2"]

    td.stop()   # QEMU closes BASE and stores its bitmaps: both intact
    on_disk = bitmaps(base)
    assert sorted(on_disk) == ["cp1", "cp2"], on_disk
    assert all("in-use" not in b["flags"] for b in on_disk.values()), on_disk


def test_live_pre_merge_in_use_in_top_deletes_its_checkpoint(
        make_domain: MakeDomain, tmp_path: Path, libvirt_conn: Any) -> None:
    """Items 5 and 1 (live): TOP's in-use bitmap can never reach BASE: its checkpoint is
    deleted (every copy goes), the stale bitmap in BASE too, exit 5 naming it."""
    td = make_domain([("qcow2", 16 * MiB)], running=False)
    base = str(tmp_path / "base.qcow2")
    top = overlay_on(td, base, 16 * MiB)
    add(base, "stale")
    add(top, "bad")
    make_in_use(top)               # as a QEMU killed with SIGKILL leaves it
    td.start()
    redefine_checkpoint(td, "bad")
    make_checkpoint(td, "good")
    with pytest.raises(BitmapLost) as e:
        hygiene.pre_merge(top, base, domain=td.name, disk="vda", connect=rig.URI)
    assert e.value.exit_code == EXIT_INTEGRITY
    report = e.value.report
    assert [p["name"] for p in report["lost"]] == ["bad"]
    assert report["lost"][0]["checkpoint_deleted"] is True
    assert {(r["name"], r["method"]) for r in report["removed"]} == {
        ("bad", hygiene.M_CHECKPOINT), ("stale", hygiene.M_REDEFINE)}
    assert checkpoints(td) == ["good"]
    # The rerun: nothing lost any more, nothing to remove.
    again = hygiene.pre_merge(top, base, domain=td.name, disk="vda", connect=rig.URI)
    assert again["lost"] == [] and again["removed"] == []


def test_checkpoint_list_says_missing_when_removed_behind_libvirts_back(
        make_domain: MakeDomain, tmp_path: Path, libvirt_conn: Any) -> None:
    """Item 8: a copy left in a lower layer is not the checkpoint's bitmap."""
    td = make_domain([("qcow2", 16 * MiB)], running=False)
    base = str(tmp_path / "base.qcow2")
    top = overlay_on(td, base, 16 * MiB)
    add(base, "cp")
    add(top, "cp")
    td.start()
    redefine_checkpoint(td, "cp")

    def state() -> dict[str, Any]:
        doc = checkpoint_op.list_checkpoints(rig.URI, td.name)
        return dict(doc["checkpoints"][0]["disks"][0])

    st = state()
    assert st["exists"] and st["usable"] and st["layers"] == [top, base]
    dom = td.dom
    from backupkit import virt

    vdom = virt.connect(rig.URI).domain(td.name)
    node = next(n["node-name"] for n in vdom.block_nodes()
                if n["drv"] == "qcow2" and n["file"] == top)
    vdom.remove_bitmap_qmp(node, "cp")
    st = state()
    assert not st["exists"] and not st["usable"] and st["layers"] == [base], st
    dom.destroy()
    st = state()
    assert not st["exists"] and st["layers"] == [base], st


@pytest.mark.slow
@pytest.mark.parametrize("written", [118, 121], ids=["118MiB-kept", "121MiB-lost"])
def test_live_post_merge_prediction_on_a_fixed_size_volume(
        make_domain: MakeDomain, loop_volume: Callable[[int], str], libvirt_conn: Any,
        written: int) -> None:
    """HOST-FACTS' window: a 1 GiB BASE on a 128 MiB volume with 32 stale bitmaps.  After a
    commit of 118 MiB QEMU still stores every bitmap; after 121 MiB it cannot.  The
    prediction (a dry run: nothing deleted) must say which, and the shutdown proves it."""
    td = make_domain([("qcow2", 1024 * MiB)], running=False)
    base = loop_volume(128 * MiB)
    top = overlay_on(td, base, 1024 * MiB)
    for i in range(32):
        add(base, f"stale-{i:03d}")
    td.start()
    make_checkpoint(td, "cp")
    td.write("vda", 0, written * MiB, 0x55)
    blockcommit(td, base)
    try:
        res = hygiene.post_merge(top, base, domain=td.name, disk="vda", connect=rig.URI,
                                 dry_run=True)
        space, lost = res["space"], False
    except BitmapLost as e:
        space, lost = e.report["space"], True
    assert space["kind"] == "block_device" and space["bitmaps"] == 33
    td.stop()
    on_disk = bitmaps(base)
    kept = "cp" in on_disk and "in-use" not in on_disk["cp"]["flags"]
    assert kept != lost, (written, space, on_disk)
    assert kept == (written == 118)


def hook(*args: str, env: dict[str, str] | None = None) -> Any:
    from tests.conftest import run_cli

    return run_cli("--connect", rig.URI, "--json", "hygiene", *args, env=env, timeout=120)


@pytest.mark.parametrize("step", [1, 2, 3])
def test_live_pre_merge_killed_at_each_step_then_rerun(
        make_domain: MakeDomain, tmp_path: Path, libvirt_conn: Any, step: int) -> None:
    """Kill the live pre-merge before its N-th removal; the rerun finishes the job:
    the broken checkpoint is gone with every copy, the stale bitmaps are gone, the
    sound checkpoint is untouched."""
    import signal

    td = make_domain([("qcow2", 16 * MiB)], running=False)
    base = str(tmp_path / "base.qcow2")
    top = overlay_on(td, base, 16 * MiB)
    add(base, "stale-a")
    add(base, "stale-b")
    add(top, "bad")
    make_in_use(top)
    td.start()
    redefine_checkpoint(td, "bad")
    make_checkpoint(td, "good")
    args = ("pre-merge", "--top", top, "--base", base, "--domain", td.name, "--disk", "vda")
    cp = hook(*args, env={"BACKUPKIT_FAULT_POINT": f"hygiene_step_{step}"})
    assert cp.returncode == -signal.SIGKILL, cp.stderr
    cp = hook(*args)
    assert cp.returncode in (0, EXIT_INTEGRITY), cp.stderr
    if step == 1:  # nothing was done before the kill: this run finds the loss
        assert cp.returncode == EXIT_INTEGRITY and "bad" in cp.stderr
    assert checkpoints(td) == ["good"]
    from backupkit import virt

    live = virt.connect(rig.URI).domain(td.name).block_bitmaps()
    assert {b["name"] for b in live[top]} == {"good"}
    assert live.get(base, []) == []
    assert hook(*args).returncode == 0


def test_live_post_merge_killed_between_deletions_then_rerun(
        make_domain: MakeDomain, tmp_path: Path, libvirt_conn: Any) -> None:
    """Two checkpoints lost their bitmap (removed behind libvirt's back); kill the live
    post-merge after the first deletion: the rerun deletes the second, exit 5 both times
    it finds one, never 0 while a checkpoint without its bitmap is left."""
    import signal

    from backupkit import virt

    td = make_domain([("qcow2", 16 * MiB)], running=False)
    base = str(tmp_path / "base.qcow2")
    top = overlay_on(td, base, 16 * MiB)
    td.start()
    for name in ("a", "b", "c"):
        make_checkpoint(td, name)
    blockcommit(td, base)
    vdom = virt.connect(rig.URI).domain(td.name)
    node = next(n["node-name"] for n in vdom.block_nodes()
                if n["drv"] == "qcow2" and n["file"] == base)
    for name in ("a", "b"):
        vdom.remove_bitmap_qmp(node, name)
    args = ("post-merge", "--top", top, "--base", base, "--domain", td.name, "--disk", "vda")
    cp = hook(*args, env={"BACKUPKIT_FAULT_POINT": "hygiene_step_2"})
    assert cp.returncode == -signal.SIGKILL, cp.stderr
    assert checkpoints(td) == ["b", "c"]
    cp = hook(*args)
    assert cp.returncode == EXIT_INTEGRITY, cp.stderr
    assert "b" in json_error(cp)["message"]
    assert checkpoints(td) == ["c"]
    assert hook(*args).returncode == 0


def json_error(cp: Any) -> dict[str, Any]:
    import json

    return dict(json.loads(cp.stdout)["error"])


def test_live_pre_merge_over_a_raw_base_says_the_loss_before_the_merge(
        make_domain: MakeDomain, tmp_path: Path, libvirt_conn: Any) -> None:
    """Item 7 (live): a raw BASE cannot store bitmaps; pre-merge says so (exit 5), changes
    nothing and deletes no checkpoint (the merge has not happened yet)."""
    from tests.hygiene.helpers import must

    td = make_domain([("qcow2", 16 * MiB)], running=False)
    base = str(tmp_path / "base.raw")
    must("qemu-img", "create", "-q", "-f", "raw", base, str(16 * MiB))
    top = str(td.disk("vda").path)
    os.unlink(top)
    must("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    td.start()
    make_checkpoint(td, "cp")
    with pytest.raises(BitmapLost) as e:
        hygiene.pre_merge(top, base, domain=td.name, disk="vda", connect=rig.URI)
    assert "raw image, which cannot store bitmaps" in str(e.value)
    assert "will be lost" in str(e.value)
    assert e.value.report["removed"] == [] and checkpoints(td) == ["cp"]
