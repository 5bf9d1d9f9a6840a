"""Issue 25: cold hygiene never loses a bitmap's contents silently, never guesses a
format, and never opens an image it cannot store bitmaps in.

Real images, real qemu-img/qemu-io, and the real command line in a child
process where the exit code or a kill is the point.  Kills use the fault
points ``hygiene_step_N`` (backupkit/faults.py: SIGKILL before the N-th change).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from backupkit.errors import EXIT_INTEGRITY, BitmapLost, NoSpace, UsageError
from backupkit.ops import hygiene
from tests.conftest import run_cli
from tests.hygiene.helpers import MiB, add, bitmaps, commit, create, dirty, make_in_use, must

pytestmark = [pytest.mark.root]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("--json", "hygiene", *args, env=env, timeout=120)


def doc(cp: subprocess.CompletedProcess[str]) -> Any:
    assert "Traceback" not in cp.stderr, cp.stderr
    return json.loads(cp.stdout)


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write(path: str, byte: int, offset: int, length: int) -> None:
    must("qemu-io", "-f", "qcow2", "-c", f"write -P {byte} {offset} {length}", path)


# --- item 2: a killed post-merge never leaves a bitmap without its bits ------

def three_layers(tmp: Path) -> tuple[str, str, str]:
    """BASE <- MID <- TOP: k in all three, x in MID and TOP (carried through a temporary
    name), t in TOP only (carried in one run); each layer saw its own writes."""
    base, mid, top = (str(tmp / f"{n}.qcow2") for n in ("base", "mid", "top"))
    create(base, 64 * MiB)
    add(base, "k")
    write(base, 0x11, 0, 1 * MiB)
    create(mid, backing=base)
    add(mid, "k")
    add(mid, "x", granularity=128 * 1024)
    write(mid, 0x22, 8 * MiB, 1 * MiB)
    create(top, backing=mid)
    for name in ("k", "x"):
        add(top, name, granularity=128 * 1024 if name == "x" else None)
    add(top, "t")
    write(top, 0x33, 16 * MiB, 1 * MiB)
    assert commit(top, base).returncode == 0
    return top, mid, base


CARRIED = {"x": [(8 * MiB, 1 * MiB), (16 * MiB, 1 * MiB)], "t": [(16 * MiB, 1 * MiB)]}


def test_post_merge_killed_at_every_step_ends_complete(tmp_path: Path) -> None:
    (tmp_path / "plan").mkdir()
    top, _mid, base = three_layers(tmp_path / "plan")
    steps = len(hygiene.post_merge(top, base, dry_run=True)["steps"])
    assert steps == 5  # x: add tmp, merge, add x from tmp, remove tmp; t: add
    for n in range(1, steps + 1):
        d = tmp_path / f"kill{n}"
        d.mkdir()
        top, _mid, base = three_layers(d)
        cp = cli("post-merge", "--top", top, "--base", base,
                 env={"BACKUPKIT_FAULT_POINT": f"hygiene_step_{n}"})
        assert cp.returncode == -signal.SIGKILL, (n, cp.stderr)
        # Whatever the kill left: a name in BASE always has all its bits.
        for name, extents in CARRIED.items():
            if name in bitmaps(base):
                assert dirty(base, name) == extents, (n, name)
        rerun = doc(cli("post-merge", "--top", top, "--base", base))
        assert rerun["lost"] == []
        after = bitmaps(base)
        assert sorted(after) == ["k", "t", "x"], (n, after)
        assert all(b["flags"] == ["auto"] for b in after.values()), (n, after)
        for name, extents in CARRIED.items():
            assert dirty(base, name) == extents, (n, name)
        assert after["x"]["granularity"] == 128 * 1024
        # BASE, active once TOP and MID are dropped, is clean.
        assert hygiene.check(images=[base])["clean"]


def test_post_merge_killed_inside_qemu_img_loses_visibly(tmp_path: Path) -> None:
    """A qemu-img killed while it has BASE open leaves every bitmap there in-use (the state
    make_in_use produces the same way).  The rerun removes every copy of those names,
    carries the rest, and exits 5 naming what was lost."""
    top, _mid, base = three_layers(tmp_path)
    make_in_use(base)
    cp = cli("post-merge", "--top", top, "--base", base)
    assert cp.returncode == EXIT_INTEGRITY, cp.stderr
    report = doc(cp)["error"]["report"]
    assert [p["name"] for p in report["lost"]] == ["k"]
    assert "k" in cp.stderr
    assert sorted(bitmaps(base)) == ["t", "x"] and "k" not in bitmaps(top)
    for name, extents in CARRIED.items():
        assert dirty(base, name) == extents
    assert doc(cli("post-merge", "--top", top, "--base", base))["lost"] == []


# --- item 1: a bitmap broken below TOP is lost everywhere, never "repaired" --

@pytest.mark.parametrize("broken", ["hole", "in_use_in_base"])
def test_broken_below_top_is_gone_after_killed_and_rerun_hooks(tmp_path: Path,
                                                               broken: str) -> None:
    for n in range(0, 4):  # 0: no kill
        d = tmp_path / f"k{n}"
        d.mkdir()
        base, mid, top = (str(d / f"{x}.qcow2") for x in ("base", "mid", "top"))
        create(base, 32 * MiB)
        add(base, "cp")
        add(base, "stale")
        write(base, 0x11, 0, 1 * MiB)      # recorded only by BASE's copy of cp
        if broken == "in_use_in_base":
            make_in_use(base)              # a killed qemu-img: cp and stale in-use
        create(mid, backing=base)
        if broken == "in_use_in_base":
            add(mid, "cp")
        create(top, backing=mid)           # hole: cp missing from MID
        add(top, "cp")
        write(top, 0x22, 4 * MiB, 1 * MiB)
        env = {"BACKUPKIT_FAULT_POINT": f"hygiene_step_{n}"} if n else None
        cp = cli("pre-merge", "--top", top, "--base", base, env=env)
        if n and cp.returncode == -signal.SIGKILL:
            cp = cli("pre-merge", "--top", top, "--base", base)
        # Exit 5 naming cp when this run saw it broken; 0 when a killed run already
        # removed TOP's copy (then only orphans were left, and are gone now).
        assert cp.returncode in (0, EXIT_INTEGRITY), cp.stderr
        if n == 0:
            assert cp.returncode == EXIT_INTEGRITY
            assert [p["name"] for p in doc(cp)["error"]["report"]["lost"]] == ["cp"]
        assert "cp" not in bitmaps(top), n
        assert commit(top, base).returncode == 0
        post = cli("post-merge", "--top", top, "--base", base)
        assert post.returncode == 0, post.stderr
        # Never re-created in BASE from TOP's bits alone.
        assert bitmaps(base) == {}, (n, bitmaps(base))
        assert doc(cli("check", "--image", base))["clean"]


# --- items 3 and 7: formats are never probed; a BASE without bitmaps is said early

def raw_base_with_qcow2_header(tmp: Path) -> tuple[str, str]:
    base, top = str(tmp / "base.raw"), str(tmp / "top.qcow2")
    must("qemu-img", "create", "-q", "-f", "raw", base, str(16 * MiB))
    header = str(tmp / "header.qcow2")
    must("qemu-img", "create", "-q", "-f", "qcow2", header, str(16 * MiB))
    with open(header, "rb") as src, open(base, "r+b") as dst:
        dst.write(src.read(256 * 1024))  # the guest's data begins with a qcow2 image
    must("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    add(top, "cp")
    write(top, 0x44, 8 * MiB, 64 * 1024)
    return top, base


def test_raw_base_with_a_qcow2_header_is_never_written(tmp_path: Path) -> None:
    top, base = raw_base_with_qcow2_header(tmp_path)
    before = sha(base)
    # Item 7: pre-merge says it now (exit 5), nothing changed.
    cp = cli("pre-merge", "--top", top, "--base", base)
    assert cp.returncode == EXIT_INTEGRITY, cp.stderr
    err = doc(cp)["error"]
    assert [p["name"] for p in err["report"]["lost"]] == ["cp"]
    assert "raw image, which cannot store bitmaps" in err["message"]
    assert "will be lost by the merge" in err["message"]
    must("qemu-img", "commit", "-q", "-f", "qcow2", "-d", top)
    after_commit = sha(base)
    # post-merge: lost again (exit 5), and not one byte of the raw disk written.
    cp = cli("post-merge", "--top", top, "--base", base)
    assert cp.returncode == EXIT_INTEGRITY, cp.stderr
    assert [p["name"] for p in doc(cp)["error"]["report"]["lost"]] == ["cp"]
    assert sha(base) == after_commit != before
    info = json.loads(must("qemu-img", "info", "--output=json", "-f", "raw", base))
    assert info["format"] == "raw"
    # The guest's data is exactly what was committed into it.
    cp2 = subprocess.run(["qemu-io", "-f", "raw", "-c", f"read -P 0x44 {8 * MiB} 65536",
                          base], capture_output=True, text=True, check=False)
    assert "Pattern verification failed" not in cp2.stdout, cp2.stdout


def test_qcow2_v2_base_loses_bitmaps_said_at_pre_merge(tmp_path: Path) -> None:
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    must("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", base, str(16 * MiB))
    create(top, backing=base)
    add(top, "cp")
    with pytest.raises(BitmapLost) as e:
        hygiene.pre_merge(top, base)
    assert "compat=0.10" in str(e.value) and e.value.report["removed"] == []
    assert bitmaps(top) == {"cp": {"granularity": 65536, "flags": ["auto"]}}


def test_unrecorded_backing_format_is_refused_not_probed(tmp_path: Path) -> None:
    top, base = raw_base_with_qcow2_header(tmp_path)
    # Hide the backing-format header extension (0xE2792ACA) behind an unknown magic:
    # an old image that records no backing format.
    data = bytearray(Path(top).read_bytes()[:65536])
    at = data.find(bytes.fromhex("E2792ACA"))
    assert at > 0
    with open(top, "r+b") as f:
        f.seek(at)
        f.write(bytes.fromhex("0BADF00D"))
    before = sha(base)
    for step in ("pre-merge", "post-merge"):
        cp = cli(step, "--top", top, "--base", base)
        assert cp.returncode == 2, cp.stderr
        assert "records no format for its backing file" in doc(cp)["error"]["message"]
    assert sha(base) == before


# --- item 6: no space: refuse before opening BASE read-write ---------------

def test_pre_merge_on_a_full_filesystem_changes_nothing(tmp_path: Path,
                                                        small_fs: Path) -> None:
    base, top = str(small_fs / "base.qcow2"), str(tmp_path / "top.qcow2")
    create(base, 16 * MiB)
    add(base, "cp")
    for i in range(3):
        add(base, f"stale-{i}")
    create(top, backing=base)
    add(top, "cp")
    filler = small_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\1" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    before = bitmaps(base)
    with pytest.raises(NoSpace) as e:
        hygiene.pre_merge(top, base)
    assert e.value.exit_code == 1
    space = e.value.report["space"]
    assert space[0]["image"] == base and not space[0]["fits"]
    assert space[0]["free"] < space[0]["needed"]
    assert bitmaps(base) == before  # cp still sound, nothing in-use
    filler.unlink()
    pre = hygiene.pre_merge(top, base)
    assert sorted(r["name"] for r in pre["removed"]) == ["stale-0", "stale-1", "stale-2"]
    assert pre["space"][0]["fits"]
    assert bitmaps(base) == {"cp": {"granularity": 65536, "flags": ["auto"]}}


# --- item 8: exit codes and messages ---------------------------------------

def test_exit_codes_and_messages(tmp_path: Path) -> None:
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    create(base, 16 * MiB)
    add(base, "stale")
    create(top, backing=base)

    # An immutable BASE: qemu-img cannot open it read-write; nothing was lost: 1.
    must("chattr", "+i", base)
    try:
        cp = cli("pre-merge", "--top", top, "--base", base)
    finally:
        must("chattr", "-i", base)
    assert cp.returncode == 1, cp.stderr
    err = doc(cp)["error"]
    assert err["kind"] != "bitmap_lost" and "nothing was lost" in err["message"]
    assert bitmaps(base) == {"stale": {"granularity": 65536, "flags": ["auto"]}}

    cp = cli("pre-merge", "--top", top, "--base", str(tmp_path / "nope.qcow2"))
    assert cp.returncode == 4 and "nope.qcow2" in doc(cp)["error"]["message"]
    cp = cli("pre-merge", "--top", "", "--base", base)
    assert cp.returncode == 2, cp.stderr
    cp = cli("check", "--image", str(tmp_path))
    assert cp.returncode == 2 and "directory" in doc(cp)["error"]["message"]
    cp = cli("check", "--image", top, "--wait", "-5")
    assert cp.returncode == 2, cp.stderr

    # A missing backing file is named, not the top image that exists.
    os.rename(base, base + ".away")
    cp = cli("post-merge", "--top", top, "--base", base + ".away")
    assert cp.returncode == 4, cp.stderr
    msg = doc(cp)["error"]["message"]
    assert base in msg and "backing file of" in msg, msg
    os.rename(base + ".away", base)
    with pytest.raises(UsageError):
        hygiene.pre_merge(top, top)
