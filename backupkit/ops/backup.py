"""The backup operation: checkpoint, pull the data over NBD, commit, clean up.

Order of a backup of one domain (under the domain lock and the shared repository lock):

1. clean up what an interrupted predecessor left: a running backup job, scratch
   files, and every ``backupkit.`` checkpoint other than the one the latest
   committed backup references;
2. choose the mode (:func:`choose_mode`, pure) and record why;
3. create the new checkpoint together with the export (running: libvirt
   ``backupBegin`` in pull mode, the guest frozen only around it with
   ``--quiesce``; shut off: ``qemu-img bitmap --add`` and ``qemu-nbd``);
4. copy each disk into the repository, write its index, then commit the
   manifest: the backup exists from that moment on;
5. end the job; delete the previous checkpoint with its bitmaps.

A failure before the commit ends the job and deletes the new checkpoint, so the
previous checkpoint still records every write and the next run can be an
incremental from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import glob
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from backupkit import config, faults, proc, qemu
from backupkit.errors import (
    Busy,
    Error,
    Interrupted,
    InvalidName,
    ModeUnavailable,
    NoSpace,
    NotFound,
    OperationFailed,
    Partial,
    QuiesceFailed,
)
from backupkit.nbd import Client, QemuNbd
from backupkit.ops.copy import Progress, copy_disk
from backupkit.repo import DiskRecord, Index, Manifest, Repository, chains
from backupkit.repo.flock import hold
from backupkit.virt import Connection, Domain
from backupkit.virt import checkpoints as vcp
from backupkit.virt import xml as vxml
from backupkit.virt.access import QemuUser, blocking_dir, make_searchable
from backupkit.virt.checkpoints import PREFIX, delete_checkpoint, owned
from backupkit.workers import wait_all

log = logging.getLogger("backupkit.backup")

DEFAULT_SCRATCH_MIN_FREE = 512 << 20
WATCH_INTERVAL = 0.1  # seconds between two looks at the scratch filesystem
SUN_PATH_MAX = 107  # bytes of a unix socket path (sun_path without its NUL)


@dataclass(frozen=True)
class Request:
    domain: str
    mode: str = "auto"  # auto | full | incremental
    disks: tuple[str, ...] = ()  # only these targets (empty: all)
    exclude: tuple[str, ...] = ()
    quiesce: bool | str = False  # True, False or "try"
    workers: int = 2
    compression_level: int | None = None  # zstd level for new chunks (None: the repository's)
    scratch_dir: str = "/var/lib/backupkit/scratch"
    lock_wait: float = 0.0
    scratch_min_free: int = DEFAULT_SCRATCH_MIN_FREE  # abort the job below this much free
    host: str | None = None  # this host's name in the repository (None: config.this_host())


@dataclass
class Hooks:
    """Test and progress hooks; all optional."""

    job_started: Callable[[], None] | None = None  # after the export exists, before any read
    before_commit: Callable[[], None] | None = None
    progress_start: Callable[[str, int], Progress | None] | None = None  # (disk, total) -> cb


@dataclass(frozen=True)
class DiskState:
    """What choose_mode needs to know about one disk."""

    target: str
    format: str
    virtual_size: int
    bitmap: str | None  # None: bitmap missing; else "ok", "in-use", "not recording", ...


@dataclass(frozen=True)
class Plan:
    mode: str
    reason: str
    parent: Manifest | None
    disk_modes: dict[str, tuple[str, str]] = field(default_factory=dict)  # target -> mode, reason


def choose_mode(requested: str, domain: str, previous: Manifest | None,
                checkpoint_known: bool, disks: Sequence[DiskState],
                no_parent: str | None = None) -> Plan:
    """Decide full or incremental for one domain, with the reason (pure).

    Incremental needs: a previous backup with a checkpoint libvirt knows, and,
    for every bitmap-capable disk, the same disk (same size) in that backup and
    a valid recording bitmap.  Disks that cannot hold bitmaps (raw) are copied in
    full every time whatever the mode.
    """
    raw = {d.target: ("full", f"{d.format} disk cannot hold bitmaps")
           for d in disks if d.format != "qcow2"}
    bitmap_disks = [d for d in disks if d.format == "qcow2"]

    def full(reason: str) -> Plan:
        if requested == "incremental":
            raise ModeUnavailable(domain, reason)
        modes = {d.target: ("full", reason) for d in bitmap_disks}
        return Plan("full", reason, None, {**modes, **raw})

    if requested == "full":
        return full("full backup requested")
    if not bitmap_disks:
        return full("no disk can hold bitmaps")
    if previous is None:  # no_parent: why the latest backup cannot be one
        return full(no_parent or "no previous backup in the repository")
    if not previous.checkpoint:
        return full(f"previous backup {previous.id} has no checkpoint")
    if not checkpoint_known:
        return full(f"checkpoint {previous.checkpoint} missing and its bitmaps are not intact")
    before = {d.name: d for d in previous.disks}
    now = {d.target for d in disks}
    removed = sorted(set(before) - now)
    if removed:
        return full(f"disk removed since the previous backup: {', '.join(removed)}")
    for d in bitmap_disks:
        prev = before.get(d.target)
        if prev is None:
            return full(f"disk {d.target} added since the previous backup")
        if prev.virtual_size != d.virtual_size:
            return full(f"disk {d.target} resized from {prev.virtual_size} to {d.virtual_size}")
        if d.bitmap is None:
            return full(f"bitmap {previous.checkpoint} missing on disk {d.target}")
        if d.bitmap != "ok":
            return full(f"bitmap {previous.checkpoint} on disk {d.target} is {d.bitmap}")
    reason = f"checkpoint {previous.checkpoint} and its bitmaps are valid"
    modes = {d.target: ("incremental", reason) for d in bitmap_disks}
    return Plan("incremental", reason, previous, {**modes, **raw})


# --- helpers ---------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def select_disks(all_disks: list[vxml.Disk], only: Sequence[str], exclude: Sequence[str],
                 domain: str) -> list[vxml.Disk]:
    names = {d.target for d in all_disks}
    for n in (*only, *exclude):
        if n not in names:
            raise NotFound("disk", f"{domain}/{n}", f"domain has {', '.join(sorted(names))}")
    chosen = [d for d in all_disks
              if (not only or d.target in only) and d.target not in exclude]
    if not chosen:
        raise InvalidName("disk selection", ",".join(only) or "(all)",
                          "no disk left to back up")
    return chosen


def _running_bitmap_state(dom: Domain, disk: vxml.Disk, name: str,
                          live: dict[str, list[dict[str, Any]]]) -> str | None:
    for b in live.get(disk.path, []):
        if b.get("name") == name:
            if b.get("inconsistent"):
                return "inconsistent"
            if b.get("busy"):
                return "in use by another job"
            if not b.get("recording"):
                return "not recording"
            return "ok"
    return None


def _cold_bitmap_state(disk: vxml.Disk, name: str) -> str | None:
    b = qemu.info(disk.path, fmt=disk.format, force_share=False).bitmap(name)
    if b is None:
        return None
    if b.in_use:
        return "in-use (not stored cleanly)"
    if not b.recording:
        return "not recording"
    return "ok"


def _sizes(dom: Domain, disks: list[vxml.Disk], running: bool) -> dict[str, int]:
    sizes = {}
    for d in disks:
        sizes[d.target] = qemu.info(d.path, fmt=d.format, force_share=running).virtual_size
    return sizes


def checkpoint_prefix(repo: Repository) -> str:
    """This repository's checkpoint name prefix (``virt.checkpoints.checkpoint_prefix``)."""
    return vcp.checkpoint_prefix(str(repo.config.get("id", "")))


