"""Bad input through the real CLI: one-line error, the contract's exit code, nothing changed.

A template repository (full + incremental of a shut-off domain) is built once per
module and copied for each case, then damaged; the repository tree is hashed
before and after every command.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import rig
from tests.conftest import traversable
from tests.faults.conftest import CHUNK, MiB, one_line_error, tree_digest, write_random

pytestmark = pytest.mark.libvirt


class Template:
    def __init__(self, root: Path, td: rig.TestDomain, ids: list[str],
                 refs: dict[str, Path]) -> None:
        self.root = root
        self.td = td
        self.ids = ids  # [full, incremental]
        self.refs = refs  # backup id -> reference of vda


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    import libvirt

    from tests.conftest import run_cli

    base = tmp_path_factory.mktemp("bad-input")
    traversable(base, tmp_path_factory.getbasetemp().parent)
    try:
        conn = libvirt.open(rig.URI)
    except libvirt.libvirtError as e:
        pytest.fail(f"libvirt is required: {e}")
    td = rig.create_domain(conn, base / "images", [("qcow2", 16 * MiB)], running=False)
    try:
        repo = base / "repo"
        scratch = base / "scratch"
        scratch.mkdir()
        cfg = base / "bk.toml"
        cfg.write_text(f'scratch_dir = "{scratch}"\n')
        common = ["--config", str(cfg), "--repo", str(repo)]
        run_cli(*common, "init", "--chunk-size", str(CHUNK), check=True)
        ids, refs = [], {}
        for i in range(2):
            write_random(td, "vda", i * 4 * MiB, 512 * 1024, 100 + i, base)
            ref = td.disk("vda").snapshot_reference(base / f"ref{i}.raw")
            cp = run_cli(*common, "--json", "backup", td.name, check=True)
            bid = json.loads(cp.stdout)["id"]
            ids.append(bid)
            refs[bid] = ref
        yield Template(repo, td, ids, refs)
    finally:
        td.cleanup()
        conn.close()


class Case:
    """A private copy of the template repository and the CLI pointed at it."""

    def __init__(self, t: Template, tmp: Path) -> None:
        self.t = t
        self.tmp = tmp
        self.repo = tmp / "repo"
        shutil.copytree(t.root, self.repo, symlinks=True)
        self.cfg = tmp / "bk.toml"
        self.cfg.write_text(f'scratch_dir = "{tmp / "scratch"}"\n')
        self.dom = t.td.name

    def cli(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        from tests.conftest import run_cli

        return run_cli("--config", str(config or self.cfg), "--repo", str(self.repo), *args)

    def fails(self, rc: int, *args: str, config: Path | None = None,
              match: str = "") -> str:
        """Run a command that must fail with rc, one line, and change nothing stored."""
        before = tree_digest(self.repo)
        cp = self.cli(*args, config=config)
        assert cp.returncode == rc, f"{args}: exit {cp.returncode} (want {rc}): {cp.stderr}"
        line = one_line_error(cp)
        assert match in line, line
        assert tree_digest(self.repo) == before, f"{args} changed the repository"
        jcp = self.cli("--json", *args, config=config)
        assert jcp.returncode == rc
        doc = json.loads(jcp.stdout)
        assert doc["error"]["exit_code"] == rc
        assert tree_digest(self.repo) == before
        return line

    def ok(self, *args: str) -> Any:
        cp = self.cli("--json", *args)
        assert cp.returncode == 0, f"{args}: exit {cp.returncode}: {cp.stderr}"
        return json.loads(cp.stdout)

    def restores(self, bid: str) -> None:
        target = self.tmp / f"restore-{bid}"
        self.ok("restore", self.dom, bid, "--target", str(target), "--format", "raw")
        rig.compare(self.t.refs[bid], target / "vda.raw", "raw")

    def backup_dir(self, bid: str) -> Path:
        return self.repo / "backups" / self.dom / bid


@pytest.fixture
def case(template: Template, tmp_path: Path) -> Case:
    return Case(template, tmp_path)


# --- usage errors --------------------------------------------------------------


def test_unknown_domain_exits_4(case: Case) -> None:
    case.fails(4, "backup", "no-such-vm", match="domain not found: no-such-vm")
    case.fails(4, "show", "no-such-vm", "latest", match="not found")


def test_malformed_config_and_unknown_option_exit_2(case: Case) -> None:
    bad = case.tmp / "bad.toml"
    bad.write_text("scratch_dir = [\n")
    case.fails(2, "list", config=bad, match=str(bad))
    bad.write_text('no_such_key = 1\n')
    case.fails(2, "list", config=bad, match="no_such_key")
    case.fails(2, "list", config=case.tmp / "missing.toml")
    case.fails(2, "backup", "--frobnicate", case.dom, match="frobnicate")
    case.fails(2, "frobnicate")


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "x/../../etc"])
def test_names_that_would_escape_exit_2(case: Case, name: str) -> None:
    case.fails(2, "backup", name, match="invalid")
    case.fails(2, "show", name, "latest", match="invalid")
    case.fails(2, "show", case.dom, name, match="invalid")
    case.fails(2, "verify", case.dom, name, match="invalid")
    case.fails(2, "restore", case.dom, name, "--target", str(case.tmp / "t"), match="invalid")
    case.fails(2, "restore", case.dom, "latest", "--disk", name,
               "--target", str(case.tmp / "t"), match="invalid")
    case.fails(2, "prune", name, "--keep-last", "1", match="invalid")
    assert not (case.tmp / "t").exists() or not any((case.tmp / "t").iterdir())


def test_nul_in_names_is_refused() -> None:
    """argv cannot carry NUL; every name is checked where it becomes a path."""
    from backupkit.errors import InvalidName
    from backupkit.repo.names import check_name

    for name in ("a\0b", "vda\0/../x"):
        with pytest.raises(InvalidName, match=r"NUL|'/'"):
            check_name("disk name", name)
        assert InvalidName.exit_code == 2


def test_restore_target_already_holds_the_files(case: Case) -> None:
    target = case.tmp / "target"
    target.mkdir()
    (target / "vda.raw").write_bytes(b"precious")
    case.fails(2, "restore", case.dom, "latest", "--target", str(target), "--format", "raw",
               match="already exists")
    assert (target / "vda.raw").read_bytes() == b"precious"
    assert sorted(p.name for p in target.iterdir()) == ["vda.raw"]


# --- damaged repository files --------------------------------------------------


def _damage_manifest(case: Case, how: str) -> Path:
    p = case.backup_dir(case.t.ids[0]) / "manifest.json"
    if how == "truncated":
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    elif how == "garbage":
        p.write_bytes(bytes(range(256)) * 8)
    elif how == "oversized":
        with open(p, "r+b") as f:
            f.truncate(20 * MiB)
    return p


def _damage_index(case: Case, how: str) -> Path:
    p = case.backup_dir(case.t.ids[0]) / "vda.index"
    if how == "truncated":
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    elif how == "garbage":
        p.write_bytes(bytes(range(256)) * 8)
    elif how == "oversized":
        with open(p, "r+b") as f:
            f.truncate(300 * MiB)
    return p


@pytest.mark.parametrize("what", ["manifest", "index"])
@pytest.mark.parametrize("how", ["truncated", "garbage", "oversized"])
def test_damaged_manifest_or_index(case: Case, what: str, how: str) -> None:
    (_damage_manifest if what == "manifest" else _damage_index)(case, how)
    full, inc = case.t.ids
    line = case.fails(5, "verify", match=full)
    assert inc not in line
    case.fails(5, "verify", "--data", match=full)
    if what == "index":
        case.fails(5, "restore", case.dom, full, "--target", str(case.tmp / "t"))
    # gc cannot know what a damaged backup needs: it refuses to delete anything.
    case.fails(5, "gc", match="refuses")
    # The other backup is untouched and restores.
    case.ok("verify", case.dom, inc, "--data")
    case.restores(inc)


def test_flipped_bit_in_a_chunk(case: Case) -> None:
    chunks = sorted(p for p in (case.repo / "chunks").rglob("*") if p.is_file())
    victim = chunks[len(chunks) // 2]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    # verify --data changes one thing: it moves the damaged chunk to quarantine/.
    cp = case.cli("--json", "verify", "--data")
    assert cp.returncode == 5, cp.stderr
    line = one_line_error(case.cli("verify"))
    assert case.t.ids[0] in line or case.t.ids[1] in line
    doc = json.loads(cp.stdout)
    assert doc["error"]["report"]["chunks_damaged"] == 1
    (moved,) = doc["error"]["report"]["chunks_quarantined"]
    assert moved["chunk"] == victim.name and not victim.exists()
    assert (case.repo / moved["key"]).read_bytes() == bytes(data)
    for damaged in doc["error"]["report"]["damaged"]:
        case.fails(5, "restore", case.dom, damaged["id"], "--target",
                   str(case.tmp / f"t-{damaged['id']}"), match="quarantined")


def test_newer_format_version(case: Case) -> None:
    cfg = case.repo / "config.json"
    doc = json.loads(cfg.read_text())
    doc["version"] = 99
    cfg.write_text(json.dumps(doc))
    for args in (("list",), ("verify",), ("gc",), ("backup", case.dom),
                 ("restore", case.dom, "latest", "--target", str(case.tmp / "t"))):
        case.fails(1, *args, match="newer than this backupkit supports")


@pytest.mark.parametrize("where", ["index", "chunk_dir", "backup_dir"])
def test_planted_symlink(case: Case, where: str) -> None:
    outside = case.tmp / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"not yours")
    full = case.t.ids[0]
    if where == "index":
        p = case.backup_dir(full) / "vda.index"
        shutil.copy(p, outside / "vda.index")
        p.unlink()
        p.symlink_to(outside / "vda.index")
    elif where == "chunk_dir":
        (case.repo / "chunks" / "zz").symlink_to(outside, target_is_directory=True)
    else:
        d = case.backup_dir(full)
        shutil.move(str(d), str(outside / full))
        d.symlink_to(outside / full, target_is_directory=True)
    if where == "chunk_dir":
        case.ok("verify")  # no backup references it: nothing to verify there
    else:
        case.fails(5, "verify", match="symlink")
    # gc walks the whole tree: it refuses rather than follow (or delete through) a link.
    case.fails(5, "gc", match="symlink")
    assert (outside / "keep").read_bytes() == b"not yours"
    if where == "index":
        case.fails(5, "restore", case.dom, full, "--target", str(case.tmp / "t"),
                   match="symlink")
