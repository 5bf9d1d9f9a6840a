"""backup --jobs: several real domains backed up at once, one failure not stopping the rest."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backupkit import virt
from backupkit.errors import Partial
from backupkit.ops import backup as op
from backupkit.ops import restore as restore_op
from backupkit.repo import Repository
from tests import rig
from tests.conftest import run_cli

pytestmark = pytest.mark.libvirt
MiB = rig.MiB


@pytest.fixture
def conn(libvirt_conn: Any) -> virt.Connection:
    return virt.connect(rig.URI)


def test_two_jobs_run_at_once_and_one_failure_costs_nothing_else(
        make_domain: Callable[..., rig.TestDomain], repo_path: Path, conn: virt.Connection,
        scratch_dir: Path, tmp_path: Path) -> None:
    repo = Repository.init(str(repo_path), chunk_size=256 * 1024)
    good = [make_domain([("qcow2", 16 * MiB)]) for _ in range(3)]
    gone = make_domain([("qcow2", 16 * MiB)], running=False)
    os.unlink(gone.disk("vda").path)  # its disk is gone: this domain's backup fails
    for i, td in enumerate(good):
        td.write("vda", i * MiB, 2 * MiB, 0x41 + i)
    refs = {td.name: td.disk("vda").snapshot_reference(tmp_path / f"{td.name}.raw")
            for td in good}
    # Two domains must be inside their backup jobs at the same time for the barrier to
    # open (with one job at a time it would break, failing both): proof of concurrency.
    barrier = threading.Barrier(2, timeout=120)
    calls = [0]
    lock = threading.Lock()

    def job_started() -> None:
        with lock:
            calls[0] += 1
            first_two = calls[0] <= 2
        if first_two:
            barrier.wait()

    labels: list[str] = []
    names = [good[0].name, gone.name, good[1].name, good[2].name]
    with pytest.raises(Partial) as ei:
        op.backup_many(
            repo, conn, names,
            lambda n: op.Request(domain=n, scratch_dir=str(scratch_dir)),
            op.Hooks(job_started=job_started,
                     progress_start=lambda label, total: labels.append(label) or None),
            jobs=2)
    doc = ei.value.result
    assert doc is not None
    # In the order given, whatever order they finished in.
    assert [r["domain"] for r in doc["backups"]] == [n for n in names if n != gone.name]
    assert [f["domain"] for f in doc["failed"]] == [gone.name]
    assert sorted(labels) == sorted(f"{td.name}/vda" for td in good)
    for td in good:
        out = tmp_path / f"out-{td.name}"
        restore_op.restore(repo, td.name, "latest", str(out), fmt="raw")
        rig.compare(refs[td.name], out / "vda.raw", "raw")


def test_cli_jobs_exit_6_and_json_lists_each(
        make_domain: Callable[..., rig.TestDomain], repo_path: Path, tmp_path: Path) -> None:
    a = make_domain([("qcow2", 16 * MiB)])
    b = make_domain([("qcow2", 16 * MiB)])
    gone = make_domain([("qcow2", 16 * MiB)], running=False)
    os.unlink(gone.disk("vda").path)
    cfg = tmp_path / "bk.toml"
    cfg.write_text(f'repository = "{repo_path}"\nscratch_dir = "{tmp_path / "s"}"\njobs = 1\n')
    assert run_cli("--config", str(cfg), "init").returncode == 0
    cp = run_cli("--config", str(cfg), "--json", "backup", "--jobs", "2", a.name, gone.name,
                 b.name)
    assert cp.returncode == 6, cp.stderr
    doc = json.loads(cp.stdout)["error"]
    assert doc["kind"] == "partial"
    assert [r["domain"] for r in doc["result"]["backups"]] == [a.name, b.name]
    assert [f["domain"] for f in doc["result"]["failed"]] == [gone.name]
    # The log lines about each domain start with its name.
    for name in (a.name, b.name, gone.name):
        assert re.search(rf"^\S+ \S+ (INFO|ERROR) +{name}: ", cp.stderr, re.M), cp.stderr
    cp = run_cli("--config", str(cfg), "backup", "--jobs", "0", a.name)
    assert cp.returncode == 2 and "between 1 and 64" in cp.stderr
