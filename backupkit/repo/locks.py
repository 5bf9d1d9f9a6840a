"""Repository locks as objects in the store, so that they work across hosts.

docs/format.md, "Locks and gc", is the specification; in short:

- A lock is an object ``locks/<kind>-<16 hex>.json`` (kind: writer, domain, gc,
  exclusive) holding who holds it (host, pid, boot id, command, since when).  The
  same code serves every store: a local directory, S3, the in-memory test store.
- To take a lock, a process creates its object, then lists ``locks/``.  It loses
  to every conflicting live lock created before its own (by the store's clock:
  the object's first modification time) *or at the same time* (S3 keeps whole
  seconds, so a tie cannot be ordered): it deletes its object and reports Busy
  naming the holder, or tries again while ``wait`` lasts.  So two conflicting
  holders never both proceed: the later one always sees the earlier one.
- A holder refreshes its object every ``lock_refresh`` seconds from a daemon
  thread.  A lock is stale when the store's clock says it was not refreshed for
  ``lock_stale`` seconds, or at once when it was taken on this host (same host
  name and boot id) by a process that is gone.  Whoever finds a stale lock
  removes it (with a warning naming it).

The old flock(2) files of local repositories (``locks/repository.lock``,
``locks/domain.NAME.lock``) are ignored; gc removes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from backupkit.errors import Busy, NotFound, OperationFailed, RepositoryError, UsageError
from backupkit.repo.storage import ObjectInfo, Storage

log = logging.getLogger("backupkit.locks")

LOCK_PREFIX = "locks/"
KINDS = ("writer", "domain", "gc", "exclusive")
# kind-[tag-]random.json; a domain lock's tag is the first 8 hex digits of the SHA-256
# of its domain name, so a process taking a lock reads only the bodies of the locks
# that may conflict with it (one request each), never all of them.
_NAME = re.compile(r"(writer|domain|gc|exclusive)-(?:([0-9a-f]{8})-)?[0-9a-f]{16}\.json")


def _tag(domain: str | None) -> str | None:
    return hashlib.sha256(domain.encode()).hexdigest()[:8] if domain is not None else None


def _may_conflict(kind: str, tag: str | None, other_kind: str, other_tag: str | None) -> bool:
    """conflicts() as far as the names tell (a tag is None when the name has none)."""
    if "exclusive" in (kind, other_kind):
        return True
    if kind == other_kind == "gc":
        return True
    return kind == other_kind == "domain" and (tag is None or other_tag is None
                                               or tag == other_tag)
LOCK_MAX = 64 * 1024
POLL_INTERVAL = 0.2  # seconds between tries while waiting for a busy lock
ENV_HOST = "BACKUPKIT_HOST"


@dataclass(frozen=True)
class Settings:
    """The timing of locks and gc (config keys of the same names, docs/format.md)."""

    lock_refresh: float = 60.0
    lock_stale: float = 600.0
    max_clock_skew: float = 300.0
    gc_grace: float = 3600.0
    #: This host's identity (config.this_host: $BACKUPKIT_HOST, config `host`, the
    #: machine's name); empty: host_name().
    host: str = ""

    def me(self) -> str:
        return self.host or host_name()


#: Environment variables that override the config keys of the same meaning.
ENV_SETTINGS = {"lock_refresh": "BACKUPKIT_LOCK_REFRESH", "lock_stale": "BACKUPKIT_LOCK_STALE",
                "max_clock_skew": "BACKUPKIT_MAX_CLOCK_SKEW", "gc_grace": "BACKUPKIT_GC_GRACE"}


def settings(host: str = "", **given: float | None) -> Settings:
    """Settings from the config's values (None: default), each overridden by its
    environment variable; UsageError if a value is out of range."""
    values: dict[str, float] = {}
    for name, env in ENV_SETTINGS.items():
        raw = os.environ.get(env)
        if raw:
            try:
                values[name] = float(raw)
            except ValueError:
                raise UsageError(f"${env} must be a number of seconds, not {raw!r}") from None
        elif given.get(name) is not None:
            values[name] = float(given[name])  # type: ignore[arg-type]
    s = Settings(**values, host=host)
    if s.lock_refresh <= 0 or s.lock_stale <= 0 or s.max_clock_skew < 0 or s.gc_grace < 0:
        raise UsageError("lock_refresh and lock_stale must be positive, max_clock_skew and "
                         "gc_grace not negative")
    if s.lock_stale < 2 * s.lock_refresh:
        raise UsageError(f"lock_stale ({s.lock_stale:g} s) must be at least twice "
                         f"lock_refresh ({s.lock_refresh:g} s)")
    if s.gc_grace < 2 * s.max_clock_skew:
        raise UsageError(f"gc_grace ({s.gc_grace:g} s) must be at least twice "
                         f"max_clock_skew ({s.max_clock_skew:g} s)")
    return s


DEFAULT_SETTINGS = Settings()


def host_name() -> str:
    """This host's name in locks: $BACKUPKIT_HOST, else the machine's host name."""
    return os.environ.get(ENV_HOST) or socket.gethostname()


def boot_id() -> str:
    """This boot's id: a pid means something only within one boot of one host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    try:
        return int(raw[raw.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _command() -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not prog or prog.startswith("-"):
        prog = f"python {prog}".strip()
    cmd = " ".join([prog, *sys.argv[1:]])
    return cmd[:197] + "..." if len(cmd) > 200 else cmd


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def conflicts(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether locks with bodies a and b exclude each other.

    exclusive: every other lock; gc: gc; domain: a domain lock of the same name whose
    uuid is the same or unknown (None) on either side; writer: only exclusive.
    """
    ka, kb = a.get("kind"), b.get("kind")
    if ka == "exclusive" or kb == "exclusive":
        return True
    if ka == kb == "gc":
        return True
    if ka == kb == "domain" and a.get("domain") == b.get("domain"):
        ua, ub = a.get("uuid"), b.get("uuid")
        return ua is None or ub is None or ua == ub
    return False


@dataclass
class Found:
    """A lock object found in the store."""

    key: str
    mtime: float  # last refresh, store clock
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))

    @property
    def created(self) -> float:
        """When it was created (store clock): recorded in the body from its first
        refresh on; until then its modification time is its creation."""
        c = self.body.get("created")
        return float(c) if isinstance(c, (int, float)) and not isinstance(c, bool) \
            else self.mtime

    def describe(self) -> str:
        b = self.body
        return (f"host {b.get('host', '?')} pid {b.get('pid', '?')} "
                f"({b.get('command', '?')}) since {b.get('started', '?')}")


def read_locks(storage: Storage, keep: Callable[[str, str | None], bool] | None = None,
               listing: list[ObjectInfo] | None = None) -> list[Found]:
    """Every lock object under locks/ (old flock files and foreign names skipped), or
    those whose kind and tag keep(kind, tag) accepts; from listing if given."""
    out: list[Found] = []
    for info in storage.list(LOCK_PREFIX) if listing is None else listing:
        name = info.key[len(LOCK_PREFIX):]
        m = _NAME.fullmatch(name)
        if not m or (keep is not None and not keep(m[1], m[2])):
            continue
        try:
            raw = storage.get(info.key, LOCK_MAX)
        except NotFound:
            continue  # released meanwhile
        except RepositoryError as e:
            log.warning("ignoring unreadable lock %s: %s", info.key, e)
            continue
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        if not isinstance(body, dict):
            # A half-written lock cannot exist (objects appear whole): treat garbage as a
            # lock of unknown holder, which expires like any other.
            body = {"kind": name.split("-", 1)[0], "host": "?", "command": "unreadable lock"}
        out.append(Found(info.key, info.mtime, body))
    return out


def stale_reason(f: Found, store_now: float, settings: Settings) -> str | None:
    """Why the lock is stale, or None if it is live (docs/format.md has the rule)."""
    age = store_now - f.mtime
    if age > settings.lock_stale:
        return f"not refreshed for {age:.0f} s (lock_stale is {settings.lock_stale:.0f} s)"
    b = f.body
    pid = b.get("pid")
    if (b.get("host") == settings.me() and b.get("boot_id") == boot_id() and boot_id()
            and isinstance(pid, int) and not isinstance(pid, bool)):
        start = _pid_start(pid)
        if start is None:
            return f"its process {pid} is gone"
        if isinstance(b.get("pid_start"), int) and b["pid_start"] != start:
            return f"its process {pid} is gone (the pid is another process's now)"
    return None


def live_locks(storage: Storage, store_now: float, settings: Settings,
               keep: str | None = None) -> list[Found]:
    """The live locks; stale ones are removed on the way (never keep, our own)."""
    live = []
    for f in read_locks(storage):
        why = None if f.key == keep else stale_reason(f, store_now, settings)
        if why is None:
            live.append(f)
            continue
        log.warning("removing stale lock %s of %s: %s", f.key, f.describe(), why)
        with contextlib.suppress(NotFound):
            storage.delete(f.key)
    return live


class Lock:
    """One lock object this process holds (see the module docstring)."""

    def __init__(self, storage: Storage, kind: str, what: str, settings: Settings,
                 *, domain: str | None = None, uuid: str | None = None) -> None:
        assert kind in KINDS
        self.storage = storage
        self.kind = kind
        self.what = what
        self.settings = settings
        self.key = ""
        self.body: dict[str, Any] = {
            "kind": kind, "host": settings.me(), "pid": os.getpid(),
            "pid_start": _pid_start(os.getpid()), "boot_id": boot_id(),
            "command": _command(), "started": _iso(time.time()), "state": "running"}
        if kind == "domain":
            self.body["domain"] = domain
            self.body["uuid"] = uuid
        #: store clock minus this host's clock, measured when the lock was taken.
        self.offset = 0.0
        #: Incremented each time a refresh found the object gone (another process
        #: judged this lock stale and removed it): what it protected may have changed.
        self.lost = 0
        self._io = threading.Lock()  # one write of the object at a time
        self._state_mx = threading.Lock()  # state transitions of committing_state
        self.committing = 0  # writers: commits in progress (state "committing" while > 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and releasing --------------------------------------------------------

    def store_now(self) -> float:
        """The store's clock now, as measured through this lock."""
        return time.time() + self.offset

    def acquire(self, wait: float = 0.0) -> None:
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            holder = self._try()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise Busy(what=self.what, holder=holder.describe())
            time.sleep(POLL_INTERVAL * (0.5 + secrets.randbelow(1000) / 1000))
        self._thread = threading.Thread(target=self._refresher, daemon=True,
                                        name=f"lock-{self.kind}")
        self._thread.start()

    def _try(self) -> Found | None:
        """Create our object and look for conflicts: None if we hold the lock now, else
        the conflicting lock we lost to (our object is gone again)."""
        tag = _tag(self.body.get("domain")) if self.kind == "domain" else None
        self.key = (f"{LOCK_PREFIX}{self.kind}-{tag + '-' if tag else ''}"
                    f"{secrets.token_hex(8)}.json")
        self.body.pop("created", None)
        t0 = time.time()
        if not self.storage.put_if_absent(self.key, self._encode()):
            raise OperationFailed(f"lock object {self.key} exists already")
        t1 = time.time()
        try:
            listing = list(self.storage.list(LOCK_PREFIX))
            own = next((i for i in listing if i.key == self.key), None)
            if own is None:
                raise OperationFailed(f"lock object {self.key} vanished right after it was "
                                      f"written ({self.storage.location})")
            found = read_locks(self.storage, lambda k, t: _may_conflict(self.kind, tag, k, t),
                               [i for i in listing if i.key != self.key])
            self._check_clock(own.mtime, t0, t1)
            self.offset = own.mtime - (t0 + t1) / 2
            self.body["created"] = own.mtime
            now = own.mtime
            loser_to = None
            for f in found:
                if f.key == self.key or not conflicts(self.body, f.body):
                    continue
                why = stale_reason(f, now, self.settings)
                if why is not None:
                    log.warning("removing stale lock %s of %s: %s", f.key, f.describe(), why)
                    with contextlib.suppress(NotFound):
                        self.storage.delete(f.key)
                    continue
                # The later lock loses; a tie (same created time) loses on both sides.
                if f.created <= own.mtime:
                    loser_to = f
                    break
            if loser_to is not None:
                self.storage.delete_many([self.key])
                return loser_to
            return None
        except BaseException:
            with contextlib.suppress(Exception):
                self.storage.delete_many([self.key])
            raise

    def _check_clock(self, store_t: float, t0: float, t1: float) -> None:
        skew = store_t - (t0 + t1) / 2
        slack = (t1 - t0) / 2 + 1.0  # the request's own time, and S3's whole seconds
        if abs(skew) > self.settings.max_clock_skew + slack:
            raise OperationFailed(
                f"the clock of this host differs from the store's ({self.storage.location}) "
                f"by {skew:+.0f} s, more than max_clock_skew ({self.settings.max_clock_skew:.0f}"
                " s): locks and gc need clocks in step; fix this host's time (NTP)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._io:
            self.storage.delete_many([self.key])  # one request; gone already is fine

    # -- state and refresh ---------------------------------------------------------------

    def _encode(self) -> bytes:
        return json.dumps(self.body, sort_keys=True).encode() + b"\n"

    def set_state(self, state: str) -> None:
        """Write state ("running" or "committing") into the object (re-creating it if a
        refresh found it gone); durable on return."""
        with self._io:
            self.body["state"] = state
            self.storage.replace(self.key, self._encode())

    @contextlib.contextmanager
    def committing_state(self) -> Iterator[None]:
        """State "committing" while any thread of this process commits under this lock."""
        with self._state_mx:
            self.committing += 1
            if self.committing == 1:
                try:
                    self.set_state("committing")
                except BaseException:
                    self.committing -= 1
                    raise
        try:
            yield
        finally:
            with self._state_mx:
                self.committing -= 1
                if self.committing == 0:
                    with contextlib.suppress(Exception):  # a refresh writes it again
                        self.set_state("running")

    def _gone(self, then: str = "") -> bool:
        """Whether another process removed the object (one HEAD): then it is counted
        as lost and logged.  Call with ``self._io`` held."""
        if self.storage.exists(self.key):
            return False
        self.lost += 1
        log.error("%s: the lock object %s was removed by another process (it judged it "
                  "stale)%s", self.what, self.key, then)
        return True

    def check(self) -> None:
        """Count it as lost if another process removed the object."""
        with self._io:
            self._gone()

    def refresh(self) -> None:
        with self._io:
            # Gone when someone judged us stale (this process was frozen, or the store
            # unreachable, for longer than lock_stale): taken again.
            self._gone("; taking it again")
            self.storage.replace(self.key, self._encode())

    def _refresher(self) -> None:
        while not self._stop.wait(self.settings.lock_refresh):
            try:
                self.refresh()
            except Exception as e:  # the store is unreachable: try again next time
                log.warning("%s: cannot refresh lock %s: %s", self.what, self.key, e)


@contextlib.contextmanager
def hold(storage: Storage, kind: str, what: str, settings: Settings, *, wait: float = 0.0,
         domain: str | None = None, uuid: str | None = None) -> Iterator[Lock]:
    """Hold a lock of kind for the with block; Busy(what, holder) after `wait` seconds."""
    lock = Lock(storage, kind, what, settings, domain=domain, uuid=uuid)
    lock.acquire(wait)
    try:
        yield lock
    finally:
        lock.release()