def check_scratch_dir(path: str) -> str:
    """scratch_dir must be an absolute path naming a directory (or nothing yet)."""
    if not path.strip():
        raise InvalidName("scratch_dir", path, "empty: give an absolute directory path")
    if not os.path.isabs(path):
        raise InvalidName("scratch_dir", path, "not an absolute path")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise InvalidName("scratch_dir", path, "exists and is not a directory")
    return os.path.normpath(path)


def host_lock_dir() -> str:
    """Where host-wide locks live: outside any repository, on a tmpfs (gone at boot)."""
    if os.geteuid() == 0:
        return "/run/backupkit"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/backupkit-{os.getuid()}"
    return os.path.join(base, "backupkit")


@contextlib.contextmanager
def host_domain_lock(domain: str, wait: float = 0.0) -> Iterator[None]:
    """One backupkit job per domain on this host, whatever the repository.

    Two repositories backing up one domain at once would abort each other's
    libvirt job (a domain has one backup job at a time); the repository's own
    domain lock cannot see the other repository.
    """
    root = host_lock_dir()
    os.makedirs(root, 0o700, exist_ok=True)
    name = f"domain-{hashlib.sha256(domain.encode()).hexdigest()[:16]}.lock"
    with hold(root, name, f"domain {domain} (host-wide lock {root}/locks/{name})", wait=wait):
        yield


def _remove_run_dir(path: str, tries: int = 30) -> None:
    """Remove a run directory, waiting briefly for libvirt to let go of it.

    Right after a job is aborted, libvirt may still be removing the socket and scratch
    files it made in there, and a removal racing it finds the directory not empty.
    So: try again for up to 3 s; what still cannot be removed is said, and left for
    the next run's cleanup.
    """
    for _ in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
        time.sleep(0.1)
    log.warning("could not remove %s (the next run of this domain removes it)", path)


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


class ScratchWatch:
    """Watches the scratch filesystem while a live backup job runs.

    A pull-mode job copies old data into the scratch file before each guest write
    to a block not yet read (copy-before-write).  When the scratch filesystem
    fills, QEMU 7.2 fails the guest's write (seen: the write lost, "write failed:
    No space left on device"): libvirt 9.0 starts the job as ``blockdev-backup``
    with ``sync=none``, whose copy-before-write filter keeps QEMU's default
    ``on-cbw-error=break-guest-write``, and has no way to ask for
    ``break-snapshot`` or a ``cbw-timeout``.  So backupkit keeps a margin: below
    ``margin`` bytes free it ends the job (abortJob), which removes the filter
    and lets every later guest write go straight to the disk.  The backup fails
    instead of the guest, provided the guest writes less than the margin between
    two looks.
    """

    def __init__(self, path: str, margin: int, on_low: Callable[[], None],
                 interval: float = WATCH_INTERVAL) -> None:
        self.path = path
        self.margin = margin
        self.on_low = on_low
        self.interval = interval
        self.lowest = _free_bytes(path)
        self.tripped: int | None = None  # free bytes when the job was ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scratch-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                free = _free_bytes(self.path)
            except OSError:
                continue
            self.lowest = min(self.lowest, free)
            if free < self.margin and self.tripped is None:
                self.tripped = free
                log.warning("scratch space low: %s free in %s (scratch_min_free %s): "
                            "ending the backup job", _mib(free), self.path, _mib(self.margin))
                try:
                    self.on_low()
                except Error as e:
                    log.warning("could not end the backup job: %s", e)

    def start(self) -> ScratchWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


