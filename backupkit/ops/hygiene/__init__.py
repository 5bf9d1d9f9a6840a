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
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from backupkit import bitmaps as bm
from backupkit import faults, proc, qemu, virt
from backupkit.errors import (
    BitmapLost,
    Error,
    LibvirtError,
    NoSpace,
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
    real = [a for a in actions if not a.name.startswith(bm.TMP_PREFIX)]
    return {
        "top": top,
        "base": base,
        "dry_run": dry_run,
        "removed": [a.to_json() for a in real if a.op == "remove"],
        "added": [a.to_json() for a in real if a.op == "add"],
        "merged": [a.to_json() for a in real if a.merges],
        "steps": [dict(a.to_json(), op=a.op) for a in actions],
        "bitmaps_after": after,
    }


def _check_image_arg(path: str, what: str) -> None:
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
               written_end: int = 0) -> dict[str, Any]:
    """Room the image at ``path`` has to grow.

    A block device (fixed-size volume): device size minus the end of the
    qcow2 (the larger of qemu-img check's image-end-offset and
    ``written_end``, QEMU's highest write).  A file: the filesystem's free
    space for unprivileged users (statvfs f_bavail).
    """
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        size = _device_size(path)
        end = max(qemu.image_end(path, fmt=fmt, force_share=force_share), written_end)
        end = -(-end // cluster_size) * cluster_size
        return {"kind": "block_device", "device_size": size, "image_end": end,
                "free": max(0, size - end)}
    vfs = os.statvfs(path)
    return {"kind": "file", "free": vfs.f_bavail * vfs.f_frsize}


def _cold_space(layers: Sequence[qemu.ImageInfo], actions: Sequence[bm.Action]
                ) -> list[dict[str, Any]]:
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
        doc.update(free_space(path, info.format, info.cluster_size, force_share=False))
        needed = bm.store_need(info.virtual_size, info.cluster_size, bitmaps,
                               free_inside=inside, is_file=doc["kind"] == "file")
        doc.update(predicted=needed, needed=needed, free_clusters_inside=inside,
                   fits=doc["free"] >= needed)
        docs.append(doc)
    return docs


def _cold_step(step: str, top: str, base: str, dry_run: bool, runner: proc.Runner | None
               ) -> dict[str, Any]:
    """pre-merge or post-merge on cold images: plan, check space, apply, verify, report."""
    _check_image_arg(top, "--top")
    _check_image_arg(base, "--base")
    layers = bm.slice_chain(top, base, runner=runner)
    if step == "pre-merge":
        actions, lost = bm.plan_pre_merge(layers)
    else:
        actions, lost = bm.plan_post_merge(layers)
    space = _cold_space(layers, actions) if actions else []
    lost_doc = [p.to_json() for p in lost]
    short = [d for d in space if not d["fits"]]
    if short and not dry_run:
        report = _result(top, base, actions, dry_run,
                         {layer.filename: bm.bitmaps_json(layer) for layer in layers})
        report.update(space=space, lost=lost_doc, changed=False)
        what = "; ".join(f"{d['image']}: {d['free']} bytes free, storing its bitmaps "
                         f"needs {d['needed']}" for d in short)
        if lost:
            raise BitmapLost(f"{step}: bitmaps lost ({', '.join(p.name for p in lost)}) and "
                             f"their copies cannot be removed: {what}", report=report)
        raise NoSpace(f"{step}: nothing changed: {what}; opening it read-write would leave "
                      "its bitmaps in-use (lost)", report=report)
    after = _run_plan(layers, actions, dry_run, runner)
    result = _result(top, base, actions, dry_run, after)
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
              runner: proc.Runner | None) -> dict[str, list[dict[str, Any]]]:
    """Apply (unless dry_run) and verify; return bitmaps_after of every layer changed."""
    top, base = layers[0], layers[-1]
    if dry_run or not actions:
        return {layer.filename: bm.predicted_bitmaps(layer, actions)
                for layer in layers if layer in (top, base)
                or any(a.image == layer.filename for a in actions)}
    touched = [layer for layer in layers if any(a.image == layer.filename for a in actions)]
    expected = {layer.filename: bm.expected_after(layer, actions) for layer in touched}
    failed = bm.apply(actions, runner=runner)
    report = {"top": top.filename, "base": base.filename,
              "planned": [dict(a.to_json(), op=a.op) for a in actions]}
    infos = bm.verify(expected, failed, report=report, runner=runner,
                      formats={layer.filename: layer.format for layer in touched},
                      before={layer.filename: {b.name for b in layer.bitmaps}
                              for layer in touched})
    after = {layer.filename: bm.bitmaps_json(infos.get(layer.filename, layer))
             for layer in layers if layer in (top, base) or layer.filename in infos}
    return after


