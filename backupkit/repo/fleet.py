"""Many writers and a gc that never stops them: the writer's side of the protocol.

docs/format.md, "Locks and gc", specifies it and argues why it is safe.  gc bumps
``gc/epoch`` ({"epoch": N, "sweeping": bool}) before it deletes anything; a writer
reads it when it starts a backup of a domain (``register``) and again at commit,
with its writer lock in state "committing" (``commit``).  If the epoch moved (or
a gc was sweeping), chunks the backup reuses may have been deleted: the writer
waits for the sweep to end and checks that every chunk it references exists
before it commits; if some are gone, it fails and commits nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from backupkit import faults
from backupkit.errors import CorruptRepository, NotFound, OperationFailed
from backupkit.repo import locks
from backupkit.repo.storage import Storage, list_chunks

log = logging.getLogger(__name__)

EPOCH_KEY = "gc/epoch"
POLL = 0.5  # seconds between looks while waiting for a gc's sweep or a committing writer
#: More chunks to check than this: one listing of chunks/ instead of a HEAD each.
HEAD_LIMIT = 2000


class Epoch(NamedTuple):
    epoch: int
    sweeping: bool


def read_epoch(storage: Storage) -> Epoch:
    try:
        raw = storage.get(EPOCH_KEY, 4096)
    except NotFound:
        return Epoch(0, False)
    try:
        doc = json.loads(raw)
        epoch, sweeping = doc["epoch"], doc["sweeping"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0 \
                or not isinstance(sweeping, bool):
            raise ValueError(doc)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptRepository(f"{EPOCH_KEY} is not a gc epoch ({e}); `backupkit gc` "
                                "writes it again", path=storage.location) from e
    return Epoch(epoch, sweeping)


def read_epoch_or_reset(storage: Storage) -> Epoch:
    """For gc: a damaged epoch counts as a very high one (gc moves past it)."""
    try:
        return read_epoch(storage)
    except CorruptRepository as e:
        log.warning("%s; starting a new one", e)
        return Epoch(int(time.time()), True)


def write_epoch(storage: Storage, epoch: Epoch) -> None:
    storage.replace(EPOCH_KEY, json.dumps(
        {"epoch": epoch.epoch, "sweeping": epoch.sweeping}).encode() + b"\n")


@dataclass
class Registration:
    """What a writer saw of gc when it started a backup of one domain."""

    epoch: int
    #: the epoch needs no check of the chunks: gc was not sweeping then, or its sweep
    #: was already over (a gc that died mid-sweep leaves "sweeping": true behind).
    clean: bool
    writer: locks.Lock
    domain_lock: locks.Lock
    writer_lost: int
    domain_lost: int


def register(writer: locks.Lock, domain_lock: locks.Lock) -> Registration:
    e = read_epoch(writer.storage)
    return Registration(e.epoch, not e.sweeping, writer, domain_lock, writer.lost,
                        domain_lock.lost)


def _gc_running(storage: Storage, writer: locks.Lock) -> bool:
    return any(f.kind == "gc" for f in locks.live_locks(storage, writer.store_now(),
                                                        writer.settings))


def wait_sweep_over(storage: Storage, writer: locks.Lock) -> Epoch:
    """Wait until no gc is deleting: "sweeping" false, or no live gc lock (it died)."""
    told = False
    while True:
        e = read_epoch(storage)
        if not e.sweeping or not _gc_running(storage, writer):
            return e
        if not told:
            log.info("a gc is deleting chunks; waiting for it to finish before the commit")
            told = True
        time.sleep(POLL)


def missing_chunks(storage: Storage, keys: set[str]) -> int:
    """How many of the chunk keys are not in the store."""
    if len(keys) <= HEAD_LIMIT:
        return sum(1 for k in keys if not storage.exists(k))
    left = set(keys)
    for info in list_chunks(storage):
        left.discard(info.key)
    return len(left)


def commit(reg: Registration | None, put: Callable[[], None],
           chunk_keys: Callable[[], Iterable[str]]) -> None:
    """Run put() (write the manifest) under the commit protocol of docs/format.md.

    reg None: the caller holds no writer lock (tools and tests that keep gc away by
    other means): put() at once.  chunk_keys gives the keys of every chunk the backup
    references (read only when the check is needed).
    """
    if reg is None:
        put()
        return
    faults.point("before_commit")
    if reg.domain_lock.lost != reg.domain_lost:
        raise OperationFailed(
            f"{reg.domain_lock.what}: the lock was removed by another process that judged it "
            "stale (was this process stopped for longer than lock_stale?); nothing was "
            "committed; run the backup again")
    writer = reg.writer
    epoch, clean = reg.epoch, reg.clean and writer.lost == reg.writer_lost
    storage = writer.storage
    while True:
        if clean:
            writer.check()  # removed as stale meanwhile? (then gc may not have seen us)
            with writer.committing_state():
                now = read_epoch(storage)
                faults.point("commit_after_epoch")
                if now.epoch == epoch and writer.lost == reg.writer_lost and (
                        not now.sweeping or reg.clean):
                    put()
                    return
        # A gc swept (or sweeps) since the backup started: it may have deleted chunks
        # this backup reuses without having uploaded them.
        now = wait_sweep_over(storage, writer)
        lost = writer.lost
        keys = set(chunk_keys())
        n = missing_chunks(storage, keys)
        if n:
            raise OperationFailed(
                f"gc removed {n} chunks this backup reuses while it ran; nothing was "
                "committed; run the backup again")
        log.info("a gc ran during the backup; all %d chunks it references are present",
                 len(keys))
        epoch, clean = now.epoch, True
        reg.clean = True  # this epoch's "sweeping" flag (if any) is over: checked above
        reg.writer_lost = lost
