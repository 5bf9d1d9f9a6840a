"""gc: remove chunks no committed backup references, and leftovers of interrupted runs.

gc never stops the fleet: backups, prunes and reads go on while it runs.  The
protocol (docs/format.md, "Locks and gc", which argues why it is safe):

1. take the gc lock (one gc at a time);
2. cutoff = min(store time now, start of the oldest live writer) - gc_grace:
   only objects older than that may go (fresh uploads of running backups stay);
3. mark: every chunk the committed manifests reference (M1), held compactly;
   any unreadable backup aborts gc: it could not know what that backup needs;
4. candidates: chunks older than the cutoff and not marked;
5. gc/epoch := {epoch+1, sweeping: true};
6. wait while a live writer is in state "committing";
7. manifests committed since the mark rescue their chunks from the candidates;
8. delete the candidates (batches), leftovers and orphaned directories older
   than the cutoff;
9. gc/epoch := {epoch+1, sweeping: false}.

A writer that read the epoch before step 5 and commits after it checks that
every chunk it references still exists (backupkit.repo.fleet).  ``--dry-run``
does steps 1-4 and reports.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import re
import time
from array import array
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from backupkit import faults
from backupkit.errors import CorruptRepository, Error, OperationFailed, RepositoryError
from backupkit.repo import Repository, fleet, locks
from backupkit.repo.manifest import Manifest
from backupkit.repo.storage import list_chunks

log = logging.getLogger(__name__)

_CHUNK_KEY = re.compile(r"chunks/([0-9a-f]{2})/([0-9a-f]{64})")
_OLD_LOCK = re.compile(r"locks/(repository|domain\..+)\.lock")
BATCH = 1000  # keys per delete request (S3 DeleteObjects takes 1000)


class DigestSet:
    """Chunk hashes, compactly: their first 8 bytes as integers in 256 sorted arrays (by
    the first byte), 8 bytes each, not ~100 for a set of bytes objects.  Two hashes
    sharing 8 bytes look alike: a false "present", which only keeps a chunk (safe for
    gc).

    New hashes wait in a small set per bucket and are merged into its array when that
    set reaches ``MERGE_MIN`` or an eighth of the array: a merge sorts one bucket (1/256
    of the hashes, two sorted runs: linear, in C), so merging costs a bounded number of
    copies per hash, and the waiting sets hold at most ~1/8 of the hashes plus 256 x
    MERGE_MIN (measured: 120 MiB peak for a gc of 1,000,000 chunks with one set of up to
    a million waiting, bench/RESULTS.md)."""

    MERGE_MIN = 512
    MERGE_RATIO = 8

    def __init__(self) -> None:
        self._sorted = [array("Q") for _ in range(256)]
        self._pending: list[set[int]] = [set() for _ in range(256)]
        self._limit = [self.MERGE_MIN] * 256

    @staticmethod
    def _prefix(digest: bytes) -> int:
        return int.from_bytes(digest[:8], "big")

    def update(self, digests: Iterable[bytes]) -> None:
        pending, limit = self._pending, self._limit
        for d in digests:
            b = d[0]
            part = pending[b]
            part.add(int.from_bytes(d[:8], "big"))
            if len(part) >= limit[b]:
                self._merge(b)

    def _merge(self, b: int) -> None:
        new = self._pending[b]
        if not new:
            return
        self._pending[b] = set()
        old = self._sorted[b]
        merged = old.tolist()
        merged.extend(sorted(new.difference(merged) if len(merged) < 4 * len(new)
                             else (x for x in new if not self._has(old, x))))
        merged.sort()  # two sorted runs: one linear merge
        self._sorted[b] = array("Q", merged)
        self._limit[b] = max(self.MERGE_MIN, len(merged) // self.MERGE_RATIO)

    @staticmethod
    def _has(a: array[int], p: int) -> bool:
        k = bisect.bisect_left(a, p)
        return k < len(a) and a[k] == p

    def __contains__(self, digest: bytes) -> bool:
        b = digest[0]
        p = self._prefix(digest)
        return p in self._pending[b] or self._has(self._sorted[b], p)

    def __len__(self) -> int:
        for b in range(256):
            self._merge(b)
        return sum(len(a) for a in self._sorted)

    @property
    def itemsize(self) -> int:
        """Bytes per merged hash."""
        return self._sorted[0].itemsize


def _refuse(d: str, bid: str, why: str, repo: Repository) -> CorruptRepository:
    return CorruptRepository(
        f"gc refuses to run: backup {d}/{bid} is unreadable ({why}); "
        f"run verify, then delete it (backupkit delete {d} {bid})", path=repo.path)


def _mark(repo: Repository, referenced: DigestSet, skip: set[tuple[str, str]]
          ) -> set[tuple[str, str]]:
    """Add the chunks of every committed backup not in skip; their (domain, id)s."""
    committed: set[tuple[str, str]] = set()
    for d, bid, m in repo.scan_backups():
        if isinstance(m, Error):
            raise _refuse(d, bid, m.reason if isinstance(m, RepositoryError) else str(m), repo)
        committed.add((d, bid))
        if (d, bid) in skip:
            continue
        _mark_one(repo, m, referenced)
    return committed


def _mark_one(repo: Repository, m: Manifest, referenced: DigestSet) -> None:
    for rec in m.disks:
        try:
            index = repo.load_index(m, rec.name)
        except RepositoryError as e:
            raise CorruptRepository(
                f"gc refuses to run: {e.reason}; run verify, then delete that backup "
                f"(backupkit delete {m.domain} {m.id})", path=repo.path) from e
        referenced.update(index.digests())


def _started(f: locks.Found) -> float:
    """When a writer started, by the store's clock (the clock of the chunks' mtimes):
    its lock's creation.  ("started" in the lock is the writer's own clock, and whole
    seconds: for people.)"""
    return f.created


def _wait_for_commits(repo: Repository, lock: locks.Lock) -> int:
    """Step 6: wait while a live writer is committing; how many were waited for."""
    settings = repo.lock_settings
    deadline = time.monotonic() + settings.lock_stale + settings.lock_refresh
    seen: set[str] = set()
    while True:
        busy = [f for f in locks.live_locks(repo.storage, lock.store_now(), settings,
                                            keep=lock.key)
                if f.kind == "writer" and f.body.get("state") == "committing"]
        if not busy:
            return len(seen)
        seen.update(f.key for f in busy)
        if time.monotonic() > deadline:
            raise OperationFailed(
                f"gc: {busy[0].describe()} has been committing for longer than lock_stale; "
                "nothing was deleted; run gc again later")
        time.sleep(fleet.POLL / 5)


def gc(repo: Repository, *, dry_run: bool = False, wait: float = 0.0) -> dict[str, Any]:
    started = time.monotonic()
    storage = repo.storage
    settings = repo.lock_settings
    # A dry run changes nothing: like a reader, it takes no lock (so it works on a
    # read-only repository too) and reads the clock of this host.
    with (contextlib.nullcontext(None) if dry_run else repo.lock_gc(wait)) as lock:
        # 2. The cutoff.
        t0 = lock.store_now() if lock is not None else time.time()
        writers = [f for f in locks.read_locks(storage) if f.kind == "writer"
                   and locks.stale_reason(f, t0, settings) is None] if lock is None else \
            [f for f in locks.live_locks(storage, t0, settings, keep=lock.key)
             if f.kind == "writer"]
        cutoff = min([t0, *(_started(f) for f in writers)]) - settings.gc_grace

        # 3. Mark.
        referenced = DigestSet()
        m1 = _mark(repo, referenced, set())

        # Backup directories without a manifest (interrupted backups or prunes), all of
        # whose files are older than the cutoff (a running backup's are not).
        orphan_dirs: dict[tuple[str, str], list[tuple[str, int]]] = {}
        fresh_dirs: set[tuple[str, str]] = set()
        for info in [*storage.list("backups/"), *storage.leftovers("backups/")]:
            parts = info.key.split("/")
            if len(parts) != 4 or (parts[1], parts[2]) in m1:
                continue
            key = (parts[1], parts[2])
            if info.mtime >= cutoff:
                fresh_dirs.add(key)
            orphan_dirs.setdefault(key, []).append((info.key, info.size))
        for key in fresh_dirs:
            orphan_dirs.pop(key, None)

        # 4. Candidates: unreferenced chunks older than the cutoff.
        cand = bytearray()  # 32-byte hashes, one after the other
        cand_sizes = array("Q")
        kept = fresh = 0
        unknown: list[str] = []
        for info in list_chunks(storage):  # concurrently on S3: order is not relied on
            match = _CHUNK_KEY.fullmatch(info.key)
            if not match or match[2][:2] != match[1]:
                unknown.append(info.key)
                continue
            digest = bytes.fromhex(match[2])
            if digest in referenced:
                kept += 1
            elif info.mtime >= cutoff:
                fresh += 1
            else:
                cand += digest
                cand_sizes.append(info.size)
        faults.point("gc_after_mark")

        rescued = waited = 0
        epoch = None
        if lock is not None:
            # 5. Tell writers a sweep begins: who read the old epoch checks its chunks.
            old = fleet.read_epoch_or_reset(storage)
            epoch = old.epoch + 1
            fleet.write_epoch(storage, fleet.Epoch(epoch, True))
            try:
                # 6. A writer that read the old epoch and is committing: wait for it.
                waited = _wait_for_commits(repo, lock)
                # 7. Backups committed since the mark keep their chunks.
                late = DigestSet()
                committed = _mark(repo, late, m1)
                for key in list(orphan_dirs):
                    if key in committed:
                        del orphan_dirs[key]
                if len(late):
                    keep = bytearray()
                    sizes = array("Q")
                    for i in range(len(cand_sizes)):
                        d = bytes(cand[32 * i:32 * i + 32])
                        if d in late:
                            rescued += 1
                        else:
                            keep += d
                            sizes.append(cand_sizes[i])
                    cand, cand_sizes = keep, sizes
                faults.point("gc_before_sweep")
                # 8. Sweep.
                result = _sweep(repo, lock, cand, cand_sizes, orphan_dirs, referenced, cutoff)
                faults.point("gc_after_sweep")
            finally:
                # 9. The sweep is over (or abandoned: nothing more is deleted either way).
                fleet.write_epoch(storage, fleet.Epoch(epoch, False))
        else:
            result = _sweep(repo, None, cand, cand_sizes, orphan_dirs, referenced, cutoff)

    return {
        "dry_run": dry_run,
        "backups": len(m1),
        "chunks_referenced": len(referenced),
        "chunks_kept": kept,
        "chunks_too_new": fresh,
        "chunks_rescued": rescued,
        **result,
        "unknown_files": sorted(unknown),
        "cutoff": datetime.fromtimestamp(max(cutoff, 0), UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "epoch": epoch,
        "waited_for_commits": waited,
        "duration_seconds": round(time.monotonic() - started, 3),
    }


def _sweep(repo: Repository, lock: locks.Lock | None, cand: bytearray,
           cand_sizes: array[int], orphan_dirs: dict[tuple[str, str], list[tuple[str, int]]],
           referenced: DigestSet, cutoff: float) -> dict[str, Any]:
    """Step 8 (lock None: a dry run, which only counts)."""
    storage = repo.storage
    dry_run = lock is None
    chunk_count = chunk_bytes = 0
    n = len(cand_sizes)
    for start in range(0, n, BATCH):
        end = min(n, start + BATCH)
        keys = [f"chunks/{cand[32 * i:32 * i + 1].hex()}/{cand[32 * i:32 * i + 32].hex()}"
                for i in range(start, end)]
        if lock is not None:
            _still_ours(lock)
            storage.delete_many(keys)
            if start == 0:
                faults.point("gc_mid_sweep")
        chunk_count += end - start
        chunk_bytes += sum(cand_sizes[start:end])

    # Quarantined copies of damaged chunks (verify --data moved them there): kept
    # while a backup still lacks the chunk, for whoever wants to salvage it.
    quarantine_count = quarantine_bytes = 0
    for digest, keys in repo.quarantined().items():
        if digest in referenced and not repo.has_chunk(digest):
            continue
        for qkey in keys:
            try:
                size = storage.size(qkey)
            except Error:  # a special file: nothing to count
                size = 0
            if dry_run or storage.delete(qkey):
                quarantine_count += 1
                quarantine_bytes += size

    dir_bytes = 0
    for (d, bid), files in sorted(orphan_dirs.items()):
        if lock is None:
            dir_bytes += sum(size for _k, size in files)
        else:
            _still_ours(lock)
            dir_bytes += repo.remove_backup_dir(d, bid)

    # Temporary files of interrupted writes, and the flock(2) files of older versions,
    # older than the cutoff (a running writer's are newer).
    tmp_count = tmp_bytes = 0
    old_locks = [info for info in storage.list(locks.LOCK_PREFIX)
                 if _OLD_LOCK.fullmatch(info.key) and info.mtime < cutoff]
    for info in [*storage.leftovers(""), *old_locks]:
        parts = info.key.split("/")
        if len(parts) == 4 and parts[0] == "backups" and (parts[1], parts[2]) in orphan_dirs:
            continue  # removed (or counted) with its directory above
        if info.mtime >= cutoff:
            continue
        if dry_run or storage.delete(info.key):
            tmp_count += 1
            tmp_bytes += info.size
    if not dry_run:
        storage.flush()
    return {
        "chunks_removed": chunk_count,
        "chunk_bytes_freed": chunk_bytes,
        "incomplete_backups_removed": [f"{d}/{bid}" for d, bid in sorted(orphan_dirs)],
        "incomplete_bytes_freed": dir_bytes,
        "tmp_files_removed": tmp_count,
        "tmp_bytes_freed": tmp_bytes,
        "quarantined_removed": quarantine_count,
        "bytes_freed": chunk_bytes + dir_bytes + tmp_bytes + quarantine_bytes,
    }


def _still_ours(lock: locks.Lock) -> None:
    """Refresh the gc lock before each batch of deletions: once it is fresh, nobody may
    judge it stale for lock_stale seconds, far longer than one batch takes.  If another
    process removed it (this gc was stopped for longer than lock_stale), stop."""
    before = lock.lost
    lock.refresh()
    if lock.lost != before:
        raise OperationFailed(
            "gc: its lock was removed by another process that judged it stale (was gc "
            "stopped for longer than lock_stale?); stopping before deleting more")