#: The socket of a job this code started: <scratch_dir>/bk-<domain hash>-<run>/sock.
_RUN_SOCKET = re.compile(r"bk-[0-9a-f]{12}-[0-9a-f]{6}/sock")


class _Backup:
    """One domain's backup run."""

    def __init__(self, repo: Repository, conn: Connection, req: Request, hooks: Hooks) -> None:
        self.repo = repo
        self.conn = conn
        self.req = req
        self.hooks = hooks
        self.started = _now()
        self.t0 = time.monotonic()
        self.dom = conn.domain(req.domain)
        self.warnings: list[str] = []
        self._holding = False  # proc.hold_signals() from the commit on (see run())
        self.scratch = check_scratch_dir(req.scratch_dir)
        self.prefix = checkpoint_prefix(repo)
        self.host = req.host or config.this_host()
        self.uuid = self.dom.uuid()
        # The latest backup when every chunk it names is stored: its indexes seed
        # deduplication (Repository.seed_known), incremental or not.
        self._known_from: Manifest | None = None
        self.clean_disks: set[str] = set()  # see _unchanged_disks

    # -- leftovers ----------------------------------------------------------------

    def _scratch_prefix(self) -> str:
        h = hashlib.sha256(self.req.domain.encode()).hexdigest()[:12]
        return os.path.join(self.scratch, f"bk-{h}")

    def _qemu_user(self) -> QemuUser | None:
        """Who this domain's QEMU runs as: its DAC label, else libvirt's default."""
        user = self.dom.qemu_user()
        if user is None:
            user = self.conn.qemu_user(self.dom.virt_type())
        return user

    def _prepare_scratch(self, user: QemuUser | None) -> None:
        """scratch_dir exists (mode 0711 when we create it) and QEMU's user can search it."""
        if not os.path.isdir(self.scratch):
            os.makedirs(self.scratch, exist_ok=True)
            os.chmod(self.scratch, 0o711)  # traversable, not listable, whatever the umask
        if user is None or user.privileged:
            return
        make_searchable(self.scratch, user)
        blocked = blocking_dir(self.scratch, user)
        if blocked:
            mode = oct(os.stat(blocked).st_mode & 0o7777)
            raise InvalidName("scratch_dir", self.req.scratch_dir,
                              f"QEMU runs as {user.describe()} and cannot enter {blocked} "
                              f"(mode {mode}): make it searchable (chmod o+x) or choose "
                              "another scratch_dir")

    @contextlib.contextmanager
    def _run_dir(self, user: QemuUser | None) -> Iterator[str]:
        """This run's own directory under scratch_dir, for the NBD socket and scratch files.

        Owned by QEMU's user and group (mode 0700) so QEMU can create the socket and
        open the scratch files, unique per run so two runs never share a path, and
        removed at the end whatever happened.
        """
        path = f"{self._scratch_prefix()}-{secrets.token_hex(3)}"
        os.mkdir(path, 0o700)
        try:
            os.chmod(path, 0o700)
            if user is not None and not user.privileged:
                os.chown(path, user.uid, user.gid)
            yield path
        finally:
            _remove_run_dir(path)

    def cleanup_leftovers(self, keep: str | None, running: bool) -> None:
        if running and self.dom.backup_job_active():
            paths = self.dom.backup_job_paths() or ()
            if not paths or not _RUN_SOCKET.fullmatch(os.path.basename(os.path.dirname(
                    paths[0])) + "/" + os.path.basename(paths[0])):
                raise Busy(f"domain {self.req.domain}",
                           "a backup job backupkit did not start"
                           + (f" (exporting {paths[0]})" if paths else "")
                           + "; wait for it or end it (virsh domjobabort)")
            log.warning("%s: aborting a backup job left by an interrupted run", self.req.domain)
            self.dom.abort_job()
        # Files of older versions (bk-HASH.*) and run directories (bk-HASH-RUN): the
        # host-wide lock is ours, so no other run of this domain is using them.
        prefix = glob.escape(self._scratch_prefix())
        for path in glob.glob(prefix + ".*") + glob.glob(prefix + "-*"):
            log.info("%s: removing leftover %s", self.req.domain, path)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        for cp in self.dom.checkpoints():
            if owned(cp.name, self.prefix) and cp.name != keep:
                log.warning("%s: deleting stale checkpoint %s (no committed backup uses it)",
                            self.req.domain, cp.name)
                delete_checkpoint(self.dom, cp.name, running)
        if running:
            self._remove_orphan_bitmaps(keep)
        else:
            # A run killed between ``qemu-img bitmap --add`` and the commit leaves a
            # bitmap that libvirt never heard of: remove it too, or it records forever.
            known = {cp.name for cp in self.dom.checkpoints()}
            for d in self.dom.disks():
                if not d.can_bitmap:
                    continue
                for b in qemu.info(d.path, fmt=d.format, force_share=False).bitmaps:
                    if b.name.startswith(PREFIX) and b.name != keep and b.name not in known:
                        log.warning("%s: removing stale bitmap %s from %s (no committed "
                                    "backup uses it)", self.req.domain, b.name, d.path)
                        qemu.bitmap_remove(d.path, b.name, fmt=d.format)

    def _remove_orphan_bitmaps(self, keep: str | None) -> None:
        """Running domain: remove ``backupkit.`` bitmaps no libvirt checkpoint owns.

        A disk detached while its checkpoint was deleted keeps that checkpoint's
        bitmap, recording for ever; reattached, it brings it back.  (The bitmap of
        ``keep`` stays: its checkpoint may only have lost libvirt's metadata.)
        """
        known = {cp.name for cp in self.dom.checkpoints()}
        live = self.dom.block_bitmaps()
        orphans: dict[str, list[str]] = {}
        for d in self.dom.disks():
            if not d.can_bitmap:
                continue
            for path in (d.path, *(layer.path for layer in d.backing)):
                for b in live.get(path, []):
                    name = str(b.get("name", ""))
                    if name.startswith(PREFIX) and name != keep and name not in known \
                            and d.target not in orphans.get(name, []):
                        orphans.setdefault(name, []).append(d.target)
        for name, targets in orphans.items():
            log.warning("%s: removing stale bitmap %s from %s (no checkpoint owns it)",
                        self.req.domain, name, ", ".join(targets))
            self.dom.remove_orphan_bitmap(name, targets)

    # -- mode -------------------------------------------------------------------

    def _recover_checkpoint(self, prev: Manifest, disks: list[vxml.Disk], running: bool
                            ) -> bool:
        """Is the previous checkpoint usable?  Redefine it if only libvirt's metadata is lost."""
        assert prev.checkpoint
        known = {c.name for c in self.dom.checkpoints()}
        if prev.checkpoint in known:
            return True
        if not prev.checkpoint_xml:
            return False
        info = vxml.parse_checkpoint(prev.checkpoint_xml)
        if info.parent not in known:
            info = vxml.CheckpointInfo(info.name, None, info.creation_time, info.disks)
        for d in disks:
            bitmap = info.disks.get(d.target)
            if bitmap is None:
                continue
            state = (self._live_state(d, bitmap) if running else _cold_bitmap_state(d, bitmap))
            if state != "ok":
                return False
        try:
            self.dom.redefine_checkpoint(vxml.redefine_xml(info), validate=running)
        except Error as e:
            log.warning("%s: cannot redefine checkpoint %s: %s", self.req.domain, info.name, e)
            return False
        log.warning("%s: checkpoint %s was missing from libvirt; redefined from the repository",
                    self.req.domain, info.name)
        self.warnings.append(f"checkpoint {info.name} redefined from the repository")
        return True

    def _live_state(self, disk: vxml.Disk, bitmap: str) -> str | None:
        return _running_bitmap_state(self.dom, disk, bitmap, self.dom.block_bitmaps())

    def plan(self, disks: list[vxml.Disk], running: bool) -> Plan:
        # A latest backup that cannot be read (or lacks quarantined chunks) makes this
        # backup full, with the reason, never a failure.
        # Only a backup of this very domain (same UUID, from any host: it may have moved
        # here) can be the parent; another host's domain of the same name never is.
        prev, unusable = self.repo.backup_parent(self.req.domain,
                                                 chains.of_domain(self.uuid, self.host))
        if unusable:
            self._warn(f"{unusable}; this backup is full")
        self._known_from = prev
        no_parent = unusable
        if prev is None and unusable is None:
            no_parent = chains.other_chains(self.repo.backups(self.req.domain).manifests,
                                            self.uuid, self.host)
        keep = prev.checkpoint if prev else None
        self.cleanup_leftovers(keep, running)
        if self.req.mode == "full" or prev is None or not prev.checkpoint:
            known = False
        else:
            known = self._recover_checkpoint(prev, disks, running)
        sizes = _sizes(self.dom, disks, running)
        live = self.dom.block_bitmaps() if running and known else {}
        states = []
        for d in disks:
            state: str | None = None
            if known and prev and prev.checkpoint and d.can_bitmap:
                state = (_running_bitmap_state(self.dom, d, prev.checkpoint, live) if running
                         else _cold_bitmap_state(d, prev.checkpoint))
            states.append(DiskState(d.target, d.format, sizes[d.target], state))
        if known and running and prev and prev.checkpoint \
                and all(st.bitmap == "ok" for st in states if st.format == "qcow2"):
            # libvirt's own view too: it refuses a missing or broken bitmap.
            try:
                self.dom.checkpoint_size(prev.checkpoint)
            except Error as e:
                refused = f"refused by libvirt ({e})"
                states = [DiskState(st.target, st.format, st.virtual_size,
                                    refused if st.format == "qcow2" else st.bitmap)
                          for st in states]
        return choose_mode(self.req.mode, self.req.domain, prev, known, states, no_parent)

    # -- run --------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        running = self.dom.is_active()
        disks = select_disks(self.dom.disks(), self.req.disks, self.req.exclude,
                             self.req.domain)
        requests0 = self.repo.request_counts()
        written0 = self.repo.chunks_written
        plan = self.plan(disks, running)
        backup_id = self.repo.new_backup_id()
        checkpoint = self.prefix + backup_id
        # Debug: the journal gets one line per backup, at its end (cli._log_summary).
        log.debug("%s: %s backup %s (%s)", self.req.domain, plan.mode, backup_id, plan.reason)
        prev_cp = plan.parent.checkpoint if plan.parent else None
        self.repo.start_known()  # deduplication without lookups, under our shared lock
        try:
            if running:
                manifest = self._run_live(disks, plan, backup_id, checkpoint)
            else:
                manifest = self._run_cold(disks, plan, backup_id, checkpoint)
            self.repo.forget_known()
        except BaseException:
            # Chunks of this run not yet published must never be published by a later
            # backup in this process: once we let go of the lock, gc may remove them.
            self.repo.discard_pending()
            if self._holding:  # the commit failed: a stop signal meanwhile acts now
                self._holding = False
                proc.release_signals()
            raise
        # The backup is committed: what follows is cleanup, and a failure here (libvirtd
        # restarting, say) is a warning, never a failed backup; the next run finishes it.
        try:
            for cp in self.dom.checkpoints():
                if owned(cp.name, self.prefix) and cp.name != checkpoint:
                    try:
                        delete_checkpoint(self.dom, cp.name, running)
                    except Error as e:
                        self._warn(f"could not delete old checkpoint {cp.name}: {e}")
        except Error as e:
            self._warn(f"could not list checkpoints after the backup: {e}")
        if self._holding:
            self._holding = False
            stopped = proc.release_signals()
            if stopped:
                # Too late to undo, and nothing to undo: the backup is complete.
                self._warn(f"{stopped} received after the backup was committed: "
                           "it is complete, and nothing more is done")
        result = summary(manifest)
        result["parent_checkpoint"] = prev_cp
        result["stored_chunks"] = self.repo.chunks_written - written0
        requests = self.repo.request_counts()
        if requests is not None and requests0 is not None:
            result["requests"] = {k: v - requests0.get(k, 0) for k, v in sorted(requests.items())
                                  if v - requests0.get(k, 0)}
        if self.warnings:
            result["warnings"] = self.warnings
        return result

    def _warn(self, msg: str) -> None:
        log.warning("%s: %s", self.req.domain, msg)
        self.warnings.append(msg)

    def _manifest(self, plan: Plan, backup_id: str, checkpoint: str, cp_xml: str | None,
                  records: list[DiskRecord], domain_xml: str, freeze: float | None,
                  quiesced: bool) -> Manifest:
        finished = _now()
        return Manifest(
            version=1, id=backup_id, domain=self.req.domain, created=_iso(self.started),
            mode=plan.mode, reason=plan.reason, checkpoint=checkpoint,
            parent_checkpoint=plan.parent.checkpoint if plan.parent else None,
            parent_id=plan.parent.id if plan.parent else None,
            started=_iso(self.started), finished=_iso(finished),
            duration_seconds=round(time.monotonic() - self.t0, 3),
            quiesced=quiesced, freeze_seconds=freeze, domain_xml=domain_xml,
            checkpoint_xml=cp_xml, disks=records, host=self.host, domain_uuid=self.uuid)

    def _copy(self, client: Client, disk: vxml.Disk, plan: Plan, backup_id: str) -> DiskRecord:
        mode, reason = plan.disk_modes[disk.target]
        parent_index: Index | None = None
        if mode == "incremental":
            assert plan.parent
            parent_index = self.repo.load_index(plan.parent, disk.target)
            self.repo.seed_known(parent_index)
        elif self._known_from is not None and self._known_from.disk(disk.target) is not None:
            # A full backup still need not send what the latest backup stored.
            with contextlib.suppress(Error):
                self.repo.seed_known(self.repo.load_index(self._known_from, disk.target))
        progress = None
        if self.hooks.progress_start:
            progress = self.hooks.progress_start(disk.target, client.size)
        t = time.monotonic()
        res = copy_disk(client, self.repo, parent=parent_index, workers=self.req.workers,
                        level=self.req.compression_level,
                        progress=progress, unchanged=disk.target in self.clean_disks)
        ref = self.repo.write_index(self.req.domain, backup_id, disk.target, res.index)
        log.debug("%s: disk %s %s: read %d bytes, stored %d bytes in %.1fs", self.req.domain,
                 disk.target, mode, res.read_bytes, res.stored_bytes, time.monotonic() - t)
        rec = DiskRecord(name=disk.target, source=disk.path, format=disk.format,
                         virtual_size=client.size, read_bytes=res.read_bytes,
                         stored_bytes=res.stored_bytes, data_bytes=res.index.data_bytes,
                         index=ref, mode=mode, reason=reason)
        return rec

    def _copy_and_commit(
            self, disks: list[vxml.Disk], plan: Plan, backup_id: str, checkpoint: str,
            cp_xml: str | None, domain_xml: str, freeze: float | None, quiesced: bool,
            export: Callable[[vxml.Disk, bool], contextlib.AbstractContextManager[Client]],
            own_job: Callable[[], None] | None = None,
    ) -> Manifest:
        """Copy every disk from its export, write the indexes, then commit the manifest.

        ``own_job`` raises unless the export is still this run's: called after each
        disk is read, so every disk committed was read from this run's own job.
        """
        if self.hooks.job_started:
            self.hooks.job_started()
        faults.point("before_first_chunk")
        records = []
        for d in disks:
            with export(d, plan.disk_modes[d.target][0] == "incremental") as client:
                records.append(self._copy(client, d, plan, backup_id))
            if own_job:
                own_job()
        manifest = self._manifest(plan, backup_id, checkpoint, cp_xml, records, domain_xml,
                                  freeze, quiesced)
        faults.point("after_index")
        if self.hooks.before_commit:
            self.hooks.before_commit()
        # From the commit until the job has ended and the old checkpoint is gone (run()),
        # a stop signal waits: acted on in between, it would delete the checkpoint the
        # committed backup names, or leave the job writing scratch data nobody watches.
        proc.hold_signals()
        self._holding = True
        self.repo.commit(manifest)
        return manifest

    def _run_live(self, disks: list[vxml.Disk], plan: Plan, backup_id: str,
                  checkpoint: str) -> Manifest:
        user = self._qemu_user()
        self._prepare_scratch(user)
        margin = self.req.scratch_min_free
        free = _free_bytes(self.scratch)
        if free < margin:
            raise NoSpace(f"{self.scratch} has {_mib(free)} free, less than scratch_min_free "
                          f"({_mib(margin)}): backup not started (the scratch file grows "
                          "with the guest's writes while the job runs)")
        with self._run_dir(user) as rundir:
            return self._run_live_in(disks, plan, backup_id, checkpoint, rundir)

    def _run_live_in(self, disks: list[vxml.Disk], plan: Plan, backup_id: str,
                     checkpoint: str, rundir: str) -> Manifest:
        sock = os.path.join(rundir, "sock")  # short: unix socket paths are limited
        if len(sock.encode()) > SUN_PATH_MAX:
            raise InvalidName("scratch_dir", self.req.scratch_dir,
                              "too long for a unix socket path")
        scratch = {d.target: os.path.join(rundir, f"{d.target}.scratch") for d in disks}
        inc = None
        if plan.mode == "incremental":
            assert plan.parent
            inc = {t: (plan.parent.checkpoint if m == "incremental" else None)
                   for t, (m, _) in plan.disk_modes.items()}
        backup_xml = vxml.backup_xml(sock, disks, scratch, inc)
        cp_xml = vxml.checkpoint_xml(checkpoint, disks,
                                     description=f"backupkit backup {backup_id}")
        domain_xml = self.dom.xml(inactive=True)
        freeze: float | None = None
        quiesced = False
        created = False
        ours = (sock, *sorted(scratch.values()))

        def abort_own_job() -> None:
            """End the job only if it is this run's: never another tool's (or run's) job."""
            if self.dom.backup_job_paths() == ours:
                self.dom.abort_job()

        watch = ScratchWatch(rundir, self.req.scratch_min_free, abort_own_job)


        def own_job() -> None:
            if watch.tripped is not None:
                raise self._scratch_low(watch)
            found = self.dom.backup_job_paths()
            if found != ours:
                raise OperationFailed(
                    f"{self.req.domain}: the backup job this run started is gone"
                    + (f" (another job is running, exporting {found[0]})" if found else "")
                    + "; what was read cannot be trusted, nothing committed")

        try:
            if self.req.quiesce:
                try:
                    # A stop signal waits until the guest is thawed (then raises here).
                    with proc.signals_held(), self.dom.frozen() as window:
                        self.dom.backup_begin(backup_xml, cp_xml)
                        created = True
                    freeze = round(window["seconds"], 6)
                    quiesced = True
                except QuiesceFailed as e:
                    if self.req.quiesce != "try":
                        raise
                    msg = f"not quiesced: {e.reason}"
                    log.warning("%s: %s", self.req.domain, msg)
                    self.warnings.append(msg)
            if not created:
                self.dom.backup_begin(backup_xml, cp_xml)
                created = True
            watch.start()
            stored_cp_xml = self.dom.checkpoint_xml(checkpoint)
            self.clean_disks = self._unchanged_disks(plan)

            def export(d: vxml.Disk, incremental: bool) -> Client:
                return Client(sock, d.target, dirty=incremental)

            manifest = self._copy_and_commit(disks, plan, backup_id, checkpoint, stored_cp_xml,
                                             domain_xml, freeze, quiesced, export, own_job)
        except BaseException as e:
            # Not committed: end the job and drop the new checkpoint, so the previous
            # checkpoint (still recording every write) serves the next incremental.
            watch.stop()
            with contextlib.suppress(Error):
                abort_own_job()
            if created:
                with contextlib.suppress(Error):
                    delete_checkpoint(self.dom, checkpoint, running=True)
            if watch.tripped is not None and isinstance(e, Exception):
                raise self._scratch_low(watch) from e
            raise
        watch.stop()
        # Committed: from here on the new checkpoint must survive whatever happens.
        faults.point("after_manifest")
        try:
            abort_own_job()
        except Error as e:
            self._warn(f"could not end the backup job (the next run ends it): {e}")
        if watch.lowest < 2 * watch.margin:
            self._warn(f"scratch space got thin: {_mib(watch.lowest)} free at the lowest in "
                       f"{self.scratch} (scratch_min_free {_mib(watch.margin)}); give it "
                       "more room")
        return manifest

    def _unchanged_disks(self, plan: Plan) -> set[str]:
        """Disks of a live incremental with nothing written since the parent's checkpoint.

        Asked once the job has begun: the parent checkpoint's bitmaps only ever gain
        bits, so none dirty now means none were dirty when the job froze its view.
        Such a disk's index is its parent's, with no block status at all: the query
        costs what the bitmap does, where block status costs a round trip per 4 GiB
        of virtual size (2048 for 8 TiB).  Any doubt (an error): the usual way.
        """
        if plan.mode != "incremental" or plan.parent is None or not plan.parent.checkpoint:
            return set()
        try:
            sizes = self.dom.checkpoint_size(plan.parent.checkpoint)
        except Error as e:
            log.debug("%s: checkpoint size unavailable (%s)", self.req.domain, e)
            return set()
        return {t for t, n in sizes.items() if n == 0
                and plan.disk_modes.get(t, ("", ""))[0] == "incremental"}

    def _scratch_low(self, watch: ScratchWatch) -> NoSpace:
        return NoSpace(f"{self.req.domain}: scratch space ran low ({_mib(watch.tripped or 0)} "
                       f"free in {self.scratch}, scratch_min_free {_mib(watch.margin)}): "
                       "backup job ended before the guest's writes could fail; nothing "
                       "committed")

    def _run_cold(self, disks: list[vxml.Disk], plan: Plan, backup_id: str,
                  checkpoint: str) -> Manifest:
        if self.req.quiesce and self.req.quiesce != "try":
            raise QuiesceFailed(self.req.domain, "domain is not running")
        self._prepare_scratch(None)
        with self._run_dir(None) as rundir:
            return self._run_cold_in(disks, plan, backup_id, checkpoint, rundir)

    def _run_cold_in(self, disks: list[vxml.Disk], plan: Plan, backup_id: str,
                     checkpoint: str, rundir: str) -> Manifest:
        domain_xml = self.dom.xml(inactive=True)
        added: list[vxml.Disk] = []
        prev_cp = plan.parent.checkpoint if plan.parent else None
        info = vxml.CheckpointInfo(checkpoint, prev_cp, int(time.time()),
                                   {d.target: (checkpoint if d.can_bitmap else None)
                                    for d in disks})
        cp_xml = vxml.redefine_xml(info)
        try:
            for d in disks:
                if d.can_bitmap:
                    qemu.bitmap_add(d.path, checkpoint, fmt=d.format)
                    added.append(d)

            @contextlib.contextmanager
            def export(d: vxml.Disk, incremental: bool) -> Iterator[Client]:
                with QemuNbd(d.path, d.format, os.path.join(rundir, f"{d.target}.sock"),
                             export=d.target,
                             read_only=True, bitmap=prev_cp if incremental else None) as server, \
                        server.client(dirty=incremental) as client:
                    yield client

            manifest = self._copy_and_commit(disks, plan, backup_id, checkpoint, cp_xml,
                                             domain_xml, None, False, export)
        except BaseException:
            for d in added:
                with contextlib.suppress(Error):
                    qemu.bitmap_remove(d.path, checkpoint, fmt=d.format)
            raise
        faults.point("after_manifest")
        # Committed: tell libvirt about the checkpoint (metadata only for a shut-off domain).
        try:
            self.dom.redefine_checkpoint(cp_xml)
        except Error as e:
            self._warn(f"could not record checkpoint {checkpoint} in libvirt: {e}")
        return manifest


