"""Which backups belong together: one chain per domain, identified by (name, UUID).

Several hosts may write to one repository, and two of them may each have a domain
of the same name: ``backups/<name>/`` then holds the backups of two different
domains.  They never mix: an incremental starts only from a backup of the same
domain (:func:`same_domain`), prune keeps its retention per chain
(:func:`chain_keys`), and a command given only a name and ``latest`` picks one
chain (:func:`pick_chain`) or asks for ``--host``.  A domain that moves to
another host keeps its UUID, so its chain continues there.

A backup's UUID is the one its manifest records (``domain_uuid``), else the
``<uuid>`` of the domain XML it holds (older manifests); a backup with neither
is a *legacy* backup.  Everything here is pure: it looks at manifests only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from backupkit.errors import NotFound, UsageError
from backupkit.repo.manifest import Manifest


def same_domain(m: Manifest, uuid: str | None, host: str) -> bool:
    """Can backup m be the parent of a backup of domain ``uuid`` taken on ``host``?

    Backups of the same UUID, from any host (a migrated domain continues), and
    legacy backups when they come from this host or name none.
    """
    theirs = m.chain_uuid
    if theirs is not None and uuid is not None:
        return theirs == uuid.lower()
    return m.host is None or m.host == host


def of_domain(uuid: str | None, host: str) -> Callable[[Manifest], bool]:
    """same_domain as a filter (Repository.latest, Repository.backup_parent)."""
    return lambda m: same_domain(m, uuid, host)


def chain_keys(manifests: Sequence[Manifest]) -> dict[tuple[str, str], str | None]:
    """(domain, id) -> the chain's UUID (None: legacy backups that join no chain).

    A legacy backup joins the oldest chain of its name whose backups come from its
    host (any host, when it names none); the backups of one domain taken before
    and after an upgrade so stay one chain.
    """
    by_name: dict[str, list[Manifest]] = {}
    for m in manifests:
        by_name.setdefault(m.domain, []).append(m)
    keys: dict[tuple[str, str], str | None] = {}
    for ms in by_name.values():
        uuids = [(m, m.chain_uuid) for m in sorted(ms, key=Manifest.sort_key)]
        oldest: dict[str | None, str] = {}  # host (None: any) -> UUID of its oldest chain
        for m, uuid in uuids:
            if uuid is not None:
                oldest.setdefault(None, uuid)
                if m.host is not None:
                    oldest.setdefault(m.host, uuid)
        for m, uuid in uuids:
            keys[(m.domain, m.id)] = uuid if uuid is not None else oldest.get(m.host)
    return keys


def chains(manifests: Sequence[Manifest]) -> dict[str | None, list[Manifest]]:
    """The backups of one name grouped by chain, each oldest first."""
    keys = chain_keys(manifests)
    out: dict[str | None, list[Manifest]] = {}
    for m in sorted(manifests, key=Manifest.sort_key):
        out.setdefault(keys[(m.domain, m.id)], []).append(m)
    return out


def _hosts(ms: Sequence[Manifest]) -> list[str]:
    return sorted({m.host or "(unknown host)" for m in ms})


def pick_chain(manifests: Sequence[Manifest], name: str, *, host: str | None,
               this_host: Callable[[], str], local_uuid: Callable[[], str | None]
               ) -> list[Manifest]:
    """The backups of the chain a command about ``name`` means (oldest first).

    One chain: it (with ``host``: only if that host wrote some of it).  Several:
    with ``host``, the chains that host wrote to; else the chain of the domain
    defined here under that name, else the chains this host wrote to; among
    several, the one of the local domain, else the one backed up last.  None
    left: UsageError (exit 2) naming the hosts and asking for ``--host``;
    NotFound (exit 4) when ``host`` wrote no backup of that name.
    """
    groups = chains(manifests)
    if host is not None:
        groups = {k: ms for k, ms in groups.items() if any(m.host == host for m in ms)}
        if not groups:
            raise NotFound("backup", f"{name} from host {host}",
                           "backups of it come from " + ", ".join(_hosts(manifests))
                           if manifests else "the domain has no backups")
    if len(groups) <= 1:
        return next(iter(groups.values()), [])
    local = local_uuid()
    if local is not None and local.lower() in groups:
        return groups[local.lower()]
    if host is None:
        me = this_host()
        groups = {k: ms for k, ms in groups.items() if any(m.host == me for m in ms)}
        if not groups:
            hosts = _hosts(manifests)
            raise UsageError(f"{name}: the repository holds backups of {len(chains(manifests))}"
                             f" different domains of that name, from hosts {', '.join(hosts)};"
                             " none is defined or backed up on this host: give --host H")
    return max(groups.values(), key=lambda ms: ms[-1].sort_key())


def other_chains(manifests: Sequence[Manifest], uuid: str | None, host: str) -> str | None:
    """Why none of ``manifests`` can be a parent of domain ``uuid`` on ``host``, naming
    the other domains' hosts; None when there is no backup of that name at all."""
    if not manifests:
        return None
    return (f"no previous backup of this domain (UUID {uuid}) on {host} or any host; the "
            f"{len(manifests)} backup(s) of that name are of another domain (backed up on "
            f"{', '.join(_hosts(manifests))})")
