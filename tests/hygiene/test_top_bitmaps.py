"""post-merge copies only usable TOP bitmaps, with their granularity, state and bits."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from backupkit.errors import EXIT_INTEGRITY, BitmapLost, ImageInUse, UsageError
from backupkit.ops import hygiene
from tests.hygiene.helpers import (
    MiB,
    add,
    bitmaps,
    commit,
    create,
    dirty,
    make_in_use,
    read_ok,
    write,
)

G128 = 128 * 1024
G256 = 256 * 1024


def chain(tmp_path: Path) -> tuple[str, str]:
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    create(base, 64 * MiB)
    add(base, "both", granularity=G128)
    add(base, "stale")
    add(base, "bad-in-top")
    write(base, 0x11, 0, 1 * MiB)
    create(top, backing=base)
    # These end in-use in TOP (as after a QEMU crash) ...
    add(top, "bad-in-top")
    add(top, "bad-top-only")
    make_in_use(top)
    # ... these are fine.
    add(top, "both", granularity=G128)
    add(top, "good", granularity=G128)
    add(top, "frozen", granularity=G256)
    write(top, 0x22, 8 * MiB, 1 * MiB)  # recorded by all three
    add(top, "late")                    # records only the next write
    add(top, "frozen-off", granularity=G256, disabled=True)  # records nothing
    write(top, 0x33, 16 * MiB, 1 * MiB)
    return top, base


def test_in_use_not_copied_granularity_and_state_kept(tmp_path: Path) -> None:
    top, base = chain(tmp_path)
    assert bitmaps(top)["bad-top-only"]["flags"] == ["auto", "in-use"]

    # Issue 25 item 5: TOP's in-use bitmaps are lost; said with exit 5, every copy
    # removed (TOP's first), after the stale bitmap was removed as well.
    with pytest.raises(BitmapLost) as e:
        hygiene.pre_merge(top, base)
    assert e.value.exit_code == EXIT_INTEGRITY
    pre = e.value.report
    assert {p["name"] for p in pre["lost"]} == {"bad-in-top", "bad-top-only"}
    assert "bad-in-top" in str(e.value) and "bad-top-only" in str(e.value)
    assert sorted((Path(r["image"]).stem, r["name"]) for r in pre["removed"]) == [
        ("base", "bad-in-top"), ("base", "stale"), ("top", "bad-in-top"),
        ("top", "bad-top-only")]
    assert "bad-in-top" not in bitmaps(top) and "bad-top-only" not in bitmaps(top)
    # The rerun finds a clean chain: nothing more lost, nothing removed.
    again = hygiene.pre_merge(top, base)
    assert again["removed"] == [] and again["lost"] == []
    assert commit(top, base).returncode == 0

    post = hygiene.post_merge(top, base)
    added = {a["name"]: (a["granularity"], a["recording"]) for a in post["added"]}
    assert added == {"good": (G128, True), "frozen": (G256, True), "late": (65536, True),
                     "frozen-off": (G256, False)}
    after = bitmaps(base)
    assert sorted(after) == ["both", "frozen", "frozen-off", "good", "late"]
    assert after["both"] == {"granularity": G128, "flags": ["auto"]}
    assert after["good"] == {"granularity": G128, "flags": ["auto"]}
    assert after["frozen"] == {"granularity": G256, "flags": ["auto"]}
    assert after["frozen-off"] == {"granularity": G256, "flags": []}
    assert "bad-top-only" not in after and "bad-in-top" not in after

    # The bits came across: exactly the writes each bitmap saw in TOP.
    assert dirty(base, "good") == [(8 * MiB, 1 * MiB), (16 * MiB, 1 * MiB)]
    assert dirty(base, "late") == [(16 * MiB, 1 * MiB)]
    assert dirty(base, "frozen-off") == []  # disabled from its creation: recorded nothing
    # "both" was kept: the commit's writes were recorded in BASE's copy.
    assert dirty(base, "both") == [(0, 1 * MiB), (8 * MiB, 1 * MiB), (16 * MiB, 1 * MiB)]
    assert read_ok(base, 0x22, 8 * MiB, 1 * MiB) and read_ok(base, 0x33, 16 * MiB, 1 * MiB)

    # Idempotent: nothing more to do, nothing changes.
    assert hygiene.pre_merge(top, base)["removed"] == []
    again = hygiene.post_merge(top, base)
    assert again["added"] == [] and again["merged"] == []
    assert bitmaps(base) == after


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    top, base = chain(tmp_path)
    before = (bitmaps(top), bitmaps(base))
    with pytest.raises(BitmapLost) as e:
        hygiene.pre_merge(top, base, dry_run=True)
    pre = e.value.report
    assert pre["dry_run"] and len(pre["removed"]) == 4
    assert sorted(b["name"] for b in pre["bitmaps_after"][base]) == ["both"]
    with pytest.raises(BitmapLost) as e:
        hygiene.post_merge(top, base, dry_run=True)
    post = e.value.report
    assert {a["name"] for a in post["added"]} == {"good", "frozen", "late", "frozen-off"}
    # bad-in-top is kept: BASE's sound copy records what a commit writes into it.
    assert {p["name"] for p in post["lost"]} == {"bad-top-only"}
    assert (bitmaps(top), bitmaps(base)) == before


def test_base_must_be_below_top(tmp_path: Path) -> None:
    top, base = chain(tmp_path)
    other = str(tmp_path / "other.qcow2")
    create(other, 64 * MiB)
    with pytest.raises(UsageError):
        hygiene.pre_merge(top, other)
    with pytest.raises(UsageError):
        hygiene.post_merge(base, top)  # reversed


def test_open_image_is_refused(
        tmp_path: Path, hold_open: Callable[[str], subprocess.Popen[bytes]]) -> None:
    top, base = chain(tmp_path)
    hold_open(top)
    with pytest.raises(ImageInUse) as e:
        hygiene.pre_merge(top, base)
    assert "use --domain" in str(e.value)
    with pytest.raises(ImageInUse):
        hygiene.check(images=[top])


def test_live_argument_errors(tmp_path: Path) -> None:
    """--domain and --disk go together; the live path is in tests/hygiene/test_live.py."""
    with pytest.raises(UsageError):
        hygiene.pre_merge("a", "b", domain="vm")
    with pytest.raises(UsageError):
        hygiene.post_merge("a", "b", disk="vda")
    with pytest.raises(UsageError):
        hygiene.check()
    with pytest.raises(UsageError):
        hygiene.check(images=["a"], domain="vm")
