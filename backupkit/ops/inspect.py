"""list and show: what the repository holds."""

from __future__ import annotations

import logging
from typing import Any

from backupkit.repo import Manifest, Repository

log = logging.getLogger("backupkit.list")


def _summary(m: Manifest) -> dict[str, Any]:
    return {
        "id": m.id,
        "domain": m.domain,
        "created": m.created,
        "mode": m.mode,
        "disks": [d.name for d in m.disks],
        "logical_size": m.logical_size,
        "stored_size": m.stored_size,
        "data_bytes": m.data_bytes,
    }


def list_backups(repo: Repository, domain: str | None = None) -> dict[str, Any]:
    """Committed backups, oldest first; those that cannot be read are skipped and named.

    One damaged backup must not hide the others: each one skipped is a warning
    (and an entry of "damaged"); verify reports it as damage (exit 5), and
    ``backupkit delete DOMAIN ID`` removes it.
    """
    listing = repo.backups(domain)
    for d, bid, e in listing.damaged:
        log.warning("skipped backup %s/%s, which cannot be read: %s (backupkit delete %s %s "
                    "removes it)", d, bid or "?", e, d, bid or "?")
    return {"backups": [_summary(m) for m in listing.manifests],
            "damaged": listing.damaged_json()}


def show(repo: Repository, domain: str, backup: str) -> dict[str, Any]:
    """One backup's manifest plus sizes; backup may be "latest"."""
    m = repo.get_manifest(domain, backup)
    doc = m.to_json()
    doc["logical_size"] = m.logical_size
    doc["stored_size"] = m.stored_size
    doc["data_bytes"] = m.data_bytes
    return doc
