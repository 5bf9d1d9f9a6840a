"""restore --define: a new domain (new name, UUID, MACs, no checkpoints) that starts."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import rig
from tests.conftest import run_cli

pytestmark = pytest.mark.libvirt


def test_restore_define_starts(make_domain: Callable[..., rig.TestDomain], libvirt_conn: Any,
                               repo_path: Path, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 16 * rig.MiB), ("raw", 8 * rig.MiB)])
    td.write("vda", 0, rig.MiB, 0x5A)
    cfg = tmp_path / "bk.toml"
    cfg.write_text(f'repository = "{repo_path}"\nscratch_dir = "{tmp_path / "s"}"\n')
    base = ["--config", str(cfg), "--json"]
    assert run_cli(*base, "init").returncode == 0
    assert run_cli(*base, "backup", td.name).returncode == 0

    new = f"{td.name}-restored"
    target = tmp_path / "restored"
    try:
        cp = run_cli(*base, "restore", td.name, "latest", "--target", str(target),
                     "--define", new)
        assert cp.returncode == 0, cp.stderr
        assert json.loads(cp.stdout)["defined"] == new
        dom = libvirt_conn.lookupByName(new)
        root = ET.fromstring(dom.XMLDesc(0))
        orig = ET.fromstring(td.dom.XMLDesc(0))
        assert root.findtext("uuid") != orig.findtext("uuid")
        macs = {m.get("address") for m in root.findall("./devices/interface/mac")}
        assert not macs & {m.get("address") for m in orig.findall("./devices/interface/mac")}
        sources = sorted(s.get("file", "") for s in root.findall("./devices/disk/source"))
        assert sources == [str(target / "vda.qcow2"), str(target / "vdb.qcow2")]
        assert dom.listAllCheckpoints(0) == []
        rig.compare(td.disk("vda").reference, target / "vda.qcow2", "qcow2")
        dom.create()
        assert dom.isActive()

        # An existing name is refused before anything is written.
        cp = run_cli(*base, "restore", td.name, "--target", str(tmp_path / "again"),
                     "--define", new)
        assert cp.returncode == 2
        assert "already exists" in cp.stderr
        assert not (tmp_path / "again" / "vda.qcow2").exists()
    finally:
        rig.remove_domain(libvirt_conn, new)
