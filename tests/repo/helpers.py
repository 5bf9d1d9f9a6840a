"""Builders for synthetic backups (no libvirt): raw images -> backups through the repo API."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from backupkit.repo import Manifest, Repository
from backupkit.repo.importer import import_raw_images

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def text(n: int, seed: int = 0) -> bytes:
    """Compressible data."""
    words = [b"backup", b"chunk", b"qemu", b"libvirt", b"index", b"manifest", b"\n"]
    r = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += r.choice(words) + b" "
    return bytes(out[:n])


def write_image(path: str | Path, size: int, writes: Iterable[tuple[int, bytes]] = ()) -> str:
    """A sparse raw image of `size` bytes with the given writes applied (in place if present)."""
    path = str(path)
    mode = "r+b" if os.path.exists(path) else "wb"
    with open(path, mode) as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return path


def make_backup(repo: Repository, domain: str, disks: Mapping[str, str | Path], *,
                now: datetime | None = None, parent: Manifest | None = None) -> Manifest:
    return import_raw_images(repo, domain, {k: str(v) for k, v in disks.items()},
                             now=now, parent=parent)


def at(y: int, mo: int, d: int, h: int = 12, mi: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=UTC)


def allocated(path: str | Path) -> int:
    return os.stat(path).st_blocks * 512
