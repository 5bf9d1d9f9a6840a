"""drill: prove a backup boots, then leave nothing behind.

A throwaway domain ``drill-<domain>-<random>`` (new name, UUID, MACs, **no network
interfaces**, serial log in its own directory) is started from overlays on the
backup's export exactly as ``restore --live`` starts one, but nothing is copied:
the overlays (in RUN_DIR/live-NAME/) only take what the guest writes.  The
drill waits for the guest agent to answer ``guest-ping`` and, with a check, runs
it in the guest through ``guest-exec`` (exit 0 passes).  It fails early when the
guest cannot go on: paused on an I/O error (a read the export refused, e.g. a
damaged chunk: the nbdkit log line is the reason) or shut off / crashed.

Whatever happens (pass, fail, timeout, interrupt), the domain, the server, the
overlays and the state are removed; the outcome is recorded in the repository
(``drills/<domain>/<time>-<name>.json``) and in the metrics textfile.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import shlex
import time
from datetime import UTC, datetime
from typing import Any

from backupkit.errors import Error, LibvirtError, OperationFailed, UsageError
from backupkit.ops import live
from backupkit.repo import Repository

log = logging.getLogger("backupkit.drill")

DEFAULT_TIMEOUT = 300.0
POLL = 0.5
DRILLS = "drills"


class DrillFailed(OperationFailed):
    """The drill ran and the backup did not pass (exit 1); the result is attached."""

    kind = "drill_failed"


def drill_name(domain: str) -> str:
    return f"drill-{domain[:40]}-{secrets.token_hex(3)}"


def _tail(path: str, n: int = 3) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read()[-4096:].decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in lines[-n:] if line.strip())


def _guest_check(dom: Any, argv: list[str], deadline: float) -> tuple[int, str]:
    """Run argv in the guest; (exit code, output tail)."""
    pid = dom.agent("guest-exec", {"path": argv[0], "arg": argv[1:], "capture-output": True},
                    timeout=10)["pid"]
    while True:
        st = dom.agent("guest-exec-status", {"pid": pid}, timeout=10)
        if st.get("exited"):
            out = b""
            for key in ("out-data", "err-data"):
                with contextlib.suppress(ValueError):
                    out += base64.b64decode(st.get(key, ""))
            return int(st.get("exitcode", -1)), out.decode("utf-8", "replace")[-500:].strip()
        if time.monotonic() > deadline:
            raise OperationFailed(f"the check {shlex.join(argv)} did not finish in time")
        time.sleep(0.2)


def _wait_agent(dom: Any, deadline: float, server_log: str) -> None:
    last = ""
    while True:
        state, why = dom.state()
        if state == "paused" and why == "I/O error":
            damage = _tail(server_log, 2)
            raise OperationFailed("the guest paused on an I/O error reading the backup"
                                  + (f": {damage}" if damage else ""))
        if state in ("shut off", "crashed"):
            raise OperationFailed(f"the guest stopped before its agent answered ({state})")
        try:
            dom.agent("guest-ping", timeout=2)
            return
        except LibvirtError as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise OperationFailed("the guest agent did not answer guest-ping in time"
                                  + (f" (last: {last})" if last else ""))
        time.sleep(POLL)


def drill(repo: Repository, repo_location: str, config_path: str | None, domain: str,
          backup: str, *, connect: str = "qemu:///system", timeout: float = DEFAULT_TIMEOUT,
          check: str | None = None, passphrase_file: str | None = None) -> dict[str, Any]:
    """Boot a throwaway copy of the backup; the result (raises DrillFailed if it failed)."""
    from backupkit.virt.live import LiveDomain

    argv = shlex.split(check) if check else []
    if check is not None and not argv:
        raise UsageError("--check needs a command")
    if timeout <= 0:
        raise UsageError("--timeout must be more than 0 seconds")
    manifest = repo.get_manifest(domain, backup)  # exit 4/5 before anything is made
    name = drill_name(domain)
    t0 = time.time()
    deadline = time.monotonic() + timeout
    sdir = live.state_dir(name)
    result: dict[str, Any] = {
        "domain": manifest.domain, "id": manifest.id, "drill_domain": name,
        "started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "passed": False,
        "reason": None, "seconds_to_start": None, "seconds_to_agent": None, "check": check,
        "check_exit_code": None, "check_output": None, "duration_seconds": None,
    }
    try:
        started = live.live_restore(
            repo, repo_location, config_path, manifest.domain, manifest.id,
            os.path.join(sdir, "disks"), name, connect=connect, networks=False, pull=False,
            console=os.path.join(sdir, "console.log"), passphrase_file=passphrase_file)
        result["seconds_to_start"] = started["seconds_to_start"]
        dom = LiveDomain(connect, name)
        _wait_agent(dom, deadline, os.path.join(sdir, "nbd.sock.log"))
        result["seconds_to_agent"] = round(time.time() - t0, 3)
        log.info("%s: the guest agent of %s answered after %.1fs", domain, name,
                 result["seconds_to_agent"])
        if argv:
            rc, out = _guest_check(dom, argv, deadline)
            result["check_exit_code"], result["check_output"] = rc, out
            if rc != 0:
                raise OperationFailed(f"the check {check!r} exited {rc}"
                                      + (f": {out}" if out else ""))
        result["passed"] = True
    except Error as e:
        result["reason"] = str(e)
    except KeyboardInterrupt:
        result["reason"] = "interrupted"
        raise
    finally:
        try:
            live.abort(name, remove_files=True)
        except Error as e:
            log.error("drill %s: cleaning up failed: %s", name, e)
            result["passed"] = False
            result["reason"] = (result["reason"] or "") + f"; cleanup failed: {e}"
        result["duration_seconds"] = round(time.time() - t0, 3)
        _record(repo, result)
    if not result["passed"]:
        raise DrillFailed(f"drill of {manifest.domain}/{manifest.id} failed: {result['reason']}",
                          result=result)
    return result


def _record(repo: Repository, result: dict[str, Any]) -> None:
    """The outcome as drills/<domain>/<time>-<name>.json (a failure to write is logged)."""
    stamp = result["started"].replace("-", "").replace(":", "")
    key = f"{DRILLS}/{result['domain']}/{stamp}-{result['drill_domain']}.json"
    record = dict(result)
    if getattr(repo, "encrypted", False):
        # The record is not sealed: keep what the guest printed out of it.
        record["check_output"] = None
    try:
        repo.storage.replace(key, json.dumps(record, indent=1, sort_keys=True).encode())
        result["record"] = key
    except (Error, OSError) as e:
        log.warning("cannot record the drill in the repository: %s", e)
        result["record"] = None
