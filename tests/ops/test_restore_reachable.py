"""restore --define: the new domain's QEMU runs unprivileged (libvirt-qemu here) and
must reach its disks; libvirt chowns the image files but not the directories above
them (issue 24)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import rig
from tests.conftest import run_cli

pytestmark = pytest.mark.libvirt


def _cli_umask_077(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as the systemd units run it (UMask=0077): new directories are 0700."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPKIT_")}
    return subprocess.run([sys.executable, "-m", "backupkit", *args], capture_output=True,
                          text=True, env=env, timeout=120, preexec_fn=lambda: os.umask(0o077))


def test_restore_define_reachable_by_qemu_user(make_domain: Callable[..., rig.TestDomain],
                                               libvirt_conn: Any, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 16 * rig.MiB)])
    td.write("vda", 0, rig.MiB, 0x5A)
    cfg = tmp_path / "bk.toml"
    cfg.write_text(f'repository = "{tmp_path / "repo"}"\nscratch_dir = "{tmp_path / "s"}"\n')
    base = ["--config", str(cfg)]
    assert run_cli(*base, "init").returncode == 0
    assert run_cli(*base, "backup", td.name).returncode == 0

    # A parent QEMU's user cannot enter, not ours to change: refused before writing.
    closed = tmp_path / "closed"
    closed.mkdir()
    os.chmod(closed, 0o700)
    subprocess.run(["chown", "nobody", str(closed)], check=True)
    new = f"{td.name}-r"
    cp = _cli_umask_077(*base, "restore", td.name, "--target", str(closed / "t"),
                        "--define", new)
    assert cp.returncode == 2, cp.stderr
    assert "cannot enter" in cp.stderr and str(closed) in cp.stderr, cp.stderr
    assert not (closed / "t").exists()
    assert new not in [d.name() for d in libvirt_conn.listAllDomains(0)]

    # New directories (0700 under this umask) get the search bits; the domain starts.
    target = tmp_path / "deep" / "restored"
    try:
        cp = _cli_umask_077(*base, "restore", td.name, "--target", str(target),
                            "--define", new)
        assert cp.returncode == 0, cp.stderr
        for d in (target, target.parent):
            assert d.stat().st_mode & 0o011 == 0o011, oct(d.stat().st_mode)
        dom = libvirt_conn.lookupByName(new)
        dom.create()
        assert dom.isActive()
    finally:
        rig.remove_domain(libvirt_conn, new)
