"""restore --live: the domain runs within seconds from overlays on the backup's export.

1. ``serve`` starts (nbdkit, detached: it outlives this process) on a socket in
   RUN_DIR/live-NAME/, owned by QEMU's user; every disk is an export of its own.
2. One qcow2 overlay per disk, ``DIR/<disk>.qcow2``, backed by its export.
3. The domain is defined (new name, UUID, MACs, as ``restore --define``) with the
   NBD backing explicit and ``error_policy='stop'`` on those disks, and started:
   ``seconds_to_start``.
4. ``blockPull`` per disk (QEMU's block-stream, running inside QEMU) copies into
   each overlay what the guest has not written and drops the backing; when every
   disk is independent of the export the persistent definition loses it too, the
   server stops and the state goes: ``seconds_to_independence``.

The state (RUN_DIR/live-NAME/state.json) lets ``restore-status NAME`` report and
finish a ``--detach``-ed restore, and lets the same ``restore --live`` command
run again resume an interrupted one: a dead server is restarted on the same
socket, a domain paused on an I/O error is resumed, a failed pull is started
again (it copies only what the overlay still lacks).  If the export dies, guest
reads that need it pause the domain (``error_policy='stop'``); nothing is
written to the backup (the export is read-only) and the overlay keeps what was
copied.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from backupkit import proc
from backupkit.errors import NotFound, OperationFailed, UsageError
from backupkit.ops import serve
from backupkit.repo import Repository
from backupkit.repo.names import check_name

log = logging.getLogger("backupkit.live")

RUN_DIR = serve.RUN_DIR
POLL = 0.2
Progress = Callable[[int], object]


def qemu_owner(connect: str, domain_xml: str) -> tuple[int, int] | None:
    """(uid, gid) the new domain's QEMU will run as (libvirt's DAC label for its virt
    type), or None when QEMU runs privileged or libvirt names no DAC identity."""
    import xml.etree.ElementTree as ET

    from backupkit import virt

    with virt.connect(connect) as conn:
        user = conn.qemu_user(ET.fromstring(domain_xml).get("type", "kvm"))
    if user is None or user.privileged:
        return None
    return user.uid, user.gid


def state_dir(name: str) -> str:
    return os.path.join(RUN_DIR, f"live-{name}")


def _load(name: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(state_dir(name), "state.json")) as f:
            doc: dict[str, Any] = json.load(f)
            return doc
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise OperationFailed(f"cannot read the live restore state of {name}: {e}") from e


def _save(doc: dict[str, Any]) -> None:
    path = os.path.join(state_dir(doc["name"]), "state.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _run_dir(name: str) -> str:
    """RUN_DIR/live-NAME: QEMU's user may traverse it (0711) to reach the socket."""
    os.makedirs(RUN_DIR, exist_ok=True)
    os.chmod(RUN_DIR, 0o711)
    d = state_dir(name)
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o711)
    return d


def _start_server(repo: Repository, doc: dict[str, Any]) -> None:
    owner = doc.get("qemu_owner")
    ids = (int(owner[0]), int(owner[1])) if owner else None
    server, _res = serve.start(repo, doc["repo"], doc["config"], doc["source"], doc["id"],
                               doc["socket"], log_path=doc["socket"] + ".log", detach=True,
                               socket_owner=ids, socket_mode=0o600,
                               passphrase_file=doc.get("passphrase_file"))
    doc["server_pid"] = server.pid
    _save(doc)


