"""Chain-level dirty-bitmap logic: pure planning plus application through qemu-img.

Vocabulary.  A *chain* is a list of ``qemu.ImageInfo`` from the active layer
(index 0) down to the base (last).  A checkpoint bitmap is created in the layer
that is active at checkpoint time, and every later overlay carries a copy of it
(libvirt's external snapshots do, and so does our post-merge).  So a usable
bitmap NAME is present, not in-use, in a contiguous run of layers that starts
at the active layer.  Anything else cannot be used for an incremental backup
and only costs space:

* orphan:   NAME is in a lower layer but not in the active layer;
* in-use:   a copy was not stored cleanly (QEMU crashed, or the image ran out
            of space while closing it); its bits are untrustworthy;
* hole:     NAME is in the active layer and in some lower layer but missing
            from a layer in between: the writes made while that layer was
            active are not tracked, an incremental would silently miss them;
* granularity mismatch: the same NAME with different granularities in two
            layers: a name reused by a different checkpoint.  Reported, never
            fixed automatically (we cannot tell which copy is the real one).

The ``plan_*`` functions are pure: they take ``ImageInfo`` lists and return
``Action`` lists.  ``apply`` runs actions through qemu-img and ``verify``
re-reads the images afterwards: qemu-img can exit 0 and leave bitmaps in-use
when the image runs out of space (HOST-FACTS), so its exit code is never
trusted alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from backupkit import proc, qemu
from backupkit.errors import BitmapLost, CommandFailed, ImageInUse, UsageError

log = logging.getLogger("backupkit.bitmaps")

# Problem kinds (stable strings, part of the JSON output).
ORPHAN = "orphan"
IN_USE = "in_use"
HOLE = "missing_in_layer"
GRANULARITY = "granularity_mismatch"
CORRUPT = "corrupt_image"


@dataclass(frozen=True)
class Action:
    """One change to one image.

    op: "remove" (drop ``name`` from ``image``), "add" (create ``name`` in
    ``image`` with ``granularity`` and ``recording`` state) or "merge" (OR the
    bits of ``name`` in ``source`` into ``name`` in ``image``).
    """

    op: str
    image: str
    name: str
    reason: str
    granularity: int | None = None
    recording: bool = True
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"image": self.image, "name": self.name, "reason": self.reason}
        if self.op == "add":
            doc["granularity"] = self.granularity
            doc["recording"] = self.recording
        if self.op == "merge":
            doc["source"] = self.source
        return doc


@dataclass(frozen=True)
class Problem:
    kind: str
    image: str
    name: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "image": self.image, "name": self.name,
                "detail": self.detail}


def bitmap_json(b: qemu.Bitmap) -> dict[str, Any]:
    return {"name": b.name, "granularity": b.granularity, "recording": b.recording,
            "in_use": b.in_use}


def bitmaps_json(info: qemu.ImageInfo) -> list[dict[str, Any]]:
    return [bitmap_json(b) for b in sorted(info.bitmaps, key=lambda b: b.name)]


def same_image(a: str, b: str) -> bool:
    """Whether two paths name the same image (files, symlinks, block devices)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    if sa.st_rdev and sb.st_rdev:  # block devices: same device number
        return sa.st_rdev == sb.st_rdev
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# ---------------------------------------------------------------------------
# Pure analysis and planning
# ---------------------------------------------------------------------------


def usable_names(layers: Sequence[qemu.ImageInfo]) -> dict[str, int]:
    """Names usable from the top of ``layers``: name -> number of layers holding it.

    A name is usable when it is present and not in-use in layers[0..n-1]
    (a contiguous run from the top) and absent from every layer below that
    run.  ``layers`` runs from the active (top) layer downwards.
    """
    result: dict[str, int] = {}
    if not layers:
        return result
    for b in layers[0].bitmaps:
        if b.in_use:
            continue
        depth = 1
        while depth < len(layers):
            lower = layers[depth].bitmap(b.name)
            if lower is None:
                break
            if lower.in_use:
                depth = -1
                break
            depth += 1
        if depth < 0:
            continue
        # Below the run, the name must not appear again (that is a hole).
        if any(layer.bitmap(b.name) is not None for layer in layers[depth:]):
            continue
        result[b.name] = depth
    return result


