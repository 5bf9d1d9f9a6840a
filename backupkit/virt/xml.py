"""Pure functions that parse and build libvirt XML (no libvirt calls here)."""

from __future__ import annotations

import uuid as _uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field


def quoteattr(value: str) -> str:
    """An XML attribute value with its quotes, as xml.sax.saxutils.quoteattr writes it.

    Not imported from there: xml.sax.saxutils pulls in urllib.request, http.client and
    ssl, 45-65 ms of every command's start (python -X importtime).
    """
    value = (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
             .replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;"))
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    return '"{}"'.format(value.replace('"', "&quot;"))


@dataclass(frozen=True)
class Layer:
    path: str
    format: str


@dataclass(frozen=True)
class Disk:
    """A guest disk as the domain XML describes it."""

    target: str  # "vda": the name libvirt uses for checkpoints and NBD exports
    path: str  # source file or block device of the active layer
    format: str  # driver type: qcow2, raw, ...
    type: str  # file | block
    serial: str | None = None
    backing: tuple[Layer, ...] = field(default_factory=tuple)  # below the active layer

    @property
    def can_bitmap(self) -> bool:
        return self.format == "qcow2"


def parse_disks(domain_xml: str) -> list[Disk]:
    """The domain's backup-able disks: device='disk', with a file or block source."""
    root = ET.fromstring(domain_xml)
    disks = []
    for d in root.findall("./devices/disk"):
        if d.get("device", "disk") != "disk":
            continue
        if d.find("readonly") is not None or d.find("shareable") is not None:
            continue
        kind = d.get("type", "file")
        src = d.find("source")
        tgt = d.find("target")
        drv = d.find("driver")
        if src is None or tgt is None or kind not in ("file", "block"):
            continue
        path = src.get("file") if kind == "file" else src.get("dev")
        if not path:
            continue
        serial = d.findtext("serial")
        disks.append(Disk(
            target=tgt.get("dev", ""),
            path=path,
            format=drv.get("type", "raw") if drv is not None else "raw",
            type=kind,
            serial=serial,
            backing=tuple(_parse_backing(d)),
        ))
    return disks


def _parse_backing(disk: ET.Element) -> list[Layer]:
    layers = []
    node = disk.find("backingStore")
    while node is not None and node.get("type") is not None:
        src = node.find("source")
        fmt = node.find("format")
        path = None
        if src is not None:
            path = src.get("file") or src.get("dev")
        if path:
            layers.append(Layer(path, fmt.get("type", "raw") if fmt is not None else "raw"))
        node = node.find("backingStore")
    return layers


def domain_name(domain_xml: str) -> str:
    return ET.fromstring(domain_xml).findtext("name") or ""


def checkpoint_xml(name: str, disks: list[Disk], *, description: str = "",
                   creation_time: int | None = None) -> str:
    """A checkpoint with one bitmap (named like the checkpoint) per bitmap-capable disk."""
    parts = [f"<domaincheckpoint><name>{_text(name)}</name>"]
    if description:
        parts.append(f"<description>{_text(description)}</description>")
    if creation_time is not None:
        parts.append(f"<creationTime>{int(creation_time)}</creationTime>")
    parts.append(_checkpoint_disks({d.target: name if d.can_bitmap else None for d in disks}))
    parts.append("</domaincheckpoint>")
    return "".join(parts)


def _checkpoint_disks(disks: dict[str, str | None]) -> str:
    """<disks> of a checkpoint: target -> bitmap name, or None for checkpoint='no'."""
    parts = ["<disks>"]
    for target, bitmap in disks.items():
        if bitmap:
            parts.append(f"<disk name={quoteattr(target)} checkpoint='bitmap' "
                         f"bitmap={quoteattr(bitmap)}/>")
        else:
            parts.append(f"<disk name={quoteattr(target)} checkpoint='no'/>")
    parts.append("</disks>")
    return "".join(parts)


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    parent: str | None
    creation_time: int
    disks: dict[str, str | None]  # target -> bitmap name (None: checkpoint='no')


def parse_checkpoint(xml: str) -> CheckpointInfo:
    root = ET.fromstring(xml)
    disks: dict[str, str | None] = {}
    for d in root.findall("./disks/disk"):
        if d.get("checkpoint") == "bitmap":
            disks[d.get("name", "")] = d.get("bitmap") or root.findtext("name")
        else:
            disks[d.get("name", "")] = None
    return CheckpointInfo(
        name=root.findtext("name") or "",
        parent=root.findtext("./parent/name"),
        creation_time=int(root.findtext("creationTime") or 0),
        disks=disks,
    )


def redefine_xml(info: CheckpointInfo) -> str:
    """Minimal checkpoint XML for VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE."""
    parts = [f"<domaincheckpoint><name>{_text(info.name)}</name>"]
    if info.parent:
        parts.append(f"<parent><name>{_text(info.parent)}</name></parent>")
    parts.append(f"<creationTime>{info.creation_time}</creationTime>")
    parts.append(_checkpoint_disks(info.disks))
    parts.append("</domaincheckpoint>")
    return "".join(parts)


def backup_xml(socket: str, disks: list[Disk], scratch: dict[str, str],
               incremental: dict[str, str | None] | None = None) -> str:
    """Pull-mode backup over a unix socket.

    ``incremental`` maps a disk target to the checkpoint to back up from, or None
    for a full backup of that disk (per-disk backupmode).
    """
    parts = ["<domainbackup mode='pull'>",
             f"<server transport='unix' socket={quoteattr(socket)}/><disks>"]
    for d in disks:
        attrs = f"name={quoteattr(d.target)} backup='yes' type='file'"
        if incremental is not None:
            since = incremental.get(d.target)
            if since:
                attrs += f" backupmode='incremental' incremental={quoteattr(since)}"
            else:
                attrs += " backupmode='full'"
        parts.append(f"<disk {attrs}><scratch file={quoteattr(scratch[d.target])}/></disk>")
    parts.append("</disks></domainbackup>")
    return "".join(parts)


def restored_domain_xml(domain_xml: str, new_name: str, disk_paths: dict[str, tuple[str, str]]
                        ) -> str:
    """A copy of domain_xml for a restored domain.

    New name and UUID, new MAC addresses, disks pointing at the restored files
    (``disk_paths``: target -> (path, format)) with no backing chain; disks that
    were not restored are dropped.
    """
    root = ET.fromstring(domain_xml)
    root.attrib.pop("id", None)
    _set_text(root, "name", new_name)
    _set_text(root, "uuid", str(_uuid.uuid4()))
    devices = root.find("devices")
    if devices is not None:
        for d in list(devices.findall("disk")):
            tgt = d.find("target")
            if d.get("device", "disk") != "disk" or tgt is None:
                continue
            dev = tgt.get("dev", "")
            if dev not in disk_paths:
                devices.remove(d)
                continue
            path, fmt = disk_paths[dev]
            d.set("type", "file")
            for child in list(d):
                if child.tag in ("source", "backingStore", "driver"):
                    d.remove(child)
            drv = ET.Element("driver", {"name": "qemu", "type": fmt})
            src = ET.Element("source", {"file": path})
            d.insert(0, src)
            d.insert(0, drv)
        for iface in devices.findall("interface"):
            mac = iface.find("mac")
            if mac is not None:
                iface.remove(mac)
    return ET.tostring(root, encoding="unicode")


def _set_text(root: ET.Element, tag: str, value: str) -> None:
    el = root.find(tag)
    if el is None:
        el = ET.SubElement(root, tag)
    el.text = value


def _text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
