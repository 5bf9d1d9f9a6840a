"""SIGTERM during ``backup --jobs 2``: every running domain stops cleanly, exit 7.

The signal reaches the main thread only; the domains being backed up on worker
threads must notice it, end their libvirt jobs, delete their new checkpoints and
remove their scratch directories, like a single run does.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.faults.conftest import Bk, MakeDomain, MiB, write_random

pytestmark = pytest.mark.libvirt


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_sigterm_stops_every_job(make_domain: MakeDomain, bk: Bk, libvirt_conn: object,
                                 tmp_path: Path) -> None:
    from backupkit import virt
    from tests import rig

    doms = [make_domain([("qcow2", 64 * MiB)]) for _ in range(2)]
    firsts = {}
    for i, td in enumerate(doms):
        td.write("vda", 0, MiB, 0x11)
        firsts[td.name] = bk.backup(td)
        write_random(td, "vda", 2 * MiB, 48 * MiB, 10 + i, tmp_path)

    # Stopped (SIGSTOP) when the first domain has stored its second chunk.
    p = bk.stopped_at("mid_data", "--json", "backup", "--jobs", "2",
                      *(td.name for td in doms))
    p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:
        if _state(p.pid) == "T":  # the other domain may reach the fault point too
            p.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 7, err
    assert json.loads(out)["error"]["kind"] == "interrupted", out
    assert "Traceback" not in err

    for td in doms:
        dom = virt.connect(rig.URI).domain(td.name)
        assert not dom.backup_job_active(), td.name
        listed = bk.json("list", td.name)["backups"]
        # Nothing half done: no new backup, or (a domain already committing when the
        # signal came) a complete one whose checkpoint is the only one left.
        assert len(listed) in (1, 2)
        latest = bk.json("show", td.name, "latest")
        assert [c.name for c in dom.checkpoints()] == [latest["checkpoint"]]
    left = list(bk.scratch.iterdir())
    assert left == [], ([(p.name, sorted(os.listdir(p)) if p.is_dir() else "file")
                         for p in left], err[-4000:])
    tmps = sorted(p.name for p in bk.repo.rglob(".tmp-*"))
    assert tmps == [], (tmps, err[-3000:])
    bk.json("verify", "--data")
    # The next run of each is incremental and needs no repair.
    for td in doms:
        nxt = bk.backup(td)
        assert nxt["mode"] == "incremental", nxt["reason"]
        bk.nothing_left(td, libvirt_conn)
