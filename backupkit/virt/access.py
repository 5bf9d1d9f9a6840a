"""Who QEMU runs as, and whether that user can reach a path (no libvirt calls here).

On a stock host QEMU runs unprivileged (Debian: ``libvirt-qemu``; Fedora: ``qemu``;
the name is never assumed).  libvirt's DAC driver chowns the files it is told
about (images, scratch files) but not their parent directories, so every
directory on the way to a file QEMU opens or creates must be searchable by that
user.  The identity comes from libvirt: the DAC ``<seclabel>`` of the running
domain, else the DAC base label in the host capabilities (libvirt's reading of
``user``/``group`` in qemu.conf).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class QemuUser:
    uid: int
    gid: int
    source: str  # where the identity came from, for messages

    @property
    def privileged(self) -> bool:
        return self.uid == 0

    @property
    def groups(self) -> frozenset[int]:
        """Primary and supplementary groups (libvirt gives QEMU the user's groups)."""
        try:
            name = pwd.getpwuid(self.uid).pw_name
            return frozenset(os.getgrouplist(name, self.gid))
        except KeyError:
            return frozenset({self.gid})

    def describe(self) -> str:
        try:
            name = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            name = "?"
        return f"{name} (uid {self.uid}, gid {self.gid}, from {self.source})"


def parse_dac_label(label: str, source: str) -> QemuUser | None:
    """``+64055:+994`` (numeric) or ``user:group`` (names) as libvirt writes DAC labels."""
    user, sep, group = label.strip().partition(":")
    if not sep:
        return None
    try:
        uid = int(user[1:]) if user.startswith("+") else pwd.getpwnam(user).pw_uid
        gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        return None
    return QemuUser(uid, gid, source)


def can_search(st: os.stat_result, user: QemuUser) -> bool:
    if user.privileged:
        return True
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in user.groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def blocking_dir(path: str, user: QemuUser) -> str | None:
    """The first existing directory on the way to ``path`` (itself included when it
    is a directory) that ``user`` cannot search, or None when all can be."""
    path = os.path.abspath(path)
    dirs = [path] if os.path.isdir(path) else []
    parent = os.path.dirname(path)
    while True:
        dirs.append(parent)
        if parent == "/":
            break
        parent = os.path.dirname(parent)
    for d in reversed(dirs):
        try:
            st = os.stat(d)
        except FileNotFoundError:
            continue
        if not can_search(st, user):
            return d
    return None


def make_searchable(path: str, user: QemuUser) -> bool:
    """Add the search bits (``chmod go+x``, never read) to a directory we own.

    Returns True when ``user`` can search it afterwards.
    """
    st = os.stat(path)
    if can_search(st, user):
        return True
    if st.st_uid != os.geteuid():
        return False
    os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IXGRP | stat.S_IXOTH)
    return True
