"""choose_mode is pure: every fallback reason, without libvirt."""

from __future__ import annotations

import pytest

from backupkit.errors import ModeUnavailable
from backupkit.ops.backup import DiskState, choose_mode
from backupkit.repo import DiskRecord, Manifest

GiB = 1 << 30


def manifest(checkpoint: str | None = "backupkit.1", disks: dict[str, int] | None = None
             ) -> Manifest:
    disks = disks if disks is not None else {"vda": GiB}
    recs = [DiskRecord(name=n, source=f"/x/{n}", format="qcow2", virtual_size=s,
                       read_bytes=0, stored_bytes=0, data_bytes=0, index={})
            for n, s in disks.items()]
    return Manifest(version=1, id="b1", domain="vm", created="2026-01-01T00:00:00Z",
                    mode="full", reason="", checkpoint=checkpoint, parent_checkpoint=None,
                    parent_id=None, started="", finished="", duration_seconds=0.0,
                    quiesced=False, freeze_seconds=None, domain_xml="<domain/>",
                    checkpoint_xml=None, disks=recs)


def ok(target: str = "vda", size: int = GiB, fmt: str = "qcow2", bitmap: str | None = "ok"
       ) -> DiskState:
    return DiskState(target, fmt, size, bitmap)


def test_incremental_when_everything_is_valid() -> None:
    plan = choose_mode("auto", "vm", manifest(), True, [ok()])
    assert plan.mode == "incremental"
    assert plan.parent is not None and plan.parent.id == "b1"
    assert plan.disk_modes["vda"][0] == "incremental"


@pytest.mark.parametrize(
    ("prev", "known", "disks", "reason"),
    [
        (None, False, [ok()], "no previous backup"),
        (manifest(checkpoint=None), False, [ok()], "has no checkpoint"),
        (manifest(), False, [ok()], "checkpoint backupkit.1 missing"),
        (manifest(), True, [ok(bitmap=None)], "bitmap backupkit.1 missing on disk vda"),
        (manifest(), True, [ok(bitmap="in-use (not stored cleanly)")], "is in-use"),
        (manifest(), True, [ok(size=2 * GiB)], "resized"),
        (manifest(), True, [ok(), ok("vdb")], "disk vdb added"),
        (manifest(disks={"vda": GiB, "vdb": GiB}), True, [ok()], "disk removed"),
        (manifest(), True, [ok(fmt="raw")], "no disk can hold bitmaps"),
    ],
)
def test_fallback_reasons(prev: Manifest | None, known: bool, disks: list[DiskState],
                          reason: str) -> None:
    plan = choose_mode("auto", "vm", prev, known, disks)
    assert plan.mode == "full"
    assert reason in plan.reason
    with pytest.raises(ModeUnavailable, match=reason.split()[0]) as e:
        choose_mode("incremental", "vm", prev, known, disks)
    assert e.value.exit_code == 1


def test_raw_disk_is_always_full_with_its_reason() -> None:
    prev = manifest(disks={"vda": GiB, "vdb": GiB})
    plan = choose_mode("auto", "vm", prev, True, [ok(), ok("vdb", fmt="raw", bitmap=None)])
    assert plan.mode == "incremental"
    assert plan.disk_modes["vdb"] == ("full", "raw disk cannot hold bitmaps")


def test_full_requested() -> None:
    plan = choose_mode("full", "vm", manifest(), True, [ok()])
    assert (plan.mode, plan.reason) == ("full", "full backup requested")
