"""hygiene check DOMAIN compares the real chain with libvirt's domain XML (vdsm's reconcile)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.libvirt


def _domain_xml(name: str, top: Path, declared_base: Path) -> str:
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{top}'/><backingStore type='file'><format type='qcow2'/>"
        f"<source file='{declared_base}'/><backingStore/></backingStore>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>")


@pytest.mark.parametrize("drift", [True, False])
def test_chain_drift_is_reported(libvirt_conn: Any, tmp_path: Path, drift: bool) -> None:
    base, other, top = tmp_path / "base.qcow2", tmp_path / "other.qcow2", tmp_path / "top.qcow2"
    for img in (base, other):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    name = f"bk-drift-{uuid.uuid4().hex[:8]}"
    # libvirt's metadata names `other` as the backing file; the image really uses `base`.
    libvirt_conn.defineXML(_domain_xml(name, top, other if drift else base))
    try:
        cp = run_cli("--json", "hygiene", "check", name)
        doc = json.loads(cp.stdout)
        if drift:
            assert cp.returncode == 5, cp.stderr
            (problem,) = doc["error"]["report"]["problems"]
            assert problem["kind"] == "chain_drift"
            assert problem["chain"] == [str(top), str(base)]
            assert problem["metadata_chain"] == [str(top), str(other)]
        else:
            assert cp.returncode == 0, cp.stderr
            assert doc["problems"] == []
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            libvirt_conn.lookupByName(name).undefine()
