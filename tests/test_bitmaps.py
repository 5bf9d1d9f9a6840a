"""Pure bitmap planning: chains of qemu.ImageInfo in, actions and problems out."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest

from backupkit import bitmaps as bm
from backupkit import qemu
from backupkit.errors import BitmapLost, CommandFailed, ImageInUse, UsageError


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


def test_pre_merge_removes_stale_and_in_use_only_from_base() -> None:
    top = img("top", B("good"), B("bad-top", in_use=True), B("only-top"))
    base = img("base", B("good"), B("stale"), B("bad-top"), B("bad-base", in_use=True))
    actions = bm.plan_pre_merge([top, base])
    assert {a.name: a.reason for a in actions} == {
        "stale": "stale: not in top",
        "bad-top": "in-use in top: contents cannot be trusted",
        "bad-base": "in-use in base: contents cannot be trusted",
    }
    assert all(a.op == "remove" and a.image == "base" for a in actions)
    # Idempotent: once applied, nothing left to do.
    after = img("base", B("good"))
    assert bm.plan_pre_merge([top, after]) == []
    with pytest.raises(UsageError):
        bm.plan_pre_merge([top])


def test_post_merge_adds_only_usable_top_only_bitmaps_with_state() -> None:
    top = img("top", B("both"), B("g", g=131072), B("off", rec=False),
              B("bad", in_use=True))
    base = img("base", B("both"))
    actions = bm.plan_post_merge([top, base])
    adds = {a.name: (a.granularity, a.recording) for a in actions if a.op == "add"}
    assert adds == {"g": (131072, True), "off": (65536, False)}
    assert [(a.name, a.source) for a in actions if a.op == "merge"] == [
        ("g", "top"), ("off", "top")]
    # add precedes merge for each name
    assert [a.op for a in actions if a.name == "g"] == ["add", "merge"]
    done = img("base", B("both"), B("g", g=131072), B("off", rec=False))
    assert bm.plan_post_merge([top, done]) == []


def test_post_merge_merges_every_upper_layer_of_the_run() -> None:
    top, mid = img("top", B("x")), img("mid", B("x"))
    actions = bm.plan_post_merge([top, mid, img("base")])
    assert [(a.op, a.source) for a in actions] == [("add", None), ("merge", "mid"),
                                                   ("merge", "top")]


def test_post_merge_damage_and_warnings() -> None:
    top = img("top", B("a"), B("b"))
    base = img("base", B("a", in_use=True), B("b", rec=False))
    assert [p.name for p in bm.post_merge_damage([top, base])] == ["a"]
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
    acts = [bm.Action("remove", "base", "stale", "r"),
            bm.Action("add", "base", "n", "r", granularity=131072, recording=False),
            bm.Action("merge", "base", "n", "r", source="top")]
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
        op, path, name = cmd[2], cmd[-2], cmd[-1]
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
    base = bm.read_info("base", runner=fake)
    acts = [bm.Action("add", "base", "n", "only in top", granularity=65536)]
    failed = bm.apply(acts, runner=fake)
    assert failed == []
    with pytest.raises(BitmapLost) as e:
        bm.verify({"base": bm.expected_after(base, acts)}, failed, runner=fake)
    assert {d["name"] for d in e.value.report["damage"]} == {"a", "n"}
    assert e.value.exit_code == 5


def test_failed_add_skips_its_merge_and_is_reported() -> None:
    fake = FakeQemu({"base": []})
    fake.exit_on = "--add"
    acts = [bm.Action("add", "base", "n", "r", granularity=65536),
            bm.Action("merge", "base", "n", "r", source="top")]
    failed = bm.apply(acts, runner=fake)
    assert [a.op for a, _ in failed] == ["add"]
    assert not any("--merge" in c for c in fake.calls)


def test_locked_image_is_reported_clearly() -> None:
    def locked(cmd: Any, **_: Any) -> bytes:
        raise CommandFailed("qemu-img info", 1,
                            "qemu-img: Could not open 'x': Failed to get shared \"write\" "
                            "lock\nIs another process using the image [x]?")
    with pytest.raises(ImageInUse, match="use --domain"):
        bm.read_chain("x", runner=locked)
    with pytest.raises(ImageInUse):
        bm.apply([bm.Action("remove", "x", "n", "r")], runner=locked)


def test_same_image_block_devices_and_files(tmp_path: Any) -> None:
    f = tmp_path / "a"
    f.write_bytes(b"")
    (tmp_path / "l").symlink_to(f)
    assert bm.same_image(str(f), str(tmp_path / "l"))
    assert not bm.same_image(str(f), "/dev/null")
    with mock.patch("os.stat", side_effect=OSError):
        assert bm.same_image("/x/../y", "/y")


def test_bitmaps_store_size() -> None:
    from backupkit import bitmaps as bm

    MiB, GiB = 1 << 20, 1 << 30
    assert bm.bitmaps_store_size(GiB, 65536, []) == 0
    # 1 GiB at 64 KiB granularity: 2 KiB of bits -> 1 data cluster + 1 table cluster.
    one = bm.bitmaps_store_size(GiB, 65536, [("a", 65536, 0)])
    assert one == 2 * 65536 + 65536 + 2 * 65536
    # HOST-FACTS' window: 33 bitmaps need more than the 3.5 MiB left after a 120 MiB
    # merge on a 128 MiB volume, and less than the 5.5 MiB left after 118 MiB.
    many = bm.bitmaps_store_size(GiB, 65536, [(f"s{i}", 65536, 0) for i in range(33)])
    assert 3.6 * MiB < many < 5.4 * MiB
    # Finer granularity needs more data clusters.
    assert bm.bitmaps_store_size(64 * GiB, 65536, [("a", 4096, 1)]) > 2 * MiB
