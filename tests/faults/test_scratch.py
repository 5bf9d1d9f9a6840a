"""The scratch directory: a full scratch filesystem must never fail the guest's
writes (issue 17 item 1), QEMU's unprivileged user must reach it (issue 24), and a
bad ``scratch_dir`` is a usage error (issue 17 item 7)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backupkit import virt
from backupkit.errors import NoSpace
from backupkit.ops import backup as op
from backupkit.repo import Repository
from tests import rig
from tests.conftest import run_cli, tmpfs
from tests.faults.conftest import MakeDomain, MiB, guest_flush, one_line_error

pytestmark = pytest.mark.libvirt


@pytest.fixture
def small_scratch(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs as scratch_dir (mode 0711, as the units make it)."""
    with tmpfs(tmp_path / "scratch", "size=24m,mode=0711") as mnt:
        yield mnt


def assert_guest_writes_landed(td: rig.TestDomain) -> None:
    """The running disk holds every write the test made (its raw reference).

    Needed because HMP ``qemu-io`` prints its result into QEMU's log, not into the
    monitor reply: a failed guest write ("write failed: No space left on device",
    what the old code caused) is invisible to ``rig.TestDomain.write``.
    """
    guest_flush(td, "vda")
    d = td.disk("vda")
    cp = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", d.format,
                         str(d.reference), str(d.path)], capture_output=True, text=True)
    assert cp.returncode == 0, f"guest writes lost: {cp.stdout}{cp.stderr}"
    log = Path(f"/var/log/libvirt/qemu/{td.name}.log")
    if log.exists():
        assert "write failed" not in log.read_text(errors="replace")


def _backup(repo: Repository, td: rig.TestDomain, scratch: Path, min_free: int,
            hooks: op.Hooks | None = None) -> dict[str, Any]:
    return op.backup(repo, virt.connect(rig.URI),
                     op.Request(domain=td.name, scratch_dir=str(scratch),
                                scratch_min_free=min_free), hooks)


def test_full_scratch_ends_the_backup_not_the_guest_writes(
        make_domain: MakeDomain, small_scratch: Path, tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "repo"), chunk_size=256 * 1024)
    td = make_domain([("qcow2", 64 * MiB)])
    td.write("vda", 0, 48 * MiB, 0x11)  # data the job must save before each overwrite
    first = _backup(repo, td, small_scratch, 8 * MiB)

    # A backup with the guest writing 40 MiB over blocks not yet read: each write
    # copies the old data into the 24 MiB scratch first.  Every write must land
    # (checked on the disk itself: seen lost without the watch); the backup ends.
    def guest_writes() -> None:
        for i in range(40):
            td.write("vda", i * MiB, MiB, 0x40 + i % 16)
            time.sleep(0.03)

    with pytest.raises(NoSpace, match="scratch space ran low"):
        _backup(repo, td, small_scratch, 8 * MiB, op.Hooks(job_started=guest_writes))
    assert_guest_writes_landed(td)
    dom = virt.connect(rig.URI).domain(td.name)
    assert not dom.backup_job_active()
    assert [c.name for c in dom.checkpoints()] == [first["checkpoint"]]
    assert os.listdir(small_scratch) == []
    assert [m.id for m in repo.list_backups(td.name)] == [first["id"]]

    # The margin got thin but held: the backup succeeds with a warning, and holds
    # the disk as it was when it started.
    ref = td.disk("vda").snapshot_reference(tmp_path / "ref-thin")

    def few_writes() -> None:
        for i in range(14):  # 14 MiB of old data to save: ~10 MiB left, above 6 MiB
            td.write("vda", i * MiB, MiB, 0x60 + i)
        time.sleep(0.5)  # let the watch see the scratch as it is now

    hooks = op.Hooks(job_started=few_writes)
    thin = _backup(repo, td, small_scratch, 6 * MiB, hooks)
    assert thin["mode"] == "incremental", thin["reason"]
    assert any("scratch space got thin" in w for w in thin.get("warnings", [])), thin
    assert_guest_writes_landed(td)
    target = tmp_path / "restored"
    from backupkit.ops import restore

    restore.restore(repo, td.name, thin["id"], str(target), fmt="raw")
    rig.compare(ref, target / "vda.raw", "raw")

    # Less free than scratch_min_free: the backup does not start.
    with pytest.raises(NoSpace, match="backup not started"):
        _backup(repo, td, small_scratch, 64 * MiB)
    assert [c.name for c in dom.checkpoints()] == [thin["checkpoint"]]
    assert os.listdir(small_scratch) == []


def test_run_directory_belongs_to_qemu_user(make_domain: MakeDomain, tmp_path: Path) -> None:
    """QEMU runs as libvirt-qemu (or whatever the DAC label says): the run's directory is
    its, mode 0700, holding the socket and scratch file; scratch_dir is 0711."""
    repo = Repository.init(str(tmp_path / "repo"), chunk_size=256 * 1024)
    td = make_domain([("qcow2", 16 * MiB)])
    td.write("vda", 0, MiB, 0x11)
    scratch = tmp_path / "n" / "s"  # created by the backup (short: a socket goes in)
    user = virt.connect(rig.URI).domain(td.name).qemu_user()
    assert user is not None and user.uid != 0, "the rig runs QEMU unprivileged"
    seen: dict[str, Any] = {}

    def look() -> None:
        (run,) = list(scratch.iterdir())
        st = run.stat()
        seen.update(uid=st.st_uid, gid=st.st_gid, mode=st.st_mode & 0o7777,
                    files=sorted(p.name for p in run.iterdir()))

    _backup(repo, td, scratch, 1 * MiB, op.Hooks(job_started=look))
    assert (seen["uid"], seen["gid"], seen["mode"]) == (user.uid, user.gid, 0o700), seen
    assert seen["files"] == ["sock", "vda.scratch"], seen
    assert scratch.stat().st_mode & 0o7777 == 0o711
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("case", ["empty", "relative", "file", "unreachable"])
def test_bad_scratch_dir_exits_2(case: str, make_domain: MakeDomain, tmp_path: Path) -> None:
    # Only an unreachable directory needs a domain (QEMU's user comes from its label);
    # the others are refused before the domain is even looked up.
    name = make_domain([("qcow2", 16 * MiB)]).name if case == "unreachable" else "bk-none"
    repo = tmp_path / "repo"
    assert run_cli("--repo", str(repo), "init").returncode == 0
    value = {"empty": "", "relative": "scratch", "file": str(tmp_path / "afile"),
             "unreachable": str(tmp_path / "closed" / "scratch")}[case]
    (tmp_path / "afile").write_text("x")
    (tmp_path / "closed").mkdir(mode=0o700)
    os.chmod(tmp_path / "closed", 0o700)
    cfg = tmp_path / "bk.toml"
    cfg.write_text(f'scratch_dir = "{value}"\n')
    cp = run_cli("--config", str(cfg), "--repo", str(repo), "backup", name)
    assert cp.returncode == 2, cp.stderr
    line = one_line_error(cp)
    assert "scratch_dir" in line, line
    if case == "unreachable":
        assert str(tmp_path / "closed") in line and "cannot enter" in line, line
        assert [c.name for c in virt.connect(rig.URI).domain(name).checkpoints()] == []
