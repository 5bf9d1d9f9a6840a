"""`backupkit hygiene`: bitmap hygiene around merges, and chain checks.

Cold path (images no process has open, changed with qemu-img) and live path
(``domain=``: a running domain's chain, through libvirt; see the comment above
``M_REDEFINE`` for which libvirt mechanism removes what, and why).

Every function plans first (pure, ``backupkit.bitmaps``), returns the plan
unchanged with ``dry_run``, otherwise applies it and re-reads every changed
image: a bitmap left in-use or gone missing raises ``BitmapLost`` (exit 5)
with the report in its ``report`` field, whatever qemu-img's exit code was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from backupkit import bitmaps as bm
from backupkit import proc, qemu, virt
from backupkit.errors import (
    BitmapLost,
    Error,
    LibvirtError,
    NotFound,
    OperationFailed,
    UsageError,
)
from backupkit.ops import backup as backup_op
from backupkit.virt import Domain
from backupkit.virt import xml as vxml
from backupkit.virt.xml import CheckpointInfo, Disk

log = logging.getLogger("backupkit.hygiene")

DEFAULT_URI = "qemu:///system"


def _live_args(domain: str | None, disk: str | None) -> bool:
    """Whether the call is live (--domain with --disk); UsageError for half of it."""
    if (disk is None) != (domain is None):
        raise UsageError("--domain and --disk go together")
    return domain is not None


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
              runner: proc.Runner | None = None, repo: str | None = None,
              wait: float = 0.0) -> dict[str, Any]:
    """Before merging TOP into BASE: remove from BASE every bitmap TOP cannot carry on.

    Removed: bitmaps missing from TOP (stale), in-use in TOP or BASE, or broken
    in a layer between.  Nothing else is touched.  Stale bitmaps take space the
    merge needs; on a fixed-size BASE they make qemu-img commit lose every
    bitmap (HOST-FACTS, seeds/000).

    Live (``domain``/``disk``): the chain is QEMU's; each removal says which
    libvirt mechanism did it (``method``) and why.  With ``repo``, runs under
    the repository's lock of the domain (serialized with its backups).
    """
    if _live_args(domain, disk):
        assert domain is not None and disk is not None
        with _domain_lock(repo, domain, wait):
            return _pre_merge_live(top, base, domain, disk, connect, dry_run)
    layers = bm.slice_chain(top, base, runner=runner)
    actions = bm.plan_pre_merge(layers)
    after = _run_plan(layers, actions, dry_run, runner)
    return _result(top, base, actions, dry_run, after)


def post_merge(top: str, base: str, *, domain: str | None = None, disk: str | None = None,
               connect: str = DEFAULT_URI, dry_run: bool = False,
               runner: proc.Runner | None = None, repo: str | None = None,
               wait: float = 0.0) -> dict[str, Any]:
    """After merging TOP into BASE: give BASE every usable bitmap only TOP had.

    Each is added with TOP's granularity and recording state and TOP's bits
    merged in.  Run it before TOP is deleted.  If the merge already damaged
    BASE's bitmaps (in-use), nothing is changed and BitmapLost is raised:
    re-creating them from TOP alone would miss every write older than TOP.

    Live (``domain``/``disk``, after ``blockcommit --active --pivot``): libvirt
    already merged TOP's bitmaps; verify that every checkpoint's bitmap is in
    the new active layer, recording and consistent, and that BASE has room to
    store its bitmaps when QEMU closes it (libvirt reports success and the
    bitmaps look fine in memory, but are lost at close on a full volume).  A
    checkpoint failing either is deleted (next backup: full, with the reason)
    and BitmapLost (exit 5) carries the report.
    """
    if _live_args(domain, disk):
        assert domain is not None and disk is not None
        with _domain_lock(repo, domain, wait):
            return _post_merge_live(top, base, domain, disk, connect, dry_run)
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
          runner: proc.Runner | None = None, wait: float = 0.0) -> dict[str, Any]:
    """Walk the real chain of each image and report (and with ``fix`` repair) its bitmaps.

    Reported: orphans, in-use copies, holes (a name missing from a layer between
    two that hold it), granularity mismatches, images marked corrupt.  ``fix``
    removes every copy of a name that cannot be used (orphans, in-use, broken
    chain); granularity mismatches and corrupt images are left for the
    operator.  When problems remain, BitmapLost (exit 5) carries the report.

    ``domain``: walk each disk's real chain (QEMU's block nodes when running,
    qemu-img when shut off) and compare it with libvirt's domain XML (drift);
    report orphan bitmaps (no checkpoint owns them), checkpoints without a
    usable bitmap, in-use/inconsistent copies, holes, granularity mismatches,
    and with ``repo`` the backupkit checkpoints the latest backup does not
    use.  ``fix`` deletes those checkpoints and removes the orphans (through
    libvirt when running), then re-checks.
    """
    if domain is not None:
        if images:
            raise UsageError("give either a domain or --image, not both")
        return _check_domain(domain, fix, connect, repo, wait)
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
_FORMAT_DRIVERS = ("qcow2", "raw", "qed", "vmdk", "vpc", "vdi", "luks")


@dataclass(frozen=True)
class LiveLayer:
    """One layer of a running disk's chain as QEMU holds it."""

    node: str  # format node name
    file_node: str  # protocol node name ("" if unknown)
    info: qemu.ImageInfo  # filename, virtual size, persistent bitmaps (inconsistent = in_use)
    read_only: bool
    cluster_size: int
    counts: dict[str, int]  # bitmap name -> dirty bytes


