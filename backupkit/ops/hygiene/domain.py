"""``backupkit hygiene check DOMAIN``: a domain's chains, checkpoints and bitmaps.

Each disk's real chain (QEMU's block nodes when running, qemu-img when shut
off) against libvirt's domain XML (drift); bitmaps no checkpoint owns;
checkpoints without a usable bitmap; with a repository, the backupkit
checkpoints its latest backup does not use.  ``fix`` deletes those checkpoints
and removes the orphans (through libvirt when running), then re-checks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from backupkit import bitmaps as bm
from backupkit import qemu, virt
from backupkit.errors import BitmapLost, Error, NotFound
from backupkit.ops.backup import checkpoint_prefix, domain_latest
from backupkit.ops.domainlock import domain_lock
from backupkit.ops.hygiene.live import M_QMP, remove_live
from backupkit.ops.hygiene.report import BitmapsAfter, layers_json, problem, report
from backupkit.virt import Domain
from backupkit.virt.blocks import LiveLayer, live_chain
from backupkit.virt.checkpoints import delete_checkpoint
from backupkit.virt.checkpoints import owned as owned_by
from backupkit.virt.xml import CheckpointInfo, Disk

log = logging.getLogger("backupkit.hygiene")

LEFTOVER = "leftover_checkpoint"
NO_BITMAP = "checkpoint_without_bitmap"
BROKEN_CP = "checkpoint_bitmap_broken"
DRIFT = "chain_drift"


@dataclass
class _DiskView:
    disk: Disk
    chain: list[qemu.ImageInfo]
    live: list[LiveLayer] | None  # None: shut off (chain read with qemu-img)
    metadata: list[str]


def _read_disks(dom: Domain, running: bool) -> list[_DiskView]:
    views = []
    for d in dom.disks():
        if not d.can_bitmap:
            continue
        meta = [d.path, *(b.path for b in d.backing)]
        if running:
            live = live_chain(dom, d)
            views.append(_DiskView(d, [lay.info for lay in live], live, meta))
        else:
            chain = bm.read_chain(d.path, fmt=d.format)
            chain[0] = bm.renamed(chain[0], d.path)
            views.append(_DiskView(d, chain, None, meta))
    return views


def _analyse_domain(dom: Domain, views: Sequence[_DiskView],
                    checkpoints: Sequence[CheckpointInfo], latest: str | None,
                    owner: str | None) -> tuple[list[dict[str, Any]], dict[str, str],
                                              list[str]]:
    """(problems, checkpoints to delete -> reason, warnings).

    ``owner``: the repository's checkpoint prefix (None without a repository);
    only that repository's checkpoints can be its leftovers, another repository
    backing up the same domain keeps its own.
    """
    problems: list[dict[str, Any]] = []
    delete: dict[str, str] = {}
    warnings: list[str] = []
    names = {cp.name for cp in checkpoints}
    if owner is not None:
        for cp in checkpoints:
            if owned_by(cp.name, owner) and cp.name != latest:
                why = ("left by an interrupted run: the latest backup uses "
                       f"{latest}" if latest else "the repository has no backup of this domain")
                problems.append(problem(LEFTOVER, "", cp.name, why, checkpoint=cp.name))
                delete.setdefault(cp.name, f"leftover checkpoint ({why})")
        if latest and latest not in names:
            warnings.append(f"the latest backup's checkpoint {latest} is not in libvirt: "
                            "the next backup redefines it if its bitmaps are intact, "
                            "else it is full")
    for v in views:
        target = v.disk.target
        real = [layer.filename for layer in v.chain]
        # Drift: QEMU's (or qemu-img's) chain against libvirt's domain XML.  A
        # shut-off domain's XML usually lists no backing chain: compared only
        # when it does.
        if v.live is not None or len(v.metadata) > 1:
            same = len(real) == len(v.metadata) and all(
                bm.same_image(a, b) or a == b for a, b in zip(real, v.metadata, strict=True))
            if not same:
                problems.append(problem(
                    DRIFT, v.disk.path, "",
                    f"real chain {real} differs from libvirt's domain XML {v.metadata}",
                    disk=target, chain=real, metadata_chain=v.metadata))
        owned: dict[str, CheckpointInfo] = {}
        for cp in checkpoints:
            owner_bitmap = cp.disks.get(target)
            if owner_bitmap:
                owned[owner_bitmap] = cp
        usable = bm.usable_names(v.chain)
        active = v.chain[0]
        for bname, cp in sorted(owned.items()):
            b = active.bitmap(bname)
            if b is None:
                problems.append(problem(NO_BITMAP, active.filename, bname,
                                         f"checkpoint {cp.name}: bitmap missing from the "
                                         "active layer", checkpoint=cp.name, disk=target))
                delete.setdefault(cp.name, f"bitmap {bname} missing on {target}")
            elif bname not in usable or not b.recording:
                what = ("inconsistent" if b.in_use else "not recording" if not b.recording
                        else "broken in a lower layer")
                problems.append(problem(BROKEN_CP, active.filename, bname,
                                         f"checkpoint {cp.name}: bitmap {what}",
                                         checkpoint=cp.name, disk=target))
                delete.setdefault(cp.name, f"bitmap {bname} on {target} is {what}")
        seen: set[tuple[str, str, str]] = set()
        for layer in v.chain:
            for b in sorted(layer.bitmaps, key=lambda b: b.name):
                if b.name not in owned:
                    problems.append(problem(bm.ORPHAN, layer.filename, b.name,
                                             "no checkpoint owns this bitmap: it can never "
                                             "be used and only takes space", disk=target))
                    seen.add((bm.ORPHAN, layer.filename, b.name))
        for p in bm.analyse_chain(v.chain):
            if (p.kind, p.image, p.name) not in seen:
                problems.append(dict(p.to_json(), disk=target))
    return problems, delete, warnings


def _remove_plan(views: Sequence[_DiskView], checkpoints: Sequence[CheckpointInfo]
                 ) -> list[tuple[_DiskView, int, str, str]]:
    """(view, layer index, name, reason): every copy of a bitmap no sound checkpoint uses."""
    plan = []
    for v in views:
        target = v.disk.target
        owned = {cp.disks[target] for cp in checkpoints if cp.disks.get(target)}
        usable = bm.usable_names(v.chain)
        for i, layer in enumerate(v.chain):
            for b in sorted(layer.bitmaps, key=lambda b: b.name):
                if b.name not in owned:
                    plan.append((v, i, b.name, "orphan: no checkpoint owns it"))
                elif b.name not in usable:
                    plan.append((v, i, b.name, "broken: in-use or missing in another layer"))
    return plan


def _owner_prefix(repo: Any) -> str | None:
    return checkpoint_prefix(repo) if repo is not None else None


def check_domain(domain: str, fix: bool, connect: str, repo: str | None, wait: float,
                  passphrase: Any = None) -> dict[str, Any]:
    with virt.connect(connect) as conn, domain_lock(repo, domain, wait, passphrase) as r:
        dom = conn.domain(domain)
        running = dom.is_active()
        latest: str | None = None
        if r is not None:
            try:
                latest = domain_latest(r, dom).checkpoint  # this domain's, not a namesake's
            except NotFound:
                latest = None
        views = _read_disks(dom, running)
        checkpoints = dom.checkpoints()
        problems, delete, warnings = _analyse_domain(dom, views, checkpoints, latest,
                                                     _owner_prefix(r))
        deleted: list[dict[str, Any]] = []
        removed: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        if fix and problems:
            # 1. Checkpoints that cannot serve an incremental, or that no backup uses.
            for name, why in delete.items():
                log.warning("%s: deleting checkpoint %s: %s", domain, name, why)
                try:
                    how = delete_checkpoint(dom, name, running, broken=True)
                    deleted.append({"checkpoint": name, "reason": why, "deleted": how})
                except Error as e:
                    errors.append({"checkpoint": name, "error": str(e)})
            # 2. Every copy of a bitmap no remaining checkpoint can use.
            views = _read_disks(dom, running)
            checkpoints = dom.checkpoints()
            done: set[tuple[str, str]] = set()
            cold_actions: list[bm.Action] = []
            for v, i, name, why in _remove_plan(views, checkpoints):
                layer = v.chain[i]
                if v.live is None:
                    cold_actions.append(bm.Action("remove", layer.filename, layer.format,
                                                  name, why))
                    continue
                if (v.disk.target, name) in done:
                    continue
                try:
                    method, mwhy = remove_live(dom, v.disk, v.live[i], name, checkpoints,
                                                False)
                except Error as e:
                    errors.append({"image": layer.filename, "name": name, "error": str(e)})
                    continue
                if method != M_QMP:
                    done.add((v.disk.target, name))  # libvirt removed every copy
                removed.append({"image": layer.filename, "name": name, "reason": why,
                                "method": method, "why": mwhy, "disk": v.disk.target})
                checkpoints = dom.checkpoints()
            if cold_actions:
                failed = bm.apply(cold_actions)
                for a, err in failed:
                    errors.append({"image": a.image, "name": a.name, "error": str(err)})
                failed_actions = [f for f, _err in failed]
                removed += [dict(a.to_json(), method="qemu-img bitmap --remove")
                            for a in cold_actions if a not in failed_actions]
            views = _read_disks(dom, running)
            checkpoints = dom.checkpoints()
            remaining, _, warnings = _analyse_domain(dom, views, checkpoints, latest,
                                                     _owner_prefix(r))
        else:
            remaining = problems
        bitmaps_after: BitmapsAfter = {}
        for v in views:
            if v.live is not None:
                bitmaps_after.update(layers_json(v.live))
            else:
                for layer in v.chain:
                    bitmaps_after[layer.filename] = bm.bitmaps_json(layer)
        result = report(
            domain=domain, running=running, fix=fix, image=None,
            repository=repo if r is not None else None,
            latest_backup_checkpoint=latest,
            checkpoints=[cp.name for cp in checkpoints],
            chains=[{"disk": v.disk.target, "chain": [la.filename for la in v.chain],
                     "metadata_chain": v.metadata} for v in views],
            problems=problems, remaining=remaining, warnings=warnings,
            deleted_checkpoints=deleted, removed=removed, errors=errors,
            bitmaps_after=bitmaps_after, clean=not remaining)
        if remaining or errors:
            kinds = sorted({p["kind"] for p in remaining} | ({"fix_failed"} if errors else set()))
            hint = "" if fix else "; --fix repairs what is safe"
            raise BitmapLost(f"{domain}: {len(remaining)} bitmap problem(s) "
                             f"({', '.join(kinds)}){hint}", report=result)
        return result

