"""A running disk's real chain as QEMU holds it: block nodes, their persistent bitmaps.

The one reader of a running disk's bitmaps as image infos (the same
``qemu.ImageInfo`` qemu-img gives for a shut-off disk), so that the pure
planning in ``backupkit.bitmaps`` serves both.  QEMU's view of the chain
(query-named-block-nodes) is the truth; libvirt's domain XML may differ (drift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backupkit import qemu
from backupkit.errors import NotFound, OperationFailed
from backupkit.fileio import same_image
from backupkit.virt import Domain
from backupkit.virt.xml import Disk

FORMAT_DRIVERS = ("qcow2", "raw", "qed", "vmdk", "vpc", "vdi", "luks")


@dataclass(frozen=True)
class LiveLayer:
    """One layer of a running disk's chain as QEMU holds it."""

    node: str  # format node name
    file_node: str  # protocol node name ("" if unknown)
    info: qemu.ImageInfo  # filename, virtual size, persistent bitmaps (inconsistent = in_use)
    read_only: bool
    cluster_size: int
    counts: dict[str, int]  # bitmap name -> dirty bytes


def disk(dom: Domain, target: str) -> Disk:
    """The domain's disk ``target`` (NotFound naming the disks it has)."""
    disks = dom.disks()
    for d in disks:
        if d.target == target:
            return d
    raise NotFound("disk", f"{dom.name}/{target}",
                   f"domain has {', '.join(d.target for d in disks) or 'no disks'}")


def live_chain(dom: Domain, disk: Disk) -> list[LiveLayer]:
    """The real chain of a running disk from QEMU's block nodes, active layer first."""
    nodes = dom.block_nodes()
    fmt_nodes = [n for n in nodes if n.get("drv") in FORMAT_DRIVERS]

    def find(path: str) -> dict[str, Any] | None:
        for n in fmt_nodes:
            if n.get("file") == path:
                return dict(n)
        for n in fmt_nodes:
            if same_image(n.get("file", ""), path):
                return dict(n)
        return None

    node = find(disk.path)
    if node is None:
        raise OperationFailed(f"QEMU has no block node for {disk.path}",
                              domain=dom.name, disk=disk.target)
    layers: list[LiveLayer] = []
    seen: set[str] = set()
    while node is not None and node["node-name"] not in seen:
        seen.add(node["node-name"])
        image = node.get("image", {})
        bitmaps = tuple(
            qemu.Bitmap(b["name"], int(b.get("granularity", 65536)),
                        bool(b.get("recording", False)), bool(b.get("inconsistent", False)))
            for b in node.get("dirty-bitmaps", []) if b.get("persistent", True))
        counts = {b["name"]: int(b.get("count", 0)) for b in node.get("dirty-bitmaps", [])}
        fs = image.get("format-specific") or {}
        compat = fs.get("data", {}).get("compat") if fs.get("type") == "qcow2" else None
        info = qemu.ImageInfo(filename=node.get("file", ""), format=node.get("drv", ""),
                              virtual_size=int(image.get("virtual-size", 0)), actual_size=0,
                              backing_filename=image.get("full-backing-filename")
                              or node.get("backing_file"), bitmaps=bitmaps, compat=compat,
                              cluster_size=int(image.get("cluster-size", 65536)))
        file_node = ""
        for n in nodes:  # the protocol node under this format node: same file, file driver
            if n.get("drv") in ("file", "host_device") and n.get("file") == info.filename:
                file_node = n.get("node-name", "")
        layers.append(LiveLayer(node["node-name"], file_node, info, bool(node.get("ro")),
                                int(image.get("cluster-size", 65536)), counts))
        backing = info.backing_filename
        node = find(backing) if backing else None
    return layers