def domain_latest(repo: Repository, dom: Domain, host: str | None = None) -> Manifest:
    """The newest backup of this very domain (its UUID; backupkit.repo.chains), not of
    another host's domain of the same name.  ``host`` (default config.this_host()) only
    matters for backups that record no UUID at all."""
    return repo.latest(dom.name, chains.of_domain(dom.uuid(), host or config.this_host()))


def summary(m: Manifest) -> dict[str, Any]:
    """The backup result document (CONTRACT.md: JSON, backup result)."""
    return {
        "domain": m.domain,
        "id": m.id,
        "host": m.host,
        "domain_uuid": m.domain_uuid,
        "mode": m.mode,
        "reason": m.reason,
        "checkpoint": m.checkpoint,
        "parent_checkpoint": m.parent_checkpoint,
        "parent_id": m.parent_id,
        "created": m.created,
        "quiesced": m.quiesced,
        "freeze_seconds": m.freeze_seconds,
        "duration_seconds": m.duration_seconds,
        "read_bytes": sum(d.read_bytes for d in m.disks),
        "stored_bytes": sum(d.stored_bytes for d in m.disks),
        "disks": [
            {"name": d.name, "format": d.format, "virtual_size": d.virtual_size,
             "read_bytes": d.read_bytes, "stored_bytes": d.stored_bytes,
             "data_bytes": d.data_bytes,
             "mode": d.mode or m.mode, "reason": d.reason or m.reason}
            for d in m.disks
        ],
    }


