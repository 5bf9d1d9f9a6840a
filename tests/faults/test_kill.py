"""kill -9 of the backupkit CLI at named points of a backup (backupkit/faults.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import rig
from tests.faults.conftest import Bk, MakeDomain, MiB, write_random

pytestmark = pytest.mark.libvirt


POINTS = ("before_first_chunk", "mid_data", "after_index", "after_manifest")


@pytest.mark.parametrize(("where", "point"), [
    *((w, p) for w in ("running", "shutoff") for p in POINTS),
    # On the S3 gateway, the points where the stores differ: chunks still on their way
    # to the gateway (mid_data), everything but the manifest stored (after_index).
    ("s3", "mid_data"), ("s3", "after_index"),
])
def test_kill_9_during_incremental(where: str, point: str, make_domain: MakeDomain,
                                   request: pytest.FixtureRequest, libvirt_conn: object,
                                   tmp_path: Path) -> None:
    """kill -9 at each fault point of an incremental backup (of a running and of a
    shut-off domain; to a local repository and to S3): the committed backups are
    intact, the next run is incremental, gc removes what the killed run stored."""
    bk: Bk = request.getfixturevalue("s3bk" if where == "s3" else "bk")
    td = make_domain([("qcow2", 32 * MiB)], running=where != "shutoff")
    td.write("vda", 0, 1 * MiB, 0x11)
    first = bk.backup(td)
    assert first["mode"] == "full"

    # Data the killed run was copying: random, several chunks, in two places.
    write_random(td, "vda", 2 * MiB, 512 * 1024, 1, tmp_path)
    td.write("vda", 20 * MiB, 256 * 1024, 0x22)
    before = {d.target: d.snapshot_reference(tmp_path / f"ref-killed-{d.target}")
              for d in td.disks}
    bk.killed_at(point, "backup", td.name)

    listed = [b["id"] for b in bk.json("list", td.name)["backups"]]
    if point == "after_manifest":
        # The manifest was written: that backup exists and is complete.
        assert len(listed) == 2
        bk.refs[listed[-1]] = before
    else:
        assert listed == [first["id"]], "an uncommitted backup is visible"
        if point == "after_index":
            # Every chunk and the index are stored, no manifest names them.  (At
            # mid_data the chunks handed over may still be on their way to an S3
            # gateway when the kill comes: some, all or none land.)
            leftover = bk.json("gc", "--dry-run")
            assert leftover["chunks_removed"] > 0, leftover
            assert len(leftover["incomplete_backups_removed"]) == 1, leftover

    # (1) what was committed before the fault survives.
    bk.survivors(td)

    # (2) the next run cleans up after its predecessor and is incremental: the
    # checkpoint of the newest committed backup still records every write since.
    td.write("vda", 8 * MiB, 64 * 1024, 0x33)
    nxt = bk.backup(td)
    assert nxt["mode"] == "incremental", nxt["reason"]
    assert nxt["parent_id"] == listed[-1]
    bk.survivors(td)

    # (3) nothing left behind.
    bk.nothing_left(td, libvirt_conn)


def test_kill_9_leaves_job_that_next_run_aborts(make_domain: MakeDomain, bk: Bk,
                                                libvirt_conn: object) -> None:
    """The killed run's libvirt backup job is still running; the next run aborts it."""
    from backupkit import virt

    td = make_domain([("qcow2", 16 * MiB)])
    td.write("vda", 0, 1 * MiB, 0x44)
    bk.killed_at("before_first_chunk", "backup", td.name)
    dom = virt.connect(rig.URI).domain(td.name)
    assert dom.backup_job_active(), "the killed run's job should still be running"
    assert len(dom.checkpoints()) == 1  # the checkpoint no backup uses
    res = bk.backup(td)
    assert res["mode"] == "full"
    assert res["reason"] == "no previous backup in the repository"
    bk.survivors(td)
    bk.nothing_left(td, libvirt_conn)