def pre_merge(top: str, base: str, *, domain: str | None = None, disk: str | None = None,
              connect: str = DEFAULT_URI, dry_run: bool = False,
              runner: proc.Runner | None = None, repo: str | None = None,
              wait: float = 0.0) -> dict[str, Any]:
    """Before merging TOP into BASE: remove what TOP cannot carry on, and say what is lost.

    Removed from BASE: bitmaps missing from TOP (stale) or in-use.  A bitmap
    TOP holds that is broken in any layer down to BASE (in-use, or missing
    in a layer between: a hole) is lost: every copy is removed, TOP's first,
    and BitmapLost (exit 5) names it once everything else is done.  A BASE
    that cannot store bitmaps (raw, qcow2 compat=0.10) loses every bitmap of
    TOP in the merge: exit 5 now, nothing changed.  Stale bitmaps take space
    the merge needs; on a fixed-size BASE they make qemu-img commit lose every
    bitmap (HOST-FACTS, seeds/000).  Before BASE is opened read-write, its
    free space must hold its bitmaps (else NoSpace, exit 1, nothing changed).

    Live (``domain``/``disk``): the chain is QEMU's; each removal says which
    libvirt mechanism did it (``method``) and why.  With ``repo``, runs under
    the repository's lock of the domain (serialized with its backups).
    """
    if _live_args(domain, disk):
        assert domain is not None and disk is not None
        with _domain_lock(repo, domain, wait):
            return _pre_merge_live(top, base, domain, disk, connect, dry_run)
    return _cold_step("pre-merge", top, base, dry_run, runner)


def post_merge(top: str, base: str, *, domain: str | None = None, disk: str | None = None,
               connect: str = DEFAULT_URI, dry_run: bool = False,
               runner: proc.Runner | None = None, repo: str | None = None,
               wait: float = 0.0) -> dict[str, Any]:
    """After merging TOP into BASE: give BASE every usable bitmap only TOP had.

    Each is added with TOP's granularity and recording state and TOP's bits
    merged in, in one qemu-img run (a killed run leaves the name absent, never
    present without its bits; runs over several layers go through a temporary
    name, see ``bitmaps.plan_post_merge``).  Run it before TOP is deleted.  A
    bitmap TOP holds that is broken down to BASE (in-use anywhere, BASE's copy
    too when the merge ran out of space, or a hole) is lost: every copy is
    removed and BitmapLost (exit 5) names it; re-creating it from TOP alone
    would miss every write older than TOP.

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
    return _cold_step("post-merge", top, base, dry_run, runner)


def check(*, images: Sequence[str] = (), domain: str | None = None, fix: bool = False,
          connect: str = DEFAULT_URI, repo: str | None = None,
          runner: proc.Runner | None = None, wait: float = 0.0,
          passphrase: Any = None) -> dict[str, Any]:
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
    use (``passphrase``: where an encrypted repository's passphrase comes from).
    ``fix`` deletes those checkpoints and removes the orphans (through libvirt
    when running), then re-checks.
    """
    if domain is not None:
        if images:
            raise UsageError("give either a domain or --image, not both")
        return _check_domain(domain, fix, connect, repo, wait, passphrase)
    if not images:
        raise UsageError("hygiene check needs a domain or at least one --image")
    for path in images:
        _check_image_arg(path, "--image")

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
        space = _cold_space(list(touched.values()), all_actions)
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
def _domain_lock(repo: str | None, domain: str, wait: float, passphrase: Any = None
                 ) -> Iterator[Any]:
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
            r = Repository.open(repo, passphrase, lazy=True)  # only check reads from it
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
                method, why = _remove_live(dom, disk, layer, a.name, checkpoints, dry_run)
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
        result = {"domain": domain, "disk": disk_name, "top": top, "base": base,
                  "image": base, "dry_run": dry_run, "removed": removed, "added": [],
                  "merged": [], "lost": lost_doc, "bitmaps_after": _layers_json(after_layers)}
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
    written = (node_write_offsets(dom).get(layer.file_node, 0) if layer.file_node else 0)
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


def _check_domain(domain: str, fix: bool, connect: str, repo: str | None, wait: float,
                  passphrase: Any = None) -> dict[str, Any]:
    with virt.connect(connect) as conn, _domain_lock(repo, domain, wait, passphrase) as r:
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
                    cold_actions.append(bm.Action("remove", layer.filename, layer.format,
                                                  name, why))
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