def analyse_chain(chain: Sequence[qemu.ImageInfo]) -> list[Problem]:
    """Every problem of a chain (active layer first), in a stable order."""
    problems: list[Problem] = []
    if not chain:
        return problems
    active = chain[0]
    for layer in chain:
        if layer.corrupt:
            problems.append(Problem(CORRUPT, layer.filename, "",
                                    "qcow2 image is marked corrupt; run qemu-img check"))
        for b in sorted(layer.bitmaps, key=lambda b: b.name):
            if b.in_use:
                problems.append(Problem(
                    IN_USE, layer.filename, b.name,
                    "bitmap is in-use (not stored cleanly): its contents cannot be trusted"))
    for depth, layer in enumerate(chain[1:], start=1):
        for b in sorted(layer.bitmaps, key=lambda b: b.name):
            if active.bitmap(b.name) is None:
                problems.append(Problem(
                    ORPHAN, layer.filename, b.name,
                    f"bitmap is not in the active layer {active.filename}: "
                    "it can never be used and only takes space"))
                continue
            # Present in the active layer and here: every layer between must hold it.
            for mid in chain[1:depth]:
                if mid.bitmap(b.name) is None:
                    problems.append(Problem(
                        HOLE, mid.filename, b.name,
                        f"bitmap is in {active.filename} and in {layer.filename} but not "
                        "in this layer: writes made while it was active are untracked"))
            ref = active.bitmap(b.name)
            if ref is not None and ref.granularity != b.granularity:
                problems.append(Problem(
                    GRANULARITY, layer.filename, b.name,
                    f"granularity {b.granularity} here but {ref.granularity} in the "
                    f"active layer {active.filename}"))
    # A hole is found once per lower copy below it; report each (layer, name) once.
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for p in problems:
        key = (p.kind, p.image, p.name)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def plan_fix(chain: Sequence[qemu.ImageInfo]) -> list[Action]:
    """Safe repairs of a chain: remove every copy of a bitmap that cannot be used.

    Orphans, in-use copies and names with a hole or an in-use copy anywhere in
    the chain are removed from every layer holding them (a broken name must
    not survive in part: an incremental based on the remaining copies would
    miss data).  Granularity mismatches are left alone.
    """
    usable = usable_names(chain)
    actions: list[Action] = []
    if not chain:
        return actions
    active = chain[0]
    for layer in chain:
        for b in sorted(layer.bitmaps, key=lambda b: b.name):
            if b.name in usable:
                continue
            if b.in_use:
                reason = "in-use: contents cannot be trusted"
            elif active.bitmap(b.name) is None:
                reason = f"orphan: not in the active layer {active.filename}"
            else:
                reason = "broken chain: in-use or missing in another layer"
            actions.append(Action("remove", layer.filename, b.name, reason))
    return actions


def plan_pre_merge(layers: Sequence[qemu.ImageInfo]) -> list[Action]:
    """Before committing layers[0] (TOP) into layers[-1] (BASE).

    Remove from BASE every bitmap that is not usable from TOP: missing from
    TOP (stale), in-use in TOP, BASE or a layer between, or with a hole
    between them.  TOP and the layers between are not changed.
    """
    if len(layers) < 2:
        raise UsageError("pre-merge needs a TOP over a BASE")
    base = layers[-1]
    top = layers[0]
    usable = usable_names(layers)
    actions = []
    for b in sorted(base.bitmaps, key=lambda b: b.name):
        if b.name in usable:
            continue
        t = top.bitmap(b.name)
        if b.in_use:
            reason = "in-use in base: contents cannot be trusted"
        elif t is None:
            reason = "stale: not in top"
        elif t.in_use:
            reason = "in-use in top: contents cannot be trusted"
        else:
            reason = "broken chain: in-use or missing in a layer between top and base"
        actions.append(Action("remove", base.filename, b.name, reason))
    return actions


def plan_post_merge(layers: Sequence[qemu.ImageInfo]) -> list[Action]:
    """After committing layers[0] (TOP) into layers[-1] (BASE).

    For every bitmap usable from TOP whose run of layers does not reach BASE:
    add it to BASE with TOP's granularity and recording state, then merge the
    bits of every layer of the run into it.  Bitmaps already in BASE are kept
    as they are: the commit wrote TOP's data through BASE, so BASE's recording
    copies recorded it (``post_merge_warnings`` names the disabled ones, which
    did not).  Nothing is planned twice: a second run finds the bitmaps in
    BASE and plans nothing, so it writes nothing (a write to a full volume is
    exactly what loses bitmaps).  In-use bitmaps in BASE are not planned for:
    ``post_merge_damage`` reports them first.
    """
    if len(layers) < 2:
        raise UsageError("post-merge needs a TOP over a BASE")
    base = layers[-1]
    top = layers[0]
    upper = layers[:-1]
    actions: list[Action] = []
    for name, depth in sorted(usable_names(upper).items()):
        if base.bitmap(name) is not None:
            continue
        t = top.bitmap(name)
        assert t is not None
        actions.append(Action("add", base.filename, name, "only in top",
                              granularity=t.granularity, recording=t.recording))
        # Oldest layer first: order does not matter for OR, it reads naturally.
        for layer in reversed(upper[:depth]):
            actions.append(Action("merge", base.filename, name, "copy top's bits",
                                  source=layer.filename))
    return actions


