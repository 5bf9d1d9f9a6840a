"""libvirt side of a live restore: a domain on overlays over an NBD export, block pull.

The overlays are qcow2 files whose backing is the export (``nbd+unix``); the
domain XML names that backing explicitly (``<backingStore type='network'>``) so
libvirt does not probe it, and sets ``error_policy='stop'`` /
``rerror_policy='stop'`` on those disks: if the export goes away, a guest read
that needs it pauses the domain (libvirt state paused, reason I/O error)
instead of handing the guest an error.  ``blockPull`` (QEMU's block-stream) then
copies what the guest has not written into each overlay and drops the backing;
it runs inside QEMU, independent of the backupkit process.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from typing import Any

import libvirt

from backupkit.errors import NotFound
from backupkit.virt import _call, connect
from backupkit.virt.xml import restored_domain_xml

log = logging.getLogger("backupkit.virt")


def live_domain_xml(domain_xml: str, new_name: str,
                    disks: dict[str, tuple[str, str, str]], *, networks: bool = True,
                    console: str | None = None) -> str:
    """The restored domain's XML on overlays: ``disks``: target -> (overlay, socket, export).

    New name, UUID and MACs as for a plain restore; each overlay gets the NBD
    export as its explicit raw backing and the stop error policies.  Without
    networks every network interface is removed (a drill's throwaway copy).
    """
    xml = restored_domain_xml(domain_xml, new_name,
                              {t: (ov, "qcow2") for t, (ov, _s, _e) in disks.items()})
    root = ET.fromstring(xml)
    devices = root.find("devices")
    assert devices is not None  # restored_domain_xml kept the disks it was given
    for d in devices.findall("disk"):
        tgt = d.find("target")
        if tgt is None or tgt.get("dev", "") not in disks:
            continue
        _ov, sock, export = disks[tgt.get("dev", "")]
        drv = d.find("driver")
        if drv is not None:
            drv.set("error_policy", "stop")
            drv.set("rerror_policy", "stop")
        bs = ET.Element("backingStore", {"type": "network"})
        ET.SubElement(bs, "format", {"type": "raw"})
        src = ET.SubElement(bs, "source", {"protocol": "nbd", "name": export})
        ET.SubElement(src, "host", {"transport": "unix", "socket": sock})
        ET.SubElement(bs, "backingStore")
        src_el = d.find("source")
        idx = list(d).index(src_el) + 1 if src_el is not None else len(d)
        d.insert(idx, bs)
    if not networks:
        for iface in devices.findall("interface"):
            devices.remove(iface)
    if console is not None:
        for dev in (*devices.findall("serial"), *devices.findall("console")):
            log_src = dev.find("source")
            if dev.get("type") == "file" and log_src is not None and log_src.get("path"):
                log_src.set("path", console)
    return ET.tostring(root, encoding="unicode")


def without_backing(domain_xml: str, targets: set[str]) -> str:
    """domain_xml with the network backing and the stop policies of targets removed."""
    root = ET.fromstring(domain_xml)
    devices = root.find("devices")
    for d in (devices.findall("disk") if devices is not None else []):
        tgt = d.find("target")
        if tgt is None or tgt.get("dev", "") not in targets:
            continue
        for bs in d.findall("backingStore"):
            d.remove(bs)
        drv = d.find("driver")
        if drv is not None:
            drv.attrib.pop("error_policy", None)
            drv.attrib.pop("rerror_policy", None)
    return ET.tostring(root, encoding="unicode")


def nbd_backed(domain_xml: str) -> set[str]:
    """Targets of disks whose backing chain still reaches an NBD export."""
    root = ET.fromstring(domain_xml)
    out = set()
    for d in root.iterfind("./devices/disk"):
        tgt = d.find("target")
        for bs in d.iter("backingStore"):
            src = bs.find("source")
            if src is not None and src.get("protocol") == "nbd" and tgt is not None:
                out.add(tgt.get("dev", ""))
    return out


class LiveDomain:
    """A domain being restored live (by name); one libvirt connection per call."""

    def __init__(self, uri: str, name: str) -> None:
        self.uri = uri
        self.name = name

    def define_and_start(self, xml: str) -> None:
        with connect(self.uri) as conn:
            dom = conn.define(xml)
            _call("start domain", dom.raw.create, name=self.name)

    def exists(self) -> bool:
        with connect(self.uri) as conn:
            return self.name in conn.domain_names()

    def state(self) -> tuple[str, str]:
        """("running"|"paused"|"shut off"|..., reason) of the domain."""
        with connect(self.uri) as conn:
            st, reason = _call("domain state", conn.domain(self.name).raw.state, 0,
                               name=self.name)
        names = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
                 libvirt.VIR_DOMAIN_SHUTOFF: "shut off", libvirt.VIR_DOMAIN_CRASHED: "crashed"}
        why = "I/O error" if (st == libvirt.VIR_DOMAIN_PAUSED
                              and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR) else str(reason)
        return names.get(st, str(st)), why

    def resume(self) -> None:
        with connect(self.uri) as conn:
            _call("resume domain", conn.domain(self.name).raw.resume, name=self.name)

    def xml(self, inactive: bool = False) -> str:
        with connect(self.uri) as conn:
            return conn.domain(self.name).xml(inactive)

    def block_pull(self, target: str, bandwidth: int = 0) -> None:
        """Start pulling the backing into target's overlay (bandwidth: bytes/s, 0: unlimited)."""
        flags = libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES if bandwidth else 0
        with connect(self.uri) as conn:
            _call(f"blockPull {target}", conn.domain(self.name).raw.blockPull, target,
                  bandwidth, flags, name=self.name)

    def start(self) -> None:
        with connect(self.uri) as conn:
            _call("start domain", conn.domain(self.name).raw.create, name=self.name)

    def jobs(self, targets: list[str]) -> dict[str, tuple[int, int] | None]:
        """Per target, (cur, end) of its running block job, or None when it has none
        (all None when the domain is not running)."""
        out: dict[str, tuple[int, int] | None] = {}
        with connect(self.uri) as conn:
            dom = conn.domain(self.name).raw
            if not dom.isActive():
                return dict.fromkeys(targets)
            for t in targets:
                info: dict[str, Any] = _call(f"blockJobInfo {t}", dom.blockJobInfo, t, 0,
                                             name=self.name) or {}
                out[t] = (int(info.get("cur", 0)), int(info.get("end", 0))) if info else None
        return out

    def agent(self, execute: str, arguments: dict[str, Any] | None = None,
              timeout: int = 5) -> Any:
        """One guest-agent command; its "return" value (LibvirtError if the agent fails)."""
        import json

        import libvirt_qemu

        cmd: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            cmd["arguments"] = arguments
        with connect(self.uri) as conn:
            dom = conn.domain(self.name).raw
            out = _call(f"guest agent {execute}", libvirt_qemu.qemuAgentCommand, dom,
                        json.dumps(cmd), timeout, 0, name=self.name)
        return json.loads(out).get("return")

    def redefine(self, xml: str) -> None:
        with connect(self.uri) as conn:
            conn.define(xml)

    def destroy_and_undefine(self) -> None:
        """Remove the domain (a failed or aborted live restore, a finished drill)."""
        with connect(self.uri) as conn:
            try:
                dom = conn.domain(self.name).raw
            except NotFound:
                return
            if dom.isActive():
                _call("destroy domain", dom.destroy, name=self.name)
            _call("undefine domain", dom.undefineFlags,
                  libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                  | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                  | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM, name=self.name)
