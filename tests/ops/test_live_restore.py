"""restore --live: a domain running from the backup's export at once, then independent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from backupkit import errors
from backupkit.ops import live, serve
from backupkit.repo import Repository
from tests import rig
from tests.conftest import run_cli

pytestmark = [pytest.mark.libvirt, pytest.mark.skipif(
    not os.environ.get("CI") and not os.path.exists(
        "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-python-plugin.so"),
    reason="nbdkit-plugin-python is not installed (scripts/setup.sh)")]


@pytest.fixture
def new_names(libvirt_conn: Any) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for n in names:
        live.abort(n, remove_files=False)
        rig.remove_domain(libvirt_conn, n)


def _backed_up(make_domain: Callable[..., rig.TestDomain], tmp_path: Path, repo_path: Path
               ) -> tuple[rig.TestDomain, list[str], dict[str, Path]]:
    """A domain with a full and an incremental backup; references of the incremental."""
    td = make_domain([("qcow2", 48 * rig.MiB), ("raw", 16 * rig.MiB)])
    for i in range(0, 40, 3):
        td.write("vda", i * rig.MiB, rig.MiB, 0x30 + i)
    td.write("vdb", 5 * rig.MiB, 3 * rig.MiB, 0x77)
    scratch = tmp_path / "s"
    cfg = tmp_path / "bk.toml"
    cfg.write_text(f'repository = "{repo_path}"\nscratch_dir = "{scratch}"\n')
    base = ["--config", str(cfg), "--json"]
    run_cli(*base, "init", check=True)
    run_cli(*base, "backup", td.name, check=True)
    td.write("vda", 7 * rig.MiB + 4096, 64 * 1024, 0xEE)
    doc = json.loads(run_cli(*base, "backup", td.name, check=True).stdout)
    assert doc["mode"] == "incremental"
    refs = {d.target: d.snapshot_reference(tmp_path / f"ref-{d.target}.raw") for d in td.disks}
    return td, base, refs


def _independent(conn: Any, name: str, target: Path, refs: dict[str, Path]) -> None:
    dom = conn.lookupByName(name)
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        root = ET.fromstring(dom.XMLDesc(flags))
        assert not [s for s in root.iter("source") if s.get("protocol") == "nbd"]
    # QEMU keeps qcow2 metadata in memory: compare the files once it has closed them
    dom.destroy()
    for t, ref in refs.items():
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(target / f"{t}.qcow2")],
            capture_output=True, text=True, check=True).stdout)
        assert "backing-filename" not in info
        cp = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2",
                             str(ref), str(target / f"{t}.qcow2")], capture_output=True,
                            text=True, check=False)
        assert cp.returncode == 0, cp.stdout + cp.stderr
    assert not os.path.exists(live.state_dir(name))


def test_live_restore_runs_at_once_then_is_independent(
        make_domain: Callable[..., rig.TestDomain], libvirt_conn: Any, repo_path: Path,
        tmp_path: Path, new_names: list[str]) -> None:
    td, base, refs = _backed_up(make_domain, tmp_path, repo_path)
    new = f"{td.name}-live"
    new_names.append(new)
    target = tmp_path / "live"
    cp = run_cli(*base, "restore", td.name, "latest", "--target", str(target),
                 "--define", new, "--live")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["state"] == "done" and doc["domain_state"] == "running"
    assert 0 < doc["seconds_to_start"] <= doc["seconds_to_independence"]
    assert not serve.alive(doc["server_pid"])
    orig = ET.fromstring(td.dom.XMLDesc(0))
    root = ET.fromstring(libvirt_conn.lookupByName(new).XMLDesc(0))
    assert root.findtext("uuid") != orig.findtext("uuid")
    _independent(libvirt_conn, new, target, refs)
    libvirt_conn.lookupByName(new).create()  # boots again from its own files
    # nothing to report any more; an existing name is refused before anything is made
    assert run_cli(*base, "restore-status", new).returncode == errors.EXIT_NOT_FOUND
    again = run_cli(*base, "restore", td.name, "--target", str(tmp_path / "again"),
                    "--define", new, "--live")
    assert again.returncode == errors.EXIT_USAGE and "already exists" in again.stderr
    assert not (tmp_path / "again" / "vda.qcow2").exists()
    assert run_cli(*base, "restore", td.name, "--target", str(tmp_path / "x"),
                   "--live").returncode == errors.EXIT_USAGE  # --live needs --define


def _live_detached(make_domain: Callable[..., rig.TestDomain], tmp_path: Path,
                   repo_path: Path, new_names: list[str], bandwidth: int
                   ) -> tuple[rig.TestDomain, list[str], dict[str, Path], str, Path,
                              dict[str, Any]]:
    """A backed-up domain restored live (detached, pulling at ``bandwidth`` bytes/s) as
    DOMAIN-live into tmp_path/live: (td, CLI base args, refs, new name, target, result)."""
    td, base, refs = _backed_up(make_domain, tmp_path, repo_path)
    new = f"{td.name}-live"
    new_names.append(new)
    target = tmp_path / "live"
    repo = Repository.open(str(repo_path))
    doc = live.live_restore(repo, str(repo_path), None, td.name, "latest", str(target), new,
                            connect=rig.URI, detach=True, bandwidth=bandwidth)
    assert doc["state"] == "copying"
    return td, base, refs, new, target, doc


def test_export_dying_mid_way_is_resumed_by_running_again(
        make_domain: Callable[..., rig.TestDomain], libvirt_conn: Any, repo_path: Path,
        tmp_path: Path, new_names: list[str]) -> None:
    # 4 MiB/s: the 64 MiB take seconds, time to kill the export mid-way
    td, base, refs, new, target, doc = _live_detached(make_domain, tmp_path, repo_path,
                                                      new_names, 4 << 20)
    assert doc["domain_state"] == "running"
    # a read the export cannot serve pauses the guest instead of failing its I/O
    drivers = ET.fromstring(libvirt_conn.lookupByName(new).XMLDesc(0)).findall(
        "./devices/disk/driver")
    assert {(d.get("error_policy"), d.get("rerror_policy")) for d in drivers} == \
        {("stop", "stop")}
    os.kill(doc["server_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while (st := live.status(new))["state"] != "stalled":
        assert st["state"] == "copying" and time.monotonic() < deadline, st
        time.sleep(0.2)
    assert "again to resume" in st["hint"] and not st["server_running"]
    assert st["reason"] == "the export's server is not running"
    # the host's QEMU dies too (or an operator destroys the domain)
    libvirt_conn.lookupByName(new).destroy()
    cp = run_cli(*base, "restore-status", new)
    st = json.loads(cp.stdout)
    assert st["state"] == "stalled" and st["reason"] == "the domain is shut off", st
    # the same command again: new server, domain started, pulls again, then independent
    cp = run_cli(*base, "restore", td.name, "latest", "--target", str(target), "--define", new,
                 "--live")
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout)
    assert res["state"] == "done" and res["domain_state"] == "running"
    _independent(libvirt_conn, new, target, refs)


def test_abort_removes_domain_server_and_overlays(
        make_domain: Callable[..., rig.TestDomain], libvirt_conn: Any, repo_path: Path,
        tmp_path: Path, new_names: list[str]) -> None:
    _td, base, _refs, new, target, doc = _live_detached(make_domain, tmp_path, repo_path,
                                                        new_names, 1 << 20)
    cp = run_cli(*base, "restore-status", new, "--abort")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["state"] == "aborted"
    assert new not in [d.name() for d in libvirt_conn.listAllDomains(0)]
    assert not serve.alive(doc["server_pid"])
    assert list(target.iterdir()) == []
    assert not os.path.exists(live.state_dir(new))
    assert run_cli(*base, "restore-status", new, "--abort").returncode == errors.EXIT_NOT_FOUND
