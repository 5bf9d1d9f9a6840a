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
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from backupkit import faults, proc, qemu
from backupkit.errors import BitmapLost, CommandFailed, ImageInUse, OperationFailed, UsageError
from backupkit.fileio import same_image as same_image  # re-exported: bm.same_image

log = logging.getLogger("backupkit.bitmaps")

# Problem kinds (stable strings, part of the JSON output).
ORPHAN = "orphan"
IN_USE = "in_use"
HOLE = "missing_in_layer"
GRANULARITY = "granularity_mismatch"
CORRUPT = "corrupt_image"
LOST = "lost"

# A multi-layer carry in post-merge builds the bits under this name first and
# creates the real name from it in one qemu-img run (so a killed run never
# leaves the real name with part of its bits).  A leftover is removed by the
# next run; every other tool sees it as an orphan.
TMP_PREFIX = "backupkit-carry."


@dataclass(frozen=True)
class Action:
    """One change to one image (of format ``fmt``, from the chain's metadata).

    op: "remove" (drop ``name`` from ``image``), "add" (create ``name`` in
    ``image`` with ``granularity`` and ``recording`` state; with ``source``,
    merge the bits of ``source_name`` in that image in the same qemu-img run,
    so the name never exists on disk without its bits) or "merge" (OR the bits
    of ``source_name`` in ``source`` into ``name`` in ``image``).  ``source``
    None with an add: the source bitmap is in ``image`` itself.
    """

    op: str
    image: str
    fmt: str
    name: str
    reason: str
    granularity: int | None = None
    recording: bool = True
    source: str | None = None
    source_fmt: str | None = None
    source_name: str | None = None  # default: name

    @property
    def merges(self) -> bool:
        return self.op == "merge" or (self.op == "add" and self.source_name is not None)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"image": self.image, "name": self.name, "reason": self.reason}
        if self.op == "add":
            doc["granularity"] = self.granularity
            doc["recording"] = self.recording
        if self.merges:
            doc["source"] = self.source or self.image
            if (self.source_name or self.name) != self.name:
                doc["source_name"] = self.source_name
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
    miss data), upper layers first (see ``_remove_everywhere``).  Granularity
    mismatches are left alone.
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
            actions.append(Action("remove", layer.filename, layer.format, b.name, reason))
    return actions


def why_broken(layers: Sequence[qemu.ImageInfo], name: str) -> str:
    """Why ``name``, held by layers[0], is not usable over ``layers`` (one phrase)."""
    for layer in layers:
        b = layer.bitmap(name)
        if b is not None and b.in_use:
            return f"in-use in {layer.filename}: its contents cannot be trusted"
    for i, layer in enumerate(layers[1:], start=1):
        if layer.bitmap(name) is None and any(lo.bitmap(name) for lo in layers[i + 1:]):
            return (f"missing from {layer.filename} between copies: the writes made while "
                    "it was active are untracked")
    return "broken in the chain"


def _remove_everywhere(layers: Sequence[qemu.ImageInfo], name: str, reason: str
                       ) -> list[Action]:
    """Remove every copy of ``name``, upper layers first.

    The order is what keeps a killed run safe: once the upper copy is gone,
    what remains below is an orphan that every later run removes; were a
    lower copy removed first, the upper one could look usable on its own and
    be carried into BASE without the older writes.
    """
    return [Action("remove", layer.filename, layer.format, name, reason)
            for layer in layers if layer.bitmap(name) is not None]


def _no_bitmaps_reason(base: qemu.ImageInfo) -> str:
    what = (f"a {base.format} image" if base.format != "qcow2"
            else "a qcow2 version 2 (compat=0.10) image")
    return f"BASE {base.filename} is {what}, which cannot store bitmaps: the merge loses it"


