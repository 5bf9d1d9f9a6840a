"""The test guest itself: it boots, its agent answers and freezes, its writer's data
survives a destroy and checks out on the host and in a verify boot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.guest import bkguest

pytestmark = [pytest.mark.slow]


def wait_manifest(guest: bkguest.Guest, at_least: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = guest.manifest_count()
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.3)


def test_image_is_built_and_cached(guest_image: bkguest.GuestImage) -> None:
    assert guest_image.kernel.read_bytes()[:4] == b"\x7fELF"  # uncompressed vmlinux
    assert guest_image.initrd.read_bytes()[:6] == b"070701"  # newc cpio
    mtime = guest_image.initrd.stat().st_mtime_ns
    again = bkguest.build_guest(guest_image.cache)
    assert again == guest_image
    assert guest_image.initrd.stat().st_mtime_ns == mtime  # reused, not rebuilt
    order = (guest_image.cache / "kernel/modules/load-order").read_text().split()
    for m in ("virtio_pci", "virtio_blk", "virtio_console", "ext4", "jbd2", "crc32c_generic"):
        assert m in order
    assert order.index("jbd2") < order.index("ext4")


def test_expected_content_matches_the_guest_writer() -> None:
    # `yes "backupkit f7" | head -c 8192`
    data = bkguest.expected_content(7)
    assert len(data) == 8 * 1024
    assert data.startswith(b"backupkit f7\nbackupkit f7\n")


@pytest.mark.libvirt
def test_guest_boots_and_agent_answers(
    linux_guest: bkguest.Guest, record_property: Any,
) -> None:
    record_property("boot_seconds", round(linux_guest.boot_seconds, 1))
    print(f"guest {linux_guest.name} ({linux_guest.virt_type}) answered guest-ping "
          f"{linux_guest.boot_seconds:.1f}s after start (first boot, with mkfs)")
    assert linux_guest.boot_seconds < 60
    assert linux_guest.agent("guest-ping") == {}
    mounts = {fs["mountpoint"]: fs for fs in linux_guest.agent("guest-get-fsinfo")}
    assert mounts["/data"]["type"] == "ext4"
    assert mounts["/data"]["name"] == "vda"  # no udev in the guest: no serial here
    assert "BKGUEST: ready" in linux_guest.console()
    assert wait_manifest(linux_guest, 3) >= 3  # the writer is running


@pytest.mark.libvirt
def test_fsfreeze_thaw_and_frozen_copy_is_clean(
    linux_guest: bkguest.Guest, libvirt_conn: Any, guest_image: bkguest.GuestImage,
) -> None:
    before = wait_manifest(linux_guest, 5)
    t0 = time.monotonic()
    assert linux_guest.dom.fsFreeze() == 1  # only /data: the initramfs root has no device
    window = time.monotonic() - t0
    assert linux_guest.agent("guest-fsfreeze-status") == "frozen"
    assert linux_guest.dom.fsThaw() == 1
    assert linux_guest.agent("guest-fsfreeze-status") == "thawed"
    print(f"freeze took {window:.2f}s")
    assert wait_manifest(linux_guest, before + 3) >= before + 3  # writes resume

    # Destroyed while frozen: the disk is what a quiesced backup copies.  The journal
    # must be clean (strict: fsck -n before any mount) and every listed file intact.
    count = wait_manifest(linux_guest, before + 5)
    assert linux_guest.dom.fsFreeze() == 1
    linux_guest.dom.destroy()
    host = bkguest.check_disk_on_host(linux_guest.data_disk, replay=False)
    assert host.ok and host.fsck_clean, host.detail + "\n".join(host.bad)
    assert host.files >= count
    t0 = time.monotonic()
    ok, console = bkguest.boot_verify(libvirt_conn, linux_guest.data_disk, 90, mode="strict",
                                      image=guest_image)
    print(f"verify boot took {time.monotonic() - t0:.1f}s")
    assert ok, console[-3000:]
    assert f"files={host.files} bad=0" in console


@pytest.mark.libvirt
def test_writer_data_survives_destroy(
    linux_guest: bkguest.Guest, libvirt_conn: Any, guest_image: bkguest.GuestImage,
    tmp_path: Path,
) -> None:
    count = wait_manifest(linux_guest, 10)
    assert count >= 10
    linux_guest.dom.destroy()  # a crash: the journal may need replaying
    host = bkguest.check_disk_on_host(linux_guest.data_disk)
    assert host.ok, host.detail + "\n".join(host.bad)
    assert host.files >= count

    ok, console = bkguest.boot_verify(libvirt_conn, linux_guest.data_disk, 90, mode="replay",
                                      image=guest_image)
    assert ok, console[-3000:]
    assert "BKGUEST-VERIFY: PASS" in console


@pytest.mark.libvirt
def test_boot_verify_fails_on_corrupted_file(
    linux_guest: bkguest.Guest, libvirt_conn: Any, guest_image: bkguest.GuestImage,
) -> None:
    wait_manifest(linux_guest, 3)
    # Overwrite f1 behind the manifest's back, durably.
    linux_guest.exec(["/bin/sh", "-c", "echo corrupt > /data/f1 && sync /data/f1"])
    assert linux_guest.dom.fsFreeze() == 1
    linux_guest.dom.destroy()
    host = bkguest.check_disk_on_host(linux_guest.data_disk)
    assert not host.ok and any(b.startswith("f1:") for b in host.bad)
    ok, console = bkguest.boot_verify(libvirt_conn, linux_guest.data_disk, 90, image=guest_image)
    assert not ok
    assert "BKGUEST-BAD: f1 want" in console
    assert "BKGUEST-VERIFY: FAIL" in console
