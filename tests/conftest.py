"""Shared fixtures: a libvirt connection and real test domains.

Tests that need libvirt are marked ``libvirt``.  When libvirt is not reachable
they skip on a developer machine but FAIL under CI (CI=true), so a broken rig
can never pass as green.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from backupkit.repo import Repository
from tests import rig

if TYPE_CHECKING:
    from backupkit import virt


@pytest.fixture(autouse=True)
def _restore_backupkit_logger() -> Iterator[None]:
    """cli.main points the backupkit logger at the sys.stderr of its moment (a test's
    captured one): put it back afterwards, or a later test's errors go to a closed stream."""
    logger = logging.getLogger("backupkit")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# gc keeps unreferenced objects younger than gc_grace (an hour by default, against
# clock skew between hosts): tests run on one clock and check what gc frees at once.
# The tests of the grace itself set their own values (tests/ops/test_gc_fleet.py).
os.environ.setdefault("BACKUPKIT_GC_GRACE", "0")
os.environ.setdefault("BACKUPKIT_MAX_CLOCK_SKEW", "0")


def need_tool(name: str, package: str) -> None:
    """Skip when the tool `name` is missing, but fail under CI=true: scripts/setup.sh
    installs `package`, so a missing tool there is a broken install step."""
    if shutil.which(name):
        return
    if IN_CI:
        pytest.fail(f"{name} ({package}, installed by scripts/setup.sh) is required in CI",
                    pytrace=False)
    pytest.skip(f"{name} ({package}) is not installed")


def _libvirt_unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"libvirt is required in CI: {reason}", pytrace=False)
    pytest.skip(f"libvirt not available: {reason}")


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[object]:
    try:
        import libvirt
    except ImportError as e:
        _libvirt_unavailable(str(e))
    try:
        conn = libvirt.open(rig.URI)
    except libvirt.libvirtError as e:
        _libvirt_unavailable(str(e))
    yield conn
    conn.close()


@pytest.fixture
def tmp_path(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pytest's tmp_path, traversable by QEMU's unprivileged user.

    QEMU runs as ``libvirt-qemu`` as on every stock host; libvirt chowns the image
    files it is given but not their parent directories, and pytest makes its
    directories 0700.  Give the chain below /tmp the search bit (not read: nothing
    is listed), as an operator's image directory has.
    """
    traversable(tmp_path, tmp_path_factory.getbasetemp().parent)
    return tmp_path


def traversable(path: Path, top: Path) -> None:
    """Add the search bit to ``path`` and each of its parents up to ``top`` (ours only)."""
    for d in (path, *path.parents):
        st = d.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o011 != 0o011:
            os.chmod(d, (st.st_mode & 0o7777) | 0o011)
        if d == top:
            break


@pytest.fixture
def make_domain(libvirt_conn: object, tmp_path: Path
                ) -> Iterator[Callable[..., rig.TestDomain]]:
    """Factory: make_domain([("qcow2", 64 * MiB), ("raw", 32 * MiB)], running=True)."""
    made: list[rig.TestDomain] = []

    def factory(disks: list[tuple[str, int]] | None = None, *, running: bool = True
                ) -> rig.TestDomain:
        td = rig.create_domain(libvirt_conn, tmp_path / "images",  # type: ignore[arg-type]
                               disks or [("qcow2", 64 * rig.MiB)], running=running)
        made.append(td)
        return td

    yield factory
    for td in made:
        td.cleanup()


@contextlib.contextmanager
def tmpfs(mnt: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``mnt`` (created) with ``options`` (root only): skipped when it
    cannot be mounted, a failure under CI=true."""
    mnt.mkdir()
    cp = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                        capture_output=True, text=True, check=False)
    if cp.returncode != 0:
        why = f"cannot mount a tmpfs ({options}): {cp.stderr.strip()}"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs."""
    with tmpfs(tmp_path / "mnt", "size=1m") as mnt:
        yield mnt


@pytest.fixture
def repo_path(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def repo(repo_path: Path) -> Repository:
    """A fresh repository at repo_path (256 KiB chunks) for the libvirt tests."""
    return Repository.init(str(repo_path), chunk_size=256 * 1024)


@pytest.fixture
def conn(libvirt_conn: object) -> virt.Connection:
    """backupkit's libvirt adapter on the test URI (libvirt_conn: reachable, else skip/fail)."""
    from backupkit import virt  # imports libvirt: only once libvirt_conn found it

    return virt.connect(rig.URI)


@pytest.fixture
def scratch_dir(tmp_path: Path) -> Path:
    p = tmp_path / "scratch"
    p.mkdir()
    return p


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = False,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real backupkit command line in a child process."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("BACKUPKIT_CONFIG", "BACKUPKIT_REPO", "JOURNAL_STREAM")}
    # A host config must not leak into tests: an empty file, unless the test gives one.
    full_env["BACKUPKIT_CONFIG"] = "/dev/null"
    if env:
        full_env.update(env)
    cp = subprocess.run([sys.executable, "-m", "backupkit", *args], capture_output=True,
                        text=True, env=full_env, timeout=timeout, check=False)
    if check and cp.returncode != 0:
        raise AssertionError(f"backupkit {' '.join(args)} exit {cp.returncode}: {cp.stderr}")
    return cp


@pytest.fixture
def s3_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """s3://BUCKET/PREFIX on the real test gateway (scripts/start-s3.sh), empty, removed
    afterwards; skipped when the gateway is down, a failure under CI=true."""
    from tests.s3rig import s3_location

    with s3_location(monkeypatch) as url:
        yield url