def live_restore(repo: Repository, repo_location: str, config_path: str | None, domain: str,
                 backup: str, target_dir: str, define: str, *, disks: tuple[str, ...] = (),
                 connect: str = "qemu:///system", detach: bool = False, bandwidth: int = 0,
                 networks: bool = True, pull: bool = True, console: str | None = None,
                 passphrase_file: str | None = None,
                 progress: Callable[[str, int], Progress | None] | None = None
                 ) -> dict[str, Any]:
    """Restore live (see the module doc); resume if a live restore of define is under way.

    Without pull the domain only runs from the export (a drill): no block pull
    starts, the result comes at once, and abort() removes it all.
    """
    from backupkit.virt.live import LiveDomain, live_domain_xml

    t0 = time.time()
    check_name("domain name", define)
    check_name("domain name", domain)
    live = LiveDomain(connect, define)
    doc = _load(define)
    if doc is not None:
        if doc["source"] != domain or backup not in ("latest", doc["id"]):
            raise UsageError(f"a live restore of {doc['source']}/{doc['id']} into {define} "
                             "is under way; resume it with the same domain and backup")
        log.info("Resuming the live restore of %s/%s into %s", doc["source"], doc["id"],
                 define)
        return _resume(repo, doc, live, detach=detach, bandwidth=bandwidth, progress=progress)
    manifest = repo.get_manifest(domain, backup)
    names = serve.served_disks(manifest, disks)
    if not manifest.domain_xml:
        raise UsageError(f"backup {domain}/{manifest.id} has no domain XML to define from")
    if live.exists():
        raise UsageError(f"domain {define!r} already exists; choose another --define name")
    target_dir = os.path.abspath(target_dir)
    if os.path.lexists(target_dir) and not os.path.isdir(target_dir):
        raise UsageError(f"restore target {target_dir} is not a directory")
    overlays = {n: os.path.join(target_dir, f"{n}.qcow2") for n in names}
    for path in overlays.values():
        if os.path.lexists(path):
            raise UsageError(f"{path} already exists")
    for n in names:
        repo.load_index(manifest, n)  # a damaged index fails before anything is made
    from backupkit import virt

    # the new domain's QEMU (an unprivileged user) must reach the overlays
    virt.make_reachable_dir(connect, manifest.domain_xml, target_dir)
    sdir = _run_dir(define)
    doc = {"name": define, "source": manifest.domain, "id": manifest.id, "connect": connect,
           "repo": repo_location, "config": config_path, "target": target_dir,
           "passphrase_file": passphrase_file,
           "qemu_owner": qemu_owner(connect, manifest.domain_xml),
           "socket": os.path.join(sdir, "nbd.sock"), "overlays": overlays,
           "server_pid": None, "started_at": t0, "seconds_to_start": None, "defined": False}
    _save(doc)
    try:
        _start_server(repo, doc)
        for n, path in overlays.items():
            rec = manifest.disk(n)
            assert rec is not None
            proc.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u",
                      "-b", serve.nbd_url(doc["socket"], n), "-F", "raw", path,
                      str(rec.virtual_size)])
        xml = live_domain_xml(manifest.domain_xml, define,
                              {n: (p, doc["socket"], n) for n, p in overlays.items()},
                              networks=networks, console=console)
        live.define_and_start(xml)
        doc["defined"] = True
        doc["seconds_to_start"] = round(time.time() - t0, 3)
        _save(doc)
        log.info("Domain %s started from %s/%s in %.1fs; copying its disks into %s",
                 define, manifest.domain, manifest.id, doc["seconds_to_start"], target_dir)
        for n in overlays if pull else ():
            live.block_pull(n, bandwidth)
    except BaseException:
        abort(define, remove_files=True)
        raise
    if not pull:
        result = _result(doc, live)
        result["state"] = "running"
        return result
    if detach:
        return status(define)
    return wait(define, progress=progress)


def _resume(repo: Repository, doc: dict[str, Any], live: Any, *, detach: bool,
            bandwidth: int, progress: Callable[[str, int], Progress | None] | None
            ) -> dict[str, Any]:
    if not doc.get("defined") or not live.exists():
        abort(doc["name"], remove_files=True)
        raise OperationFailed(f"the live restore into {doc['name']} had not started its "
                              "domain; it was cleaned up: run the command again")
    pending = _pending(live, doc)
    if pending:
        pid = doc.get("server_pid")
        if not pid or not serve.alive(int(pid)) or not serve.answers(doc["socket"]):
            if pid:
                serve.stop_pid(int(pid))
            log.info("Restarting the export for %s", doc["name"])
            _start_server(repo, doc)
        state, why = live.state()
        if state == "paused":
            log.info("Resuming %s (paused: %s)", doc["name"], why)
            live.resume()
        elif state in ("shut off", "crashed"):
            log.info("Starting %s again (%s)", doc["name"], state)
            live.start()
        _pull_again(live, doc, sorted(pending), bandwidth)
    if detach:
        return status(doc["name"])
    return wait(doc["name"], progress=progress)


