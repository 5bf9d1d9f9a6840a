"""The lock of a domain for the operations that change its checkpoints outside a backup.

``checkpoint delete`` and ``hygiene`` (merge hooks and check with --domain) take
the host-wide lock of the domain (one backupkit job per domain on this host,
whatever the repository: see ``backup.host_domain_lock``) and, when a
repository is configured and exists, that repository's lock of the domain, so
they never run beside a backup of it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from backupkit.errors import NotFound
from backupkit.ops.backup import host_domain_lock
from backupkit.repo import Repository

log = logging.getLogger("backupkit.lock")


@contextlib.contextmanager
def domain_lock(repo: str | None, domain: str, wait: float, passphrase: Any = None
                ) -> Iterator[Repository | None]:
    """Hold the host-wide lock of ``domain`` and, with ``repo``, its repository lock.

    Yields the open Repository (opened lazily: an encrypted one is unlocked only
    when read from, with ``passphrase``), or None when none is configured or it
    does not exist (then only the host-wide lock is held).
    """
    # The host-wide lock first: a backup into any repository may be using a checkpoint.
    with host_domain_lock(domain, wait=wait):
        if repo is None:
            yield None
            return
        try:
            r = Repository.open(repo, passphrase, lazy=True)
        except NotFound:
            log.warning("repository %s does not exist: holding the host-wide lock only", repo)
            yield None
            return
        with r.lock_domain(domain, wait=wait):
            yield r
