"""The report every hygiene step returns (and BitmapLost/NoSpace carry in ``report``).

One shape for the cold merge hooks, the live ones and both checks: what was
``removed``, ``added`` and ``merged``, and the ``bitmaps_after`` of every layer
looked at, plus the fields of each step (``top``/``base``, ``domain``,
``problems``...).  ``docs/checks.md`` describes the fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backupkit import bitmaps as bm
from backupkit.virt.blocks import LiveLayer

BitmapsAfter = dict[str, list[dict[str, Any]]]


def report(*, bitmaps_after: BitmapsAfter,
           removed: Sequence[dict[str, Any]] = (), added: Sequence[dict[str, Any]] = (),
           merged: Sequence[dict[str, Any]] = (), **fields: Any) -> dict[str, Any]:
    """A hygiene result: the step's own ``fields`` first, then the common ones."""
    return {**fields, "removed": list(removed), "added": list(added),
            "merged": list(merged), "bitmaps_after": bitmaps_after}


def merge_report(top: str, base: str, actions: Sequence[bm.Action], dry_run: bool,
                 after: BitmapsAfter) -> dict[str, Any]:
    """The report of a cold merge hook from its planned actions."""
    real = [a for a in actions if not a.name.startswith(bm.TMP_PREFIX)]
    return report(top=top, base=base, dry_run=dry_run,
                  removed=[a.to_json() for a in real if a.op == "remove"],
                  added=[a.to_json() for a in real if a.op == "add"],
                  merged=[a.to_json() for a in real if a.merges],
                  steps=[dict(a.to_json(), op=a.op) for a in actions],
                  bitmaps_after=after)


def problem(kind: str, image: str, name: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "image": image, "name": name, "detail": detail, **extra}


def layers_json(layers: Sequence[LiveLayer]) -> BitmapsAfter:
    """bitmaps_after of a running chain: with QEMU's dirty count of each bitmap."""
    out: BitmapsAfter = {}
    for lay in layers:
        docs = bm.bitmaps_json(lay.info)
        for d in docs:
            d["count"] = lay.counts.get(d["name"], 0)
        out[lay.info.filename] = docs
    return out
