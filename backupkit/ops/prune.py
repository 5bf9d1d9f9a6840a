"""prune: drop backups outside a retention policy (manifests and indexes only; gc frees chunks).

The policy is the one restic, borg and Proxmox users know, per domain, and
per chain within a name: when hosts back up different domains of one name (told
apart by their UUID, backupkit.repo.chains), each keeps its own retention, as
restic groups by host:

- ``last N``: the N newest backups;
- ``hourly/daily/weekly/monthly/yearly N``: walking from the newest backup to
  the oldest, the newest backup of each hour/day/ISO week/month/year, for the
  N most recent periods that *have* a backup (periods without one are not
  counted, so a gap in backups never costs kept history);
- ``within D``: every backup created less than D before now (``--keep-within``,
  the config's ``prune.keep_within``; ``config.parse_duration`` reads D).

Rules are applied independently, as restic does (a backup can be kept by
several rules: all are listed as its reasons; a rule counts a period even when
another rule already keeps its backup).  Periods use local time unless the
policy says otherwise.  The newest backup of a domain (of each chain) is always kept.
Every backup restores on its own, so removing any of them never breaks another.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from backupkit.errors import Busy, Partial, RepositoryError, UsageError
from backupkit.repo import Manifest, Repository, chains

log = logging.getLogger("backupkit.prune")

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: timedelta | None = None
    tz: tzinfo | None = None  # None: the machine's local time zone

    def validate(self) -> None:
        for rule in RULES:
            n = getattr(self, rule)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise UsageError(f"--keep-{rule} must be a whole number >= 0, not {n!r}")
        if self.within is not None and self.within <= timedelta(0):
            raise UsageError("--keep-within must be a positive duration")
        if not any(getattr(self, r) for r in RULES) and self.within is None:
            raise UsageError("prune needs at least one --keep-* option greater than 0 "
                             "(refusing to remove every backup but the newest)")

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {f"keep_{r}": getattr(self, r) for r in RULES}
        doc["keep_within_seconds"] = self.within.total_seconds() if self.within else None
        return doc


@dataclass
class Decision:
    manifest: Manifest
    keep: bool
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {"domain": m.domain, "id": m.id, "host": m.host, "created": m.created,
                "action": "keep" if self.keep else "remove", "reasons": self.reasons}


def _created(m: Manifest) -> datetime:
    return m.created_at


def _period(rule: str, tz: tzinfo | None) -> Callable[[Manifest], Hashable]:
    def local(m: Manifest) -> datetime:
        return _created(m).astimezone(tz)

    if rule == "last":
        return lambda m: (m.domain, m.id)
    if rule == "hourly":
        return lambda m: local(m).strftime("%Y-%m-%d %H")
    if rule == "daily":
        return lambda m: local(m).strftime("%Y-%m-%d")
    if rule == "weekly":
        return lambda m: local(m).isocalendar()[:2]
    if rule == "monthly":
        return lambda m: local(m).strftime("%Y-%m")
    if rule == "yearly":
        return lambda m: local(m).year
    raise ValueError(rule)


def plan(backups: Sequence[Manifest], policy: Policy, now: datetime) -> list[Decision]:
    """Keep/remove for each backup (pure); decisions oldest first within each chain.

    A chain is one domain's backups: same name and UUID (backupkit.repo.chains).
    """
    policy.validate()
    keys = chains.chain_keys(backups)
    by_chain: dict[tuple[str, str], list[Manifest]] = {}
    for m in backups:
        by_chain.setdefault((m.domain, keys[(m.domain, m.id)] or ""), []).append(m)
    result: list[Decision] = []
    for chain in sorted(by_chain):
        newest_first = sorted(by_chain[chain], key=lambda m: (_created(m), m.id),
                              reverse=True)
        decisions = {m.id: Decision(m, False) for m in newest_first}
        for rule in RULES:
            remaining = getattr(policy, rule)
            if not remaining:
                continue
            bucket = _period(rule, policy.tz)
            last: Hashable = object()
            for m in newest_first:
                if remaining == 0:
                    break
                b = bucket(m)
                if b != last:
                    last = b
                    remaining -= 1
                    decisions[m.id].keep = True
                    decisions[m.id].reasons.append(f"keep-{rule}")
        if policy.within is not None:
            for m in newest_first:
                if _created(m) >= now - policy.within:
                    decisions[m.id].keep = True
                    decisions[m.id].reasons.append("keep-within")
        if newest_first and not decisions[newest_first[0].id].keep:
            d = decisions[newest_first[0].id]
            d.keep = True
            d.reasons.append("newest")
        result.extend(decisions[m.id] for m in reversed(newest_first))
    return result


def _domains(repo: Repository) -> list[str]:
    return sorted({d for d, _bid, _m in repo.scan_backups()})


def prune(repo: Repository, domain: str | None, policy: Policy, *, dry_run: bool = False,
          wait: float = 0.0, now: datetime | None = None) -> dict[str, Any]:
    """Apply the policy to one domain or all; removes manifests (and indexes) only.

    Holds the shared repository lock (gc waits) and each domain's lock in turn
    (a backup of that domain waits).  With every domain, a domain that is busy
    or damaged is skipped and reported, and the rest pruned (exit 6 at the end).
    """
    policy.validate()
    now = now or datetime.now(UTC)
    decisions: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    damaged: list[dict[str, Any]] = []
    removed = kept = 0
    with repo.lock_read(wait):  # each domain's lock below; gc goes on meanwhile
        domains = [domain] if domain is not None else _domains(repo)
        for d in domains:
            try:
                with repo.lock_domain(d, wait):
                    # A backup that cannot be read is neither kept nor removed by the
                    # policy (it is not counted in any period): it is reported, and
                    # ``backupkit delete`` removes it.
                    listing = repo.backups(d)
                    for _d, bid, e in listing.damaged:
                        log.warning("prune skipped backup %s/%s, which cannot be read: %s "
                                    "(backupkit delete %s %s removes it)", d, bid or "?", e,
                                    d, bid or "?")
                    damaged += listing.damaged_json()
                    for dec in plan(listing.manifests, policy, now):
                        if dec.keep:
                            kept += 1
                        else:
                            removed += 1
                            if not dry_run:
                                repo.remove_backup(dec.manifest)
                        decisions.append(dec.to_json())
            except (Busy, RepositoryError) as e:
                if domain is not None:
                    raise
                skipped.append({"domain": d, "error": e.to_json()})
    result: dict[str, Any] = {
        "dry_run": dry_run,
        "policy": policy.to_json(),
        "kept": kept,
        "removed": removed,
        "decisions": decisions,
        "skipped": skipped,
        "damaged": damaged,
    }
    if skipped:
        names = ", ".join(s["domain"] for s in skipped)
        raise Partial(f"prune skipped {len(skipped)} domain(s): {names}", result=result)
    return result



def delete(repo: Repository, domain: str, backup_id: str, *, wait: float = 0.0
           ) -> dict[str, Any]:
    """Delete one backup by id, whether it can be read or not (a damaged one, say).

    The supported way to remove a backup that verify reports as damaged and that
    list and prune skip.  Holds the domain's lock, as prune does; chunks are freed
    by the next gc.
    """
    if backup_id == "latest":
        raise UsageError("delete needs a backup id, not 'latest' (backupkit list DOMAIN)")
    with repo.lock_domain(domain, wait):
        freed, damage = repo.delete_backup(domain, backup_id)
    log.info("deleted backup %s/%s%s", domain, backup_id,
             f" (it could not be read: {damage})" if damage else "")
    return {"domain": domain, "id": backup_id, "deleted": True, "damaged": damage,
            "bytes_freed": freed}
