"""checkpoint list / delete: libvirt's checkpoints and the real state of their bitmaps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from backupkit import qemu, virt
from backupkit.errors import Error, NotFound
from backupkit.ops.backup import delete_checkpoint, host_domain_lock
from backupkit.virt import Domain


def _bitmap_states(dom: Domain) -> dict[str, dict[str, dict[str, Any]]]:
    """target -> bitmap name -> {recording, consistent, layers}."""
    running = dom.is_active()
    live = dom.block_bitmaps() if running else {}
    states: dict[str, dict[str, dict[str, Any]]] = {}
    for d in dom.disks():
        per: dict[str, dict[str, Any]] = {}
        if running:
            layers = [(d.path, live.get(d.path, []))]
            layers += [(b.path, live.get(b.path, [])) for b in d.backing]
            for path, bitmaps in layers:
                for b in bitmaps:
                    e = per.setdefault(b["name"], {"layers": []})
                    e["layers"].append(path)
                    if path == d.path:
                        e["recording"] = bool(b.get("recording"))
                        e["consistent"] = not b.get("inconsistent", False)
        elif d.can_bitmap:
            # Shut off: the chain from the images (the inactive XML has no <backingStore>).
            try:
                chain = qemu.chain(d.path, force_share=True)
            except Error:
                chain = []
            for img in chain:
                for bm in img.bitmaps:
                    e = per.setdefault(bm.name, {"layers": []})
                    e["layers"].append(img.filename)
                    if img is chain[0]:
                        e["recording"] = bm.recording
                        e["consistent"] = not bm.in_use
        states[d.target] = per
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
                st = states.get(target, {}).get(bitmap)
                disks.append({
                    "name": target, "bitmap": bitmap, "exists": st is not None,
                    "recording": bool(st and st.get("recording")),
                    "consistent": bool(st and st.get("consistent", False)),
                    "layers": st["layers"] if st else [],
                })
            out.append({"name": cp.name, "parent": cp.parent,
                        "creation_time": cp.creation_time, "disks": disks})
        return {"domain": domain, "running": dom.is_active(), "checkpoints": out}


@contextlib.contextmanager
def _maybe_lock(repo_path: str | None, domain: str, wait: float) -> Iterator[None]:
    # The host-wide lock first: a backup into any repository may be using a checkpoint.
    with host_domain_lock(domain, wait=wait):
        if repo_path is None:
            yield
            return
        from backupkit.repo import Repository

        try:
            repo = Repository.open(repo_path)
        except NotFound:
            yield
            return
        with repo.lock_domain(domain, wait=wait):
            yield


def delete(uri: str, domain: str, name: str | None, *, repo_path: str | None = None,
           wait: float = 0.0) -> dict[str, Any]:
    """Delete one checkpoint (or all) with its bitmaps in every layer of the chain."""
    with virt.connect(uri) as conn, _maybe_lock(repo_path, domain, wait):
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
