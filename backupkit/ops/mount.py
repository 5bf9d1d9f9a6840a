"""mount / umount: a backup's filesystems, browsable read-only, and everything undone after.

The chain: ``serve`` (nbdkit on a private socket) -> ``nbdfuse -r`` (the disk as
a read-only file; this host has no /dev/nbd*) -> partitions found with
``sfdisk --json`` (MBR or GPT; none: the whole disk) -> one read-only loop
device per partition (``losetup --read-only --offset --sizelimit``) -> each
filesystem ``blkid`` names mounted read-only, with ``noload`` (ext3/ext4) or
``norecovery`` (xfs): a journal is never replayed onto the backup (the loop
device and the export are read-only as well, so a replay could not write).
One filesystem is mounted on MOUNTPOINT itself; several get one directory each
(``part1``, ``part2`` ... by partition number).  What cannot be mounted is
reported (LVM inside the guest: not yet, it may come later; swap; no
filesystem).

Every step is recorded in a state file under RUN_DIR before it is taken, so
``umount`` (or a failed ``mount``) undoes exactly what was done: mounts,
directories it made, loop devices, the FUSE mount (nbdfuse exits), nbdkit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

from backupkit import proc
from backupkit.errors import CommandFailed, NotFound, OperationFailed, UsageError
from backupkit.ops import serve
from backupkit.repo import Repository

log = logging.getLogger("backupkit.mount")

RUN_DIR = serve.RUN_DIR
SECTOR = 512
#: mount options per filesystem type: read-only, and never a journal replay.
MOUNT_OPTIONS = {
    "ext2": "ro",
    "ext3": "ro,noload",
    "ext4": "ro,noload",
    "xfs": "ro,norecovery,nouuid",
    "btrfs": "ro,rescue=nologreplay",
    "vfat": "ro",
    "exfat": "ro",
    "ntfs": "ro",
    "ntfs3": "ro",
    "iso9660": "ro",
}
#: partition types that are containers, not filesystems (MBR extended partitions)
_EXTENDED = {"5", "f", "85"}
_NOT_YET = {
    "LVM2_member": "an LVM physical volume: LVM inside the guest is not supported yet "
                   "(it may come later)",
    "crypto_LUKS": "LUKS-encrypted: not supported",
    "linux_raid_member": "a RAID member: not supported",
    "swap": "swap space (nothing to browse)",
}


_DETACHED: list[subprocess.Popen[bytes]] = []


def state_dir(mountpoint: str) -> str:
    real = os.path.realpath(mountpoint)
    return os.path.join(RUN_DIR, "mount-" + hashlib.sha256(real.encode()).hexdigest()[:16])


class _State:
    """What mount did so far, written to disk after every step (umount reads it)."""

    def __init__(self, directory: str, doc: dict[str, Any] | None = None) -> None:
        self.dir = directory
        self.path = os.path.join(directory, "state.json")
        self.doc: dict[str, Any] = doc or {"server_pid": None, "socket": None, "fuse": None,
                                           "fuse_pid": None, "loops": [], "mounts": [],
                                           "dirs": []}

    @classmethod
    def load(cls, directory: str) -> _State:
        try:
            with open(os.path.join(directory, "state.json")) as f:
                return cls(directory, json.load(f))
        except FileNotFoundError:
            return cls(directory)
        except (OSError, ValueError) as e:
            raise OperationFailed(f"cannot read {directory}/state.json: {e}") from e

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def add(self, key: str, value: Any) -> None:
        self.doc[key].append(value)
        self.save()

    def set(self, **kw: Any) -> None:
        self.doc.update(kw)
        self.save()


def _run(cmd: list[str], timeout: float = 60.0) -> str:
    return proc.run(cmd, timeout=timeout).decode("utf-8", "replace")


def _partitions(path: str) -> list[dict[str, Any]]:
    """Partitions of the disk image: number, start and size in bytes, type; [] if none."""
    try:
        out = _run(["sfdisk", "--json", path])
    except CommandFailed:
        return []  # no partition table sfdisk recognises: perhaps a bare filesystem
    table = json.loads(out).get("partitiontable", {})
    sector = int(table.get("sectorsize", SECTOR))
    parts = []
    for i, p in enumerate(table.get("partitions", []), 1):
        node = str(p.get("node", ""))
        digits = ""
        for ch in reversed(node):
            if not ch.isdigit():
                break
            digits = ch + digits
        number = int(digits) if digits else i
        if str(p.get("type", "")).lower() in _EXTENDED and table.get("label") == "dos":
            continue
        parts.append({"partition": number, "offset": int(p["start"]) * sector,
                      "size": int(p["size"]) * sector, "table": table.get("label")})
    return parts


def _fstype(device: str) -> str:
    try:
        out = _run(["blkid", "-p", "-o", "export", device])
    except CommandFailed as e:
        if e.fields.get("rc") == 2:  # nothing found
            return ""
        raise
    for line in out.splitlines():
        if line.startswith("TYPE="):
            return line.split("=", 1)[1]
    return ""


def _wait_file(path: str, timeout: float, child: subprocess.Popen[bytes], log_path: str
               ) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if child.poll() is not None:
            with open(log_path, "rb") as f:
                err = f.read()[-2000:].decode("utf-8", "replace")
            raise OperationFailed(f"nbdfuse exited with status {child.returncode}: "
                                  f"{err.strip()}")
        if time.monotonic() > deadline:
            raise OperationFailed(f"nbdfuse did not start within {timeout:.0f}s")
        time.sleep(0.05)


def mount(repo: Repository, repo_location: str, config_path: str | None, domain: str,
          backup: str, mountpoint: str, *, disk: str | None = None,
          passphrase_file: str | None = None) -> dict[str, Any]:
    """Mount the filesystems of one disk of a backup read-only under mountpoint."""
    for tool in ("nbdfuse", "fusermount3", "sfdisk", "losetup", "blkid", "mount"):
        if shutil.which(tool) is None:
            raise NotFound("program", tool, "install libnbd-bin, fuse3, fdisk, util-linux")
    mountpoint = os.path.abspath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise NotFound("directory", mountpoint, "the mount point must be an existing directory")
    if os.path.ismount(mountpoint) or os.listdir(mountpoint):
        raise UsageError(f"{mountpoint} is not an empty directory (or is mounted on)")
    sdir = state_dir(mountpoint)
    if os.path.exists(os.path.join(sdir, "state.json")):
        raise UsageError(f"{mountpoint} holds a backupkit mount already "
                         f"(backupkit umount {mountpoint})")
    os.makedirs(sdir, mode=0o700, exist_ok=True)
    state = _State(sdir)
    state.set(mountpoint=mountpoint)
    try:
        return _mount(repo, repo_location, config_path, domain, backup, mountpoint, disk, state,
                      passphrase_file)
    except BaseException:
        try:
            _undo(state)
        except Exception as e:  # the first error is the one to report
            log.warning("cleaning up after the failed mount: %s", e)
        raise


def _mount(repo: Repository, repo_location: str, config_path: str | None, domain: str,
           backup: str, mountpoint: str, disk: str | None, state: _State,
           passphrase_file: str | None) -> dict[str, Any]:
    sock = os.path.join(state.dir, "nbd.sock")
    server, res = serve.start(repo, repo_location, config_path, domain, backup, sock,
                              disk=disk, log_path=sock + ".log", detach=True,
                              passphrase_file=passphrase_file)
    state.set(server_pid=server.pid, socket=sock, domain=res["domain"], id=res["id"],
              disk=res["disk"])
    fuse = os.path.join(state.dir, "fuse")
    os.makedirs(fuse, exist_ok=True)
    pidfile = os.path.join(state.dir, "nbdfuse.pid")
    fuse_log = os.path.join(state.dir, "nbdfuse.log")
    with open(fuse_log, "ab") as logf:
        child = subprocess.Popen(["nbdfuse", "-r", "-P", pidfile, f"{fuse}/disk", "--unix",
                                  sock], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=logf, start_new_session=True)
    _DETACHED.append(child)  # it outlives this call (umount ends it): no "still running" warning
    state.set(fuse=fuse, fuse_pid=child.pid)
    _wait_file(pidfile, 30.0, child, fuse_log)
    image = f"{fuse}/disk"
    parts = _partitions(image)
    targets = parts or [{"partition": None, "offset": 0, "size": res["virtual_size"],
                         "table": None}]
    found: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for t in targets:
        dev = _run(["losetup", "--find", "--show", "--read-only", "--offset", str(t["offset"]),
                    "--sizelimit", str(t["size"]), image]).strip()
        state.add("loops", dev)
        fstype = _fstype(dev)
        what = f"partition {t['partition']}" if t["partition"] is not None else "the disk"
        if fstype in MOUNT_OPTIONS:
            found.append({**t, "type": fstype, "device": dev})
        else:
            reason = _NOT_YET.get(fstype, f"{fstype} is not a filesystem backupkit mounts"
                                  if fstype else "no filesystem found")
            skipped.append({"partition": t["partition"], "type": fstype or None,
                            "reason": reason})
            log.warning("%s of %s/%s disk %s: %s", what, res["domain"], res["id"], res["disk"],
                        reason)
    if not found:
        why = "; ".join(f"{'partition ' + str(s['partition']) if s['partition'] else 'disk'}: "
                        f"{s['reason']}" for s in skipped)
        raise OperationFailed(f"nothing to mount in {res['domain']}/{res['id']} disk "
                              f"{res['disk']}: {why}")
    mounted = []
    several = len(found) > 1
    for f in found:
        path = os.path.join(mountpoint, f"part{f['partition']}") if several else mountpoint
        if several:
            os.mkdir(path)
            state.add("dirs", path)
        opts = MOUNT_OPTIONS[f["type"]]
        state.add("mounts", path)
        try:
            _run(["mount", "-t", f["type"], "-o", opts, f["device"], path])
        except CommandFailed as e:
            # e.g. a kernel without that filesystem: report it, mount the others
            state.doc["mounts"].remove(path)
            state.save()
            why = str(e.fields.get("stderr") or e).strip().splitlines()[0]
            skipped.append({"partition": f["partition"], "type": f["type"],
                            "reason": f"mount -t {f['type']} failed: {why}"})
            log.warning("cannot mount partition %s (%s): %s", f["partition"], f["type"], why)
            continue
        mounted.append({"partition": f["partition"], "type": f["type"], "path": path,
                        "options": opts, "size": f["size"]})
        log.info("Mounted %s (%s) on %s", f["device"], f["type"], path)
    if not mounted:
        raise OperationFailed(f"nothing could be mounted from {res['domain']}/{res['id']} "
                              f"disk {res['disk']}: "
                              + "; ".join(s["reason"] for s in skipped))
    return {"mountpoint": mountpoint, "domain": res["domain"], "id": res["id"],
            "disk": res["disk"], "filesystems": mounted, "skipped": skipped,
            "server_pid": server.pid}


def _umount(path: str) -> str | None:
    if os.path.ismount(path):
        try:
            _run(["umount", path])
        except CommandFailed as e:
            return f"umount {path}: {e.fields.get('stderr') or e}"
    return None


def _rmdir(path: str) -> str | None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"rmdir {path}: {e}"
    return None


def _detach(dev: str) -> str | None:
    try:
        _run(["losetup", "--detach", dev])
    except CommandFailed as e:
        if "No such device" not in str(e.fields.get("stderr", "")):
            return f"losetup -d {dev}: {e.fields.get('stderr') or e}"
    return None


def _undo(state: _State) -> list[str]:
    """Undo what state records, last step first; the errors (state kept if any)."""
    errors: list[str] = []
    undo: tuple[tuple[str, Callable[[str], str | None]], ...] = (
        ("mounts", _umount), ("dirs", _rmdir), ("loops", _detach))
    for key, step in undo:
        for item in reversed(list(state.doc[key])):
            error = step(item)
            if error:
                errors.append(error)
                continue
            state.doc[key].remove(item)
            state.save()
    if errors:
        return errors
    fuse = state.doc.get("fuse")
    if fuse and os.path.ismount(fuse):
        try:
            _run(["fusermount3", "-u", fuse])
        except CommandFailed as e:
            return [f"fusermount3 -u {fuse}: {e.fields.get('stderr') or e}"]
    pid = state.doc.get("fuse_pid")
    if pid:
        _wait_gone(int(pid), 10.0)
    spid = state.doc.get("server_pid")
    if spid:
        serve.stop_pid(int(spid))
    if state.doc.get("socket"):
        serve.remove_socket(state.doc["socket"])
    shutil.rmtree(state.dir, ignore_errors=True)
    return []


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not serve.alive(pid):
            return
        time.sleep(0.05)
    serve.stop_pid(pid)


def umount(mountpoint: str) -> dict[str, Any]:
    """Undo a backupkit mount: filesystems, directories, loop devices, FUSE, nbdkit."""
    mountpoint = os.path.abspath(mountpoint)
    sdir = state_dir(mountpoint)
    if not os.path.exists(os.path.join(sdir, "state.json")):
        raise NotFound("backupkit mount", mountpoint)
    state = _State.load(sdir)
    doc = dict(state.doc)
    errors = _undo(state)
    if errors:
        raise OperationFailed(f"umount {mountpoint} is incomplete (run it again): "
                              + "; ".join(errors))
    return {"mountpoint": mountpoint, "domain": doc.get("domain"), "id": doc.get("id"),
            "disk": doc.get("disk"), "unmounted": True}