def post_merge_warnings(layers: Sequence[qemu.ImageInfo]) -> list[Problem]:
    """Bitmaps kept in BASE that are disabled there but recording in TOP.

    The commit's writes were recorded by TOP's copy and not by BASE's: an
    incremental from that checkpoint would miss them.  Such a state mismatch
    is not made by libvirt or by us; report it rather than guess.
    """
    base, top = layers[-1], layers[0]
    result = []
    for b in sorted(base.bitmaps, key=lambda b: b.name):
        t = top.bitmap(b.name)
        if t is not None and t.recording and not b.recording and not b.in_use:
            result.append(Problem("disabled_in_base", base.filename, b.name,
                                  "disabled in base but recording in top: the merged "
                                  "writes were not recorded in base"))
    return result


def post_merge_damage(layers: Sequence[qemu.ImageInfo]) -> list[Problem]:
    """Bitmaps of BASE that the merge damaged (in-use), found before post-merge acts.

    After a commit into a base that ran out of space, qemu-img leaves base's
    bitmaps in-use and may exit 0.  Re-creating such a name from TOP alone
    would give a bitmap that misses every write made before TOP existed, so
    post-merge refuses and reports instead.
    """
    base = layers[-1]
    return [Problem(IN_USE, base.filename, b.name,
                    "in-use in base after the merge: the merge lost this bitmap")
            for b in sorted(base.bitmaps, key=lambda b: b.name) if b.in_use]


def expected_after(info: qemu.ImageInfo, actions: Iterable[Action]) -> dict[str, qemu.Bitmap]:
    """The bitmaps ``info`` must hold, none in-use, once ``actions`` are applied."""
    result = {b.name: b for b in info.bitmaps}
    for a in actions:
        if a.image != info.filename:
            continue
        if a.op == "remove":
            result.pop(a.name, None)
        elif a.op == "add":
            result[a.name] = qemu.Bitmap(a.name, a.granularity or 65536, a.recording, False)
    return result


def predicted_bitmaps(info: qemu.ImageInfo, actions: Iterable[Action]) -> list[dict[str, Any]]:
    after = expected_after(info, actions)
    return [bitmap_json(after[n]) for n in sorted(after)]


# ---------------------------------------------------------------------------
# Reading and changing images (qemu-img, cold: no -U)
# ---------------------------------------------------------------------------

_LOCKED = "image is in use by a running process; use --domain"


def _stderr(e: CommandFailed) -> str:
    return str(e.fields.get("stderr", ""))


def _raise_if_locked(e: CommandFailed, image: str) -> None:
    """qemu-img could not take the image's lock: ImageInUse (a running process holds it)."""
    text = _stderr(e).lower()
    if "failed to get" in text and "lock" in text:
        raise ImageInUse(_LOCKED, image=image, stderr=_stderr(e)) from e


def read_chain(path: str, *, runner: proc.Runner | None = None) -> list[qemu.ImageInfo]:
    """The real backing chain of a cold image, active layer first (no -U: a lock is an error)."""
    try:
        return qemu.chain(path, force_share=False, runner=runner)
    except CommandFailed as e:
        _raise_if_locked(e, path)
        raise


def read_info(path: str, *, runner: proc.Runner | None = None) -> qemu.ImageInfo:
    try:
        return qemu.info(path, force_share=False, runner=runner)
    except CommandFailed as e:
        _raise_if_locked(e, path)
        raise


def slice_chain(top: str, base: str, *, runner: proc.Runner | None = None
                ) -> list[qemu.ImageInfo]:
    """TOP's chain down to and including BASE; UsageError if BASE is not below TOP."""
    chain = read_chain(top, runner=runner)
    for i, layer in enumerate(chain[1:], start=1):
        if same_image(layer.filename, base):
            # Report paths as the caller gave them for the two ends.
            layers = list(chain[: i + 1])
            layers[0] = renamed(layers[0], top)
            layers[-1] = renamed(layers[-1], base)
            return layers
    raise UsageError(f"{base} is not in the backing chain of {top} "
                     f"(chain: {', '.join(layer.filename for layer in chain)})",
                     top=top, base=base)


def renamed(info: qemu.ImageInfo, path: str) -> qemu.ImageInfo:
    """info reported under the path the caller used (qemu-img may print another)."""
    return replace(info, filename=path)