@contextlib.contextmanager
def _domain_lock(repo: str | None, domain: str, wait: float) -> Iterator[Any]:
    """Serialize with backups of the same domain (host-wide lock, whatever the
    repository) and, when a repository is configured, with its domain lock.

    Yields the open Repository (or None when none is configured or it does
    not exist).
    """
    with backup_op.host_domain_lock(domain, wait=wait):
        if repo is None:
            yield None
            return
        from backupkit.repo import Repository

        try:
            r = Repository.open(repo)
        except NotFound:
            log.warning("repository %s does not exist: not comparing", repo)
            yield None
            return
        with r.lock_domain(domain, wait=wait):
            yield r



def _qmp(dom: Domain, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """A QMP command through libvirt; a QMP error reply raises LibvirtError with QEMU's text.

    (``Domain.qmp`` expects a "return" member; QEMU's refusals come back as
    an "error" member, which is exactly what the callers here must see.)
    """
    import libvirt
    import libvirt_qemu

    cmd: dict[str, Any] = {"execute": command}
    if arguments:
        cmd["arguments"] = arguments
    try:
        out = json.loads(libvirt_qemu.qemuMonitorCommand(dom.raw, json.dumps(cmd), 0))
    except libvirt.libvirtError as e:
        raise LibvirtError(f"QMP {command}", e.get_error_message() or str(e)) from e
    if "error" in out:
        err = out["error"]
        raise LibvirtError(f"QMP {command}", str(err.get("desc") or err))
    return out.get("return")


def block_nodes(dom: Domain) -> list[dict[str, Any]]:
    """QEMU's named block nodes (query-named-block-nodes, flat): read-only."""
    return list(_qmp(dom, "query-named-block-nodes", {"flat": True}))


def node_write_offsets(dom: Domain) -> dict[str, int]:
    """node-name -> wr_highest_offset of every named node (query-blockstats): read-only."""
    stats = _qmp(dom, "query-blockstats", {"query-nodes": True})
    return {s["node-name"]: int(s.get("stats", {}).get("wr_highest_offset", 0))
            for s in stats if s.get("node-name")}


def remove_bitmap_qmp(dom: Domain, node: str, name: str) -> None:
    """block-dirty-bitmap-remove on one node (QEMU refuses it on a read-only node)."""
    _qmp(dom, "block-dirty-bitmap-remove", {"node": node, "name": name})


def _disk(dom: Domain, target: str) -> Disk:
    disks = dom.disks()
    for d in disks:
        if d.target == target:
            return d
    raise NotFound("disk", f"{dom.name}/{target}",
                   f"domain has {', '.join(d.target for d in disks) or 'no disks'}")


def live_chain(dom: Domain, disk: Disk) -> list[LiveLayer]:
    """The real chain of a running disk from QEMU's block nodes, active layer first."""
    nodes = block_nodes(dom)
    by_name = {n.get("node-name", ""): n for n in nodes}
    fmt_nodes = [n for n in nodes if n.get("drv") in _FORMAT_DRIVERS]

    def find(path: str) -> dict[str, Any] | None:
        for n in fmt_nodes:
            if n.get("file") == path:
                return dict(n)
        for n in fmt_nodes:
            if bm.same_image(n.get("file", ""), path):
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
        info = qemu.ImageInfo(filename=node.get("file", ""), format=node.get("drv", ""),
                              virtual_size=int(image.get("virtual-size", 0)), actual_size=0,
                              backing_filename=image.get("full-backing-filename")
                              or node.get("backing_file"), bitmaps=bitmaps)
        file_node = ""
        for n in nodes:  # the protocol node under this format node: same file, file driver
            if n.get("drv") in ("file", "host_device") and n.get("file") == info.filename:
                file_node = n.get("node-name", "")
        layers.append(LiveLayer(node["node-name"], file_node, info, bool(node.get("ro")),
                                int(image.get("cluster-size", 65536)), counts))
        backing = info.backing_filename
        node = find(backing) if backing else None
    del by_name
    return layers


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


def _minimal_checkpoint(name: str, target: str) -> str:
    info = CheckpointInfo(name, None, int(time.time()), {target: name})
    return vxml.redefine_xml(info)


def _remove_live(dom: Domain, disk: Disk, layer: LiveLayer, name: str,
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
            _delete_checkpoint_live(dom, owner.name)
    elif not taken:
        method, why = (M_REDEFINE,
                       "no checkpoint owns it: libvirt reaches it through a redefined "
                       "checkpoint of that name, deleted at once")
        if not dry_run:
            dom.redefine_checkpoint(_minimal_checkpoint(name, disk.target))
            try:
                dom.delete_checkpoint(name)
            except Error:
                with contextlib.suppress(Error):
                    dom.delete_checkpoint(name, metadata_only=True)
                raise
    else:
        method, why = (M_QMP,
                       "the name is taken by a checkpoint that does not own this disk's "
                       "bitmap: libvirt's checkpoint API cannot reach it")
        if layer.read_only:
            raise OperationFailed(
                f"bitmap {name} in read-only layer {layer.info.filename}: {why}, and QEMU "
                "refuses block-dirty-bitmap-remove on a read-only node", method=M_QMP)
        if not dry_run:
            remove_bitmap_qmp(dom, layer.node, name)
    log.info("%s/%s: remove bitmap %s from %s via %s (%s)", dom.name, disk.target, name,
             layer.info.filename, method, why)
    return method, why


def _delete_checkpoint_live(dom: Domain, name: str) -> str:
    """Delete a checkpoint with its bitmaps; metadata only if libvirt finds no bitmap."""
    try:
        dom.delete_checkpoint(name)
        return "checkpoint and its bitmaps"
    except NotFound:
        return "already gone"
    except Error as e:
        # libvirt refuses ("bitmap ... not found in backing chain") when the
        # bitmap is already gone; the metadata must go anyway, or the next
        # backup would trust a checkpoint without a bitmap.
        log.warning("%s: deleting checkpoint %s with its bitmaps failed (%s); "
                    "deleting its metadata", dom.name, name, e)
        dom.delete_checkpoint(name, metadata_only=True)
        return "metadata only (bitmap already gone)"


def _layers_json(layers: Sequence[LiveLayer]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for lay in layers:
        docs = bm.bitmaps_json(lay.info)
        for d in docs:
            d["count"] = lay.counts.get(d["name"], 0)
        out[lay.info.filename] = docs
    return out


def _running_disk(conn: virt.Connection, domain: str, disk_name: str, step: str
                  ) -> tuple[Domain, Disk]:
    """The live forms need a running domain; a shut-off one takes the cold path."""
    dom = conn.domain(domain)
    if not dom.is_active():
        raise UsageError(f"domain {domain} is not running: use {step} without --domain",
                         domain=domain)
    return dom, _disk(dom, disk_name)


def _pre_merge_live(top: str, base: str, domain: str, disk_name: str, connect: str,
                    dry_run: bool) -> dict[str, Any]:
    with virt.connect(connect) as conn:
        dom, disk = _running_disk(conn, domain, disk_name, "pre-merge")
        layers = _slice(live_chain(dom, disk), top, base)
        actions = bm.plan_pre_merge([lay.info for lay in layers])
        checkpoints = dom.checkpoints()
        base_layer = layers[-1]
        removed: list[dict[str, Any]] = []
        unresolved: list[dict[str, Any]] = []
        for a in actions:
            # A checkpoint deletion or redefine+delete removes every copy: a later
            # action on the same name may find it gone already.
            if not dry_run:
                now = {b.name for b in _slice(live_chain(dom, disk), top, base)[-1].info.bitmaps}
                if a.name not in now:
                    continue
            try:
                method, why = _remove_live(dom, disk, base_layer, a.name, checkpoints, dry_run)
            except Error as e:
                unresolved.append(dict(a.to_json(), image=base, error=str(e)))
                continue
            removed.append(dict(a.to_json(), image=base, method=method, why=why))
            checkpoints = dom.checkpoints() if not dry_run else checkpoints
        after_layers = layers if dry_run else _slice(live_chain(dom, disk), top, base)
        result = {"domain": domain, "disk": disk_name, "top": top, "base": base,
                  "image": base, "dry_run": dry_run, "removed": removed, "added": [],
                  "merged": [], "bitmaps_after": _layers_json(after_layers)}
        if dry_run:
            return result
        # Re-read: every removed name gone from BASE, everything else still there and sound.
        damage = list(unresolved)
        gone = {r["name"] for r in removed}
        after_base = after_layers[-1].info
        for b in base_layer.info.bitmaps:
            got = after_base.bitmap(b.name)
            if b.name in gone and got is not None:
                damage.append({"image": base, "name": b.name, "kind": "not_removed",
                               "detail": "still in base after removal"})
            if b.name not in gone and b.name not in {u["name"] for u in unresolved} \
                    and got is None:
                damage.append({"image": base, "name": b.name, "kind": "missing",
                               "detail": "bitmap went missing"})
        for lay in after_layers:
            for b in lay.info.bitmaps:
                if b.in_use:
                    damage.append({"image": lay.info.filename, "name": b.name,
                                   "kind": bm.IN_USE, "detail": "inconsistent"})
        if damage:
            result["damage"] = damage
            raise BitmapLost(f"{domain}/{disk_name}: pre-merge left bitmap problems: "
                             + ", ".join(sorted({d['name'] for d in damage})), report=result)
        return result


def _device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _image_end(path: str) -> int:
    """Where the qcow2's highest allocated cluster ends (qemu-img check -U, read-only).

    Exit codes 0-3 all carry the JSON (2 and 3: errors or leaks found).
    """
    cp = subprocess.run(["qemu-img", "check", "-U", "--output=json", path],
                        capture_output=True, check=False)
    try:
        doc = json.loads(cp.stdout or b"{}")
    except ValueError:
        doc = {}
    if "image-end-offset" not in doc:
        raise OperationFailed(f"{path}: cannot read the image end offset: "
                              f"{cp.stderr.decode(errors='replace').strip()}")
    return int(doc["image-end-offset"])


def space_check(dom: Domain, layer: LiveLayer) -> dict[str, Any]:
    """Can ``layer`` store its persistent bitmaps when QEMU closes it?

    A block device (fixed-size volume): free = device size minus the end of
    the qcow2 (the larger of qemu-img check's image-end-offset and QEMU's
    wr_highest_offset on the protocol node).  A file: the filesystem's free
    space (statvfs).  Needed: ``bitmaps.bitmaps_store_size``.
    """
    path = layer.info.filename
    needed = bm.bitmaps_store_size(
        layer.info.virtual_size, layer.cluster_size,
        [(b.name, b.granularity, layer.counts.get(b.name, 0)) for b in layer.info.bitmaps])
    st = os.stat(path)
    doc: dict[str, Any] = {"image": path, "needed": needed}
    if stat.S_ISBLK(st.st_mode):
        size = _device_size(path)
        end = _image_end(path)
        if layer.file_node:
            end = max(end, node_write_offsets(dom).get(layer.file_node, 0))
        end = -(-end // layer.cluster_size) * layer.cluster_size
        doc.update(kind="block_device", device_size=size, image_end=end,
                   free=max(0, size - end))
    else:
        vfs = os.statvfs(path)
        doc.update(kind="file", free=vfs.f_bavail * vfs.f_frsize)
    doc["fits"] = doc["free"] >= needed
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


def _post_merge_live(top: str, base: str, domain: str, disk_name: str, connect: str,
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
        for cp in checkpoints:
            name = cp.disks[disk_name] or cp.name
            why = _bitmap_state(layers, name)
            if why is None and not space["fits"] and base_layer.info.bitmap(name) is not None:
                why = (f"{base_layer.info.filename} cannot store its bitmaps when QEMU closes "
                       f"it: needs {space['needed']} bytes, {space['free']} free; the bitmap "
                       "would be lost (left in-use) at the next shutdown, restart or migration")
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
                log.error("%s/%s: deleting checkpoint %s: %s (the next backup will be full)",
                          domain, disk_name, cp.name, why)
                entry["deleted"] = _delete_checkpoint_live(dom, cp.name)
            lost.append(entry)
        after = layers if dry_run else live_chain(dom, disk)
        result: dict[str, Any] = {
            "domain": domain, "disk": disk_name, "top": top, "base": base, "image": base,
            "dry_run": dry_run, "removed": [], "added": [], "merged": merged,
            "deleted_checkpoints": lost, "space": space,
            "chain": [lay.info.filename for lay in after],
            "bitmaps_after": _layers_json(after)}
        if lost:
            raise BitmapLost(
                f"{domain}/{disk_name}: {len(lost)} checkpoint(s) lost their bitmap after the "
                f"merge and were {'to be ' if dry_run else ''}deleted: "
                + ", ".join(e["checkpoint"] for e in lost)
                + "; the next backup will be full", report=result)
        return result


# --- hygiene check DOMAIN ---------------------------------------------------

LEFTOVER = "leftover_checkpoint"
NO_BITMAP = "checkpoint_without_bitmap"
BROKEN_CP = "checkpoint_bitmap_broken"
DRIFT = "chain_drift"


def _problem(kind: str, image: str, name: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "image": image, "name": name, "detail": detail, **extra}


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
            chain = bm.read_chain(d.path)
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
            if backup_op.owned(cp.name, owner) and cp.name != latest:
                why = ("left by an interrupted run: the latest backup uses "
                       f"{latest}" if latest else "the repository has no backup of this domain")
                problems.append(_problem(LEFTOVER, "", cp.name, why, checkpoint=cp.name))
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
                problems.append(_problem(
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
                problems.append(_problem(NO_BITMAP, active.filename, bname,
                                         f"checkpoint {cp.name}: bitmap missing from the "
                                         "active layer", checkpoint=cp.name, disk=target))
                delete.setdefault(cp.name, f"bitmap {bname} missing on {target}")
            elif bname not in usable or not b.recording:
                what = ("inconsistent" if b.in_use else "not recording" if not b.recording
                        else "broken in a lower layer")
                problems.append(_problem(BROKEN_CP, active.filename, bname,
                                         f"checkpoint {cp.name}: bitmap {what}",
                                         checkpoint=cp.name, disk=target))
                delete.setdefault(cp.name, f"bitmap {bname} on {target} is {what}")
        seen: set[tuple[str, str, str]] = set()
        for layer in v.chain:
            for b in sorted(layer.bitmaps, key=lambda b: b.name):
                if b.name not in owned:
                    problems.append(_problem(bm.ORPHAN, layer.filename, b.name,
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
    return backup_op.checkpoint_prefix(repo) if repo is not None else None


def _check_domain(domain: str, fix: bool, connect: str, repo: str | None, wait: float
                  ) -> dict[str, Any]:
    with virt.connect(connect) as conn, _domain_lock(repo, domain, wait) as r:
        dom = conn.domain(domain)
        running = dom.is_active()
        latest: str | None = None
        if r is not None:
            try:
                latest = r.get_manifest(domain, "latest").checkpoint
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
                    if running:
                        how = _delete_checkpoint_live(dom, name)
                    else:
                        backup_op.delete_checkpoint(dom, name, running=False)
                        how = "checkpoint and its bitmaps (cold)"
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
                    cold_actions.append(bm.Action("remove", layer.filename, name, why))
                    continue
                if (v.disk.target, name) in done:
                    continue
                try:
                    method, mwhy = _remove_live(dom, v.disk, v.live[i], name, checkpoints,
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
        bitmaps_after: dict[str, list[dict[str, Any]]] = {}
        for v in views:
            if v.live is not None:
                bitmaps_after.update(_layers_json(v.live))
            else:
                for layer in v.chain:
                    bitmaps_after[layer.filename] = bm.bitmaps_json(layer)
        result: dict[str, Any] = {
            "domain": domain, "running": running, "fix": fix, "image": None,
            "repository": repo if r is not None else None,
            "latest_backup_checkpoint": latest,
            "checkpoints": [cp.name for cp in checkpoints],
            "chains": [{"disk": v.disk.target, "chain": [la.filename for la in v.chain],
                        "metadata_chain": v.metadata} for v in views],
            "problems": problems, "remaining": remaining, "warnings": warnings,
            "deleted_checkpoints": deleted, "removed": removed, "added": [], "merged": [],
            "errors": errors, "bitmaps_after": bitmaps_after, "clean": not remaining,
        }
        if remaining or errors:
            kinds = sorted({p["kind"] for p in remaining} | ({"fix_failed"} if errors else set()))
            hint = "" if fix else "; --fix repairs what is safe"
            raise BitmapLost(f"{domain}: {len(remaining)} bitmap problem(s) "
                             f"({', '.join(kinds)}){hint}", report=result)
        return result
