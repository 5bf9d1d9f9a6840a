"""list and show: what the repository holds."""

from __future__ import annotations

from typing import Any

from backupkit.repo import Manifest, Repository


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
    """Committed backups, oldest first (a damaged manifest raises, naming it)."""
    return {"backups": [_summary(m) for m in repo.list_backups(domain)]}


def show(repo: Repository, domain: str, backup: str) -> dict[str, Any]:
    """One backup's manifest plus sizes; backup may be "latest"."""
    m = repo.get_manifest(domain, backup)
    doc = m.to_json()
    doc["logical_size"] = m.logical_size
    doc["stored_size"] = m.stored_size
    doc["data_bytes"] = m.data_bytes
    return doc
