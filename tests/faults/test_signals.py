"""SIGTERM, SIGHUP and SIGINT during a backup: a clean stop, exit 7, one line.

SIGTERM is what ``kill``, ``timeout(1)``, cron wrappers and ``systemctl stop``
send; before it had a handler, a backup killed by it left the libvirt job, the new
checkpoint, the socket, the scratch file and ``.tmp-*`` files behind (issue 17).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.faults.conftest import Bk, MakeDomain, MiB, one_line_error, write_random

pytestmark = pytest.mark.libvirt


@pytest.mark.parametrize(("sig", "point", "running"), [
    (signal.SIGTERM, "mid_data", True),
    (signal.SIGTERM, "mid_data", False),
    (signal.SIGHUP, "before_first_chunk", True),
    (signal.SIGINT, "mid_data", True),
], ids=["SIGTERM-running", "SIGTERM-shutoff", "SIGHUP-running", "SIGINT-running"])
def test_stop_signal_cleans_up(sig: signal.Signals, point: str, running: bool,
                               make_domain: MakeDomain, bk: Bk, libvirt_conn: object,
                               tmp_path: Path) -> None:
    from backupkit import virt
    from tests import rig

    td = make_domain([("qcow2", 32 * MiB)], running=running)
    td.write("vda", 0, 1 * MiB, 0x11)
    first = bk.backup(td)
    write_random(td, "vda", 2 * MiB, 512 * 1024, 3, tmp_path)

    p = bk.stopped_at(point, "--json", "backup", td.name)
    p.send_signal(sig)
    p.send_signal(signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 7, err
    line = one_line_error_text(err)
    assert f"{td.name}: backup interrupted by {sig.name}" in line, err
    doc = json.loads(out)["error"]
    assert doc["kind"] == "interrupted" and doc["exit_code"] == 7, doc

    # Right away, before any later run could tidy up: no job, only the committed
    # backup's checkpoint (and bitmap), no scratch directory or socket, no backup
    # and no .tmp-* file in the repository.
    dom = virt.connect(rig.URI).domain(td.name)
    assert not dom.backup_job_active()
    assert [c.name for c in dom.checkpoints()] == [first["checkpoint"]]
    if not running:
        assert list(rig.bitmaps(td.disk("vda").path)) == [first["checkpoint"]]
    assert list(bk.scratch.iterdir()) == []
    assert [b["id"] for b in bk.json("list", td.name)["backups"]] == [first["id"]]
    assert not list(bk.repo.rglob(".tmp-*"))
    # The next run needs no repair and is incremental from the committed backup.
    td.write("vda", 8 * MiB, 64 * 1024, 0x33)
    nxt = bk.backup(td)
    assert nxt["mode"] == "incremental", nxt["reason"]
    bk.survivors(td)
    bk.nothing_left(td, libvirt_conn)


def one_line_error_text(err: str) -> str:
    import subprocess

    return one_line_error(subprocess.CompletedProcess([], 7, "", err))


@pytest.mark.parametrize("running", [True, False], ids=["running", "shutoff"])
def test_stop_signal_after_the_commit_keeps_the_backup_whole(
        running: bool, make_domain: MakeDomain, bk: Bk, libvirt_conn: object,
        tmp_path: Path) -> None:
    """A stop signal between the commit and the job's end waits until the job has ended:
    the committed backup keeps its checkpoint, the job ends, the scratch directory goes,
    and the run says what happened (exit 0: the backup is complete).  Acted on at once,
    it deleted the committed backup's checkpoint (next backup full) and, live, left the
    job writing into a scratch directory already removed (review of issue 17)."""
    from backupkit import virt
    from tests import rig

    td = make_domain([("qcow2", 32 * MiB)], running=running)
    td.write("vda", 0, 1 * MiB, 0x11)
    bk.backup(td)
    write_random(td, "vda", 2 * MiB, 512 * 1024, 4, tmp_path)
    before = {d.target: d.snapshot_reference(tmp_path / f"ref-stopped-{d.target}")
              for d in td.disks}

    p = bk.stopped_at("after_manifest", "--json", "backup", td.name)
    p.send_signal(signal.SIGTERM)
    p.send_signal(signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    doc = json.loads(out)
    assert any("SIGTERM received after the backup was committed" in w
               for w in doc.get("warnings", [])), doc
    bk.refs[doc["id"]] = before  # complete: it must restore equal to the disk then
    dom = virt.connect(rig.URI).domain(td.name)
    assert not dom.backup_job_active()
    assert [c.name for c in dom.checkpoints()] == [doc["checkpoint"]]
    assert list(bk.scratch.iterdir()) == []
    td.write("vda", 8 * MiB, 64 * 1024, 0x33)
    nxt = bk.backup(td)
    assert nxt["mode"] == "incremental", nxt["reason"]
    bk.survivors(td)
    bk.nothing_left(td, libvirt_conn)


def test_a_backup_job_backupkit_did_not_start_is_left_alone(
        make_domain: MakeDomain, bk: Bk, tmp_path: Path) -> None:
    """Another tool's pull-mode job on the domain: the backup exits 3 naming it and
    never aborts it (before, it was taken for a leftover of ours and aborted)."""
    from backupkit import virt
    from tests import rig

    td = make_domain([("qcow2", 32 * MiB)], running=True)
    other = tmp_path / "other"
    other.mkdir()
    os.chmod(other, 0o777)
    xml = (f"<domainbackup mode='pull'><server transport='unix' socket='{other}/s'/><disks>"
           f"<disk name='vda' backup='yes' type='file'><scratch file='{other}/vda.scratch'/>"
           "</disk></disks></domainbackup>")
    td.dom.backupBegin(xml, None, 0)
    try:
        cp = bk.run("--json", "backup", td.name)
        assert cp.returncode == 3, cp.stderr
        assert f"{other}/s" in json.loads(cp.stdout)["error"]["message"]
        dom = virt.connect(rig.URI).domain(td.name)
        assert dom.backup_job_paths() == (f"{other}/s", f"{other}/vda.scratch")
    finally:
        td.dom.abortJob()
