"""Chunk-count scaling (issue 18 part 6, issue 21 "Millions of chunks").

A bench helper builds a repository of N chunks and many backups FAST, through the
Repository/Storage API rather than real backups: small chunks (4 KiB slots, each
chunk a distinct 4 KiB block that compresses to ~60 bytes), parallel PUTs on S3;
every chunk and index is written as a backup writes it, and each manifest last.
The repository then holds N / 10,000 domains (500 backups at 1M);
each domain has 10,000 chunks and 5 backups, backup k naming a window of 8,000
consecutive chunks of its domain's sequence, the windows sliding so that
consecutive backups share most chunks (an incremental chain) and every chunk is
named by some backup, plus 1 % of chunks no backup names (for gc to remove).  A
repository made for a smaller N is extended to the next N.

Then the CLI, as a child process (/usr/bin/time: wall time and peak RSS):
``list``, ``prune --keep-last 10 --dry-run``, ``gc --dry-run``, ``gc``, ``verify``
(metadata) and ``verify --data`` of one backup (a sample of W chunks).
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import zstandard

from backupkit.errors import NotFound
from backupkit.fileio import syncfs
from backupkit.repo import DiskRecord, Index, Manifest, Repository
from backupkit.repo.storage import Storage
from backupkit.repo.url import open_storage, parse

SLOT = 4096  # chunk size of the generated repositories (the smallest allowed)


PER_DOMAIN = 10_000  # chunks per generated domain
BACKUPS = 5  # backups per generated domain: 500 at 1,000,000 chunks
WINDOW = 8_000  # slots per backup index (a 32 MiB disk of 4 KiB chunks)


def _chunk(i: int, salt: bytes) -> bytes:
    """Chunk i: distinct, a whole 4 KiB slot, compressible to ~40 bytes."""
    head = salt + i.to_bytes(8, "big")
    return head * 4 + bytes(SLOT - 4 * len(head))


def open_store(url: str, concurrency: int) -> Storage:
    scheme, bucket, prefix = parse(url)
    if scheme == "s3":
        from backupkit.repo.s3 import S3Settings, S3Storage

        st = S3Storage(bucket, prefix, S3Settings(concurrency=concurrency))
        st.max_inflight = 4 * 1024 * 1024  # tiny objects: bound the queue by count too
        return st
    return open_storage(url)


def generate(url: str, n: int, *, concurrency: int = 16, log: Any = print) -> dict[str, Any]:
    """Make the repository at url hold n chunks (+1 % no backup names) and their backups.

    Domains of PER_DOMAIN chunks and BACKUPS backups each; a repository made for a
    smaller n is extended (the domains it has are kept), so 100k -> 200k -> 1M
    writes each chunk once.
    """
    t0 = time.monotonic()
    store = open_store(url, concurrency)
    try:
        repo = Repository.open(store)
    except NotFound:
        repo = Repository.init(store, chunk_size=SLOT)
    have = len(repo.storage.children("backups/"))
    want = max(1, n // PER_DOMAIN)
    local = repo.storage.properties.local
    salt = os.urandom(8)
    dirs: dict[str, int] = {}
    if local:
        # A local store is written with plain openat/write (the on-disk format of
        # docs/format.md: codec byte, zstd frame), one syncfs at the end: LocalStorage
        # walks every path component with O_NOFOLLOW, ~1 ms a chunk here.
        for h in range(256):
            path = os.path.join(repo.path, "chunks", f"{h:02x}")
            os.makedirs(path, 0o755, exist_ok=True)
            dirs[f"{h:02x}"] = os.open(path, os.O_RDONLY | os.O_DIRECTORY)

    def put_range(a: int, b: int) -> list[bytes]:
        out = []
        cctx = zstandard.ZstdCompressor(level=1, write_content_size=True)  # one per thread
        for i in range(a, b):
            data = _chunk(i, salt)
            if not local:
                d, _ = repo.put_chunk(data)
                assert d is not None
            else:
                d = repo.digest(data)
                name = d.hex()
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644,
                             dir_fd=dirs[name[:2]])
                try:
                    os.write(fd, b"\x01" + cctx.compress(data))
                finally:
                    os.close(fd)
            out.append(d)
        return out

    base = datetime(2026, 1, 1, tzinfo=UTC)
    stride = (PER_DOMAIN - WINDOW) // (BACKUPS - 1)
    orphans = PER_DOMAIN // 100
    written = 0
    with ThreadPoolExecutor(2) as pool:
        for dom in range(have, want):
            name = f"scale-{dom:03d}"
            seq: list[bytes] = []
            first = dom * (PER_DOMAIN + orphans)
            end = first + PER_DOMAIN + orphans
            ranges = [(a, min(a + 2500, end)) for a in range(first, end, 2500)]
            for part in pool.map(lambda ab: put_range(*ab), ranges):
                seq.extend(part)
            written += len(seq)
            for k in range(BACKUPS):
                start = k * stride
                index = Index(WINDOW * SLOT, SLOT, list(seq[start:start + WINDOW]))
                when = base + timedelta(days=k, minutes=dom)
                bid = repo.new_backup_id(when)
                if local:
                    syncfs(dirs["00"])  # write_index's flush covers LocalStorage's own only
                ref = repo.write_index(name, bid, "vda", index)
                iso = when.strftime("%Y-%m-%dT%H:%M:%SZ")
                repo.commit(Manifest(
                    version=1, id=bid, domain=name, created=iso,
                    mode="full" if k == 0 else "incremental", reason="bench.scale",
                    checkpoint=None, parent_checkpoint=None, parent_id=None, started=iso,
                    finished=iso, duration_seconds=0.0, quiesced=False,
                    freeze_seconds=None, domain_xml=f"<domain><name>{name}</name></domain>",
                    checkpoint_xml=None,
                    disks=[DiskRecord(name="vda", source="/dev/null", format="raw",
                                      virtual_size=WINDOW * SLOT, read_bytes=0,
                                      stored_bytes=0, data_bytes=WINDOW * SLOT, index=ref)]))
            if dom % 10 == 9:
                log(f"scale {n}: {dom + 1} of {want} domains, {time.monotonic() - t0:.0f}s")
    for fd in dirs.values():
        os.close(fd)
    repo.storage.flush()
    return {"chunks": want * PER_DOMAIN, "unreferenced": want * orphans, "domains": want,
            "backups": want * BACKUPS, "slots_per_index": WINDOW,
            "chunks_written_now": written,
            "generate_seconds": round(time.monotonic() - t0, 1),
            "sample": {"domain": "scale-000",
                       "id": repo.backups("scale-000").manifests[-1].id}}


def measure(url: str, info: dict[str, Any], run: Any, env: dict[str, str]) -> list[dict[str, Any]]:
    """Time each command on the generated repository (bench.run.run: wall time, peak RSS)."""
    base = [sys.executable, "-m", "backupkit", "--repo", url, "--json", "-q"]
    steps = [("list", ["list"]),
             ("prune --dry-run", ["prune", "--keep-last", "10", "--dry-run"]),
             ("gc --dry-run", ["gc", "--dry-run"]),
             ("gc", ["gc"]),
             ("verify", ["verify"]),
             ("verify --data (one backup)", ["verify", "--data", info["sample"]["domain"],
                                              info["sample"]["id"]])]
    rows = []
    for label, argv in steps:
        r = run([*base, *argv], env=env, check=False)
        row = {"step": label, "seconds": round(r.seconds, 2),
               "rss_mib": round(r.max_rss_kib / 1024, 1), "rc": r.rc,
               "cpu_seconds": round(r.cpu_seconds, 2)}
        if r.rc == 0 and label == "gc":
            with_json = json.loads(r.stdout)
            row["chunks_removed"] = with_json.get("chunks_removed")
        if r.rc != 0:
            row["error"] = r.stderr.strip()[-300:]
        rows.append(row)
    return rows