def _pull_again(live: Any, doc: dict[str, Any], targets: list[str], bandwidth: int,
                attempts: int = 10) -> None:
    """Start the pulls of targets again, until they keep running.

    QEMU's NBD client reconnects to a restarted server lazily: the first requests
    after the server died fail at once while it reconnects, which ends a pull
    started too early.  So a pull that ends at once without finishing is started
    again, up to ``attempts`` times.
    """
    for attempt in range(attempts):
        pending = _pending(live, doc) & set(targets)
        jobs = live.jobs(sorted(pending))
        idle = [t for t in sorted(pending) if jobs[t] is None]
        if not idle:
            return
        for t in idle:
            log.info("Pulling %s again%s", t, f" (attempt {attempt + 1})" if attempt else "")
            live.block_pull(t, bandwidth)
        time.sleep(0.5 * (attempt + 1))


def _pending(live: Any, doc: dict[str, Any]) -> set[str]:
    from backupkit.virt.live import nbd_backed

    return nbd_backed(live.xml()) & set(doc["overlays"])


def wait(name: str, *, progress: Callable[[str, int], Progress | None] | None = None,
         timeout: float | None = None) -> dict[str, Any]:
    """Wait until every disk is independent (then finish), or fail if a pull stops."""
    from backupkit.virt.live import LiveDomain

    doc = _load(name)
    if doc is None:
        raise NotFound("live restore", name)
    live = LiveDomain(doc["connect"], name)
    try:
        return _wait(doc, live, progress, timeout)
    except KeyboardInterrupt:
        log.warning("The copy into %s goes on inside QEMU: 'backupkit restore-status %s' "
                    "reports and finishes it", name, name)
        raise


def _wait(doc: dict[str, Any], live: Any, progress: Callable[[str, int], Progress | None]
          | None, timeout: float | None) -> dict[str, Any]:
    name = doc["name"]
    bar: Progress | None = None
    done = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pending = _pending(live, doc)
        if not pending:
            return _finish(doc, live)
        jobs = live.jobs(sorted(pending))
        if any(j is None for j in jobs.values()):
            # libvirt ends the job a moment before the XML loses the backing
            stopped = _stopped(live, doc)
            if stopped is None:
                return _finish(doc, live)
            if stopped:
                raise OperationFailed(
                    f"live restore into {name}: the copy of {', '.join(stopped)} stopped "
                    f"before it was complete ({_why_stopped(doc)}); {_hint(doc)}")
            continue
        if progress is not None:
            total = sum(j[1] for j in jobs.values() if j)
            cur = sum(j[0] for j in jobs.values() if j)
            if bar is None and total:
                bar = progress("live restore", total)
            if bar is not None and cur > done:
                bar(cur - done)
                done = cur
        if deadline is not None and time.monotonic() > deadline:
            raise OperationFailed(f"live restore into {name} not complete after {timeout}s")
        time.sleep(POLL)


def _stopped(live: Any, doc: dict[str, Any], grace: float = 5.0) -> list[str] | None:
    """Disks whose pull ended without making them independent (None: all independent).

    A job that just completed is gone from blockJobInfo before libvirt has updated
    the domain XML: only a disk still backed after ``grace`` seconds without a job
    has stopped.  [] means a job reappeared (someone restarted it).
    """
    deadline = time.monotonic() + grace
    while True:
        pending = _pending(live, doc)
        if not pending:
            return None
        jobs = live.jobs(sorted(pending))
        stopped = sorted(t for t, j in jobs.items() if j is None)
        if not stopped or time.monotonic() > deadline:
            return stopped
        time.sleep(POLL)


def _why_stopped(doc: dict[str, Any]) -> str:
    """The export's last refused read (a damaged chunk), else whether the server died."""
    from backupkit.virt.live import LiveDomain

    state, _why = LiveDomain(doc["connect"], doc["name"]).state()
    if state in ("shut off", "crashed"):
        return f"the domain is {state}"
    try:
        with open(doc["socket"] + ".log", "rb") as f:
            lines = f.read()[-8192:].decode("utf-8", "replace").splitlines()
    except OSError:
        lines = []
    refused = [line for line in lines if "EIO sent" in line]
    if refused:
        return f"the export refused a read: {refused[-1].strip()}"
    pid = doc.get("server_pid")
    if not pid or not serve.alive(int(pid)):
        return "the export's server is not running"
    return "see restore-status"


