"""Damage a careful operator finds in a repository (issue 17): the real CLI keeps working.

Each case builds a small repository through the repository API (raw images, no
libvirt), damages it the way it was found damaged, and runs the real command
line against it: a damaged manifest or index, a FIFO where a file should be, a
read-only mount, a file the process may not read, names too long for a file
name, a restore that was killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backupkit.repo import Repository
from tests import rig
from tests.conftest import run_cli
from tests.faults.conftest import one_line_error
from tests.repo.helpers import CHUNK, MiB, make_backup, rand, write_image

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
TIMEOUT = 30  # a command that takes longer hangs (the FIFO cases)


class Repo:
    """A repository with backups of vm1 (three) and vm2 (one), and the images behind them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "repo"
        self.repo = Repository.init(str(self.path), chunk_size=CHUNK)
        self.images: dict[str, Path] = {}  # backup id -> the raw image it holds
        self.ids: list[str] = []  # vm1, oldest first
        self.restored = 0
        for i in range(3):
            img = root / f"vm1-{i}.raw"
            write_image(img, 2 * MiB, [(0, rand(3 * CHUNK, 10 + i)), (MiB, rand(CHUNK, 1))])
            m = make_backup(self.repo, "vm1", {"vda": img}, now=T0 + timedelta(days=i))
            self.ids.append(m.id)
            self.images[m.id] = img
        img2 = write_image(root / "vm2.raw", MiB, [(0, rand(CHUNK, 99))])
        self.vm2 = make_backup(self.repo, "vm2", {"vda": img2}, now=T0).id
        self.images[self.vm2] = Path(img2)

    def manifest(self, bid: str, domain: str = "vm1") -> Path:
        return self.path / "backups" / domain / bid / "manifest.json"

    def index(self, bid: str, domain: str = "vm1") -> Path:
        return self.path / "backups" / domain / bid / "vda.index"

    def cli(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        try:
            return run_cli("--repo", str(self.path), *args, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{args} still running after {timeout}s: it hangs")

    def ok(self, *args: str, **kw: Any) -> Any:
        cp = self.cli("--json", *args, **kw)
        assert cp.returncode == 0, f"{args}: exit {cp.returncode}: {cp.stderr}"
        return json.loads(cp.stdout)

    def fails(self, rc: int, *args: str, match: str = "", **kw: Any) -> str:
        cp = self.cli(*args, **kw)
        assert cp.returncode == rc, f"{args}: exit {cp.returncode} (want {rc}): {cp.stderr}"
        line = one_line_error(cp)
        assert "internal error" not in line, line
        assert match in line, line
        return line

    def restores(self, bid: str, domain: str = "vm1", name: str = "latest") -> None:
        self.restored += 1
        target = self.root / f"restore-{self.restored}"
        self.ok("restore", domain, name if name == "latest" else bid, "--target", str(target),
                "--format", "raw")
        rig.compare(self.images[bid], target / "vda.raw", "raw")


@pytest.fixture
def r(tmp_path: Path) -> Repo:
    return Repo(tmp_path)


# --- item 3: one damaged backup stops nothing else ------------------------------------


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_damaged_manifest_is_skipped_and_can_be_deleted(r: Repo, how: str) -> None:
    old, middle, newest = r.ids
    p = r.manifest(middle)
    raw = p.read_bytes()
    p.write_bytes({"garbage": bytes(range(256)), "truncated": raw[:len(raw) // 2],
                   "empty": b""}[how])
    # list: the others, and the damaged one named (a warning, and in the JSON).
    cp = r.cli("--json", "list")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert sorted(b["id"] for b in doc["backups"]) == sorted([old, newest, r.vm2])
    assert [(d["domain"], d["id"]) for d in doc["damaged"]] == [("vm1", middle)]
    assert middle in cp.stderr and "backupkit delete vm1" in cp.stderr
    # restore of the others, latest included.
    r.restores(newest)
    r.restores(old, name=old)
    r.fails(5, "show", "vm1", middle, match=middle)
    r.fails(5, "verify", match=middle)
    # gc cannot know what the damaged backup needs: it refuses, and says what to do.
    r.fails(5, "gc", match=f"backupkit delete vm1 {middle}")
    # prune works on the rest, and says what it skipped.
    res = r.ok("prune", "vm1", "--keep-last", "1")
    assert res["removed"] == 1 and [d["id"] for d in res["damaged"]] == [middle]
    res = r.ok("prune", "--keep-last", "1")
    assert res["removed"] == 0 and [d["id"] for d in res["damaged"]] == [middle]
    # The supported way out: delete it; then gc and verify are clean again.
    res = r.ok("delete", "vm1", middle)
    assert res["deleted"] and res["damaged"]
    assert not (r.path / "backups" / "vm1" / middle).exists()
    assert r.ok("list")["damaged"] == []
    r.ok("gc")
    r.ok("verify", "--data")
    r.restores(newest)
    r.fails(4, "delete", "vm1", middle, match="not found")
    r.fails(2, "delete", "vm1", "latest", match="backup id")


def test_damaged_latest_backup_is_named_and_older_ones_restore(r: Repo) -> None:
    _old, middle, newest = r.ids
    r.manifest(newest).write_bytes(b"{")
    line = r.fails(5, "restore", "vm1", "latest", "--target", str(r.root / "t"),
                   match=f"latest backup vm1/{newest} cannot be read")
    assert f"backupkit delete vm1 {newest}" in line
    assert not (r.root / "t").exists()
    r.fails(5, "show", "vm1", "latest", match=newest)
    r.restores(middle, name=middle)
    r.restores(r.vm2, domain="vm2")  # another domain: untouched


def test_truncated_latest_index(r: Repo) -> None:
    _old, middle, newest = r.ids
    p = r.index(newest)
    p.write_bytes(p.read_bytes()[:40])
    assert [b["id"] for b in r.ok("list", "vm1")["backups"]] == r.ids
    r.fails(5, "restore", "vm1", "latest", "--target", str(r.root / "t"), match=newest)
    r.restores(middle, name=middle)
    assert r.ok("prune", "vm1", "--keep-last", "2")["removed"] == 1
    r.ok("delete", "vm1", newest)
    r.ok("gc")
    r.restores(middle)


def test_backup_dir_that_is_a_symlink_or_a_file_can_be_deleted(r: Repo) -> None:
    _old, middle, _newest = r.ids
    d = r.path / "backups" / "vm1" / middle
    os.rename(d, r.root / "elsewhere")
    d.symlink_to(r.root / "elsewhere", target_is_directory=True)
    assert [x["id"] for x in r.ok("list", "vm1")["damaged"]] == [middle]
    r.ok("delete", "vm1", middle)
    assert not os.path.lexists(d) and (r.root / "elsewhere" / "manifest.json").exists()
    r.ok("verify")


# --- item 5: special files never hang a command ------------------------------------------


@pytest.mark.parametrize("where", ["manifest", "index", "chunk", "lock"])
def test_fifo_in_the_repository_is_damage_not_a_hang(r: Repo, where: str) -> None:
    _old, middle, newest = r.ids
    if where == "manifest":
        p = r.manifest(middle)
    elif where == "index":
        p = r.index(middle)
    elif where == "chunk":
        digest = r.repo.load_index(r.repo.read_manifest("vm1", middle), "vda")[0]
        assert digest is not None
        p = r.path / "chunks" / digest.hex()[:2] / digest.hex()
    else:
        p = r.path / "locks" / "writer-0123456789abcdef.json"  # where a lock object goes
    p.unlink(missing_ok=True)
    os.mkfifo(p)
    target = str(r.root / "t")
    if where == "lock":
        # Who takes a lock lists locks/ and refuses the special file; readers take none.
        for args in (("gc",), ("delete", "vm1", middle)):
            r.fails(5, *args, match="locks/writer-0123456789abcdef.json")
        r.ok("verify")
        r.ok("restore", "vm1", "--target", target)
        r.ok("list")
        return
    if where == "manifest":
        r.fails(5, "show", "vm1", middle, match="not a regular file")
    r.fails(5, "verify", "--data", match=middle)
    r.fails(5, "restore", "vm1", middle, "--target", target)
    r.fails(5, "gc")
    listed = r.ok("list")
    if where == "manifest":
        assert [d["id"] for d in listed["damaged"]] == [middle]
    r.restores(newest)
    if where == "chunk":  # verify --data moved it aside: a backup can store it again
        assert not os.path.lexists(p)
        assert list((r.path / "quarantine").iterdir())


def test_fifo_as_config_json(r: Repo) -> None:
    p = r.path / "config.json"
    p.unlink()
    os.mkfifo(p)
    for args in (("list",), ("verify",), ("gc",), ("show", "vm1", "latest")):
        r.fails(5, *args, match="config.json")


# --- item 6: reading from a read-only repository ------------------------------------------


@pytest.fixture
def ro_mount(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs, remounted read-only by the test; unmounted in teardown."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.root
def test_read_only_repository(ro_mount: Path, tmp_path: Path) -> None:
    r = Repo(ro_mount)
    old, middle, _newest = r.ids
    with r.repo.lock_shared(), r.repo.lock_domain("vm2"):
        r.repo.remove_backup(r.repo.read_manifest("vm2", r.vm2))  # chunks for gc
    subprocess.run(["mount", "-o", "remount,ro", str(ro_mount)], check=True)
    assert [b["id"] for b in r.ok("list")["backups"]] == r.ids
    r.ok("show", "vm1", "latest")
    r.ok("verify", "--data")
    target = tmp_path / "out"
    r.ok("restore", "vm1", middle, "--target", str(target), "--format", "raw")
    rig.compare(r.images[middle], target / "vda.raw", "raw")
    r.ok("restore", "vm1", "--target", str(tmp_path / "q"))  # qcow2: checked by qemu-img
    # Writers say why they cannot (one line, exit 1), never "internal error".
    r.fails(1, "delete", "vm1", old, match="read-only")
    r.fails(1, "gc", match="read-only")
    cp = run_cli("--repo", str(ro_mount / "new"), "init")
    assert cp.returncode == 1 and "read-only" in one_line_error(cp), cp.stderr
    assert r.ok("gc", "--dry-run")["chunks_removed"] == 1


@pytest.mark.root
def test_read_only_repository_with_a_damaged_chunk(ro_mount: Path) -> None:
    r = Repo(ro_mount)
    digest = r.repo.load_index(r.repo.read_manifest("vm1", r.ids[0]), "vda")[0]
    assert digest is not None
    chunk = r.path / "chunks" / digest.hex()[:2] / digest.hex()
    data = bytearray(chunk.read_bytes())
    data[100] ^= 1
    chunk.write_bytes(bytes(data))
    subprocess.run(["mount", "-o", "remount,ro", str(ro_mount)], check=True)
    cp = r.cli("--json", "verify", "--data")
    assert cp.returncode == 5, cp.stderr
    report = json.loads(cp.stdout)["error"]["report"]
    assert report["chunks_damaged"] == 1 and report["chunks_quarantined"] == []
    assert "read-only" in report["quarantine_failed"][0]


# --- item 7: errors of their kind, naming the path ------------------------------------------


def _without_dac(*args: str) -> list[str]:
    """The CLI as root without the capabilities that bypass file permissions."""
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.root
@pytest.mark.parametrize("what", ["manifest", "index"])
def test_permission_denied_names_the_path(r: Repo, what: str) -> None:
    import sys

    _old, _middle, newest = r.ids
    p = r.manifest(newest) if what == "manifest" else r.index(newest)
    os.chmod(p, 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPKIT_")}
    env["BACKUPKIT_CONFIG"] = "/dev/null"
    for args in (["show", "vm1", newest], ["restore", "vm1", newest, "--target",
                                           str(r.root / "t")]):
        if what == "index" and args[0] == "show":
            continue
        cp = subprocess.run([*_without_dac(), sys.executable, "-m", "backupkit", "--json",
                             "--repo", str(r.path), *args], capture_output=True, text=True,
                            env=env, timeout=TIMEOUT, check=False)
        assert cp.returncode == 1, cp.stderr
        err = json.loads(cp.stdout)["error"]
        assert err["kind"] == "permission_denied", err
        assert str(p) in err["message"], err


@pytest.mark.root
def test_no_space_creating_a_chunk_directory(tmp_path: Path) -> None:
    """ENOSPC from mkdir of a chunk directory (a tmpfs out of inodes) is NoSpace, exit 1."""
    from backupkit import errors

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=64", "tmpfs", str(mnt)],
                   check=True)
    try:
        repo = Repository.init(str(mnt / "repo"), chunk_size=CHUNK)
        filler = mnt / "filler"
        filler.mkdir()
        with pytest.raises(OSError):
            for i in range(100):
                (filler / str(i)).touch()
        with pytest.raises(errors.NoSpace) as e:
            repo.put_chunk(rand(CHUNK, 7))
        assert "no space left" in str(e.value) and "chunks/" in str(e.value)
        assert e.value.exit_code == 1
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_long_multibyte_name_is_a_usage_error(r: Repo) -> None:
    name = "\u20ac" * 82  # 82 characters, 246 bytes in UTF-8: over a file name's 255 with
    assert len(name.encode()) == 246  # "domain." and ".lock" around it
    target = str(r.root / "t")
    for args in (("show", name, "latest"), ("list", name), ("verify", name),
                 ("prune", name, "--keep-last", "1"), ("delete", name, "x"),
                 ("restore", name, "--target", target),
                 ("restore", "vm1", "--target", target, "--define", name)):
        r.fails(2, *args, match="bytes in UTF-8")
    assert not os.path.exists(target)


# --- item 8: smaller things ----------------------------------------------------------------


def test_killed_restore_leftover_is_removed_by_the_next_restore(r: Repo) -> None:
    target = r.root / "t"
    cp = r.cli("restore", "vm1", "--target", str(target), "--format", "raw",
               env={"BACKUPKIT_FAULT_POINT": "restore_before_install"})
    assert cp.returncode == -signal.SIGKILL, cp.stderr
    left = sorted(p.name for p in target.iterdir())
    assert len(left) == 1 and left[0].startswith("vda.raw.tmp-"), left
    # A running restore's tmp file (a live pid) is never touched.
    live = target / f"vda.qcow2.tmp-{os.getpid()}"
    live.write_bytes(b"in progress")
    r.ok("restore", "vm1", "--target", str(target), "--format", "raw")
    assert sorted(p.name for p in target.iterdir()) == sorted(["vda.raw", live.name])
    rig.compare(r.images[r.ids[-1]], target / "vda.raw", "raw")


def test_init_refuses_zero_chunk_size_and_level(tmp_path: Path) -> None:
    for args in (("--chunk-size", "0"), ("--compression-level", "0")):
        cp = run_cli("--repo", str(tmp_path / "repo"), "init", *args)
        assert cp.returncode == 2, cp.stderr
        assert "0" in one_line_error(cp)
        assert not (tmp_path / "repo").exists()


def test_empty_backupkit_config_is_named(tmp_path: Path) -> None:
    cp = run_cli("--repo", str(tmp_path), "list", env={"BACKUPKIT_CONFIG": ""})
    assert cp.returncode == 2
    line = one_line_error(cp)
    assert "BACKUPKIT_CONFIG" in line and "empty" in line, line


@pytest.mark.root
def test_init_at_the_root_of_a_fresh_ext4(tmp_path: Path) -> None:
    img = tmp_path / "fs.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "8M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        assert sorted(os.listdir(mnt)) == ["lost+found"]
        cp = run_cli("--repo", str(mnt), "init")
        assert cp.returncode == 0, cp.stderr
        assert (mnt / "config.json").exists() and (mnt / "lost+found").is_dir()
        Repository.open(str(mnt))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        out = subprocess.run(["losetup", "-j", str(img)], capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)
