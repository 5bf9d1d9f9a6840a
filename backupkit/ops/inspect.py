"""list and show: what the repository holds."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from backupkit.repo import Manifest, Repository, chains

log = logging.getLogger("backupkit.list")


def _summary(m: Manifest) -> dict[str, Any]:
    return {
        "id": m.id,
        "domain": m.domain,
        "host": m.host,  # null: written before backupkit recorded hosts
        "domain_uuid": m.domain_uuid,
        "created": m.created,
        "mode": m.mode,
        "disks": [d.name for d in m.disks],
        "logical_size": m.logical_size,
        "stored_size": m.stored_size,
        "data_bytes": m.data_bytes,
    }


def list_backups(repo: Repository, domain: str | None = None, host: str | None = None
                 ) -> dict[str, Any]:
    """Committed backups, oldest first; those that cannot be read are skipped and named.

    With ``host``, only the backups that host wrote.

    One damaged backup must not hide the others: each one skipped is a warning
    (and an entry of "damaged"); verify reports it as damage (exit 5), and
    ``backupkit delete DOMAIN ID`` removes it.
    """
    listing = repo.backups(domain)
    for d, bid, e in listing.damaged:
        log.warning("skipped backup %s/%s, which cannot be read: %s (backupkit delete %s %s "
                    "removes it)", d, bid or "?", e, d, bid or "?")
    return {"backups": [_summary(m) for m in listing.manifests
                        if host is None or m.host == host],
            "damaged": listing.damaged_json()}


def show(repo: Repository, domain: str, backup: str) -> dict[str, Any]:
    """One backup's manifest plus sizes; backup may be "latest"."""
    m = repo.get_manifest(domain, backup)
    doc = m.to_json()
    doc["logical_size"] = m.logical_size
    doc["stored_size"] = m.stored_size
    doc["data_bytes"] = m.data_bytes
    return doc


def resolve(repo: Repository, domain: str, backup: str, *, host: str | None,
            this_host: Callable[[], str], local_uuid: Callable[[], str | None]) -> str:
    """The backup a command about DOMAIN [BACKUP|latest] [--host H] means.

    An id names one backup whatever the host.  "latest" stays "latest" while the
    name has one chain (backupkit.repo.chains) and no ``host`` is given; else it
    becomes the id of the newest backup of the chain chains.pick_chain picks.
    """
    if backup != "latest":
        return backup
    manifests = repo.backups(domain).manifests
    chain = chains.pick_chain(manifests, domain, host=host, this_host=this_host,
                              local_uuid=local_uuid)
    if host is None and len(chain) == len(manifests):
        return backup
    return chain[-1].id if chain else backup
