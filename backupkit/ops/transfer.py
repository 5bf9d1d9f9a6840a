"""backupkit copy: backups from one repository into another (an off-site one, say).

Each backup is copied as the source has it: every chunk its indexes name is read
from the source (hash-checked, and authenticated when the source is encrypted) and
stored in the target under the target's own name for it (the same name when both
repositories name chunks alike; a keyed name, sealed, when the target is encrypted),
so only chunks the target lacks are sent.  Then the indexes (names translated) and,
last, the manifest are written, as a backup writes them: an interrupted copy leaves
nothing visible.  Afterwards every chunk, index and manifest of the copy is read back
from the target and checked; a backup the target already has is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

from backupkit.errors import CorruptRepository, Error, NotFound, UsageError
from backupkit.repo import Index, Manifest, Repository, chains

log = logging.getLogger(__name__)


class _Names:
    """Source chunk name -> target chunk name, storing each chunk the target lacks."""

    def __init__(self, src: Repository, dst: Repository) -> None:
        self.src, self.dst = src, dst
        # Same naming on both sides: a chunk keeps its name and need not be read when
        # the target has it.
        self.same = (not src.encrypted and not dst.encrypted
                     and src.hash_name == dst.hash_name)
        self.map: dict[bytes, bytes] = {}
        self.buf = src.chunk_buffer()
        self.sent = self.sent_bytes = 0
        self.seeded: set[str] = set()

    def seed(self, domain: str) -> None:
        """Chunks the target's backups of domain name are known: not asked for one by one."""
        if domain in self.seeded:
            return
        self.seeded.add(domain)
        for m in self.dst.backups(domain).manifests:
            for rec in m.disks:
                with contextlib.suppress(Error):
                    self.dst.seed_known(self.dst.load_index(m, rec.name))

    def __call__(self, digest: bytes | None) -> bytes | None:
        if digest is None:
            return None
        got = self.map.get(digest)
        if got is not None:
            return got
        if self.same and (self.dst.knows_chunk(digest) or self.dst.has_chunk(digest)):
            self.map[digest] = digest
            return digest
        data = self.src.read_chunk(digest, self.buf)
        new, written = self.dst.put_chunk(data)
        if new is None:  # cannot happen: the source stores no all-zero chunk
            raise CorruptRepository(f"chunk {digest.hex()} reads as zeros",
                                    path=self.src.path)
        if written:
            self.sent += 1
            self.sent_bytes += written
        self.map[digest] = new
        return new


def _translate(index: Index, names: _Names) -> Index:
    new = index.copy()
    for slot, d in index.chunks.items():
        new[slot] = names(d)
    new.overlays = {slot: [(off, n, names(d)) for off, n, d in pieces]
                    for slot, pieces in index.overlays.items()}
    new.npieces = index.npieces
    return new


def _check_copy(dst: Repository, m: Manifest) -> None:
    """Read the copy back from the target: manifest, indexes, every chunk (hash-checked)."""
    again = dst.read_manifest(m.domain, m.id)
    buf = dst.chunk_buffer()
    with dst.storage.bulk():
        for rec in again.disks:
            idx = dst.load_index(again, rec.name)
            for digest in sorted(idx.digests()):
                dst.read_chunk(digest, buf)


def _copy_one(src: Repository, dst: Repository, m: Manifest, names: _Names) -> dict[str, Any]:
    sent0, bytes0 = names.sent, names.sent_bytes
    disks = []
    with dst.lock_shared(), dst.lock_domain(m.domain):
        with contextlib.suppress(NotFound):
            dst.read_manifest(m.domain, m.id)
            return {"domain": m.domain, "id": m.id, "skipped": "already in the target"}
        names.seed(m.domain)
        try:
            for rec in m.disks:
                index = _translate(src.load_index(m, rec.name), names)
                disks.append(dataclasses.replace(
                    rec, index=dst.write_index(m.domain, m.id, rec.name, index)))
            dst.commit(dataclasses.replace(m, disks=disks))
        except BaseException:
            dst.discard_pending()
            raise
    _check_copy(dst, m)
    return {"domain": m.domain, "id": m.id, "chunks_sent": names.sent - sent0,
            "bytes_sent": names.sent_bytes - bytes0}


def copy(src: Repository, dst: Repository, domains: list[str], latest: int | None
         ) -> dict[str, Any]:
    """Copy the backups of domains (all when empty; the newest `latest` of each, per
    chain: backupkit.repo.chains) to dst."""
    if src.config["id"] == dst.config["id"]:
        raise UsageError(f"{dst.path} is the source repository itself")
    if src.chunk_size != dst.chunk_size:
        raise UsageError(f"chunk sizes differ ({src.chunk_size} in {src.path}, "
                         f"{dst.chunk_size} in {dst.path}): copy needs equal chunk sizes")
    if latest is not None and latest < 1:
        raise UsageError("--latest must be at least 1")
    names = _Names(src, dst)
    copied: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    # The target's writer lock for the whole run too: the chunks known to be stored
    # there (names.map, the seeded set) are checked by the commit if a gc swept meanwhile.
    with src.lock_read(), dst.lock_shared():
        dst.start_known()
        listing = src.backups()
        wanted = [m for m in listing.manifests if not domains or m.domain in domains]
        for d in domains:
            if not any(m.domain == d for m in wanted):
                raise NotFound("backup", f"{d}/*", f"no backups of {d} in {src.path}")
        if latest is not None:
            # Per domain: per chain (name and UUID) when hosts back up different domains
            # of one name.  A manifest is copied as it is, with its host and UUID.
            keys = chains.chain_keys(wanted)
            per: dict[tuple[str, str | None], list[Manifest]] = {}
            for m in wanted:
                per.setdefault((m.domain, keys[(m.domain, m.id)]), []).append(m)
            wanted = [m for ms in per.values() for m in ms[-latest:]]
        for m in sorted(wanted, key=Manifest.sort_key):
            try:
                res = _copy_one(src, dst, m, names)
            except Error as e:
                e.fields["result"] = {"copied": copied, "skipped": skipped}
                raise
            (skipped if "skipped" in res else copied).append(res)
            if "skipped" not in res:
                log.info("copied %s/%s to %s: %d chunk(s) sent, checked", m.domain, m.id,
                         dst.path, res["chunks_sent"])
        dst.forget_known()
    return {"from": src.path, "to": dst.path, "copied": copied, "skipped": skipped,
            "chunks_sent": names.sent, "bytes_sent": names.sent_bytes,
            "damaged_in_source": listing.damaged_json()}