def plan_pre_merge(layers: Sequence[qemu.ImageInfo]) -> tuple[list[Action], list[Problem]]:
    """Before committing layers[0] (TOP) into layers[-1] (BASE): (actions, lost).

    * A bitmap TOP holds that is not usable over TOP..BASE (in-use in any
      layer, or a hole) is lost: every copy is removed, TOP's first, and it
      is reported.  Keeping TOP's copy would let post-merge re-create it in
      BASE from TOP's bits alone, silently missing every older write.
    * BASE's other bitmaps that are not usable from TOP (missing from TOP,
      in-use) are removed from BASE: stale bitmaps take the space the merge
      needs (on a fixed-size BASE they make qemu-img commit lose every bitmap).
    * A BASE that cannot store bitmaps (raw, qcow2 compat=0.10): every bitmap
      TOP holds will be lost by the merge; reported now, nothing removed.
    """
    if len(layers) < 2:
        raise UsageError("pre-merge needs a TOP over a BASE")
    base = layers[-1]
    top = layers[0]
    usable = usable_names(layers)
    actions: list[Action] = []
    lost: list[Problem] = []
    for b in sorted(top.bitmaps, key=lambda b: b.name):
        if b.name in usable:
            continue
        why = why_broken(layers, b.name)
        lost.append(Problem(LOST, top.filename, b.name, why))
        actions += _remove_everywhere(layers, b.name, f"broken: {why}")
    for b in sorted(base.bitmaps, key=lambda b: b.name):
        if b.name in usable or top.bitmap(b.name) is not None:
            continue
        reason = ("in-use in base: contents cannot be trusted" if b.in_use
                  else "stale: not in top")
        actions.append(Action("remove", base.filename, base.format, b.name, reason))
    if not base.stores_bitmaps:
        lost += [Problem(LOST, top.filename, name, _no_bitmaps_reason(base))
                 for name in sorted(usable)]
    return actions, lost


def plan_post_merge(layers: Sequence[qemu.ImageInfo]) -> tuple[list[Action], list[Problem]]:
    """After committing layers[0] (TOP) into layers[-1] (BASE): (actions, lost).

    * Leftovers of an interrupted carry (``TMP_PREFIX``) are removed first.
    * A bitmap TOP holds is lost when BASE's copy is in-use (a commit that ran
      out of space), or when BASE has none and it is not usable from TOP
      (in-use, or a hole, in the layers above BASE): every copy is removed,
      TOP's first.  Other in-use copies in BASE are removed as well (they
      only take space).
    * Every bitmap usable from TOP whose run of layers does not reach BASE is
      carried: added to BASE with TOP's granularity and recording state, its
      bits merged in, in one qemu-img run (``Action.source``).  A run over
      several layers is first built under ``TMP_PREFIX + name`` (one run per
      layer) and the real name is created from it in one run; the temporary
      bitmap is removed last.
    * Bitmaps already in BASE are kept: the commit wrote TOP's data through
      BASE, so BASE's recording copies recorded it (``post_merge_warnings``
      names the disabled ones, which did not).

    Nothing is planned twice: a second run finds the bitmaps in BASE and plans
    nothing, so it writes nothing (a write to a full volume is exactly what
    loses bitmaps).
    """
    if len(layers) < 2:
        raise UsageError("post-merge needs a TOP over a BASE")
    base = layers[-1]
    top = layers[0]
    upper = layers[:-1]
    usable = usable_names(upper)
    actions: list[Action] = []
    lost: list[Problem] = []
    for b in sorted(base.bitmaps, key=lambda b: b.name):
        if b.name.startswith(TMP_PREFIX):
            actions.append(Action("remove", base.filename, base.format, b.name,
                                  "leftover of an interrupted post-merge"))
    for b in sorted(top.bitmaps, key=lambda b: b.name):
        kept = base.bitmap(b.name)
        if kept is not None and not kept.in_use:
            continue  # BASE's copy recorded the commit's writes: complete
        if kept is None and b.name in usable:
            continue  # carried below
        why = why_broken(upper if kept is None else layers, b.name)
        lost.append(Problem(LOST, top.filename, b.name, why))
        actions += _remove_everywhere(layers, b.name, f"broken: {why}")
    for b in sorted(base.bitmaps, key=lambda b: b.name):
        if b.in_use and top.bitmap(b.name) is None and not b.name.startswith(TMP_PREFIX):
            actions.append(Action("remove", base.filename, base.format, b.name,
                                  "in-use in base: contents cannot be trusted"))
    for name, depth in sorted(usable.items()):
        if base.bitmap(name) is not None:
            continue  # kept, or lost above
        t = top.bitmap(name)
        assert t is not None
        if not base.stores_bitmaps:
            lost.append(Problem(LOST, top.filename, name, _no_bitmaps_reason(base)))
            continue
        run = upper[:depth]
        if depth == 1:
            actions.append(Action("add", base.filename, base.format, name, "only in top",
                                  granularity=t.granularity, recording=t.recording,
                                  source=top.filename, source_fmt=top.format,
                                  source_name=name))
            continue
        tmp = TMP_PREFIX + name
        deepest = run[-1]
        actions.append(Action("add", base.filename, base.format, tmp,
                              f"temporary: collects {name} from {depth} layers",
                              granularity=t.granularity, recording=False,
                              source=deepest.filename, source_fmt=deepest.format,
                              source_name=name))
        for layer in reversed(run[:-1]):
            actions.append(Action("merge", base.filename, base.format, tmp,
                                  f"temporary: collects {name} from {depth} layers",
                                  source=layer.filename, source_fmt=layer.format,
                                  source_name=name))
        actions.append(Action("add", base.filename, base.format, name,
                              f"only in the {depth} layers above base",
                              granularity=t.granularity, recording=t.recording,
                              source_name=tmp))
        actions.append(Action("remove", base.filename, base.format, tmp, "temporary"))
    return actions, lost


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

