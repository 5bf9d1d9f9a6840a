"""Fixtures for the cold hygiene tests: fixed-size volumes where space really runs out.

A volume is a loop device over a sparse file (``losetup --find --show``): a
qcow2 written straight onto it cannot grow past the device size, exactly
like a qcow2 on an LV.  The loop devices are detached in teardown even when
the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MiB = 1 << 20
GiB = 1 << 30


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _loop_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for losetup"
    if shutil.which("losetup") is None:
        return "losetup not installed"
    return None


@pytest.fixture
def loop_volume(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """Factory: loop_volume(size) -> /dev/loopN of exactly size bytes, zeroed."""
    reason = _loop_usable()
    if reason:
        pytest.skip(reason)
    devices: list[str] = []

    def make(size: int) -> str:
        backing = tmp_path / f"volume{len(devices)}.raw"
        with open(backing, "wb") as f:
            f.truncate(size)
        cp = sh("losetup", "--find", "--show", str(backing), check=False)
        if cp.returncode != 0:
            pytest.fail(f"losetup failed: {cp.stderr.strip()}")
        dev = cp.stdout.strip()
        devices.append(dev)
        return dev

    try:
        yield make
    finally:
        for dev in devices:
            sh("losetup", "-d", dev, check=False)


@pytest.fixture
def hold_open() -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Factory: keep an image open read-write in qemu-nbd (like a running QEMU)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(image: str) -> subprocess.Popen[bytes]:
        sock = f"{image}.sock"
        p = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", sock, image],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(p)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if p.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"qemu-nbd did not start on {image}")
            time.sleep(0.02)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(10)
        if p.stderr:
            p.stderr.close()
