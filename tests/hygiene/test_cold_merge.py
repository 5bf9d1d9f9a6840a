"""The vdsm cold-merge reproducer (seeds/000) on real fixed-size volumes.

BASE is a 1 GiB qcow2 written straight onto a 128 MiB loop device (an LV in
vdsm's setup), so a commit really runs out of space.  TOP is a qcow2 on a
second 128 MiB loop device.  Measured on QEMU 7.2 with 126 MiB written into
TOP and 2 good bitmaps in both images plus 1 top-only:

* 0-2 stale bitmaps: the commit succeeds and keeps every bitmap;
* 4-11 stale bitmaps: ``qemu-img commit`` EXITS 0 and leaves the bitmaps in
  BASE in-use (lost) -- the silent failure;
* 12-32 stale bitmaps: the commit exits 1 ("Lost persistent bitmaps ...",
  "Block job failed: No space left on device") with every bitmap in-use.
* with the stale bitmaps pruned first (pre-merge), 32 stale bitmaps cause no
  failure.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from backupkit.errors import EXIT_INTEGRITY, BitmapLost
from backupkit.ops import hygiene
from tests.hygiene.helpers import GiB, MiB, add, bitmaps, commit, create, read_ok, write

pytestmark = [pytest.mark.root, pytest.mark.slow]

GOOD = ["good-bitmap-000", "good-bitmap-001"]
TOP_ONLY = "top-only"
WRITTEN = 126 * MiB
PATTERN = 0x42


def reproducer(loop_volume: Callable[[int], str], stale: int) -> tuple[str, str]:
    """seeds/000's setup: BASE (on a 128 MiB volume) with stale bitmaps, TOP over it."""
    base = loop_volume(128 * MiB)
    top = loop_volume(128 * MiB)
    create(base, GiB)
    for i in range(stale):
        add(base, f"stale-bitmap-{i:03d}")
    create(top, backing=base)
    for name in GOOD:
        add(base, name)
        add(top, name)
    add(top, TOP_ONLY)
    write(top, PATTERN, 0, WRITTEN)
    return top, base


def test_pre_merge_commit_post_merge_keeps_bitmaps(loop_volume: Callable[[int], str]) -> None:
    top, base = reproducer(loop_volume, stale=32)

    pre = hygiene.pre_merge(top, base)
    assert sorted(r["name"] for r in pre["removed"]) == [f"stale-bitmap-{i:03d}"
                                                         for i in range(32)]
    assert all(r["reason"] == "stale: not in top" for r in pre["removed"])
    assert pre["added"] == [] and pre["merged"] == []
    assert sorted(b["name"] for b in pre["bitmaps_after"][base]) == GOOD

    cp = commit(top, base)
    assert cp.returncode == 0, cp.stderr

    post = hygiene.post_merge(top, base)
    assert [a["name"] for a in post["added"]] == [TOP_ONLY]
    assert post["added"][0]["granularity"] == 65536
    assert [(m["name"], m["source"]) for m in post["merged"]] == [(TOP_ONLY, top)]
    assert post["removed"] == []

    after = bitmaps(base)
    assert sorted(after) == sorted([*GOOD, TOP_ONLY])
    assert all(b["flags"] == ["auto"] for b in after.values()), after
    assert post["bitmaps_after"][base] == [
        {"name": n, "granularity": 65536, "recording": True, "in_use": False}
        for n in sorted(after)]
    # The data committed into BASE is what was written into TOP.
    assert read_ok(base, PATTERN, 0, WRITTEN)
    assert read_ok(base, 0, WRITTEN, GiB - WRITTEN)

    # And the chain is clean; a second round changes nothing.
    assert hygiene.check(images=[top])["clean"]
    assert hygiene.pre_merge(top, base)["removed"] == []
    again = hygiene.post_merge(top, base)
    assert again["added"] == [] and again["merged"] == [] and again["removed"] == []
    assert bitmaps(base) == after
    fixed = hygiene.check(images=[top], fix=True)
    assert fixed["removed"] == [] and fixed["problems"] == []


def test_without_pre_merge_commit_fails_and_check_reports(
        loop_volume: Callable[[int], str]) -> None:
    top, base = reproducer(loop_volume, stale=32)

    cp = commit(top, base)
    assert cp.returncode == 1
    assert "Lost persistent bitmaps" in cp.stderr
    assert all("in-use" in b["flags"] for b in bitmaps(base).values())
    # (On this host the data commit itself is incomplete too: "Block job failed:
    # No space left on device".  TOP still holds the data: -d kept it.)
    assert read_ok(top, PATTERN, 0, WRITTEN)

    with pytest.raises(BitmapLost) as e:
        hygiene.check(images=[top])
    assert e.value.exit_code == EXIT_INTEGRITY
    report = e.value.report
    in_use = {p["name"] for p in report["remaining"]
              if p["kind"] == "in_use" and p["image"] == base}
    assert set(GOOD) <= in_use and len(in_use) == 34
    assert {p["name"] for p in report["remaining"] if p["kind"] == "orphan"} >= {
        "stale-bitmap-000"}

    # post-merge never rebuilds lost bitmaps from TOP alone (they would miss every
    # write older than TOP): it removes every copy of them (in-use ones are never
    # stored again, so that fits even on this full volume), carries TOP's sound
    # bitmap, and names the lost ones (exit 5).
    with pytest.raises(BitmapLost) as e2:
        hygiene.post_merge(top, base)
    assert {d["name"] for d in e2.value.report["lost"]} == set(GOOD)
    assert all(d["fits"] for d in e2.value.report["space"])
    assert sorted(bitmaps(base)) == [TOP_ONLY] and sorted(bitmaps(top)) == [TOP_ONLY]
    assert bitmaps(base)[TOP_ONLY]["flags"] == ["auto"]


def test_without_pre_merge_commit_exits_0_but_loses_bitmaps(
        loop_volume: Callable[[int], str]) -> None:
    """The silent case: 8 stale bitmaps, qemu-img commit exits 0, bitmaps are in-use."""
    top, base = reproducer(loop_volume, stale=8)

    cp = commit(top, base)
    assert cp.returncode == 0, cp.stderr
    lost = {n for n, b in bitmaps(base).items() if "in-use" in b["flags"]}
    assert set(GOOD) <= lost

    with pytest.raises(BitmapLost) as e2:
        hygiene.check(images=[base])
    assert {p["name"] for p in e2.value.report["remaining"]} >= set(GOOD)

    # post-merge removes every copy of the broken names in the whole chain
    # (TOP's copies included: alone they would claim changes they never saw),
    # carries TOP's sound bitmap, and names the lost ones (exit 5).
    with pytest.raises(BitmapLost) as e:
        hygiene.post_merge(top, base)
    assert e.value.exit_code == EXIT_INTEGRITY
    report = e.value.report
    assert {p["name"] for p in report["lost"]} == set(GOOD)
    assert [a["name"] for a in report["added"]] == [TOP_ONLY]
    assert sorted(bitmaps(top)) == [TOP_ONLY]
    assert sorted(bitmaps(base)) == [TOP_ONLY]
    assert all(b["flags"] == ["auto"] for b in bitmaps(base).values())
    # Rerun: nothing left to lose or carry; the chain is clean.
    again = hygiene.post_merge(top, base)
    assert again["lost"] == [] and again["added"] == [] and again["removed"] == []
    assert hygiene.check(images=[top], fix=True)["removed"] == []
