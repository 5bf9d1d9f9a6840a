"""gc: remove chunks no committed backup references, and leftovers of interrupted runs.

Runs under the exclusive repository lock: backups and prune hold the shared
lock for their whole run, so no backup can be between "chunk exists, skip it"
and "commit the manifest that references it" while gc decides what is
unreferenced (docs/format.md, "Locks and gc").  gc refuses to delete anything
if a manifest or index cannot be read: it could not know what that backup needs
(``backupkit delete`` removes such a backup).  A quarantined copy of a damaged
chunk is removed once no backup lacks that chunk.
"""

from __future__ import annotations

import re
import time
from typing import Any

from backupkit.errors import CorruptRepository, Error, RepositoryError
from backupkit.repo import Repository

_CHUNK_KEY = re.compile(r"chunks/([0-9a-f]{2})/([0-9a-f]{64})")


def gc(repo: Repository, *, dry_run: bool = False, wait: float = 0.0) -> dict[str, Any]:
    started = time.monotonic()
    with repo.lock_exclusive(wait):
        storage = repo.storage
        # 1. Everything committed backups reference; any damage aborts gc.
        referenced: set[bytes] = set()
        committed: set[tuple[str, str]] = set()
        backups = 0
        for d, bid, m in repo.scan_backups():
            if isinstance(m, Error):
                why = m.reason if isinstance(m, RepositoryError) else str(m)
                raise CorruptRepository(
                    f"gc refuses to run: backup {d}/{bid} is unreadable ({why}); "
                    f"run verify, then delete it (backupkit delete {d} {bid})",
                    path=repo.path)
            backups += 1
            committed.add((d, bid))
            for rec in m.disks:
                try:
                    index = repo.load_index(m, rec.name)
                except RepositoryError as e:
                    raise CorruptRepository(
                        f"gc refuses to run: {e.reason}; run verify, then delete that backup "
                        f"(backupkit delete {d} {bid})", path=repo.path) from e
                referenced.update(index.digests())

        # 2. Backup directories without a manifest: interrupted backups or prunes.
        orphan_dirs: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for info in storage.list("backups/"):
            parts = info.key.split("/")
            if len(parts) != 4:
                continue
            key = (parts[1], parts[2])
            if key not in committed:
                orphan_dirs.setdefault(key, []).append((info.key, info.size))
        for info in storage.leftovers("backups/"):
            parts = info.key.split("/")
            if len(parts) == 4 and (parts[1], parts[2]) not in committed:
                orphan_dirs.setdefault((parts[1], parts[2]), [])

        # 3. Unreferenced chunks.
        chunk_count = chunk_bytes = kept_chunks = 0
        unknown: list[str] = []
        for info in storage.list("chunks/"):
            match = _CHUNK_KEY.fullmatch(info.key)
            if not match or match[2][:2] != match[1]:
                unknown.append(info.key)
                continue
            if bytes.fromhex(match[2]) in referenced:
                kept_chunks += 1
                continue
            if dry_run or storage.delete(info.key):
                chunk_count += 1
                chunk_bytes += info.size

        # 3b. Quarantined copies of damaged chunks (verify --data moved them there): kept
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
            if dry_run:
                dir_bytes += sum(size for _k, size in files)
            else:
                dir_bytes += repo.remove_backup_dir(d, bid)

        # 4. Temporary files of interrupted writes (no writer runs: we hold the lock).
        tmp_count = tmp_bytes = 0
        for info in list(storage.leftovers("")):
            parts = info.key.split("/")
            if len(parts) == 4 and parts[0] == "backups" and (parts[1], parts[2]) in orphan_dirs:
                if dry_run:
                    dir_bytes += info.size
                continue  # removed with its directory above
            if dry_run or storage.delete(info.key):
                tmp_count += 1
                tmp_bytes += info.size
        if not dry_run:
            storage.flush()

    return {
        "dry_run": dry_run,
        "backups": backups,
        "chunks_referenced": len(referenced),
        "chunks_kept": kept_chunks,
        "chunks_removed": chunk_count,
        "chunk_bytes_freed": chunk_bytes,
        "incomplete_backups_removed": [f"{d}/{bid}" for d, bid in sorted(orphan_dirs)],
        "incomplete_bytes_freed": dir_bytes,
        "tmp_files_removed": tmp_count,
        "tmp_bytes_freed": tmp_bytes,
        "quarantined_removed": quarantine_count,
        "bytes_freed": chunk_bytes + dir_bytes + tmp_bytes + quarantine_bytes,
        "unknown_files": unknown,
        "duration_seconds": round(time.monotonic() - started, 3),
    }


