"""Pure XML building and parsing (no libvirt)."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from backupkit.virt import xml as vx

DOMAIN = """<domain type='kvm' id='3'><name>vm1</name><uuid>0b1c</uuid>
<devices>
 <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='/i/top.qcow2'/>
  <backingStore type='file'><format type='qcow2'/><source file='/i/base.qcow2'/>
   <backingStore/></backingStore>
  <target dev='vda' bus='virtio'/><serial>data</serial></disk>
 <disk type='block' device='disk'><driver name='qemu' type='raw'/>
  <source dev='/dev/vg/lv'/><target dev='vdb' bus='virtio'/></disk>
 <disk type='file' device='cdrom'><source file='/i/x.iso'/><target dev='sda'/></disk>
 <interface type='network'><mac address='52:54:00:00:00:01'/></interface>
</devices></domain>"""


def test_parse_disks_with_chain() -> None:
    disks = vx.parse_disks(DOMAIN)
    assert [d.target for d in disks] == ["vda", "vdb"]
    vda, vdb = disks
    assert vda.backing == (vx.Layer("/i/base.qcow2", "qcow2"),)
    assert vda.serial == "data" and vda.can_bitmap
    assert (vdb.type, vdb.path, vdb.can_bitmap) == ("block", "/dev/vg/lv", False)


def test_checkpoint_and_backup_xml_round_trip() -> None:
    disks = vx.parse_disks(DOMAIN)
    cp = vx.parse_checkpoint(vx.checkpoint_xml("backupkit.1", disks, creation_time=5))
    assert cp.disks == {"vda": "backupkit.1", "vdb": None}
    assert cp.creation_time == 5
    again = vx.parse_checkpoint(vx.redefine_xml(cp))
    assert again == cp
    b = ET.fromstring(vx.backup_xml("/s.sock", disks, {"vda": "/a", "vdb": "/b"},
                                    {"vda": "backupkit.1", "vdb": None}))
    modes = {d.get("name"): (d.get("backupmode"), d.get("incremental"))
             for d in b.findall("./disks/disk")}
    assert modes == {"vda": ("incremental", "backupkit.1"), "vdb": ("full", None)}
    assert b.find("server").get("socket") == "/s.sock"  # type: ignore[union-attr]


def test_names_are_escaped() -> None:
    cp = vx.checkpoint_xml("a<b&'c", [], description="x&y")
    assert vx.parse_checkpoint(cp).name == "a<b&'c"


def test_restored_domain_xml() -> None:
    out = ET.fromstring(vx.restored_domain_xml(DOMAIN, "vm1-restored",
                                               {"vda": ("/r/vda.qcow2", "qcow2")}))
    assert out.findtext("name") == "vm1-restored"
    assert out.findtext("uuid") != "0b1c" and out.get("id") is None
    disks = out.findall("./devices/disk")
    assert len(disks) == 2  # vdb dropped (not restored), cdrom kept
    vda = disks[0]
    assert vda.find("source").get("file") == "/r/vda.qcow2"  # type: ignore[union-attr]
    assert vda.find("backingStore") is None
    assert out.find("./devices/interface/mac") is None


@pytest.mark.parametrize("value", ["vda", "a\"b", "a'b", "a\"b'c", "<&>\n\t\r", "", "/var/tmp/x y"])
def test_quoteattr_matches_saxutils(value: str) -> None:
    from xml.sax.saxutils import quoteattr as reference

    assert vx.quoteattr(value) == reference(value)


def test_cli_start_does_not_import_urllib_request() -> None:
    """xml.sax.saxutils pulled in urllib.request, http.client and ssl: 45-65 ms per command."""
    code = ("import sys, backupkit.cli, backupkit.ops.backup, backupkit.ops.restore; "
            "print(sorted(m for m in ('urllib.request', 'http.client', 'ssl') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