def _hint(doc: dict[str, Any]) -> str:
    return (f"run 'backupkit restore {doc['source']} {doc['id']} --live --define {doc['name']} "
            f"--target {doc['target']}' again to resume it")


def _finish(doc: dict[str, Any], live: Any) -> dict[str, Any]:
    """Every disk is independent: drop the backing from the persistent definition, stop
    the server, remove the state."""
    from backupkit.virt.live import nbd_backed, without_backing

    inactive = live.xml(inactive=True)
    if nbd_backed(inactive):
        live.redefine(without_backing(inactive, set(doc["overlays"])))
    pid = doc.get("server_pid")
    if pid:
        serve.stop_pid(int(pid))
    serve.remove_socket(doc["socket"])
    shutil.rmtree(state_dir(doc["name"]), ignore_errors=True)
    result = _result(doc, live)
    result["state"] = "done"
    result["seconds_to_independence"] = round(time.time() - doc["started_at"], 3)
    log.info("%s no longer depends on the backup (%.1fs)", doc["name"],
             result["seconds_to_independence"])
    return result


def _result(doc: dict[str, Any], live: Any) -> dict[str, Any]:
    try:
        dstate, why = live.state()
    except NotFound:
        dstate, why = "missing", ""
    return {"domain": doc["name"], "source": doc["source"], "id": doc["id"],
            "target": doc["target"],
            "disks": [{"name": n, "path": p} for n, p in sorted(doc["overlays"].items())],
            "seconds_to_start": doc["seconds_to_start"], "domain_state": dstate,
            "domain_state_reason": why, "server_pid": doc.get("server_pid")}


def status(name: str) -> dict[str, Any]:
    """restore-status: progress of a live restore; finishes it once every disk is independent."""
    from backupkit.virt.live import LiveDomain

    check_name("domain name", name)
    doc = _load(name)
    if doc is None:
        raise NotFound("live restore", name, "none under way (finished, or never started)")
    live = LiveDomain(doc["connect"], name)
    pending = _pending(live, doc)
    if not pending:
        return _finish(doc, live)
    stopped = _stopped(live, doc, grace=1.0) if None in live.jobs(sorted(pending)).values() \
        else []
    if stopped is None:
        return _finish(doc, live)
    pending = _pending(live, doc)
    jobs = live.jobs(sorted(pending))
    result = _result(doc, live)
    result["seconds_to_independence"] = None
    disks = []
    for d in result["disks"]:
        j = jobs.get(d["name"])
        d["independent"] = d["name"] not in pending
        d["copied"] = j[0] if j else None
        d["total"] = j[1] if j else None
        disks.append(d)
    result["disks"] = disks
    result["state"] = "stalled" if stopped else "copying"
    if stopped:
        result["hint"] = _hint(doc)
        result["reason"] = _why_stopped(doc)
    server = doc.get("server_pid")
    result["server_running"] = bool(server and serve.alive(int(server)))
    return result


def abort_command(name: str) -> dict[str, Any]:
    """restore-status --abort: undo a live restore that is under way (or stalled)."""
    check_name("domain name", name)
    doc = _load(name)
    if doc is None:
        raise NotFound("live restore", name, "none under way (finished, or never started)")
    abort(name, remove_files=True)
    log.info("Live restore into %s aborted: domain, server and overlays removed", name)
    return {"domain": name, "source": doc["source"], "id": doc["id"], "state": "aborted",
            "removed": sorted(doc["overlays"].values())}


def abort(name: str, *, remove_files: bool) -> None:
    """Undo a live restore: the domain, the server, the state (and the overlays if asked)."""
    from backupkit.virt.live import LiveDomain

    doc = _load(name)
    if doc is None:
        return
    if doc.get("defined"):
        with contextlib.suppress(NotFound):
            LiveDomain(doc["connect"], name).destroy_and_undefine()
    pid = doc.get("server_pid")
    if pid:
        serve.stop_pid(int(pid))
    serve.remove_socket(doc["socket"])
    if remove_files:
        for path in doc["overlays"].values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    shutil.rmtree(state_dir(name), ignore_errors=True)
