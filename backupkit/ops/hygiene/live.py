"""The live path of ``backupkit hygiene``: a running domain's chain, through libvirt.

``pre-merge``/``post-merge`` with ``--domain``/``--disk``; the space check of a
layer QEMU holds open; :func:`remove_live`, which the domain check uses too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from backupkit import bitmaps as bm
from backupkit import faults, virt
from backupkit.errors import BitmapLost, Error, OperationFailed, UsageError
from backupkit.ops.hygiene.cold import free_space
from backupkit.ops.hygiene.report import layers_json, report
from backupkit.virt import Domain
from backupkit.virt.blocks import LiveLayer, live_chain
from backupkit.virt.blocks import disk as find_disk
from backupkit.virt.checkpoints import delete_checkpoint
from backupkit.virt.xml import CheckpointInfo, Disk

log = logging.getLogger("backupkit.hygiene")

# ===========================================================================
# Live path (--domain): a running domain's chain, through libvirt.
#
# Nothing here runs qemu-img on an image QEMU has open read-write (only
# ``qemu-img check -U`` to read where the image ends).  QEMU's own view of the
# chain (query-named-block-nodes) is the truth; libvirt's domain XML is
# compared with it.  Bitmaps are changed only through libvirt:
#
# * "checkpoint-redefine-delete": a bitmap no checkpoint owns is removed by
#   redefining a minimal checkpoint of that name (REDEFINE, with a creation
#   time) and deleting it.  libvirt then removes the bitmap from every layer
#   of the disk's chain, reopening read-only layers read-write as needed
#   (HOST-FACTS: verified; other bitmaps untouched).
# * "checkpoint-delete": the bitmap belongs to a checkpoint of this disk but
#   cannot be used (missing from the active layer, inconsistent, or broken
#   in a layer between): the checkpoint cannot serve an incremental any
#   more, so it is deleted with every copy of its bitmap.
# * "qmp-block-dirty-bitmap-remove": a bitmap whose name libvirt's checkpoint
#   API does not reach (the name is taken by a checkpoint that does not own
#   this disk's bitmap, so it can be neither redefined nor deleted through
#   it) is removed with QMP through libvirt.  QEMU refuses that on a
#   read-only node ("Bitmap ... is readonly"), i.e. on every layer below the
#   active one, so it is used only on writable nodes; anywhere else the
#   bitmap is reported as unresolved (exit 5).  The same method removes the
#   last copy of a bitmap whose checkpoint was already deleted.
# ===========================================================================

M_REDEFINE = "checkpoint-redefine-delete"
M_CHECKPOINT = "checkpoint-delete"
M_QMP = "qmp-block-dirty-bitmap-remove"


def _slice(layers: list[LiveLayer], top: str, base: str) -> list[LiveLayer]:
    names = ", ".join(lay.info.filename for lay in layers)
    start = next((i for i, lay in enumerate(layers) if bm.same_image(lay.info.filename, top)),
                 None)
    if start is None:
        raise UsageError(f"{top} is not in the disk's chain ({names})", top=top, base=base)
    for j in range(start + 1, len(layers)):
        if bm.same_image(layers[j].info.filename, base):
            return layers[start:j + 1]
    raise UsageError(f"{base} is not below {top} in the disk's chain ({names})",
                     top=top, base=base)


def _owner(checkpoints: Sequence[CheckpointInfo], target: str, bitmap: str
           ) -> CheckpointInfo | None:
    """The checkpoint whose bitmap on disk ``target`` is ``bitmap``."""
    for cp in checkpoints:
        if cp.disks.get(target) == bitmap:
            return cp
    return None



def remove_live(dom: Domain, disk: Disk, layer: LiveLayer, name: str,
                 checkpoints: Sequence[CheckpointInfo], dry_run: bool) -> tuple[str, str]:
    """Remove bitmap ``name`` from ``layer``; returns (method, why that method)."""
    owner = _owner(checkpoints, disk.target, name)
    taken = any(cp.name == name for cp in checkpoints)
    if owner is not None:
        method, why = (M_CHECKPOINT,
                       f"checkpoint {owner.name} owns this bitmap but it cannot serve an "
                       "incremental; deleting the checkpoint through libvirt removes every "
                       "copy (libvirt reopens read-only layers)")
        if not dry_run:
            delete_checkpoint(dom, owner.name, running=True, broken=True)
    elif not taken:
        method, why = (M_REDEFINE,
                       "no checkpoint owns it: libvirt reaches it through a redefined "
                       "checkpoint of that name, deleted at once")
        if not dry_run:
            dom.remove_orphan_bitmap(name, [disk.target])
    else:
        method, why = (M_QMP,
                       "the name is taken by a checkpoint that does not own this disk's "
                       "bitmap: libvirt's checkpoint API cannot reach it")
        if layer.read_only:
            raise OperationFailed(
                f"bitmap {name} in read-only layer {layer.info.filename}: {why}, and QEMU "
                "refuses block-dirty-bitmap-remove on a read-only node", method=M_QMP)
        if not dry_run:
            dom.remove_bitmap_qmp(layer.node, name)
    log.info("%s/%s: remove bitmap %s from %s via %s (%s)", dom.name, disk.target, name,
             layer.info.filename, method, why)
    return method, why



def _running_disk(conn: virt.Connection, domain: str, disk_name: str, step: str
                  ) -> tuple[Domain, Disk]:
    """The live forms need a running domain; a shut-off one takes the cold path."""
    dom = conn.domain(domain)
    if not dom.is_active():
        raise UsageError(f"domain {domain} is not running: use {step} without --domain",
                         domain=domain)
    return dom, find_disk(dom, disk_name)


def pre_merge(top: str, base: str, domain: str, disk_name: str, connect: str,
                    dry_run: bool) -> dict[str, Any]:
    with virt.connect(connect) as conn:
        dom, disk = _running_disk(conn, domain, disk_name, "pre-merge")
        layers = _slice(live_chain(dom, disk), top, base)
        actions, lost = bm.plan_pre_merge([lay.info for lay in layers])
        checkpoints = dom.checkpoints()
        before = {lay.info.filename: {b.name for b in lay.info.bitmaps} for lay in layers}
        removed: list[dict[str, Any]] = []
        unresolved: list[dict[str, Any]] = []
        everywhere: set[str] = set()  # names libvirt removed from every layer
        for i, a in enumerate(actions, start=1):
            if a.name in everywhere:
                continue
            layer = next(lay for lay in layers if lay.info.filename == a.image)
            if not dry_run:
                faults.point(f"hygiene_step_{i}")
                # A checkpoint deletion or redefine+delete removes every copy: a later
                # action on the same name may find it gone already.
                now = _slice(live_chain(dom, disk), top, base)
                layer = next((lay for lay in now if lay.info.filename == a.image), layer)
                if layer.info.bitmap(a.name) is None:
                    continue
            try:
                method, why = remove_live(dom, disk, layer, a.name, checkpoints, dry_run)
            except Error as e:
                unresolved.append(dict(a.to_json(), error=str(e)))
                continue
            if method != M_QMP:
                everywhere.add(a.name)
            removed.append(dict(a.to_json(), method=method, why=why))
            checkpoints = dom.checkpoints() if not dry_run else checkpoints
        after_layers = layers if dry_run else _slice(live_chain(dom, disk), top, base)
        lost_doc = []
        for p in lost:
            entry = p.to_json()
            owner = _owner(dom.checkpoints() if dry_run else checkpoints, disk.target, p.name)
            deleted = [r for r in removed if r["name"] == p.name and r["method"] == M_CHECKPOINT]
            if deleted:
                entry["checkpoint_deleted"] = True
            elif owner is not None:
                entry["checkpoint"] = owner.name
            lost_doc.append(entry)
        result = report(domain=domain, disk=disk_name, top=top, base=base, image=base,
                        dry_run=dry_run, removed=removed, lost=lost_doc,
                        bitmaps_after=layers_json(after_layers))
        if not dry_run:
            # Re-read: every removed name gone, everything else still there and sound.
            damage = list(unresolved)
            gone_everywhere = everywhere
            gone_here = {(r["image"], r["name"]) for r in removed}
            for lay in after_layers:
                f = lay.info.filename
                for name in sorted(before.get(f, set())):
                    got = lay.info.bitmap(name)
                    if got is not None and (name in gone_everywhere or (f, name) in gone_here):
                        damage.append({"image": f, "name": name, "kind": "not_removed",
                                       "detail": "still there after its removal"})
                    if got is None and name not in gone_everywhere and (f, name) not in \
                            gone_here and name not in {u["name"] for u in unresolved}:
                        damage.append({"image": f, "name": name, "kind": "missing",
                                       "detail": "bitmap went missing"})
                for b in lay.info.bitmaps:
                    if b.in_use:
                        damage.append({"image": f, "name": b.name, "kind": bm.IN_USE,
                                       "detail": "inconsistent"})
            if damage:
                result["damage"] = damage
                raise BitmapLost(f"{domain}/{disk_name}: pre-merge left bitmap problems: "
                                 + ", ".join(sorted({d['name'] for d in damage})),
                                 report=result)
        if lost:
            raise BitmapLost(
                f"{domain}/{disk_name}: pre-merge: {len(lost)} bitmap(s) "
                + ("will be " if dry_run or not layers[-1].info.stores_bitmaps else "")
                + "lost: " + "; ".join(f"{p.name} ({p.detail})" for p in lost)
                + "; the next backup of this disk will be full", report=result)
        return result


def space_check(dom: Domain, layer: LiveLayer) -> dict[str, Any]:
    """Can ``layer`` store its persistent bitmaps when QEMU closes it?

    Free: ``free_space`` (for a block device with QEMU's highest write on the
    protocol node as a floor of the image's end).  Needed: what QEMU writes
    for the bitmaps it will store (``bitmaps.store_need``, from QEMU's dirty
    counts).  No cluster free inside the image is counted: while QEMU runs,
    the refcounts on disk lag behind its cache (measured: after a commit of
    121 MiB they showed 31 free clusters the commit's data had taken, and
    counting them kept a checkpoint whose bitmap the shutdown lost).
    ``predicted`` is the measured model; ``needed_min`` the least QEMU can
    need (dirty bits packed; on a file only the pages it writes).  ``fits``
    compares the free space with ``needed_min``: a checkpoint is deleted only
    when QEMU certainly cannot store its bitmap; below ``predicted`` it is
    kept with a ``warning``.
    """
    path = layer.info.filename
    bitmaps: list[tuple[str, int, int | None]] = [
        (b.name, b.granularity, layer.counts.get(b.name, 0))
        for b in layer.info.bitmaps if not b.in_use]
    written = (dom.node_write_offsets().get(layer.file_node, 0) if layer.file_node else 0)
    doc: dict[str, Any] = {"image": path, "bitmaps": len(bitmaps)}
    doc.update(free_space(path, layer.info.format, layer.cluster_size, force_share=True,
                          written_end=written))
    is_file = doc["kind"] == "file"
    vs, cs = layer.info.virtual_size, layer.cluster_size
    predicted = bm.store_need(vs, cs, bitmaps, free_inside=0, is_file=is_file)
    low = bm.store_need(vs, cs, bitmaps, free_inside=0, is_file=is_file, low=True)
    doc.update(predicted=predicted, needed=predicted, needed_min=low, fits=doc["free"] >= low)
    if doc["fits"] and doc["free"] < predicted:
        doc["warning"] = (f"{path} has {doc['free']} bytes free; storing its bitmaps at close "
                          f"needs {low} to about {predicted}: they may be lost at the next "
                          "shutdown, restart or migration; free space there")
    return doc


def _bitmap_state(layers: Sequence[LiveLayer], name: str) -> str | None:
    """None when bitmap ``name`` is usable from the active layer, else why not."""
    active = layers[0].info
    b = active.bitmap(name)
    if b is None:
        return f"bitmap {name} missing from the active layer {active.filename}"
    if b.in_use:
        return f"bitmap {name} is inconsistent in {active.filename}"
    if not b.recording:
        return f"bitmap {name} is not recording in {active.filename}"
    if name not in bm.usable_names([lay.info for lay in layers]):
        return f"bitmap {name} is broken in a lower layer of the chain"
    return None


def post_merge(top: str, base: str, domain: str, disk_name: str, connect: str,
                     dry_run: bool) -> dict[str, Any]:
    with virt.connect(connect) as conn:
        dom, disk = _running_disk(conn, domain, disk_name, "post-merge")
        layers = live_chain(dom, disk)
        files = [lay.info.filename for lay in layers]
        if any(bm.same_image(f, top) for f in files if os.path.exists(f)) \
                or top in files:
            raise UsageError(f"{top} is still in the chain of {domain}/{disk_name} "
                             f"({', '.join(files)}): the merge has not finished (pivot?)",
                             top=top, base=base)
        idx = next((i for i, f in enumerate(files) if bm.same_image(f, base) or f == base),
                   None)
        if idx is None:
            raise UsageError(f"{base} is not in the chain of {domain}/{disk_name} "
                             f"({', '.join(files)})", top=top, base=base)
        base_layer = layers[idx]
        space = space_check(dom, base_layer)
        checkpoints = [cp for cp in dom.checkpoints() if cp.disks.get(disk_name)]
        lost: list[dict[str, Any]] = []
        merged: list[dict[str, Any]] = []
        step = 0
        for cp in checkpoints:
            name = cp.disks[disk_name] or cp.name
            why = _bitmap_state(layers, name)
            if why is None and not space["fits"] and base_layer.info.bitmap(name) is not None:
                why = (f"{base_layer.info.filename} cannot store its bitmaps when QEMU closes "
                       f"it: needs at least {space['needed_min']} bytes (predicted "
                       f"{space['predicted']}), {space['free']} free; the bitmap would be "
                       "lost (left in-use) at the next shutdown, restart or migration")
            if why is None:
                b = layers[0].info.bitmap(name)
                assert b is not None
                merged.append({"image": base, "name": name, "checkpoint": cp.name,
                               "reason": "merged by libvirt's blockcommit; verified",
                               "count": layers[0].counts.get(name, 0),
                               "granularity": b.granularity})
                continue
            entry = {"checkpoint": cp.name, "name": name, "image": base, "reason": why}
            if not dry_run:
                step += 1
                faults.point(f"hygiene_step_{step}")
                log.error("%s/%s: deleting checkpoint %s: %s (the next backup will be full)",
                          domain, disk_name, cp.name, why)
                entry["deleted"] = delete_checkpoint(dom, cp.name, running=True, broken=True)
            lost.append(entry)
        after = layers if dry_run else live_chain(dom, disk)
        result = report(domain=domain, disk=disk_name, top=top, base=base, image=base,
                        dry_run=dry_run, merged=merged, deleted_checkpoints=lost, space=space,
                        chain=[lay.info.filename for lay in after],
                        bitmaps_after=layers_json(after))
        if lost:
            raise BitmapLost(
                f"{domain}/{disk_name}: {len(lost)} checkpoint(s) lost their bitmap after the "
                f"merge and were {'to be ' if dry_run else ''}deleted: "
                + ", ".join(e["checkpoint"] for e in lost)
                + "; the next backup will be full", report=result)
        return result

