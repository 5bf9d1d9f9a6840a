"""verify: check manifests, indexes and (with data=True) every chunk's content.

Two passes keep memory bounded by the number of distinct chunks, not by the
number of backups times their size: pass 1 parses every manifest and index and
collects the set of referenced digests; the chunks are then checked once each
(existence, or read + decompress + hash check in parallel with data=True); only if
some chunk is bad, pass 2 re-reads the indexes to name every affected backup,
disk and byte range.  Nothing stops at the first problem.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from backupkit.errors import (
    CorruptRepository,
    Error,
    IntegrityError,
    RepositoryError,
    UnsupportedFormat,
)
from backupkit.repo import Index, Manifest, Repository

MAX_PROBLEMS = 20  # distinct problem messages listed per damaged item


def _targets(repo: Repository, domain: str | None, backup: str | None
             ) -> Iterator[tuple[str, str, Manifest | Error]]:
    if backup is not None:
        if domain is None:
            raise ValueError("a backup needs its domain")
        try:
            m = repo.get_manifest(domain, backup)
        except RepositoryError as e:
            yield domain, backup, e
            return
        yield m.domain, m.id, m
        return
    yield from repo.scan_backups(domain)


def _ranges(index: Index, slots: list[int]) -> list[dict[str, int]]:
    """Merge damaged slots into byte ranges."""
    out: list[dict[str, int]] = []
    for slot in sorted(slots):
        start = slot * index.chunk_size
        length = index.slot_length(slot)
        if out and out[-1]["offset"] + out[-1]["length"] == start:
            out[-1]["length"] += length
        else:
            out.append({"offset": start, "length": length})
    return out


ProgressStart = Callable[[str, int], Callable[[int], None] | None]


def _check_chunks(repo: Repository, digests: dict[bytes, int], data: bool, workers: int,
                  progress_start: ProgressStart | None = None) -> tuple[dict[bytes, str], int]:
    """Bad digests with the reason, and bytes read."""
    bad: dict[bytes, str] = {}
    it = iter(sorted(digests))  # sorted: walks the chunk directories in order
    lock = threading.Lock()
    read_total = 0
    progress = None
    if progress_start and data:
        progress = progress_start("verify", sum(digests.values()))

    def work() -> None:
        nonlocal read_total
        buf = repo.chunk_buffer()
        local = 0
        while True:
            with lock:
                digest = next(it, None)
            if digest is None:
                break
            try:
                if data:
                    chunk = repo.read_chunk(digest, buf, verify=True)
                    n = memoryview(chunk).nbytes
                    local += n
                    if progress:
                        with lock:
                            progress(n)
                elif not repo.has_chunk(digest):
                    raise CorruptRepository(f"chunk {digest.hex()} is missing", path=repo.path)
            except RepositoryError as e:
                with lock:
                    bad[digest] = e.reason
            except OSError as e:
                with lock:
                    bad[digest] = f"chunk {digest.hex()}: {e}"
        with lock:
            read_total += local

    threads = [threading.Thread(target=work, name=f"verify-{i}", daemon=True)
               for i in range(max(1, workers if data else 1))]
    with repo.storage.bulk():
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return bad, read_total


def verify(repo: Repository, domain: str | None = None, backup: str | None = None, *,
           data: bool = False, workers: int = 2, wait: float = 0.0,
           progress_start: ProgressStart | None = None) -> dict[str, Any]:
    """Check the selected backups; IntegrityError (exit 5) with the report on any damage.

    Holds the shared repository lock, so gc cannot remove chunks meanwhile.
    """
    with repo.lock_shared(wait):
        return _verify(repo, domain, backup, data, workers, progress_start)


def _verify(repo: Repository, domain: str | None, backup: str | None, data: bool,
            workers: int, progress_start: ProgressStart | None = None) -> dict[str, Any]:
    started = time.monotonic()
    damaged: dict[tuple[str, str], dict[str, Any]] = {}
    good: list[tuple[Manifest, list[str]]] = []  # manifests with their readable disks
    digests: dict[bytes, int] = {}  # chunk -> its length (for progress)
    backups = disks = 0

    def damage(d: str, bid: str) -> dict[str, Any]:
        return damaged.setdefault((d, bid), {"domain": d, "id": bid, "problems": [],
                                             "disks": []})

    for d, bid, m in _targets(repo, domain, backup):
        backups += 1
        if isinstance(m, Error):
            if not isinstance(m, RepositoryError) or isinstance(m, UnsupportedFormat):
                raise m  # a newer backupkit's backup is not damage: exit 1, upgrade
            damage(d, bid)["problems"].append(str(m))
            continue
        readable = []
        for rec in m.disks:
            disks += 1
            try:
                index = repo.load_index(m, rec.name)
            except UnsupportedFormat:
                raise
            except RepositoryError as e:
                damage(d, bid)["disks"].append({
                    "name": rec.name, "problems": [e.reason],
                    "ranges": [{"offset": 0, "length": rec.virtual_size}],
                })
                continue
            readable.append(rec.name)
            for _slot, digest, pieces in index.slots():
                if digest is not None:
                    digests[digest] = index.chunk_size
                digests.update((p, n) for _, n, p in pieces if p is not None)
        good.append((m, readable))

    bad, read_bytes = _check_chunks(repo, digests, data, workers, progress_start)

    if bad:
        for m, readable in good:
            for name in readable:
                index = repo.load_index(m, name)
                slots = [i for i, _, _ in index.slots()
                         if any(d in bad for d in index.slot_digests(i))]
                if not slots:
                    continue
                reasons = list(dict.fromkeys(bad[d] for i in slots
                                             for d in index.slot_digests(i) if d in bad))
                damage(m.domain, m.id)["disks"].append({
                    "name": name,
                    "chunks": len(slots),
                    "problems": reasons[:MAX_PROBLEMS],
                    "ranges": _ranges(index, slots),
                })

    report: dict[str, Any] = {
        "ok": not damaged,
        "data": data,
        "backups_checked": backups,
        "disks_checked": disks,
        "chunks_checked": len(digests),
        "chunks_damaged": len(bad),
        "bytes_read": read_bytes,
        "damaged": sorted(damaged.values(), key=lambda x: (x["domain"], x["id"])),
        "duration_seconds": round(time.monotonic() - started, 3),
    }
    if damaged:
        names = ", ".join(f"{x['domain']}/{x['id']}" for x in report["damaged"])
        n = len(damaged)
        raise IntegrityError(f"{n} backup{'s' if n != 1 else ''} damaged: {names}",
                             report=report)
    return report
