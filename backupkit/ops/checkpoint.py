"""checkpoint list / delete: libvirt's checkpoints and the real state of their bitmaps."""

from __future__ import annotations

from typing import Any

from backupkit import bitmaps as bm
from backupkit import qemu, virt
from backupkit.errors import Error, NotFound
from backupkit.ops.domainlock import domain_lock
from backupkit.virt import Domain
from backupkit.virt.blocks import live_chain
from backupkit.virt.checkpoints import delete_checkpoint


def _disk_chains(dom: Domain) -> dict[str, list[qemu.ImageInfo]]:
    """target -> the disk's chain with its bitmaps, active layer first.

    Running: QEMU's chain and bitmaps (``virt.blocks.live_chain``).  Shut off:
    the chain from the images (the inactive XML has no <backingStore>), each
    opened with the format its metadata records; a chain that cannot be read
    is empty (every bitmap then shows as missing).
    """
    running = dom.is_active()
    chains: dict[str, list[qemu.ImageInfo]] = {}
    for d in dom.disks():
        if not d.can_bitmap:
            continue
        try:
            chains[d.target] = ([lay.info for lay in live_chain(dom, d)] if running
                                else qemu.chain(d.path, fmt=d.format, force_share=True))
        except Error:
            if running:
                raise
            chains[d.target] = []
    return chains


def _bitmap_states(dom: Domain) -> dict[str, dict[str, dict[str, Any]]]:
    """target -> bitmap name -> {exists, recording, consistent, usable, layers}.

    ``exists``: the bitmap is in the disk's active layer, where a checkpoint's
    bitmap must be; a copy left only in a lower layer (the active one removed
    behind libvirt's back) does not count.  ``usable``: it can serve an
    incremental (present and sound from the active layer down, no hole).
    """
    states: dict[str, dict[str, dict[str, Any]]] = {}
    for target, chain in _disk_chains(dom).items():
        per: dict[str, dict[str, Any]] = {}
        usable = bm.usable_names(chain)
        for img in chain:
            for b in img.bitmaps:
                e = per.setdefault(b.name, {"layers": [], "exists": False})
                e["layers"].append(img.filename)
                if img is chain[0]:
                    e.update(exists=True, recording=b.recording, consistent=not b.in_use)
        for name, e in per.items():
            e["usable"] = name in usable
        states[target] = per
    return states


def list_checkpoints(uri: str, domain: str) -> dict[str, Any]:
    with virt.connect(uri) as conn:
        dom = conn.domain(domain)
        states = _bitmap_states(dom)
        out = []
        for cp in dom.checkpoints():
            disks: list[dict[str, Any]] = []
            for target, bitmap in cp.disks.items():
                if bitmap is None:
                    disks.append({"name": target, "bitmap": None})
                    continue
                st = states.get(target, {}).get(bitmap, {})
                disks.append({
                    "name": target, "bitmap": bitmap, "exists": bool(st.get("exists")),
                    "recording": bool(st.get("recording")),
                    "consistent": bool(st.get("consistent", False)),
                    "usable": bool(st.get("usable")),
                    "layers": st.get("layers", []),
                })
            out.append({"name": cp.name, "parent": cp.parent,
                        "creation_time": cp.creation_time, "disks": disks})
        return {"domain": domain, "running": dom.is_active(), "checkpoints": out}


def delete(uri: str, domain: str, name: str | None, *, repo_path: str | None = None,
           wait: float = 0.0) -> dict[str, Any]:
    """Delete one checkpoint (or all) with its bitmaps in every layer of the chain."""
    with virt.connect(uri) as conn, domain_lock(repo_path, domain, wait):
        dom = conn.domain(domain)
        names = [c.name for c in dom.checkpoints()]
        if name is not None:
            if name not in names:
                raise NotFound("checkpoint", f"{domain}/{name}")
            names = [name]
        running = dom.is_active()
        # Newest first: libvirt reparents children, so any order works, but
        # deleting leaves first avoids needless bitmap merges.
        for n in reversed(names):
            delete_checkpoint(dom, n, running)
        return {"domain": domain, "deleted": names}
