"""hygiene check on real cold chains: what it reports, what --fix repairs, idempotence."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupkit.errors import EXIT_INTEGRITY, BitmapLost
from backupkit.ops import hygiene
from tests.hygiene.helpers import MiB, add, bitmaps, create, make_in_use


def three_layers(tmp_path: Path) -> tuple[str, str, str]:
    base, mid, top = (str(tmp_path / f"{n}.qcow2") for n in ("base", "mid", "top"))
    create(base, 64 * MiB)
    add(base, "good")          # in every layer: fine
    add(base, "orphan")        # only in base
    add(base, "hole")          # base and top, not mid
    add(base, "gran", granularity=128 * 1024)
    add(base, "broken")        # in-use copy in mid
    create(mid, backing=base)
    add(mid, "broken")
    make_in_use(mid)
    add(mid, "good")
    add(mid, "gran", granularity=128 * 1024)
    create(top, backing=mid)
    for name in ("good", "hole", "broken"):
        add(top, name)
    add(top, "gran", granularity=256 * 1024)
    add(top, "new")            # only in top: fine
    return top, mid, base


def problems(report: dict[str, object]) -> set[tuple[str, str, str]]:
    return {(p["kind"], Path(p["image"]).stem, p["name"])  # type: ignore[index]
            for p in report["remaining"]}  # type: ignore[attr-defined]


def test_check_reports_and_fix_repairs(tmp_path: Path) -> None:
    top, mid, base = three_layers(tmp_path)
    before = {p: bitmaps(p) for p in (top, mid, base)}

    with pytest.raises(BitmapLost) as e:
        hygiene.check(images=[top])
    assert e.value.exit_code == EXIT_INTEGRITY
    report = e.value.report
    assert report["chains"][0]["chain"][1:] == [mid, base]
    assert problems(report) == {
        ("in_use", "mid", "broken"),
        ("orphan", "base", "orphan"),
        ("missing_in_layer", "mid", "hole"),
        ("granularity_mismatch", "mid", "gran"),
        ("granularity_mismatch", "base", "gran"),
    }
    assert report["removed"] == []
    assert {p: bitmaps(p) for p in (top, mid, base)} == before  # report only

    # --fix removes every copy of unusable names; the granularity mismatch stays
    # (which copy is right is not ours to guess), so it still exits 5.
    with pytest.raises(BitmapLost) as e2:
        hygiene.check(images=[top], fix=True)
    fixed = e2.value.report
    assert {(Path(r["image"]).stem, r["name"]) for r in fixed["removed"]} == {
        ("base", "orphan"), ("base", "hole"), ("top", "hole"),
        ("base", "broken"), ("mid", "broken"), ("top", "broken")}
    assert problems(fixed) == {("granularity_mismatch", "mid", "gran"),
                               ("granularity_mismatch", "base", "gran")}
    assert sorted(bitmaps(top)) == ["good", "gran", "new"]
    assert sorted(bitmaps(mid)) == ["good", "gran"]
    assert sorted(bitmaps(base)) == ["gran", "good"] or sorted(bitmaps(base)) == [
        "good", "gran"]

    # Second --fix: nothing removed, same remaining report.
    with pytest.raises(BitmapLost) as e3:
        hygiene.check(images=[top], fix=True)
    assert e3.value.report["removed"] == []
    assert problems(e3.value.report) == problems(fixed)


def test_clean_chain(tmp_path: Path) -> None:
    base, top = str(tmp_path / "b.qcow2"), str(tmp_path / "t.qcow2")
    create(base, 64 * MiB)
    add(base, "c1")
    create(top, backing=base)
    add(top, "c1")
    add(top, "c2")
    result = hygiene.check(images=[top], fix=True)
    assert result["clean"] and result["removed"] == [] and result["problems"] == []
    assert result["image"] == top
    assert [b["name"] for b in result["bitmaps_after"][base]] == ["c1"]
    assert [b["name"] for b in result["bitmaps_after"][top]] == ["c1", "c2"]


def test_shared_base_keeps_bitmap_another_overlay_uses(tmp_path: Path) -> None:
    """A template shared by two overlays: an orphan from one is valid from the other."""
    base = str(tmp_path / "template.qcow2")
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    create(base, 64 * MiB)
    add(base, "used-by-b")
    create(a, backing=base)
    create(b, backing=base)
    add(b, "used-by-b")
    with pytest.raises(BitmapLost) as e:
        hygiene.check(images=[a, b], fix=True)
    assert e.value.report["removed"] == []
    assert "used-by-b" in bitmaps(base)
    assert hygiene.check(images=[b])["clean"]
