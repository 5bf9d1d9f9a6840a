"""verify: check manifests, indexes and (with data=True) every chunk's content.

Two passes keep memory bounded by the number of distinct chunks, not by the
number of backups times their size: pass 1 parses every manifest and index and
collects the referenced digests in a ``ChunkTable`` (backupkit.repo.digests:
sorted 32-byte records, ~32 bytes per distinct chunk, exact); the chunks are then checked once each
(existence, or read + decompress + hash check in parallel with data=True); only if
some chunk is bad, pass 2 re-reads the indexes to name every affected backup,
disk, byte range and missing chunk.  Nothing stops at the first problem.

With data=True a chunk found damaged is moved to the repository's quarantine
(as Proxmox Backup Server renames bad chunks): deduplication no longer trusts
it, so the next backup that meets the same data stores it afresh, and every
backup referencing it reads as missing that chunk, by name.  repair=True then
heals what it can: a chunk a damaged backup lacks is stored again when another
backup of the same disk holds the same bytes at the same place (the same
chunk, or the range of a slot it covers, hash-checked), which is how a later
full backup mends the backups before it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from backupkit.errors import (
    Error,
    IntegrityError,
    NotFound,
    RepositoryError,
    UnsupportedFormat,
)
from backupkit.ops.restore import remote_workers
from backupkit.repo import Index, Manifest, Repository, chains
from backupkit.repo.digests import ChunkTable
from backupkit.repo.repository import ChunkMissing
from backupkit.repo.storage import list_chunks
from backupkit.workers import run_threads

log = logging.getLogger("backupkit.verify")

MAX_PROBLEMS = 20  # distinct problem messages listed per damaged item
MAX_CHUNKS_LISTED = 100  # missing chunks named per damaged disk (all are counted)
#: Verifying every backup, with this many chunks or more, on an object store: one listing.
LIST_MIN = 2000


def _targets(repo: Repository, domain: str | None, backup: str | None,
             host: str | None = None) -> Iterator[tuple[str, str, Manifest | Error]]:
    if host is not None and domain is not None and backup is None:
        # The chains (one per domain UUID) that host wrote to; damage is always reported.
        found = list(repo.scan_backups(domain))
        manifests = [m for _d, _b, m in found if isinstance(m, Manifest)]
        keys = chains.chain_keys(manifests)
        wanted = {keys[(m.domain, m.id)] for m in manifests if m.host == host}
        if not wanted:
            raise NotFound("backup", f"{domain} from host {host}")
        yield from ((d, bid, m) for d, bid, m in found
                    if not isinstance(m, Manifest) or keys[(m.domain, m.id)] in wanted)
        return
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


def _check_chunks(repo: Repository, digests: ChunkTable, data: bool, workers: int,
                  progress_start: ProgressStart | None = None, *, whole: bool = False
                  ) -> tuple[dict[bytes, str], set[bytes], int]:
    """Bad digests with the reason, those of them whose file is there but damaged, bytes read.

    whole: every backup is verified, so the digests are about all the chunks stored.
    """
    bad: dict[bytes, str] = {}
    damaged: set[bytes] = set()
    todo: Iterator[bytes] = iter(digests)  # ascending: walks the chunk directories in order
    remote = not repo.storage.properties.local
    if remote and not data and whole and len(digests) >= LIST_MIN:
        # An object store answers one LIST per 1000 chunks, a HEAD per chunk otherwise
        # (in parallel): when the whole repository is verified, the chunks are listed
        # and only those the listing lacks are looked up one by one (and named).
        # A listed chunk is marked in the table (a bit each), not copied into a set.
        for info in list_chunks(repo.storage):
            name = info.key.rpartition("/")[2]
            if len(name) == 64:
                try:
                    digests.mark(bytes.fromhex(name))
                except ValueError:
                    continue
        todo = digests.unmarked()
    it = todo
    lock = threading.Lock()
    read_total = 0
    progress = None
    if progress_start and data:
        progress = progress_start("verify", digests.total_length)

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
                    raise ChunkMissing(repo.missing_chunk(digest), path=repo.path)
            except RepositoryError as e:
                with lock:
                    bad[digest] = e.reason
                    if data and not isinstance(e, ChunkMissing):  # a file is there: damaged
                        damaged.add(digest)
            except Error as e:  # e.g. permission denied: not damage of the chunk itself
                with lock:
                    bad[digest] = str(e)
            except OSError as e:
                with lock:
                    bad[digest] = f"chunk {digest.hex()}: {e}"
                    if data:
                        damaged.add(digest)
        with lock:
            read_total += local

    with repo.storage.bulk():
        run_threads("verify", [work] * max(1, workers if data else 1,
                                            remote_workers(repo) if remote else 1))
    return bad, damaged, read_total


def _quarantine(repo: Repository, damaged: set[bytes]) -> tuple[list[dict[str, str]], list[str]]:
    """Move damaged chunks aside: (what was moved where, what could not be moved and why)."""
    moved: list[dict[str, str]] = []
    failed: list[str] = []
    for digest in sorted(damaged):
        try:
            key = repo.quarantine_chunk(digest)
        except Error as e:  # a read-only repository, say: still a report, never a crash
            failed.append(f"chunk {digest.hex()}: cannot quarantine it: {e}")
            continue
        if key is not None:
            log.warning("chunk %s is damaged: moved to %s", digest.hex(), key)
            moved.append({"chunk": digest.hex(), "key": key})
    return moved, failed


def _heal(repo: Repository, good: list[tuple[Manifest, list[str]]], bad: dict[bytes, str]
          ) -> set[bytes]:
    """Store again every bad chunk another backup of the same disk still holds; those healed.

    A bad chunk fills (slot, offset, length) of some disk of a damaged backup.
    Any other backup of that domain with a disk of that name and size whose slot
    can be read in full (none of its own chunks bad) holds candidate bytes: they
    are hash-checked against the chunk's name before they are stored.  One index
    is held at a time, newest backup first.  A damaged chunk still in place
    (it could not be quarantined) cannot be replaced and is not healed.
    """
    # (domain, disk, size) -> chunk -> the places it fills: (slot, offset, length)
    needs: dict[tuple[str, str, int], dict[bytes, list[tuple[int, int, int]]]] = {}
    for m, readable in good:
        for name in readable:
            index = repo.load_index(m, name)
            wanted = needs.setdefault((m.domain, name, index.virtual_size), {})
            for slot, digest, pieces in index.slots():
                if digest is not None and digest in bad:
                    wanted.setdefault(digest, []).append((slot, 0, index.slot_length(slot)))
                for off, n, d in pieces:
                    if d is not None and d in bad:
                        wanted.setdefault(d, []).append((slot, off, n))
    healed: set[bytes] = set()
    present = {d for d in bad if _present(repo, d)}
    buf = bytearray(repo.chunk_max)
    slot_buf = memoryview(bytearray(repo.chunk_size))
    newest_first = sorted((m for m, _ in good), key=Manifest.sort_key, reverse=True)
    for (domain, disk, size), wanted in needs.items():
        for m in newest_first:
            if not any(d not in healed and d not in present for d in wanted):
                break
            if m.domain != domain or m.disk(disk) is None:
                continue
            try:
                src = repo.load_index(m, disk)
            except Error:
                continue
            if src.virtual_size != size:
                continue
            for digest, places in wanted.items():
                if digest in healed or digest in present:
                    continue
                for slot, off, n in places:
                    if any(d in bad for d in src.slot_digests(slot)):
                        continue  # the same damage, or other damage: no source here
                    view = slot_buf[:src.slot_length(slot)]
                    try:
                        repo.read_slot(src[slot], src.pieces(slot), view, buf)
                    except Error:
                        continue
                    piece = view[off:off + n]
                    if repo.digest(piece) != digest:
                        continue
                    repo.put_chunk(piece)
                    healed.add(digest)
                    log.warning("chunk %s healed from backup %s/%s disk %s", digest.hex(),
                                m.domain, m.id, disk)
                    break
    repo.storage.flush()
    return healed


def _present(repo: Repository, digest: bytes) -> bool:
    try:
        return repo.has_chunk(digest)
    except Error:
        return True  # something is there (a special file, say): it cannot be replaced


def verify(repo: Repository, domain: str | None = None, backup: str | None = None, *,
           data: bool = False, repair: bool = False, workers: int = 2, wait: float = 0.0,
           progress_start: ProgressStart | None = None, host: str | None = None
           ) -> dict[str, Any]:
    """Check the selected backups; IntegrityError (exit 5) with the report on any damage.

    Takes no lock (docs/format.md, "Locks and gc"): gc removes only chunks no
    committed backup references, so it runs meanwhile.
    With data=True damaged chunks are quarantined; with repair=True missing
    chunks are stored again where another backup still holds their bytes.
    With ``host`` (and a domain, no backup): only the backups of the domain(s) of
    that name that host backed up (backupkit.repo.chains).
    """
    with repo.lock_read(wait):
        return _verify(repo, domain, backup, data, workers, progress_start, repair, host)


def _verify(repo: Repository, domain: str | None, backup: str | None, data: bool,
            workers: int, progress_start: ProgressStart | None = None,
            repair: bool = False, host: str | None = None) -> dict[str, Any]:
    started = time.monotonic()
    damaged: dict[tuple[str, str], dict[str, Any]] = {}
    good: list[tuple[Manifest, list[str]]] = []  # manifests with their readable disks
    digests = ChunkTable()  # the distinct chunks referenced, ~32 bytes each (and lengths' total)
    backups = disks = 0

    def damage(d: str, bid: str) -> dict[str, Any]:
        return damaged.setdefault((d, bid), {"domain": d, "id": bid, "problems": [],
                                             "disks": []})

    # A repair may heal from any backup of the domain, not just the selected ones.
    sources: list[tuple[Manifest, list[str]]] = []
    for d, bid, m in _targets(repo, domain, backup, host):
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
            digests.add_all(index.chunks.values(), index.chunk_size)
            for pieces in index.overlays.values():
                digests.update((p, n) for _, n, p in pieces if p is not None)
        good.append((m, readable))

    bad, damaged_chunks, read_bytes = _check_chunks(repo, digests, data, workers,
                                                    progress_start, whole=domain is None)
    quarantined, not_quarantined = _quarantine(repo, damaged_chunks)
    healed: set[bytes] = set()
    if repair and bad:
        if backup is not None or domain is not None:
            chosen = {(m.domain, m.id) for m, _ in good}
            for m in repo.backups(domain).manifests:
                if (m.domain, m.id) not in chosen:
                    sources.append((m, [rec.name for rec in m.disks]))
        healed = _heal(repo, good + sources, bad)
        bad = {d: why for d, why in bad.items() if d not in healed}

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
                lacks = sorted({d.hex() for i in slots for d in index.slot_digests(i)
                                if d in bad})
                damage(m.domain, m.id)["disks"].append({
                    "name": name,
                    "chunks": len(slots),
                    "missing_chunks": lacks[:MAX_CHUNKS_LISTED],
                    "missing_chunk_count": len(lacks),
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
        "chunks_quarantined": quarantined,
        "bytes_read": read_bytes,
        "damaged": sorted(damaged.values(), key=lambda x: (x["domain"], x["id"])),
        "duration_seconds": round(time.monotonic() - started, 3),
    }
    if not_quarantined:
        report["quarantine_failed"] = not_quarantined[:MAX_PROBLEMS]
    if repair:
        report["chunks_repaired"] = sorted(d.hex() for d in healed)
    if damaged:
        names = ", ".join(f"{x['domain']}/{x['id']}" for x in report["damaged"])
        n = len(damaged)
        first = report["damaged"][0]
        problems = first["problems"] or [p for d in first["disks"] for p in d["problems"]]
        hint = f" ({problems[0]})" if problems else ""
        raise IntegrityError(f"{n} backup{'s' if n != 1 else ''} damaged: {names}{hint}",
                             report=report)
    return report
