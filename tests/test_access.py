"""QEMU's identity from DAC labels and directory reachability (pure logic)."""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

from backupkit.virt.access import QemuUser, blocking_dir, can_search, parse_dac_label


def test_parse_dac_label_numeric_and_names() -> None:
    assert parse_dac_label("+64055:+994", "x") == QemuUser(64055, 994, "x")
    # Distributions name the user differently (qemu, libvirt-qemu, ...): names resolve.
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    assert parse_dac_label(f"nobody:{group}", "y") == QemuUser(nobody.pw_uid, nobody.pw_gid, "y")
    assert parse_dac_label("no-such-user-xyz:+1", "z") is None
    assert parse_dac_label("garbage", "z") is None


def test_can_search_by_owner_group_other(tmp_path: Path) -> None:
    user = QemuUser(4242, 4243, "t")
    d = tmp_path / "d"
    d.mkdir()
    os.chown(d, 4242, 0)
    os.chmod(d, 0o700)
    assert can_search(d.stat(), user)
    os.chmod(d, 0o070)
    assert not can_search(d.stat(), user)  # owner bits decide for the owner
    os.chown(d, 0, 4243)
    assert can_search(d.stat(), user)
    os.chmod(d, 0o701)
    assert not can_search(d.stat(), user)  # group bits decide for the group
    os.chown(d, 0, 0)
    assert can_search(d.stat(), user)
    assert can_search(d.stat(), QemuUser(0, 0, "root"))


def test_blocking_dir_names_the_first_closed_directory(tmp_path: Path) -> None:
    user = QemuUser(4242, 4243, "t")  # tmp_path and its parents are searchable (conftest)
    closed = tmp_path / "a"
    (closed / "b").mkdir(parents=True)
    os.chmod(closed, 0o700)
    assert blocking_dir(str(closed / "b" / "missing" / "file"), user) == str(closed)
    os.chmod(closed, 0o711)
    assert blocking_dir(str(closed / "b" / "missing"), user) is None
