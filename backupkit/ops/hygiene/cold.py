"""The cold path of ``backupkit hygiene``: images no process has open, changed with qemu-img.

``pre-merge``/``post-merge`` without ``--domain`` (:func:`merge_step`) and
``check --image`` (:func:`check_images`).  Each plans first (pure,
``backupkit.bitmaps``), returns the plan unchanged with ``dry_run``, checks
that every image it opens read-write can store its bitmaps at close, applies,
and re-reads every changed image.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import Any

from backupkit import bitmaps as bm
from backupkit import proc, qemu
from backupkit.errors import BitmapLost, NoSpace, NotFound, UsageError
from backupkit.ops.hygiene.report import BitmapsAfter, merge_report, report


def check_image_arg(path: str, what: str) -> None:
    """An image named on the command line: UsageError for nonsense, NotFound if missing."""
    if not path:
        raise UsageError(f"{what}: empty path")
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a directory, not an image")
    if not os.path.lexists(path):
        raise NotFound("image", path, what)


def _device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def free_space(path: str, fmt: str, cluster_size: int, *, force_share: bool,
               written_end: int = 0, runner: proc.Runner | None = None) -> dict[str, Any]:
    """Room the image at ``path`` has to grow.

    A block device (fixed-size volume): device size minus the end of the
    qcow2 (the larger of qemu-img check's image-end-offset and
    ``written_end``, QEMU's highest write).  A file: the filesystem's free
    space for unprivileged users (statvfs f_bavail).
    """
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        size = _device_size(path)
        end = max(qemu.image_end(path, fmt=fmt, force_share=force_share, runner=runner),
                  written_end)
        end = -(-end // cluster_size) * cluster_size
        return {"kind": "block_device", "device_size": size, "image_end": end,
                "free": max(0, size - end)}
    vfs = os.statvfs(path)
    return {"kind": "file", "free": vfs.f_bavail * vfs.f_frsize}


def _cold_space(layers: Sequence[qemu.ImageInfo], actions: Sequence[bm.Action],
                runner: proc.Runner | None) -> list[dict[str, Any]]:
    """For every image the actions open read-write: can it store its bitmaps at close?

    Counted: every sound bitmap it holds before or after (the peak), each with all
    its data clusters (qemu-img does not tell how many bits are set), minus
    the clusters free inside the image: erring on refusing to open it, which
    loses nothing, rather than on opening an image that then cannot store
    its bitmaps (they are left in-use: lost).
    """
    by_path = {layer.filename: layer for layer in layers}
    docs = []
    for path in dict.fromkeys(a.image for a in actions):
        info = by_path[path]
        if not info.stores_bitmaps:
            continue
        # In-use bitmaps are never stored again (QEMU skips them; removing one only
        # frees its clusters): the peak is every sound bitmap before or after.
        names = {b.name: b.granularity for b in info.bitmaps if not b.in_use}
        for name, b in bm.expected_after(info, actions).items():
            if not b.in_use:
                names.setdefault(name, b.granularity)
        bitmaps = [(n, g, None) for n, g in sorted(names.items())]
        inside = bm.free_clusters_inside(path)
        doc: dict[str, Any] = {"image": path}
        doc.update(free_space(path, info.format, info.cluster_size, force_share=False,
                              runner=runner))
        needed = bm.store_need(info.virtual_size, info.cluster_size, bitmaps,
                               free_inside=inside, is_file=doc["kind"] == "file")
        doc.update(predicted=needed, needed=needed, free_clusters_inside=inside,
                   fits=doc["free"] >= needed)
        docs.append(doc)
    return docs


def merge_step(step: str, top: str, base: str, dry_run: bool, runner: proc.Runner | None
               ) -> dict[str, Any]:
    """pre-merge or post-merge on cold images: plan, check space, apply, verify, report."""
    check_image_arg(top, "--top")
    check_image_arg(base, "--base")
    layers = bm.slice_chain(top, base, runner=runner)
    if step == "pre-merge":
        actions, lost = bm.plan_pre_merge(layers)
    else:
        actions, lost = bm.plan_post_merge(layers)
    space = _cold_space(layers, actions, runner) if actions else []
    lost_doc = [p.to_json() for p in lost]
    short = [d for d in space if not d["fits"]]
    if short and not dry_run:
        partial = merge_report(top, base, actions, dry_run,
                               {layer.filename: bm.bitmaps_json(layer) for layer in layers})
        partial.update(space=space, lost=lost_doc, changed=False)
        what = "; ".join(f"{d['image']}: {d['free']} bytes free, storing its bitmaps "
                         f"needs {d['needed']}" for d in short)
        if lost:
            raise BitmapLost(f"{step}: bitmaps lost ({', '.join(p.name for p in lost)}) and "
                             f"their copies cannot be removed: {what}", report=partial)
        raise NoSpace(f"{step}: nothing changed: {what}; opening it read-write would leave "
                      "its bitmaps in-use (lost)", report=partial)
    after = _run_plan(layers, actions, dry_run, runner)
    result = merge_report(top, base, actions, dry_run, after)
    result.update(space=space, lost=lost_doc)
    if step == "post-merge":
        result["warnings"] = [p.to_json() for p in bm.post_merge_warnings(layers)]
    if lost:
        when = "will be lost by the merge" if step == "pre-merge" and not layers[
            -1].stores_bitmaps else "lost"
        raise BitmapLost(
            f"{step}: {len(lost)} bitmap(s) {when}: "
            + "; ".join(f"{p.name} ({p.detail})" for p in lost)
            + "; incremental backups from their checkpoints are impossible, the next backup "
            "of this disk will be full", report=result)
    return result


def _run_plan(layers: list[qemu.ImageInfo], actions: list[bm.Action], dry_run: bool,
              runner: proc.Runner | None) -> BitmapsAfter:
    """Apply (unless dry_run) and verify; return bitmaps_after of every layer changed."""
    top, base = layers[0], layers[-1]
    if dry_run or not actions:
        return {layer.filename: bm.predicted_bitmaps(layer, actions)
                for layer in layers if layer in (top, base)
                or any(a.image == layer.filename for a in actions)}
    touched = [layer for layer in layers if any(a.image == layer.filename for a in actions)]
    expected = {layer.filename: bm.expected_after(layer, actions) for layer in touched}
    failed = bm.apply(actions, runner=runner)
    planned = {"top": top.filename, "base": base.filename,
               "planned": [dict(a.to_json(), op=a.op) for a in actions]}
    infos = bm.verify(expected, failed, report=planned, runner=runner,
                      formats={layer.filename: layer.format for layer in touched},
                      before={layer.filename: {b.name for b in layer.bitmaps}
                              for layer in touched})
    after = {layer.filename: bm.bitmaps_json(infos.get(layer.filename, layer))
             for layer in layers if layer in (top, base) or layer.filename in infos}
    return after


def check_images(images: Sequence[str], fix: bool, runner: proc.Runner | None
                 ) -> dict[str, Any]:
    """``hygiene check --image``: see :func:`backupkit.ops.hygiene.check`."""
    if not images:
        raise UsageError("hygiene check needs a domain or at least one --image")
    for path in images:
        check_image_arg(path, "--image")

    chains = [(path, bm.read_chain(path, runner=runner)) for path in images]
    for path, chain in chains:
        chain[0] = bm.renamed(chain[0], path)

    reports: list[dict[str, Any]] = []
    all_actions: list[bm.Action] = []
    for path, chain in chains:
        problems = bm.analyse_chain(chain)
        actions = [a for a in bm.plan_fix(chain) if fix
                   and not _needed_elsewhere(a, chains)
                   and all((a.image, a.name) != (b.image, b.name) for b in all_actions)]
        all_actions += actions
        reports.append({"image": path,
                        "chain": [layer.filename for layer in chain],
                        "problems": [p.to_json() for p in problems],
                        "removed": [a.to_json() for a in actions]})

    if all_actions:
        touched = {layer.filename: layer for _path, chain in chains for layer in chain
                   if any(a.image == layer.filename for a in all_actions)}
        expected = {p: bm.expected_after(layer, all_actions) for p, layer in touched.items()}
        partial: dict[str, Any] = {"images": list(images), "chains": reports}
        space = _cold_space(list(touched.values()), all_actions, runner)
        short = [d for d in space if not d["fits"]]
        if short:
            partial["space"] = space
            raise NoSpace("check --fix: nothing changed: " + "; ".join(
                f"{d['image']}: {d['free']} bytes free, storing its bitmaps needs "
                f"{d['needed']}" for d in short), report=partial)
        failed = bm.apply(all_actions, runner=runner)
        bm.verify(expected, failed, report=partial, runner=runner,
                  formats={p: layer.format for p, layer in touched.items()},
                  before={p: {b.name for b in layer.bitmaps} for p, layer in touched.items()})

    # Re-walk after a fix: what is left is what the operator must deal with.
    remaining: list[dict[str, Any]] = []
    bitmaps_after: BitmapsAfter = {}
    for i, (path, chain) in enumerate(chains):
        if all_actions:
            chain = bm.read_chain(path, runner=runner)
            chain[0] = bm.renamed(chain[0], path)
            reports[i]["remaining"] = [p.to_json() for p in bm.analyse_chain(chain)]
        else:
            reports[i]["remaining"] = reports[i]["problems"]
        remaining += reports[i]["remaining"]
        for layer in chain:
            bitmaps_after[layer.filename] = bm.bitmaps_json(layer)

    result = report(image=images[0] if len(images) == 1 else None, images=list(images),
                    fix=fix, chains=reports,
                    problems=[p for r in reports for p in r["problems"]],
                    remaining=remaining, clean=not remaining,
                    removed=[a.to_json() for a in all_actions], bitmaps_after=bitmaps_after)
    if remaining:
        kinds = sorted({f"{p['kind']}" for p in remaining})
        hint = "" if fix else "; --fix repairs what is safe"
        raise BitmapLost(f"{len(remaining)} bitmap problem(s) ({', '.join(kinds)}){hint}",
                         report=result)
    return result


def _needed_elsewhere(action: bm.Action, chains: Sequence[tuple[str, list[qemu.ImageInfo]]]
                      ) -> bool:
    """Whether another given chain shares action's layer and can use the bitmap there.

    A template or other shared base may hold a bitmap that is an orphan seen
    from one overlay and valid seen from another; never remove it then.
    """
    for _path, chain in chains:
        usable = bm.usable_names(chain)
        if action.name not in usable:
            continue
        for layer in chain[: usable[action.name]]:
            if bm.same_image(layer.filename, action.image):
                return True
    return False

