"""Fixtures for tests with a real Linux guest (see docs/test-guest.md).

guest_image          session: GuestImage(kernel, initrd, ...) built or reused from the cache
linux_guest_factory  function: start(**start_guest kwargs) -> Guest; all torn down after
linux_guest          function: one running guest (writer on, agent answering guest-ping)
(libvirt_conn, the connection, comes from tests/conftest.py.)

Without libvirt or a buildable guest these skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest import bkguest


def unavailable(reason: str) -> None:
    """Skip, or fail under CI=true (CI must run these tests, not silently skip them)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: not skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def guest_image() -> bkguest.GuestImage:
    try:
        return bkguest.build_guest()
    except bkguest.GuestBuildError as e:
        unavailable(f"cannot build the test guest: {e}")
        raise  # unreachable: unavailable() raises


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"bkguest_rep_{rep.when}", rep)
    return rep


@pytest.fixture
def linux_guest_factory(
    request: pytest.FixtureRequest, libvirt_conn: Any, guest_image: bkguest.GuestImage,
    tmp_path: Path,
) -> Iterator[Callable[..., bkguest.Guest]]:
    """start(**kw) -> Guest, kw as bkguest.start_guest (name, data_disk, writer, agent,
    persistent, cmdline, timeout, ...).  Every guest started is destroyed and undefined,
    and its files in tmp_path removed, at teardown, pass or fail."""
    started: list[tuple[str, Path]] = []

    def start(**kw: Any) -> bkguest.Guest:
        name = kw.pop("name", None) or bkguest.new_name()
        started.append((name, tmp_path))
        return bkguest.start_guest(libvirt_conn, guest_image, tmp_path, name=name, **kw)

    yield start

    rep = getattr(request.node, "bkguest_rep_call", None)
    failed = rep is None or rep.failed
    for name, _ in started:
        bkguest.destroy_domain(libvirt_conn, name)
        console = tmp_path / f"{name}-console.log"
        if failed and console.exists():
            print(f"--- console of {name} (last 3000 chars) ---")
            print(console.read_text(errors="replace")[-3000:])
    for p in tmp_path.iterdir():
        if p.is_file() and (p.suffix in (".qcow2", ".raw", ".log", ".img")):
            p.unlink(missing_ok=True)


@pytest.fixture
def linux_guest(linux_guest_factory: Callable[..., bkguest.Guest]) -> bkguest.Guest:
    """A running guest: ext4 data disk (qcow2, 256 MiB, serial 'data', vda) mounted at
    /data, the writer running, the agent answering guest-ping."""
    return linux_guest_factory()