def backup(repo: Repository, conn: Connection, req: Request, hooks: Hooks | None = None
           ) -> dict[str, Any]:
    """Back up one domain; raises on failure (nothing half-committed is visible).

    Holds the repository's writer lock (gc's protocol then keeps every chunk this
    backup references: docs/format.md, "Locks and gc") and the domain's lock (one
    backup per domain at a time, on any host).
    """
    with repo.lock_shared(wait=req.lock_wait):
        return _backup_locked(repo, conn, req, hooks)


def _backup_locked(repo: Repository, conn: Connection, req: Request, hooks: Hooks | None
                   ) -> dict[str, Any]:
    check_scratch_dir(req.scratch_dir)
    # The repository's domain lock first: a backup of this domain on another host holds
    # it, and Busy then names that host (the host-wide lock sees only this host).
    # Keyed by name and UUID: another host's different domain of the same name is not us.
    try:
        uuid: str | None = conn.domain(req.domain).uuid()
    except Error:
        uuid = None  # not defined here: _Backup reports it, under the name-only lock
    with repo.lock_domain(req.domain, wait=req.lock_wait, uuid=uuid), \
            host_domain_lock(req.domain, wait=req.lock_wait):
        return _Backup(repo, conn, req, hooks or Hooks()).run()


def backup_many(repo: Repository, conn: Connection, domains: Sequence[str],
                make_request: Callable[[str], Request], hooks: Hooks | None = None,
                on_result: Callable[[str, dict[str, Any] | None, Error | None], None]
                | None = None, jobs: int = 1) -> dict[str, Any]:
    """Back up several domains, ``jobs`` at a time; one failure does not stop the others.

    The writer lock is held for the whole run (gc runs beside it: docs/format.md,
    "Locks and gc").  With jobs > 1, each worker thread backs up one domain after
    another through a libvirt connection and a Repository (Repository.sibling) of its
    own; the results keep the order of ``domains``.  Each disk's progress bar is
    labelled with its domain.
    """
    wait = max((make_request(n).lock_wait for n in domains), default=0.0)
    for n in domains[:1]:
        check_scratch_dir(make_request(n).scratch_dir)  # a usage error, not N failures
    hooks = hooks or Hooks()
    outcomes: dict[str, tuple[dict[str, Any] | None, Error | None]] = {}
    report = threading.Lock()  # on_result runs in one thread at a time

    def one(r: Repository, c: Connection, name: str) -> None:
        start = hooks.progress_start
        h = hooks if start is None or len(domains) < 2 else dataclasses.replace(
            hooks, progress_start=lambda disk, total: start(f"{name}/{disk}", total))
        try:
            res: dict[str, Any] | None = _backup_locked(r, c, make_request(name), h)
            err: Error | None = None
        except KeyboardInterrupt as e:
            e.context = f"{name}: backup"  # type: ignore[attr-defined]
            raise
        except Exception as e:  # one domain's failure, even a bug, must not cost the others
            if isinstance(e, Error):
                err = e
            else:
                log.exception("%s: unexpected error", name)
                err = OperationFailed(f"{type(e).__name__}: {e}")
            log.error("%s: backup failed: %s", name, err)
            res = None
        record(name, err, res)

    def record(name: str, err: Error | None, res: dict[str, Any] | None = None) -> None:
        with report:
            outcomes[name] = (res, err)
            if on_result:
                on_result(name, res, err)

    with repo.lock_shared(wait=wait):
        if jobs <= 1 or len(domains) <= 1:
            for name in domains:
                proc.raise_if_stopped()  # a stop signal held by the previous domain's commit
                one(repo, conn, name)
        else:
            _run_parallel(repo, conn, domains, min(jobs, len(domains)), one, record)
    results = [res for n in domains if (res := outcomes[n][0]) is not None]
    failed = [{"domain": n, **err.to_json()} for n in domains
              if (err := outcomes[n][1]) is not None]
    doc = {"backups": results, "failed": failed}
    if failed and results:
        raise Partial(f"{len(failed)} of {len(domains)} domains failed: "
                      + ", ".join(f["domain"] for f in failed), result=doc)
    if failed:
        raise OperationFailed(f"all {len(failed)} domains failed: "
                              + "; ".join(f"{f['domain']}: {f['message']}" for f in failed),
                              result=doc)
    return doc