def apply(actions: Sequence[Action], *, runner: proc.Runner | None = None
          ) -> list[tuple[Action, CommandFailed]]:
    """Run actions in order through qemu-img; return the ones that failed.

    A failed add or merge stops the work on that bitmap name in that image
    (merging into a bitmap that was not created makes no sense); the caller
    verifies the images afterwards, whatever happened here.
    """
    failed: list[tuple[Action, CommandFailed]] = []
    skip: set[tuple[str, str]] = set()
    for a in actions:
        if (a.image, a.name) in skip:
            continue
        log.info("%s bitmap %s in %s (%s)", a.op, a.name, a.image, a.reason)
        try:
            if a.op == "remove":
                qemu.bitmap_remove(a.image, a.name, runner=runner)
            elif a.op == "add":
                qemu.bitmap_add(a.image, a.name, granularity=a.granularity,
                                disabled=not a.recording, runner=runner)
            elif a.op == "merge":
                qemu.bitmap_merge(a.image, a.name, a.name, source_file=a.source, runner=runner)
            else:
                raise ValueError(f"unknown action {a.op!r}")
        except CommandFailed as e:
            _raise_if_locked(e, a.image)
            log.error("%s bitmap %s in %s failed: %s", a.op, a.name, a.image, e)
            failed.append((a, e))
            skip.add((a.image, a.name))
    return failed


def verify(expected: dict[str, dict[str, qemu.Bitmap]],
           failed: Sequence[tuple[Action, CommandFailed]] = (), *,
           report: dict[str, Any] | None = None, runner: proc.Runner | None = None
           ) -> dict[str, qemu.ImageInfo]:
    """Re-read every image and fail with BitmapLost unless it holds what it should.

    ``expected`` maps an image to the bitmaps it must hold.  Any bitmap in-use,
    any expected bitmap missing or with another granularity, or any failed
    action is a failure (exit 5), whatever qemu-img's exit codes said.  The
    report (with ``bitmaps_after`` and ``damage``) travels in the exception.
    """
    infos = {path: read_info(path, runner=runner) for path in expected}
    damage: list[dict[str, Any]] = []
    for path, want in expected.items():
        info = infos[path]
        for b in info.bitmaps:
            if b.in_use:
                damage.append({"image": path, "name": b.name, "kind": IN_USE,
                               "detail": "bitmap left in-use (image out of space?)"})
        for name, w in sorted(want.items()):
            got = info.bitmap(name)
            if got is None:
                damage.append({"image": path, "name": name, "kind": "missing",
                               "detail": "bitmap went missing"})
            elif got.granularity != w.granularity:
                damage.append({"image": path, "name": name, "kind": GRANULARITY,
                               "detail": f"granularity {got.granularity}, expected "
                                         f"{w.granularity}"})
    for a, e in failed:
        damage.append({"image": a.image, "name": a.name, "kind": "command_failed",
                       "detail": f"{a.op}: {e}"})
    if damage:
        doc = dict(report or {})
        doc["bitmaps_after"] = {p: bitmaps_json(i) for p, i in infos.items()}
        doc["damage"] = damage
        names = ", ".join(sorted({f"{d['name']} ({d['kind']})" for d in damage}))
        raise BitmapLost(f"bitmaps damaged: {names}", report=doc)
    return infos


# ---------------------------------------------------------------------------
# Space a qcow2 needs to store its bitmaps (pure)
# ---------------------------------------------------------------------------


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def bitmaps_store_size(virtual_size: int, cluster_size: int,
                       bitmaps: Sequence[tuple[str, int, int]]) -> int:
    """Bytes QEMU must allocate to store ``bitmaps`` [(name, granularity, dirty count)].

    When QEMU closes an image it had open read-write, it writes every
    persistent bitmap anew (new data clusters and a new bitmap table) before
    it frees the old ones, then rewrites the bitmap directory.  Per bitmap:
    ceil(virtual_size / granularity / 8) bytes of data rounded up to clusters
    plus its table (8 bytes per data cluster, rounded up to clusters), plus
    the directory (24 bytes + name, 8-aligned, per bitmap, rounded up to
    clusters) and a margin of two clusters for refcount blocks.  Data clusters
    are counted even for empty bitmaps (dirty count 0): measured, 32 empty
    bitmaps of a 1 GiB image take two clusters each, and with that the
    estimate matches HOST-FACTS' window on a 128 MiB volume (118 MiB merged:
    kept, 120 MiB: lost).  The dirty count is accepted for later refinement.
    """
    if not bitmaps:
        return 0
    total = 0
    directory = 0
    for name, granularity, count in bitmaps:
        bits = -(-virtual_size // granularity)
        data = -(-bits // 8)
        data_clusters = -(-data // cluster_size)
        table = _round_up(data_clusters * 8, cluster_size)
        del count
        total += table + data_clusters * cluster_size
        directory += _round_up(24 + len(name.encode()), 8)
    total += _round_up(directory, cluster_size)
    return total + 2 * cluster_size
