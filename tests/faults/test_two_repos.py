"""Two repositories backing up one domain (issue 17 item 4).

Before: both runs used the same scratch and socket paths, the second aborted the
first's job, the first then read its second disk from the other run's export and
committed a backup mixing two points in time (exit 0); and each run deleted the
other's checkpoint, so every backup was full.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from backupkit import virt
from tests import rig
from tests.conftest import run_cli
from tests.faults.conftest import (
    CHUNK,
    Bk,
    MakeDomain,
    MiB,
    one_line_error,
    paused_second_backup,
    write_random,
)

pytestmark = pytest.mark.libvirt


@pytest.fixture
def bk2(tmp_path: Path, bk: Bk) -> Bk:
    """A second repository, same scratch_dir and config (as on one host)."""
    (tmp_path / "second").mkdir()  # its own references and restores
    b = Bk(tmp_path / "second", tmp_path / "repo2", bk.scratch, bk.config)
    cp = b.run("init", "--chunk-size", str(CHUNK))
    assert cp.returncode == 0, cp.stderr
    return b


def _checkpoints(td: rig.TestDomain) -> list[str]:
    return [c.name for c in virt.connect(rig.URI).domain(td.name).checkpoints()]


def test_two_repositories_keep_their_own_checkpoints(make_domain: MakeDomain, bk: Bk,
                                                      bk2: Bk, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 32 * MiB), ("qcow2", 16 * MiB)])
    td.write("vda", 0, 1 * MiB, 0x11)
    td.write("vdb", 0, 1 * MiB, 0x12)
    a1 = bk.backup(td)
    b1 = bk2.backup(td)
    assert a1["checkpoint"] != b1["checkpoint"]
    # Each checkpoint name says whose it is: the repository id's first 8 digits.
    for b, res in ((bk, a1), (bk2, b1)):
        rid = json.loads((b.repo / "config.json").read_text())["id"][:8]
        assert res["checkpoint"].startswith(f"backupkit.{rid}."), res["checkpoint"]
    assert sorted(_checkpoints(td)) == sorted([a1["checkpoint"], b1["checkpoint"]])

    write_random(td, "vda", 4 * MiB, 256 * 1024, 21, tmp_path)
    td.write("vdb", 2 * MiB, 64 * 1024, 0x22)
    a2 = bk.backup(td)
    assert a2["mode"] == "incremental" and a2["parent_id"] == a1["id"], a2["reason"]
    td.write("vda", 9 * MiB, 64 * 1024, 0x23)
    b2 = bk2.backup(td)
    # B's checkpoint survived A's run: B's incremental has A's writes and its own.
    assert b2["mode"] == "incremental" and b2["parent_id"] == b1["id"], b2["reason"]
    assert sorted(_checkpoints(td)) == sorted([a2["checkpoint"], b2["checkpoint"]])
    # hygiene with one repository sees the other's checkpoint as no leftover of its own.
    fixed = bk.json("hygiene", "check", td.name, "--fix")
    assert not [p for p in fixed.get("problems", []) if p.get("checkpoint")], fixed
    assert sorted(_checkpoints(td)) == sorted([a2["checkpoint"], b2["checkpoint"]])
    bk.survivors(td)
    bk2.survivors(td)
    assert list(bk.scratch.iterdir()) == []


def test_concurrent_run_on_another_repository_is_busy(make_domain: MakeDomain, bk: Bk,
                                                      bk2: Bk, tmp_path: Path) -> None:
    td, before, p = paused_second_backup(make_domain, bk, tmp_path, length=256 * 1024,
                                         seed=22, tag="c")
    try:
        cp = bk2.run("backup", td.name)
        assert cp.returncode == 3, cp.stderr
        line = one_line_error(cp)
        assert "host-wide" in line and f"pid {p.pid}" in line, line
        # Commands that change the domain's checkpoints or bitmaps wait for it too,
        # with another repository or none.
        for args in (["hygiene", "check", td.name, "--fix"],
                     ["checkpoint", "delete", td.name, "--all"]):
            cp = run_cli("--config", str(bk.config), *args)
            assert cp.returncode == 3, (args, cp.stderr)
            assert "host-wide" in one_line_error(cp)
    finally:
        p.send_signal(signal.SIGCONT)
    _out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    bk.refs[bk.json("list", td.name)["backups"][-1]["id"]] = before
    bk.survivors(td)
    b = bk2.backup(td)
    assert b["mode"] == "full"
    bk2.survivors(td)


def test_disk_read_from_another_job_is_not_committed(make_domain: MakeDomain, bk: Bk,
                                                     tmp_path: Path) -> None:
    """Another tool replaces this run's job with its own on the same socket path:
    the reads succeed, but the run sees the job is not its own and commits nothing."""
    td = make_domain([("qcow2", 16 * MiB)])
    td.write("vda", 0, 1 * MiB, 0x11)
    first = bk.backup(td)
    td.write("vda", 2 * MiB, 1 * MiB, 0x22)
    p = bk.stopped_at("before_first_chunk", "backup", td.name)
    dom = virt.connect(rig.URI).domain(td.name)
    try:
        paths = dom.backup_job_paths()
        assert paths is not None
        sock = paths[0]
        dom.abort_job()
        other = tmp_path / "other"
        other.mkdir()
        subprocess.run(["chown", "--reference", str(Path(sock).parent), str(other)], check=True)
        td.dom.backupBegin(
            f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/><disks>"
            f"<disk name='vda' backup='yes' type='file' backupmode='incremental' "
            f"incremental='{first['checkpoint']}'><scratch file='{other}/vda.s'/></disk>"
            "</disks></domainbackup>", None, 0)
    finally:
        p.send_signal(signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    try:
        assert p.returncode == 1, err
        line = one_line_error(subprocess.CompletedProcess(p.args, 1, out, err))
        assert "job this run started is gone" in line, line
        assert [b["id"] for b in bk.json("list", td.name)["backups"]] == [first["id"]]
    finally:
        dom.abort_job()
    bk.survivors(td)
    nxt = bk.backup(td)
    assert nxt["mode"] == "incremental", nxt["reason"]
    bk.survivors(td)
