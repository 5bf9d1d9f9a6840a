"""Locks between processes: Busy names the holder; a killed holder leaves no lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from backupkit import errors
from backupkit.repo import Repository

ROOT = Path(__file__).resolve().parents[2]

HOLDER = """
import sys
from backupkit.repo import Repository
repo = Repository.open(sys.argv[1])
kind = sys.argv[2]
cm = {"domain": lambda: repo.lock_domain("vm1"), "shared": repo.lock_shared,
      "exclusive": repo.lock_exclusive}[kind]()
with cm:
    print("locked", flush=True)
    sys.stdin.read()
"""


@contextmanager
def holder(repo: Repository, kind: str) -> Iterator[subprocess.Popen[str]]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, repo.path, kind, "backup", "vm1"],
                         cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "locked"
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdin, p.stdout):
            if f:
                f.close()


def test_domain_lock_busy_names_holder(repo: Repository) -> None:
    with holder(repo, "domain") as p:
        with pytest.raises(errors.Busy) as e, repo.lock_domain("vm1"):
            pass
        assert e.value.exit_code == 3
        msg = str(e.value)
        assert msg.startswith("domain vm1 is locked by pid ")
        assert f"pid {p.pid} " in msg and "backup vm1" in msg and " since 20" in msg
        # Other domains are independent; shared repository locks coexist.
        with repo.lock_domain("vm2"), repo.lock_shared():
            pass
        # A killed holder can never leave the lock behind.
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        with repo.lock_domain("vm1"):
            pass


def test_wait_for_lock(repo: Repository) -> None:
    with holder(repo, "domain") as p:
        threading.Timer(0.3, lambda: p.kill()).start()
        t0 = time.monotonic()
        with repo.lock_domain("vm1", wait=10):
            assert time.monotonic() - t0 >= 0.25
        # Same process, second open file description: conflicts too.
        with pytest.raises(errors.Busy), repo.lock_domain("vm1"), \
                repo.lock_domain("vm1", wait=0.2):
            pass


def test_gc_excluded_by_backups_and_backups_by_gc(repo: Repository) -> None:
    with holder(repo, "shared") as p:
        with repo.lock_shared():
            pass
        with pytest.raises(errors.Busy) as e, repo.lock_exclusive():
            pass
        assert f"pid {p.pid}" in str(e.value)  # found through /proc/locks
    with holder(repo, "exclusive") as p:
        with pytest.raises(errors.Busy) as e, repo.lock_shared():
            pass
        assert f"pid {p.pid}" in str(e.value)


def test_stale_holder_text_not_trusted(repo: Repository) -> None:
    with holder(repo, "exclusive") as p:
        os.kill(p.pid, signal.SIGKILL)  # dies without clearing its text
        p.wait()
    with holder(repo, "shared") as p2:
        with pytest.raises(errors.Busy) as e, repo.lock_exclusive():
            pass
        assert f"pid {p2.pid}" in str(e.value)
        assert f"pid {p.pid}" not in str(e.value)
