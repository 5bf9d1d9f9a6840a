"""Back up plain image files into a repository, without libvirt.

Used by tests and benchmarks to build synthetic backups through the same API
the backup engine uses (put_chunk, write_index, commit).  Raw images only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from backupkit.repo.index import Index
from backupkit.repo.manifest import DiskRecord, Manifest
from backupkit.repo.repository import Repository


def _iso(t: datetime) -> str:
    t = t.astimezone(UTC)
    if t.microsecond:
        return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def import_raw_images(repo: Repository, domain: str, disks: Mapping[str, str], *,
                      now: datetime | None = None, parent: Manifest | None = None,
                      domain_xml: str = "<domain/>", lock: bool = True,
                      host: str | None = None, domain_uuid: str | None = None) -> Manifest:
    """Store the raw images `disks` ({disk name: path}) as one committed backup.

    With `parent`, the backup is recorded as incremental (the data is still
    read in full; only chunks not yet stored are written).  `host` and
    `domain_uuid` are recorded as given (None: as older backupkit wrote them).
    """
    now = now or datetime.now(UTC)
    started = time.monotonic()
    bid = repo.new_backup_id(now)
    buf = bytearray(repo.chunk_size)
    view = memoryview(buf)

    def run() -> Manifest:
        records = []
        for name, path in disks.items():
            size = os.path.getsize(path)
            index = Index(size, repo.chunk_size)
            read = stored = 0
            with open(path, "rb", buffering=0) as f:
                for slot in range(len(index)):
                    n = f.readinto(view)
                    assert n is not None
                    read += n
                    digest, written = repo.put_chunk(view[:n])
                    stored += written
                    index[slot] = digest
            rec = repo.write_index(domain, bid, name, index)
            records.append(DiskRecord(name=name, source=path, format="raw", virtual_size=size,
                                      read_bytes=read, stored_bytes=stored,
                                      data_bytes=index.data_bytes, index=rec))
        m = Manifest(
            id=bid, domain=domain, created=_iso(now),
            mode="incremental" if parent else "full",
            reason="imported" if parent is None else "imported (incremental)",
            checkpoint=None, parent_checkpoint=None,
            parent_id=parent.id if parent else None,
            started=_iso(now), finished=_iso(now),
            duration_seconds=time.monotonic() - started, quiesced=False, freeze_seconds=None,
            domain_xml=domain_xml, checkpoint_xml=None, disks=records, host=host,
            domain_uuid=domain_uuid)
        repo.commit(m)
        return m

    if not lock:
        return run()
    with repo.lock_shared(), repo.lock_domain(domain):
        return run()