# The format of an image named on the command line of the cold hooks (TOP,
# ``check --image``): only a qcow2 has both a backing file and bitmaps, so it
# must be one; it is never probed.  Lower layers take the format their upper
# layer records (``qemu.chain`` refuses a layer that records none).
TOP_FORMAT = "qcow2"


def _stderr(e: CommandFailed) -> str:
    return str(e.fields.get("stderr", ""))


def _raise_if_locked(e: CommandFailed, image: str) -> None:
    """qemu-img could not take the image's lock: ImageInUse (a running process holds it)."""
    text = _stderr(e).lower()
    if "failed to get" in text and "lock" in text:
        raise ImageInUse(_LOCKED, image=image, stderr=_stderr(e)) from e


def read_chain(path: str, *, fmt: str = TOP_FORMAT, runner: proc.Runner | None = None
               ) -> list[qemu.ImageInfo]:
    """The real backing chain of a cold image, active layer first (no -U: a lock is an error)."""
    try:
        return qemu.chain(path, fmt=fmt, force_share=False, runner=runner)
    except CommandFailed as e:
        _raise_if_locked(e, path)
        raise


def read_info(path: str, *, fmt: str, runner: proc.Runner | None = None) -> qemu.ImageInfo:
    try:
        return qemu.info(path, fmt=fmt, force_share=False, runner=runner)
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
    (merging into a bitmap that was not created makes no sense), and so does
    a failed step of a carry through ``TMP_PREFIX``: the steps not run are
    returned as failed with the same error.  The caller verifies the images
    afterwards, whatever happened here.  Fault point ``hygiene_step_N``
    fires before the N-th action (1-based; tests kill the run there).
    """
    failed: list[tuple[Action, CommandFailed]] = []
    skip: dict[tuple[str, str], CommandFailed] = {}
    for i, a in enumerate(actions, start=1):
        faults.point(f"hygiene_step_{i}")
        cause = skip.get((a.image, a.name)) or skip.get((a.image, a.source_name or ""))
        if cause is not None:
            failed.append((a, cause))  # not run: a step it depends on failed
            skip[(a.image, a.name)] = cause
            continue
        log.info("%s bitmap %s in %s (%s)", a.op, a.name, a.image, a.reason)
        try:
            if a.op == "remove":
                qemu.bitmap_remove(a.image, a.name, fmt=a.fmt, runner=runner)
            elif a.op == "add":
                qemu.bitmap_add(a.image, a.name, fmt=a.fmt, granularity=a.granularity,
                                disabled=not a.recording, merge_from=a.source_name,
                                source_file=a.source, source_fmt=a.source_fmt, runner=runner)
            elif a.op == "merge":
                qemu.bitmap_merge(a.image, a.name, a.source_name or a.name, fmt=a.fmt,
                                  source_file=a.source, source_fmt=a.source_fmt,
                                  runner=runner)
            else:
                raise ValueError(f"unknown action {a.op!r}")
        except CommandFailed as e:
            _raise_if_locked(e, a.image)
            log.error("%s bitmap %s in %s failed: %s", a.op, a.name, a.image, e)
            failed.append((a, e))
            skip[(a.image, a.name)] = e
    return failed


def verify(expected: dict[str, dict[str, qemu.Bitmap]],
           failed: Sequence[tuple[Action, CommandFailed]] = (), *,
           formats: dict[str, str], before: dict[str, set[str]] | None = None,
           report: dict[str, Any] | None = None, runner: proc.Runner | None = None
           ) -> dict[str, qemu.ImageInfo]:
    """Re-read every image and fail unless it holds what it should.

    ``expected`` maps an image to the bitmaps it must hold (``formats`` to its
    format, ``before`` to the names it held before the actions).  A bitmap
    in-use, one held before and not planned away but now missing, a wrong
    granularity, or a planned bitmap missing although qemu-img exited 0:
    BitmapLost (exit 5), whatever qemu-img's exit codes said.  Otherwise a
    failed action (qemu-img refused: read-only or immutable file, ...) left
    nothing lost: OperationFailed (exit 1), the hook can run again.  The
    report (with ``bitmaps_after`` and ``damage``) travels in the exception.
    """
    infos = {path: read_info(path, fmt=formats[path], runner=runner) for path in expected}
    failed_names = {(a.image, a.name) for a, _e in failed}
    damage: list[dict[str, Any]] = []
    for path, want in expected.items():
        info = infos[path]
        held = (before or {}).get(path, set())
        for b in info.bitmaps:
            if b.in_use:
                damage.append({"image": path, "name": b.name, "kind": IN_USE,
                               "detail": "bitmap left in-use (image out of space?)"})
        for name, w in sorted(want.items()):
            got = info.bitmap(name)
            if got is None:
                if name in held or (path, name) not in failed_names:
                    damage.append({"image": path, "name": name, "kind": "missing",
                                   "detail": "bitmap went missing"})
            elif got.granularity != w.granularity:
                damage.append({"image": path, "name": name, "kind": GRANULARITY,
                               "detail": f"granularity {got.granularity}, expected "
                                         f"{w.granularity}"})
    doc = dict(report or {})
    doc["bitmaps_after"] = {p: bitmaps_json(i) for p, i in infos.items()}
    if damage:
        doc["damage"] = damage + [{"image": a.image, "name": a.name, "kind": "command_failed",
                                   "detail": f"{a.op}: {e}"} for a, e in failed]
        names = ", ".join(sorted({f"{d['name']} ({d['kind']})" for d in damage}))
        raise BitmapLost(f"bitmaps damaged: {names}", report=doc)
    if failed:
        a, e = failed[0]
        doc["failed"] = [dict(f.to_json(), op=f.op, error=str(err)) for f, err in failed]
        raise OperationFailed(
            f"{a.image}: {a.op} bitmap {a.name} failed, nothing was lost (run again once "
            f"fixed): {_stderr(e) or e}", report=doc)
    return infos


# ---------------------------------------------------------------------------
# Space a qcow2 needs to store its bitmaps
# ---------------------------------------------------------------------------
#
# When QEMU closes a qcow2 it had open read-write (qemu-img bitmap, qemu-io, a
# domain's shutdown) it writes every persistent bitmap anew before it frees
# the old copies: per bitmap a table (8 bytes per data cluster, rounded up to
# whole clusters) and one data cluster for every cluster of bits that is not
# all zeros (an empty bitmap has no data cluster), then a new directory
# (24 bytes + name, 8-aligned, per bitmap, rounded up to clusters).  The new
# clusters come first from the free clusters inside the image (left by the
# previous store, or by anything freed), then from past the image's end.
#
# Measured on QEMU 7.2 (tests/hygiene/measure_space.py: bisection of the
# least free space with which a read-write open and close leaves no bitmap
# in-use; 64 KiB clusters; "dirty" = 64 KiB writes spread over the disk):
#
#   disk    bitmaps granularity dirty | past the end (block) | free on ext4 (file)
#   1 GiB      1      64 KiB      0   |   131,072 (2 cl.)    |   134,144
#   1 GiB      2      64 KiB      4   |   131,072 (2)        |   265,216
#   1 GiB      8      64 KiB     16   |   524,288 (8)        |   658,432
#   1 GiB     32      64 KiB     16   | 2,097,152 (32)       | 2,096,128
#   16 GiB     1      64 KiB      0   |   131,072 (2)        |   134,144
#   16 GiB     4      64 KiB     64   |   262,144 (4)        |   396,288
#   100 GiB    2      64 KiB    512   |   524,288 (8)        |   654,336
#   100 GiB    2       1 MiB     64   |   131,072 (2)        |   264,192
#   1 TiB      1      64 KiB     64   | 2,097,152 (32)       | 2,095,104
#
# Every block-device figure is exactly (new clusters - free clusters inside
# the image): e.g. 8 dirty bitmaps of 1 GiB write 8 tables + 8 data clusters
# + 1 directory = 17 clusters, 9 of which were free inside the image.  On a
# file, ext4 needed up to 2 clusters + 3 KiB more than that.  On tmpfs a
# domain's shutdown stored 2 dirty bitmaps of a 16 MiB disk (5 new clusters,
# none free inside) with 196,608 bytes free and lost both with 131,072: a
# file's filesystem allocates only the pages written (2 data clusters + a
# page per table and for the directory = 143,360).  ``store_need`` gives the
# prediction and, with ``low``, the least QEMU can need; nothing is a safety
# factor.


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def store_clusters(virtual_size: int, cluster_size: int,
                   bitmaps: Sequence[tuple[str, int, int | None]], *, low: bool = False
                   ) -> int:
    """Clusters QEMU allocates to store ``bitmaps`` [(name, granularity, dirty bytes or None)].

    Data clusters: every one (``None``: unknown, all may hold set bits), or at
    most one per dirty bit; with ``low``, the fewest the dirty bits can fill
    (all packed together; 0 for unknown counts).
    """
    if not bitmaps:
        return 0
    clusters = 0
    directory = 0
    for name, granularity, count in bitmaps:
        bits = -(-virtual_size // granularity)
        data_clusters = -(-bits // (8 * cluster_size))
        table = _round_up(data_clusters * 8, cluster_size) // cluster_size
        if count is None:
            dirty = 0 if low else data_clusters
        else:
            dirty_bits = -(-count // granularity)
            dirty = (-(-dirty_bits // (8 * cluster_size)) if low
                     else min(data_clusters, dirty_bits))
        clusters += table + dirty
        directory += _round_up(24 + len(name.encode()), 8)
    return clusters + _round_up(directory, cluster_size) // cluster_size


# Measured extra for an image in a file on ext4 (above): clusters + bytes.
FILE_EXTRA_CLUSTERS = 2
FILE_EXTRA_BYTES = 4096
# A file's filesystem allocates what QEMU writes, page by page: a table or a
# directory smaller than a cluster costs one page, not one cluster.
PAGE = 4096


def store_need(virtual_size: int, cluster_size: int,
               bitmaps: Sequence[tuple[str, int, int | None]], *, free_inside: int,
               is_file: bool, low: bool = False) -> int:
    """Bytes of free space (past the image's end, or on the file's filesystem) QEMU needs.

    Default: the prediction from the measurements above (every data cluster
    that may hold a set bit; on a file the ext4 extra).  ``low``: the least
    QEMU can need (dirty bits packed; on a file only the pages it writes, and
    every free cluster inside reused without a new page), below which storing
    certainly fails.
    """
    if not bitmaps:
        return 0
    if not (low and is_file):
        clusters = store_clusters(virtual_size, cluster_size, bitmaps, low=low)
        past = max(0, clusters - free_inside)
        if is_file:
            return (past + FILE_EXTRA_CLUSTERS) * cluster_size + FILE_EXTRA_BYTES
        return past * cluster_size
    written = 0
    directory = 0
    for name, granularity, count in bitmaps:
        bits = -(-virtual_size // granularity)
        data_clusters = -(-bits // (8 * cluster_size))
        dirty_bits = 0 if count is None else -(-count // granularity)
        dirty = -(-dirty_bits // (8 * cluster_size))
        written += _round_up(data_clusters * 8, PAGE) + dirty * cluster_size
        directory += _round_up(24 + len(name.encode()), 8)
    written += _round_up(directory, PAGE)
    return max(0, written - free_inside * cluster_size)


def free_clusters_inside(path: str) -> int:
    """Clusters with refcount 0 below the end of the qcow2 ``path``, read from its refcounts.

    Read from the file as it is on disk.  For an image a running QEMU has
    open, refcounts it has not flushed yet may count a cluster as free that
    is in use: the count can only be too high, which makes a prediction keep
    rather than delete.  0 when the layout is not understood (16-bit
    refcounts, version 3) or cannot be read.
    """
    import struct
    from array import array

    try:
        with open(path, "rb") as f:
            head = f.read(104)
            if len(head) < 104 or head[:4] != b"QFI\xfb":
                return 0
            version, = struct.unpack_from(">I", head, 4)
            cluster_bits, = struct.unpack_from(">I", head, 20)
            rt_offset, rt_clusters = struct.unpack_from(">QI", head, 48)
            order = struct.unpack_from(">I", head, 96)[0] if version >= 3 else 4
            if order != 4 or not 9 <= cluster_bits <= 21:
                return 0
            cs = 1 << cluster_bits
            f.seek(rt_offset)
            table = array("Q")
            table.frombytes(f.read(rt_clusters * cs))
            if sys.byteorder == "little":
                table.byteswap()
            while table and not table[-1]:
                table.pop()
            per_block = cs // 2
            counts: list[array[int]] = []
            for entry in table:
                off = entry & ~((1 << 9) - 1) & ((1 << 56) - 1)
                block = array("H")
                if off:
                    f.seek(off)
                    block.frombytes(f.read(cs))
                    if sys.byteorder == "little":
                        block.byteswap()
                else:
                    block = array("H", bytes(2 * per_block))
                counts.append(block)
    except (OSError, ValueError, struct.error):
        return 0
    flat = [c for block in counts for c in block]
    used = [i for i, c in enumerate(flat) if c]
    if not used:
        return 0
    end = used[-1] + 1
    return sum(1 for c in flat[:end] if c == 0)
