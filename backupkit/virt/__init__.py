"""A thin adapter around libvirt: every libvirt error is translated here, once.

Callers get backupkit.errors exceptions (NotFound for a missing domain or
checkpoint, LibvirtError with libvirt's message otherwise) and never see
libvirt.libvirtError.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import libvirt

from backupkit.errors import LibvirtError, NotFound, QuiesceFailed
from backupkit.virt.access import QemuUser, parse_dac_label
from backupkit.virt.xml import CheckpointInfo, Disk, parse_checkpoint, parse_disks, redefine_xml

log = logging.getLogger("backupkit.virt")

T = TypeVar("T")

# libvirt logs every error to stderr through its default handler; we report them ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_NOT_FOUND = {
    libvirt.VIR_ERR_NO_DOMAIN: "domain",
    libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT: "checkpoint",
}


def _call(op: str, fn: Callable[..., T], *args: Any, name: str = "") -> T:
    try:
        return fn(*args)
    except libvirt.libvirtError as e:
        code = e.get_error_code()
        if code in _NOT_FOUND:
            raise NotFound(_NOT_FOUND[code], name or op) from e
        raise LibvirtError(op, e.get_error_message() or str(e), code) from e


class Connection:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn = _call(f"connect {uri}", libvirt.open, uri)

    def domain(self, name: str) -> Domain:
        return Domain(_call("lookup domain", self._conn.lookupByName, name, name=name))

    def domain_names(self) -> list[str]:
        doms = _call("list domains", self._conn.listAllDomains, 0)
        return sorted(d.name() for d in doms)

    def define(self, xml: str) -> Domain:
        return Domain(_call("define domain", self._conn.defineXML, xml))

    def qemu_user(self, virt_type: str = "kvm") -> QemuUser | None:
        """The DAC identity libvirt gives new QEMU processes (capabilities base label)."""
        import xml.etree.ElementTree as ET

        caps = ET.fromstring(_call("capabilities", self._conn.getCapabilities))
        for model in caps.findall("./host/secmodel"):
            if model.findtext("model") != "dac":
                continue
            labels = {b.get("type"): b.text or "" for b in model.findall("baselabel")}
            label = labels.get(virt_type) or next(iter(labels.values()), "")
            if label:
                return parse_dac_label(label, "libvirt capabilities")
        return None

    def close(self) -> None:
        with suppress(libvirt.libvirtError):
            self._conn.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(uri: str) -> Connection:
    return Connection(uri)


class Domain:
    def __init__(self, dom: Any) -> None:
        self._dom = dom
        self.name: str = dom.name()

    @property
    def raw(self) -> Any:
        """The libvirt.virDomain (for tests and diagnostics)."""
        return self._dom

    def uuid(self) -> str:
        """The domain's UUID (lowercase, with dashes): what identifies it across hosts."""
        return str(_call("domain UUID", self._dom.UUIDString, name=self.name)).lower()

    def is_active(self) -> bool:
        return bool(_call("domain state", self._dom.isActive, name=self.name))

    def xml(self, inactive: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(_call("domain XML", self._dom.XMLDesc, flags, name=self.name))

    def disks(self) -> list[Disk]:
        return parse_disks(self.xml())

    def virt_type(self) -> str:
        import xml.etree.ElementTree as ET

        return ET.fromstring(self.xml(inactive=True)).get("type", "kvm")

    def qemu_user(self) -> QemuUser | None:
        """The user and group this running domain's QEMU runs as (its DAC seclabel)."""
        import xml.etree.ElementTree as ET

        root = ET.fromstring(self.xml())
        for sec in root.findall("./seclabel"):
            label = sec.findtext("label")
            if sec.get("model") == "dac" and label:
                return parse_dac_label(label, "the domain's DAC label")
        return None

    # --- checkpoints -------------------------------------------------------

    def checkpoints(self) -> list[CheckpointInfo]:
        cps = _call("list checkpoints", self._dom.listAllCheckpoints, 0, name=self.name)
        infos = [parse_checkpoint(c.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
                 for c in cps]
        return sorted(infos, key=lambda c: (c.creation_time, c.name))

    def checkpoint(self, name: str) -> CheckpointInfo:
        cp = _call("lookup checkpoint", self._dom.checkpointLookupByName, name, 0, name=name)
        return parse_checkpoint(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))

    def checkpoint_xml(self, name: str) -> str:
        cp = _call("lookup checkpoint", self._dom.checkpointLookupByName, name, 0, name=name)
        return str(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))

    def checkpoint_size(self, name: str) -> dict[str, int]:
        """Bytes dirtied since the checkpoint per disk; fails on a missing or broken bitmap."""
        cp = _call("lookup checkpoint", self._dom.checkpointLookupByName, name, 0, name=name)
        xml = _call(f"checkpoint {name} size", cp.getXMLDesc,
                    libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE
                    | libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
        import xml.etree.ElementTree as ET

        root = ET.fromstring(xml)
        return {d.get("name", ""): int(d.get("size", "0"))
                for d in root.findall("./disks/disk") if d.get("checkpoint") == "bitmap"}

    def redefine_checkpoint(self, xml: str, validate: bool = False) -> None:
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        if validate:
            flags |= libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
        _call("redefine checkpoint", self._dom.checkpointCreateXML, xml, flags, name=self.name)

    def delete_checkpoint(self, name: str, metadata_only: bool = False) -> None:
        cp = _call("lookup checkpoint", self._dom.checkpointLookupByName, name, 0, name=name)
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0
        _call(f"delete checkpoint {name}", cp.delete, flags, name=name)

    # --- backup jobs -------------------------------------------------------

    def backup_begin(self, backup_xml: str, checkpoint_xml: str | None) -> None:
        _call("backupBegin", self._dom.backupBegin, backup_xml, checkpoint_xml, 0,
              name=self.name)

    def backup_job_paths(self) -> tuple[str, ...] | None:
        """The running pull-mode backup job's NBD socket and scratch files (sorted),
        which identify the job; None when no backup job runs."""
        import xml.etree.ElementTree as ET

        try:
            xml = self._dom.backupGetXMLDesc(0)
        except libvirt.libvirtError:
            return None
        root = ET.fromstring(xml)
        server = root.find("server")
        socket = server.get("socket", "") if server is not None else ""
        scratch = sorted(s.get("file", "") for s in root.findall("./disks/disk/scratch"))
        return (socket, *scratch)

    def remove_orphan_bitmap(self, name: str, targets: list[str]) -> None:
        """Remove bitmap ``name`` (which no checkpoint owns) from the disks ``targets``
        of a running domain, in every layer: libvirt reaches it through a checkpoint of
        that name, redefined for the purpose and deleted at once (HOST-FACTS)."""
        info = CheckpointInfo(name, None, int(time.time()), {t: name for t in targets})
        self.redefine_checkpoint(redefine_xml(info))
        try:
            self.delete_checkpoint(name)
        except (LibvirtError, NotFound):
            with suppress(LibvirtError, NotFound):
                self.delete_checkpoint(name, metadata_only=True)
            raise

    def backup_job_active(self) -> bool:
        try:
            stats = self._dom.jobStats(0)
        except libvirt.libvirtError:
            return False
        op = stats.get("operation")
        return bool(stats.get("type", 0) != libvirt.VIR_DOMAIN_JOB_NONE
                    and op == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP)

    def abort_job(self) -> None:
        """End a running backup job; no error if none is running."""
        try:
            self._dom.abortJob()
        except libvirt.libvirtError as e:
            if e.get_error_code() not in (libvirt.VIR_ERR_OPERATION_INVALID,
                                          libvirt.VIR_ERR_NO_DOMAIN):
                raise LibvirtError("abortJob", e.get_error_message() or str(e)) from e

    # --- guest agent ---------------------------------------------------------

    @contextmanager
    def frozen(self) -> Iterator[dict[str, float]]:
        """Freeze guest filesystems through the agent; yields a dict receiving 'seconds'."""
        window: dict[str, float] = {}
        start = time.monotonic()
        try:
            self._dom.fsFreeze(None, 0)
        except libvirt.libvirtError as e:
            raise QuiesceFailed(self.name, e.get_error_message() or str(e)) from e
        except BaseException:
            # Interrupted once the freeze returned: never leave the guest frozen.
            with suppress(Exception):
                self._thaw()
            raise
        try:
            yield window
        finally:
            try:
                self._thaw()
            finally:
                window["seconds"] = time.monotonic() - start

    def _thaw(self, attempts: int = 3) -> None:
        """Thaw, retrying: a guest left frozen is worse than a failed backup."""
        for attempt in range(attempts):
            try:
                self._dom.fsThaw(None, 0)
                return
            except libvirt.libvirtError as e:
                if attempt == attempts - 1:
                    raise LibvirtError(
                        "fsThaw", f"{e.get_error_message() or e}; guest filesystems of "
                        f"{self.name} may still be frozen: run 'virsh domfsthaw {self.name}'"
                    ) from e
                log.warning("%s: thaw failed (%s), retrying", self.name, e)
                time.sleep(0.5 * (attempt + 1))

    # --- monitor (QMP through libvirt) -------------------------------------

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """A QMP command through libvirt; its "return" value.

        A QMP error reply (QEMU refusing the command) raises LibvirtError with
        QEMU's text, like a libvirt failure.
        """
        import libvirt_qemu

        cmd: dict[str, Any] = {"execute": command}
        if arguments:
            cmd["arguments"] = arguments
        out = json.loads(_call(f"QMP {command}", libvirt_qemu.qemuMonitorCommand, self._dom,
                               json.dumps(cmd), 0, name=self.name))
        if "error" in out:
            err = out["error"]
            raise LibvirtError(f"QMP {command}", str(err.get("desc") or err))
        return out.get("return")

    def block_nodes(self) -> list[dict[str, Any]]:
        """QEMU's named block nodes (query-named-block-nodes, flat): read-only."""
        return list(self.qmp("query-named-block-nodes", {"flat": True}))

    def node_write_offsets(self) -> dict[str, int]:
        """node-name -> wr_highest_offset of every named node (query-blockstats): read-only."""
        stats = self.qmp("query-blockstats", {"query-nodes": True})
        return {s["node-name"]: int(s.get("stats", {}).get("wr_highest_offset", 0))
                for s in stats if s.get("node-name")}

    def remove_bitmap_qmp(self, node: str, name: str) -> None:
        """block-dirty-bitmap-remove on one node (QEMU refuses it on a read-only node)."""
        self.qmp("block-dirty-bitmap-remove", {"node": node, "name": name})

    def block_bitmaps(self) -> dict[str, list[dict[str, Any]]]:
        """Bitmaps per image file of a running domain, as QEMU holds them in memory.

        Maps the image filename of each block node to its dirty bitmaps
        (name, recording, busy, persistent, inconsistent, count, granularity),
        QEMU's own records.  The chain of one disk with its persistent bitmaps
        as image infos: :func:`backupkit.virt.blocks.live_chain`.
        """
        result: dict[str, list[dict[str, Any]]] = {}
        for node in self.block_nodes():
            if node.get("drv") in ("file", "host_device", "raw"):
                continue
            result.setdefault(node.get("file", ""), []).extend(node.get("dirty-bitmaps", []))
        return result


def define_restored(uri: str, manifest: Any, new_name: str, disk_paths: dict[str, str]) -> str:
    """Define (not start) a new domain from a backup's stored domain XML.

    New name and UUID, new MAC addresses, disks pointing at the restored files
    with no backing chain, no checkpoints.  Refuses an existing name.
    """
    from backupkit.errors import UsageError
    from backupkit.virt.xml import restored_domain_xml

    with connect(uri) as conn:
        if new_name in conn.domain_names():
            raise UsageError(f"domain {new_name!r} already exists; choose another --define name")
        paths = {name: (path, "raw" if path.endswith(".raw") else "qcow2")
                 for name, path in disk_paths.items()}
        xml = restored_domain_xml(manifest.domain_xml, new_name, paths)
        conn.define(xml)
        log.info("defined domain %s from backup %s/%s", new_name, manifest.domain, manifest.id)
        return new_name


def make_reachable_dir(uri: str, domain_xml: str, path: str) -> None:
    """Create directory ``path`` for images a domain will open, reachable by QEMU's user.

    libvirt chowns the image files for QEMU but not the directories above them.
    Directories created here get the search bits (``go+x``, never read), as does
    ``path`` itself when we own it; a directory above that QEMU's user cannot enter
    is an error (UsageError naming it), with what was created here removed again.
    """
    import xml.etree.ElementTree as ET

    from backupkit.errors import UsageError
    from backupkit.virt.access import blocking_dir, make_searchable

    path = os.path.abspath(path)
    virt_type = ET.fromstring(domain_xml).get("type", "kvm")
    with connect(uri) as conn:
        user = conn.qemu_user(virt_type)
    created = []
    p = path
    while not os.path.lexists(p):
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    if user is None or user.privileged:
        return
    for d in [*created, path]:
        make_searchable(d, user)
    blocked = blocking_dir(path, user)
    if blocked:
        for d in created:
            with suppress(OSError):
                os.rmdir(d)
        mode = oct(os.stat(blocked).st_mode & 0o7777)
        raise UsageError(f"restore target {path}: QEMU runs as {user.describe()} and cannot "
                         f"enter {blocked} (mode {mode}), so the defined domain could not open "
                         "its disks: make it searchable (chmod o+x) or choose another --target")


def domain_exists(uri: str, name: str) -> bool:
    with connect(uri) as conn:
        return name in conn.domain_names()
