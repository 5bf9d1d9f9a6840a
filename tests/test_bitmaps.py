"""Pure bitmap planning: chains of qemu.ImageInfo in, actions and problems out."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest

from backupkit import bitmaps as bm
from backupkit import qemu
from backupkit.errors import BitmapLost, CommandFailed, ImageInUse, OperationFailed, UsageError


def B(name: str, g: int = 65536, rec: bool = True, in_use: bool = False) -> qemu.Bitmap:
    return qemu.Bitmap(name, g, rec, in_use)


def img(path: str, *bitmaps: qemu.Bitmap) -> qemu.ImageInfo:
    return qemu.ImageInfo(path, "qcow2", 1 << 30, 0, bitmaps=tuple(bitmaps))


def names(actions: list[bm.Action], op: str) -> list[tuple[str, str]]:
    return [(a.image, a.name) for a in actions if a.op == op]


def test_usable_names() -> None:
    chain = [img("top", B("a"), B("b"), B("c", in_use=True), B("d"), B("new")),
             img("mid", B("a"), B("c"), B("d", in_use=True)),
             img("base", B("a"), B("b"), B("orphan"))]
    # b has a hole in mid; c is in-use in top; d in-use in mid.
    assert bm.usable_names(chain) == {"a": 3, "new": 1}
    assert bm.usable_names([]) == {}


def test_pre_merge_removes_stale_from_base_and_every_copy_of_broken_names() -> None:
    top = img("top", B("good"), B("bad-top", in_use=True), B("only-top"))
    base = img("base", B("good"), B("stale"), B("bad-top"), B("bad-base", in_use=True))
    actions, lost = bm.plan_pre_merge([top, base])
    assert [(a.image, a.name) for a in actions] == [
        ("top", "bad-top"), ("base", "bad-top"),      # TOP's copy first
        ("base", "bad-base"), ("base", "stale")]
    assert all(a.op == "remove" and a.fmt == "qcow2" for a in actions)
    assert [(p.kind, p.name) for p in lost] == [("lost", "bad-top")]
    assert "in-use in top" in lost[0].detail
    # Once applied, nothing left to do and nothing more is lost.
    after_top = img("top", B("good"), B("only-top"))
    assert bm.plan_pre_merge([after_top, img("base", B("good"))]) == ([], [])
    with pytest.raises(UsageError):
        bm.plan_pre_merge([top])


def test_pre_merge_hole_or_in_use_below_top_loses_the_name_everywhere() -> None:
    """Issue 25 item 1: a name broken below TOP must not survive in TOP."""
    top = img("top", B("hole"), B("iu"))
    mid = img("mid", B("iu", in_use=True))
    base = img("base", B("hole"), B("iu"))
    actions, lost = bm.plan_pre_merge([top, mid, base])
    assert [(a.image, a.name) for a in actions] == [
        ("top", "hole"), ("base", "hole"), ("top", "iu"), ("mid", "iu"), ("base", "iu")]
    assert {p.name for p in lost} == {"hole", "iu"}
    # Post-merge (had pre-merge not run): BASE's copies recorded every write the
    # commit made, so they are kept; a name BASE lacks is carried only when TOP's
    # run is sound.
    assert bm.plan_post_merge([top, mid, base]) == ([], [])
    actions, lost = bm.plan_post_merge([top, mid, img("base")])
    assert [(a.op, a.image, a.name) for a in actions] == [
        ("remove", "top", "iu"), ("remove", "mid", "iu"), ("add", "base", "hole")]
    assert [p.name for p in lost] == ["iu"]
    carry, _ = bm.plan_post_merge([top, img("mid"), img("base")])
    assert {a.name for a in carry} == {"hole", "iu"}


def test_base_that_cannot_store_bitmaps_loses_every_top_bitmap() -> None:
    top = img("top", B("a"), B("b"))
    raw = qemu.ImageInfo("base", "raw", 1 << 30, 0)
    v2 = qemu.ImageInfo("base", "qcow2", 1 << 30, 0, compat="0.10")
    for base in (raw, v2):
        actions, lost = bm.plan_pre_merge([top, base])
        assert actions == [] and [p.name for p in lost] == ["a", "b"]
        assert "cannot store bitmaps" in lost[0].detail
        actions, lost = bm.plan_post_merge([top, base])
        assert actions == [] and [p.name for p in lost] == ["a", "b"]


def test_post_merge_adds_only_usable_top_only_bitmaps_with_state() -> None:
    top = img("top", B("both"), B("g", g=131072), B("off", rec=False),
              B("bad", in_use=True))
    base = img("base", B("both"))
    actions, lost = bm.plan_post_merge([top, base])
    adds = {a.name: (a.granularity, a.recording, a.source, a.source_name)
            for a in actions if a.op == "add"}
    # Added and merged in one qemu-img run each.
    assert adds == {"g": (131072, True, "top", "g"), "off": (65536, False, "top", "off")}
    assert [a.name for a in actions if a.op == "remove"] == ["bad"]
    assert [p.name for p in lost] == ["bad"]
    done = img("base", B("both"), B("g", g=131072), B("off", rec=False))
    assert bm.plan_post_merge([img("top", B("both"), B("g", g=131072), B("off", rec=False)),
                               done]) == ([], [])


def test_post_merge_over_several_layers_goes_through_a_temporary_name() -> None:
    top, mid = img("top", B("x")), img("mid", B("x"))
    actions, lost = bm.plan_post_merge([top, mid, img("base")])
    tmp = bm.TMP_PREFIX + "x"
    assert lost == []
    assert [(a.op, a.name, a.source, a.source_name) for a in actions] == [
        ("add", tmp, "mid", "x"), ("merge", tmp, "top", "x"),
        ("add", "x", None, tmp), ("remove", tmp, None, None)]
    # A rerun after a kill: leftovers go first, then the carry starts over.
    left = img("base", B(tmp, rec=False))
    actions, _ = bm.plan_post_merge([top, mid, left])
    assert [(a.op, a.name) for a in actions][:2] == [("remove", tmp), ("add", tmp)]
    # Killed after the real name was made: only the leftover goes.
    made = img("base", B("x"), B(tmp, rec=False))
    actions, _ = bm.plan_post_merge([top, mid, made])
    assert [(a.op, a.name) for a in actions] == [("remove", tmp)]


def test_post_merge_in_use_in_base_is_lost_everywhere_and_warnings() -> None:
    top = img("top", B("a"), B("b"))
    base = img("base", B("a", in_use=True), B("b", rec=False))
    actions, lost = bm.plan_post_merge([top, base])
    assert [(a.image, a.name) for a in actions] == [("top", "a"), ("base", "a")]
    assert [p.name for p in lost] == ["a"]
    assert [p.kind for p in bm.post_merge_warnings([top, base])] == ["disabled_in_base"]


def test_analyse_and_fix() -> None:
    chain = [img("top", B("ok"), B("hole"), B("g", g=131072), B("iu", in_use=True)),
             img("mid", B("ok"), B("g")),
             img("base", B("ok"), B("hole"), B("orphan"), B("iu"))]
    kinds = {(p.kind, p.image, p.name) for p in bm.analyse_chain(chain)}
    assert kinds == {("in_use", "top", "iu"), ("missing_in_layer", "mid", "hole"),
                     ("missing_in_layer", "mid", "iu"),
                     ("granularity_mismatch", "mid", "g"), ("orphan", "base", "orphan")}
    fix = bm.plan_fix(chain)
    assert set(names(fix, "remove")) == {("top", "hole"), ("base", "hole"),
                                         ("base", "orphan"), ("top", "iu"), ("base", "iu")}


def test_expected_after_and_predicted() -> None:
    base = img("base", B("a"), B("stale"))
    acts = [bm.Action("remove", "base", "qcow2", "stale", "r"),
            bm.Action("add", "base", "qcow2", "n", "r", granularity=131072, recording=False),
            bm.Action("merge", "base", "qcow2", "n", "r", source="top", source_fmt="qcow2")]
    assert sorted(bm.expected_after(base, acts)) == ["a", "n"]
    assert bm.predicted_bitmaps(base, acts)[1] == {
        "name": "n", "granularity": 131072, "recording": False, "in_use": False}


class FakeQemu:
    """A qemu-img runner over an in-memory image table, with scripted failures."""

    def __init__(self, images: dict[str, list[dict[str, Any]]]) -> None:
        self.images = images
        self.calls: list[list[str]] = []
        self.lose_on: str | None = None  # op after which every bitmap goes in-use
        self.exit_on: str | None = None

    def __call__(self, cmd: Any, *, input: bytes | None = None,
                 timeout: float | None = None) -> bytes:
        import json
        cmd = list(cmd)
        self.calls.append(cmd)
        if cmd[1] == "info":
            path = cmd[-1]
            doc = {"filename": path, "format": "qcow2", "virtual-size": 1 << 30,
                   "format-specific": {"type": "qcow2",
                                       "data": {"bitmaps": self.images[path]}}}
            return json.dumps(doc).encode()
        op, path, name = cmd[4], cmd[-2], cmd[-1]  # qemu-img bitmap -f FMT OP ...
        if op == "--remove":
            self.images[path] = [b for b in self.images[path] if b["name"] != name]
        elif op == "--add":
            g = int(cmd[cmd.index("-g") + 1]) if "-g" in cmd else 65536
            flags = [] if "--disable" in cmd else ["auto"]
            self.images[path].append({"name": name, "granularity": g, "flags": flags})
        if self.lose_on == op:
            for b in self.images[path]:
                b["flags"] = [*b["flags"], "in-use"]
        if self.exit_on == op:
            raise CommandFailed("qemu-img bitmap", 1, "No space left on device")
        return b""


def test_verify_catches_exit_0_with_lost_bitmaps() -> None:
    fake = FakeQemu({"base": [{"name": "a", "granularity": 65536, "flags": ["auto"]}]})
    fake.lose_on = "--add"  # qemu-img exits 0 but leaves everything in-use
    base = bm.read_info("base", fmt="qcow2", runner=fake)
    acts = [bm.Action("add", "base", "qcow2", "n", "only in top", granularity=65536)]
    failed = bm.apply(acts, runner=fake)
    assert failed == []
    with pytest.raises(BitmapLost) as e:
        bm.verify({"base": bm.expected_after(base, acts)}, failed, runner=fake,
                  formats={"base": "qcow2"}, before={"base": {"a"}})
    assert {d["name"] for d in e.value.report["damage"]} == {"a", "n"}
    assert e.value.exit_code == 5


def test_failed_add_skips_its_merge_and_is_reported() -> None:
    fake = FakeQemu({"base": []})
    fake.exit_on = "--add"
    acts = [bm.Action("add", "base", "qcow2", "n", "r", granularity=65536),
            bm.Action("merge", "base", "qcow2", "n", "r", source="top", source_fmt="qcow2")]
    failed = bm.apply(acts, runner=fake)
    assert [a.op for a, _ in failed] == ["add", "merge"]  # the merge was not run
    assert not any("--merge" in c for c in fake.calls)
    # Nothing held before went missing: the failure is exit 1, not a loss.
    with pytest.raises(OperationFailed) as e:
        bm.verify({"base": {}}, failed, runner=fake, formats={"base": "qcow2"},
                  before={"base": set()})
    assert e.value.exit_code == 1 and "nothing was lost" in str(e.value)


def test_every_qemu_img_call_names_the_format() -> None:
    fake = FakeQemu({"base": [], "top": []})
    acts = [bm.Action("remove", "base", "raw", "x", "r"),
            bm.Action("add", "base", "qcow2", "n", "r", source="top", source_fmt="qcow2",
                      source_name="n"),
            bm.Action("merge", "base", "qcow2", "n", "r", source="top", source_fmt="qcow2")]
    bm.apply(acts, runner=fake)
    bm.read_info("base", fmt="qcow2", runner=fake)
    for c in fake.calls:
        assert c[c.index("-f") + 1] in ("raw", "qcow2"), c
    assert fake.calls[0][:4] == ["qemu-img", "bitmap", "-f", "raw"]
    add = fake.calls[1]
    assert add[add.index("-b") + 1: add.index("-b") + 4] == ["top", "-F", "qcow2"]


def test_chain_refuses_a_backing_format_it_would_have_to_probe() -> None:
    docs = [{"filename": "top", "format": "qcow2", "virtual-size": 1,
             "backing-filename": "base", "full-backing-filename": "base"},
            {"filename": "base", "format": "qcow2", "virtual-size": 1}]
    with pytest.raises(UsageError, match="records no format for its backing file"):
        qemu.parse_chain(docs)
    docs[0]["backing-filename-format"] = "raw"
    assert [i.format for i in qemu.parse_chain(docs)] == ["qcow2", "qcow2"]


def test_locked_image_is_reported_clearly() -> None:
    def locked(cmd: Any, **_: Any) -> bytes:
        raise CommandFailed("qemu-img info", 1,
                            "qemu-img: Could not open 'x': Failed to get shared \"write\" "
                            "lock\nIs another process using the image [x]?")
    with pytest.raises(ImageInUse, match="use --domain"):
        bm.read_chain("x", runner=locked)
    with pytest.raises(ImageInUse):
        bm.apply([bm.Action("remove", "x", "qcow2", "n", "r")], runner=locked)


def test_same_image_block_devices_and_files(tmp_path: Any) -> None:
    f = tmp_path / "a"
    f.write_bytes(b"")
    (tmp_path / "l").symlink_to(f)
    assert bm.same_image(str(f), str(tmp_path / "l"))
    assert not bm.same_image(str(f), "/dev/null")
    with mock.patch("os.stat", side_effect=OSError):
        assert bm.same_image("/x/../y", "/y")


def test_store_need_matches_the_measurements() -> None:
    """The figures measured on QEMU 7.2 (bitmaps.py's table) come out exactly."""
    GiB, cs = 1 << 30, 65536
    dirty = 64 * 1024  # bytes per write, one bit each at 64 KiB granularity

    def need(size: int, n: int, g: int, writes: int, inside: int) -> int:
        bs = [(f"backupkit.{i:03d}-20261206T000000Z", g, writes * dirty) for i in range(n)]
        return bm.store_need(size, cs, bs, free_inside=inside, is_file=False)

    # (disk, bitmaps, granularity, writes, clusters free inside) -> measured past the end
    assert need(GiB, 1, cs, 0, 0) == 131072
    assert need(GiB, 2, cs, 4, 3) == 131072
    assert need(GiB, 8, cs, 16, 9) == 524288
    assert need(GiB, 32, cs, 16, 33) == 2097152
    assert need(100 * GiB, 2, cs, 512, 3) == 524288
    assert need(100 * GiB, 2, 1 << 20, 64, 3) == 131072
    assert need(1 << 40, 1, cs, 64, 2) == 2097152
    # The file case adds what ext4 needed on top (never less than measured).
    f = bm.store_need(GiB, cs, [("a", cs, 4 * dirty), ("b", cs, 4 * dirty)], free_inside=3,
                      is_file=True)
    assert f >= 265216
    # Unknown counts: every data cluster may hold bits; low: none.
    assert bm.store_clusters(1 << 40, cs, [("a", cs, None)]) == 1 + 32 + 1
    assert bm.store_clusters(1 << 40, cs, [("a", cs, None)], low=True) == 1 + 0 + 1
    assert bm.store_need(GiB, cs, [], free_inside=0, is_file=True) == 0
    # The least a file needs: the pages QEMU writes (tmpfs: stored with 196,608 free,
    # lost with 131,072 for these two bitmaps of a 16 MiB disk).
    two = [("cp1", cs, 64 * 1024), ("cp2", cs, 64 * 1024)]
    low = bm.store_need(16 << 20, cs, two, free_inside=0, is_file=True, low=True)
    assert low == 2 * cs + 3 * 4096 and 131072 < low <= 196608


def test_failed_step_of_a_carry_is_exit_1_and_leaves_only_the_temporary_name() -> None:
    fake = FakeQemu({"top": [], "mid": [], "base": []})
    fake.exit_on = "--merge"
    top, mid, base = img("top", B("x")), img("mid", B("x")), img("base")
    actions, _ = bm.plan_post_merge([top, mid, base])
    failed = bm.apply(actions, runner=fake)
    assert [a.op for a, _ in failed] == ["merge", "add", "remove"]
    assert [b["name"] for b in fake.images["base"]] == [bm.TMP_PREFIX + "x"]
    with pytest.raises(OperationFailed, match="nothing was lost"):
        bm.verify({"base": bm.expected_after(base, actions)}, failed, runner=fake,
                  formats={"base": "qcow2"}, before={"base": set()})
    # The rerun removes the leftover first.
    left = img("base", B(bm.TMP_PREFIX + "x", rec=False))
    assert bm.plan_post_merge([top, mid, left])[0][0].op == "remove"