def _run_parallel(repo: Repository, conn: Connection, domains: Sequence[str], jobs: int,
                  one: Callable[[Repository, Connection, str], None],
                  fail: Callable[[str, Error], None]) -> None:
    """Run one(repo, conn, name) for every domain on ``jobs`` worker threads.

    A stop signal raises Interrupted in the main thread (waiting here); the workers
    see it (proc.stop_requested: the copy loop checks it for every chunk, and no
    worker starts another domain), clean up like a single run, and this raises it
    once every worker is done.  A domain committing when it arrives finishes.
    A worker that cannot start (no libvirt connection) leaves its domains to the
    others; domains nobody could take fail with its error.
    """
    todo = list(domains)
    lock = threading.Lock()
    setup_errors: list[Error] = []
    done: set[str] = set()

    def worker(ended: threading.Event) -> None:
        try:
            work()
        finally:
            ended.set()

    def work() -> None:
        held = contextlib.ExitStack()
        try:
            r = repo.sibling()
            # A writer lock of its own: its domain locks register its commits with gc's
            # protocol (Repository.lock_domain), like a single backup's.
            held.enter_context(r.lock_shared())
            c = Connection(conn.uri)
        except Exception as e:
            held.close()
            err = e if isinstance(e, Error) else OperationFailed(f"{type(e).__name__}: {e}")
            log.error("a backup job could not start: %s", err)
            with lock:
                setup_errors.append(err)
            return
        held.callback(c.close)
        try:
            while not proc.stop_requested():
                with lock:
                    if not todo:
                        return
                    name = todo.pop(0)
                one(r, c, name)
                with lock:
                    done.add(name)
        except KeyboardInterrupt:
            return  # Interrupted: the main thread raises it once all workers are done
        finally:
            held.close()  # the connection, then the writer lock

    ended = [threading.Event() for _ in range(jobs)]
    threads = [threading.Thread(target=worker, args=(ev,), name=f"backup-job-{i}", daemon=True)
               for i, ev in enumerate(ended)]
    for t in threads:
        t.start()
    # The workers see a stop request and clean up; wait_all waits for all of them
    # (not Thread.join: see there) and then raises the interrupt.
    wait_all(ended)
    stop = proc.stop_requested()
    if stop:
        raise Interrupted(stop)
    for name in domains:
        if name not in done and setup_errors:
            fail(name, setup_errors[0])
