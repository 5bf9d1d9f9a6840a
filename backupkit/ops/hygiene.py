"""`backupkit hygiene`: bitmap hygiene around merges, and chain checks.

Cold path only (images no process has open, changed with qemu-img).  The live
path (``domain=``) goes through libvirt and is not implemented yet.

Every function plans first (pure, ``backupkit.bitmaps``), returns the plan
unchanged with ``dry_run``, otherwise applies it and re-reads every changed
image: a bitmap left in-use or gone missing raises ``BitmapLost`` (exit 5)
with the report in its ``report`` field, whatever qemu-img's exit code was.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from backupkit import bitmaps as bm
from backupkit import proc, qemu
from backupkit.errors import BitmapLost, OperationFailed, UsageError

log = logging.getLogger("backupkit.hygiene")

DEFAULT_URI = "qemu:///system"


def _live_not_ready(domain: str | None, disk: str | None) -> None:
    if disk is not None and domain is None:
        raise UsageError("--disk needs --domain")
    if domain is not None:
        raise OperationFailed("live hygiene (--domain) not implemented yet", domain=domain)


def _result(top: str, base: str, actions: Sequence[bm.Action], dry_run: bool,
            after: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        "top": top,
        "base": base,
        "dry_run": dry_run,
        "removed": [a.to_json() for a in actions if a.op == "remove"],
        "added": [a.to_json() for a in actions if a.op == "add"],
        "merged": [a.to_json() for a in actions if a.op == "merge"],
        "bitmaps_after": after,
    }


def _run_plan(layers: list[qemu.ImageInfo], actions: list[bm.Action], dry_run: bool,
              runner: proc.Runner | None) -> dict[str, list[dict[str, Any]]]:
    """Apply (unless dry_run) and verify; return bitmaps_after of TOP and BASE."""
    top, base = layers[0], layers[-1]
    if dry_run or not actions:
        # Nothing to change: still report (and, when not a dry run, insist on)
        # the state of both ends.
        after = {top.filename: bm.bitmaps_json(top),
                 base.filename: bm.predicted_bitmaps(base, actions)}
        return after
    expected = {base.filename: bm.expected_after(base, actions)}
    failed = bm.apply(actions, runner=runner)
    report = {"top": top.filename, "base": base.filename,
              "planned": [dict(a.to_json(), op=a.op) for a in actions]}
    infos = bm.verify(expected, failed, report=report, runner=runner)
    return {top.filename: bm.bitmaps_json(top),
            base.filename: bm.bitmaps_json(infos[base.filename])}


def pre_merge(top: str, base: str, *, domain: str | None = None, disk: str | None = None,
              connect: str = DEFAULT_URI, dry_run: bool = False,
              runner: proc.Runner | None = None) -> dict[str, Any]:
    """Before merging TOP into BASE: remove from BASE every bitmap TOP cannot carry on.

    Removed: bitmaps missing from TOP (stale), in-use in TOP or BASE, or broken
    in a layer between.  Nothing else is touched.  Stale bitmaps take space the
    merge needs; on a fixed-size BASE they make qemu-img commit lose every
    bitmap (HOST-FACTS, seeds/000).
    """
    _live_not_ready(domain, disk)
    layers = bm.slice_chain(top, base, runner=runner)
    actions = bm.plan_pre_merge(layers)
    after = _run_plan(layers, actions, dry_run, runner)
    return _result(top, base, actions, dry_run, after)


def post_merge(top: str, base: str, *, domain: str | None = None, disk: str | None = None,
               connect: str = DEFAULT_URI, dry_run: bool = False,
               runner: proc.Runner | None = None) -> dict[str, Any]:
    """After merging TOP into BASE: give BASE every usable bitmap only TOP had.

    Each is added with TOP's granularity and recording state and TOP's bits
    merged in.  Run it before TOP is deleted.  If the merge already damaged
    BASE's bitmaps (in-use), nothing is changed and BitmapLost is raised:
    re-creating them from TOP alone would miss every write older than TOP.
    """
    _live_not_ready(domain, disk)
    layers = bm.slice_chain(top, base, runner=runner)
    damage = bm.post_merge_damage(layers)
    if damage:
        names = ", ".join(p.name for p in damage)
        raise BitmapLost(
            f"{base}: the merge left bitmaps in-use (lost): {names}; incremental backups "
            "from these checkpoints are impossible, run `hygiene check --fix` on the chain "
            "and take a full backup",
            report={"top": top, "base": base, "damage": [p.to_json() for p in damage],
                    "bitmaps_after": {top: bm.bitmaps_json(layers[0]),
                                      base: bm.bitmaps_json(layers[-1])}})
    actions = bm.plan_post_merge(layers)
    after = _run_plan(layers, actions, dry_run, runner)
    result = _result(top, base, actions, dry_run, after)
    result["warnings"] = [p.to_json() for p in bm.post_merge_warnings(layers)]
    return result


def check(*, images: Sequence[str] = (), domain: str | None = None, fix: bool = False,
          connect: str = DEFAULT_URI, repo: str | None = None,
          runner: proc.Runner | None = None) -> dict[str, Any]:
    """Walk the real chain of each image and report (and with ``fix`` repair) its bitmaps.

    Reported: orphans, in-use copies, holes (a name missing from a layer between
    two that hold it), granularity mismatches, images marked corrupt.  ``fix``
    removes every copy of a name that cannot be used (orphans, in-use, broken
    chain); granularity mismatches and corrupt images are left for the
    operator.  When problems remain, BitmapLost (exit 5) carries the report.
    """
    if domain is not None:
        if images:
            raise UsageError("give either a domain or --image, not both")
        raise OperationFailed("live hygiene check not implemented yet", domain=domain)
    if not images:
        raise UsageError("hygiene check needs a domain or at least one --image")

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
        expected: dict[str, dict[str, qemu.Bitmap]] = {}
        for _path, chain in chains:
            for layer in chain:
                if any(a.image == layer.filename for a in all_actions):
                    expected[layer.filename] = bm.expected_after(layer, all_actions)
        failed = bm.apply(all_actions, runner=runner)
        partial = {"images": list(images), "chains": reports}
        bm.verify(expected, failed, report=partial, runner=runner)

    # Re-walk after a fix: what is left is what the operator must deal with.
    remaining: list[dict[str, Any]] = []
    bitmaps_after: dict[str, list[dict[str, Any]]] = {}
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

    result: dict[str, Any] = {
        "image": images[0] if len(images) == 1 else None,
        "images": list(images),
        "fix": fix,
        "chains": reports,
        "problems": [p for r in reports for p in r["problems"]],
        "remaining": remaining,
        "removed": [a.to_json() for a in all_actions],
        "added": [],
        "merged": [],
        "bitmaps_after": bitmaps_after,
        "clean": not remaining,
    }
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
