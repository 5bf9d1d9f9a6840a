"""Host-wide locks: flock(2) on files under a local directory's locks/.

Repository locks are objects in the store (backupkit.repo.locks); these guard what
only this host shares, such as libvirt's one backup job per domain
(backupkit.ops.backup.host_domain_lock).

The kernel releases an flock when its last descriptor closes, so a killed
process never leaves a lock behind.  The holder of an exclusive lock writes
"pid N (command) since TIME" into the file so that a process that finds it
busy can name it; for shared holders (many at once) the names come from
/proc/locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from backupkit.errors import Busy, CorruptRepository, PermissionDenied, ReadOnly

log = logging.getLogger("backupkit.locks")

POLL_INTERVAL = 0.05
LOCK_DIR = "locks"


def _describe_self() -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not prog or prog.startswith("-"):
        prog = f"python {prog}".strip()
    argv = [prog, *sys.argv[1:]]
    cmd = " ".join(argv)
    if len(cmd) > 200:
        cmd = cmd[:197] + "..."
    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"pid {os.getpid()} ({cmd}) since {since}"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return "?"
    args = [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
    if args:
        args[0] = os.path.basename(args[0])
    return " ".join(args)[:200] or "?"


def _holders_from_proc(fd: int) -> list[int]:
    """pids holding an flock on the file open as fd, from /proc/locks."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: list[int] = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" ("->" for waiters)
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[2] != "->" \
                        and fields[5] == dev:
                    pid = int(fields[4])
                    if pid != os.getpid() and pid not in pids:
                        pids.append(pid)
    except (OSError, ValueError):
        return []
    return pids


_CANNOT_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _cannot_write(e: OSError, root: str, name: str) -> Exception:
    if e.errno == errno.EROFS:
        return ReadOnly(f"cannot create the lock file {LOCK_DIR}/{name}", path=root)
    return PermissionDenied(f"cannot open the lock file: {e.strerror}",
                            path=os.path.join(root, LOCK_DIR, name))


def _open_lock_file(root: str, name: str, shared: bool) -> int | None:
    """Open (creating) root/locks/name without following symlinks.

    A repository where this process cannot write (a read-only mount or snapshot,
    or files it may only read) still has its lock file: it is opened read-only,
    which is enough for flock(2).  A shared holder (a reader) goes on without a
    lock when the file is missing and cannot be created (None): nothing can
    change such a repository through this mount.
    """
    try:
        dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in _CANNOT_WRITE:
            raise _cannot_write(e, root, name) from e
        raise
    try:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            ldfd = os.open(LOCK_DIR, flags, dir_fd=dfd)
        except FileNotFoundError:
            try:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(LOCK_DIR, 0o755, dir_fd=dfd)
            except OSError as e:
                if shared and e.errno in _CANNOT_WRITE:
                    log.info("repository %s: no lock directory and none can be made (%s); "
                             "reading without a lock", root, e.strerror)
                    return None
                raise _cannot_write(e, root, name) from e
            ldfd = os.open(LOCK_DIR, flags, dir_fd=dfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CorruptRepository(f"{LOCK_DIR} is a symlink or not a directory", path=root) from e
        raise
    finally:
        os.close(dfd)
    try:
        # O_NONBLOCK: a FIFO planted here must not block the open (it is refused below).
        nofollow = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | nofollow, 0o644, dir_fd=ldfd)
        except OSError as e:
            if e.errno not in _CANNOT_WRITE:
                raise
            try:
                fd = os.open(name, os.O_RDONLY | nofollow, dir_fd=ldfd)
            except FileNotFoundError:
                if shared:
                    log.info("repository %s: no lock file %s and none can be made (%s); "
                             "reading without a lock", root, name, e.strerror)
                    return None
                raise _cannot_write(e, root, name) from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptRepository(f"{LOCK_DIR}/{name} is a symlink", path=root) from e
        raise
    finally:
        os.close(ldfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptRepository(f"{LOCK_DIR}/{name} is not a regular file", path=root)
    return fd


@contextlib.contextmanager
def hold(root: str, name: str, what: str, *, shared: bool = False, wait: float = 0.0
         ) -> Iterator[None]:
    """Hold the lock file root/locks/name; Busy(what, holder) after `wait` seconds."""
    fd = _open_lock_file(root, name, shared)
    if fd is None:
        yield
        return
    try:
        op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Busy(what=what, holder=_holder(fd)) from None
                time.sleep(POLL_INTERVAL)
        if not shared:
            with contextlib.suppress(OSError):  # EBADF: opened read-only (see above)
                info = _describe_self().encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, info + b"\n", 0)
        try:
            yield
        finally:
            if not shared:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 1024, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    text = " ".join(text.split())
    pids = _holders_from_proc(fd)
    # The text may be stale (a holder killed before clearing it): trust it only
    # when /proc/locks agrees or cannot tell.
    if text and (not pids or any(text.startswith(f"pid {pid} ") for pid in pids)):
        return text
    if pids:
        return ", ".join(f"pid {pid} ({_cmdline(pid)})" for pid in pids)
    return text or "another process"
