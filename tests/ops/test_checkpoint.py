"""checkpoint list / delete through the CLI: bitmaps leave every layer of the chain."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from backupkit import virt
from tests import rig
from tests.conftest import run_cli

pytestmark = pytest.mark.libvirt
MiB = rig.MiB


def cli(cfg: Path, *args: str) -> tuple[int, Any]:
    cp = run_cli("--config", str(cfg), "--json", *args)
    return cp.returncode, json.loads(cp.stdout)


@pytest.fixture
def cfg(repo_path: Path, tmp_path: Path) -> Path:
    p = tmp_path / "bk.toml"
    p.write_text(f'repository = "{repo_path}"\nscratch_dir = "{tmp_path / "s"}"\n')
    assert run_cli("--config", str(p), "init").returncode == 0
    return p


def test_shut_off_delete_removes_bitmap_from_every_layer(
        make_domain: Callable[..., rig.TestDomain], cfg: Path, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 16 * MiB)], running=False)
    rc, res = cli(cfg, "backup", td.name)
    assert rc == 0, res
    cp_name = res["checkpoint"]
    # Put an overlay on top that carries the bitmap too (as an external snapshot does).
    base = td.disk("vda").path
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(top), cp_name], check=True)
    xml = td.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace(str(base), str(top))
    td.conn.defineXML(xml)

    rc, listing = cli(cfg, "checkpoint", "list", td.name)
    assert rc == 0, listing
    (cp,) = listing["checkpoints"]
    (disk,) = cp["disks"]
    assert disk["exists"] and disk["recording"] and disk["consistent"]
    assert disk["layers"] == [str(top), str(base)]

    assert cli(cfg, "checkpoint", "delete", td.name, "nope")[0] == 4
    rc, res = cli(cfg, "checkpoint", "delete", td.name, "--all")
    assert rc == 0, res
    assert res["deleted"] == [cp_name]
    assert rig.bitmaps(top) == {} and rig.bitmaps(base) == {}
    assert td.dom.listAllCheckpoints(0) == []
    # Idempotent: nothing left to delete.
    rc, res = cli(cfg, "checkpoint", "delete", td.name, "--all")
    assert (rc, res["deleted"]) == (0, [])


def test_running_delete_removes_bitmap_from_every_layer(
        make_domain: Callable[..., rig.TestDomain], cfg: Path, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 16 * MiB)])
    rc, res = cli(cfg, "backup", td.name)
    assert rc == 0, res
    cp_name = res["checkpoint"]
    overlay = tmp_path / "overlay.qcow2"
    td.dom.snapshotCreateXML(
        f"<domainsnapshot><disks><disk name='vda' snapshot='external'>"
        f"<source file='{overlay}'/></disk></disks></domainsnapshot>",
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
    dom = virt.connect(rig.URI).domain(td.name)

    def layers_with_bitmap() -> list[str]:
        return sorted(path for path, bms in dom.block_bitmaps().items()
                      if any(b["name"] == cp_name for b in bms))

    assert layers_with_bitmap() == sorted([str(overlay), str(td.disk("vda").path)])
    rc, listing = cli(cfg, "checkpoint", "list", td.name)
    assert rc == 0 and listing["running"] is True
    assert listing["checkpoints"][0]["disks"][0]["recording"] is True

    rc, res = cli(cfg, "checkpoint", "delete", td.name, cp_name)
    assert rc == 0, res
    assert layers_with_bitmap() == []
    assert dom.checkpoints() == []
