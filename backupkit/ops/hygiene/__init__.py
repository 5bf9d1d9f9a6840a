"""`backupkit hygiene`: bitmap hygiene around merges, and chain checks.

One module a job, one report shape (``report``):

* ``cold``: images no process has open, changed with qemu-img (merge hooks
  without ``--domain``, ``check --image``);
* ``live``: a running domain's chain, through libvirt (merge hooks with
  ``--domain``/``--disk``; see the comment above ``M_REDEFINE`` there for which
  libvirt mechanism removes what, and why);
* ``domain``: ``check DOMAIN``.

Block nodes and QMP go through ``backupkit.virt`` (``virt.blocks``), checkpoint
deletion through ``virt.checkpoints``, qemu-img through ``backupkit.qemu``.

Every function plans first (pure, ``backupkit.bitmaps``), returns the plan
unchanged with ``dry_run``, otherwise applies it and re-reads every changed
image: a bitmap left in-use or gone missing raises ``BitmapLost`` (exit 5)
with the report in its ``report`` field, whatever qemu-img's exit code was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backupkit import proc
from backupkit.errors import UsageError
from backupkit.ops.domainlock import domain_lock
from backupkit.ops.hygiene import cold, live
from backupkit.ops.hygiene import domain as domain_check
from backupkit.ops.hygiene.cold import free_space
from backupkit.ops.hygiene.live import M_CHECKPOINT, M_QMP, M_REDEFINE, space_check

__all__ = ["DEFAULT_URI", "M_CHECKPOINT", "M_QMP", "M_REDEFINE", "check", "free_space",
           "post_merge", "pre_merge", "space_check"]

DEFAULT_URI = "qemu:///system"


def _live_args(domain: str | None, disk: str | None) -> bool:
    """Whether the call is live (--domain with --disk); UsageError for half of it."""
    if (disk is None) != (domain is None):
        raise UsageError("--domain and --disk go together")
    return domain is not None


def pre_merge(top: str, base: str, *, domain: str | None = None, disk: str | None = None,
              connect: str = DEFAULT_URI, dry_run: bool = False,
              runner: proc.Runner | None = None, repo: str | None = None,
              wait: float = 0.0) -> dict[str, Any]:
    """Before merging TOP into BASE: remove what TOP cannot carry on, and say what is lost.

    Removed from BASE: bitmaps missing from TOP (stale) or in-use.  A bitmap
    TOP holds that is broken in any layer down to BASE (in-use, or missing
    in a layer between: a hole) is lost: every copy is removed, TOP's first,
    and BitmapLost (exit 5) names it once everything else is done.  A BASE
    that cannot store bitmaps (raw, qcow2 compat=0.10) loses every bitmap of
    TOP in the merge: exit 5 now, nothing changed.  Stale bitmaps take space
    the merge needs; on a fixed-size BASE they make qemu-img commit lose every
    bitmap (HOST-FACTS, seeds/000).  Before BASE is opened read-write, its
    free space must hold its bitmaps (else NoSpace, exit 1, nothing changed).

    Live (``domain``/``disk``): the chain is QEMU's; each removal says which
    libvirt mechanism did it (``method``) and why.  With ``repo``, runs under
    the repository's lock of the domain (serialized with its backups).
    """
    if _live_args(domain, disk):
        assert domain is not None and disk is not None
        with domain_lock(repo, domain, wait):
            return live.pre_merge(top, base, domain, disk, connect, dry_run)
    return cold.merge_step("pre-merge", top, base, dry_run, runner)


def post_merge(top: str, base: str, *, domain: str | None = None, disk: str | None = None,
               connect: str = DEFAULT_URI, dry_run: bool = False,
               runner: proc.Runner | None = None, repo: str | None = None,
               wait: float = 0.0) -> dict[str, Any]:
    """After merging TOP into BASE: give BASE every usable bitmap only TOP had.

    Each is added with TOP's granularity and recording state and TOP's bits
    merged in, in one qemu-img run (a killed run leaves the name absent, never
    present without its bits; runs over several layers go through a temporary
    name, see ``bitmaps.plan_post_merge``).  Run it before TOP is deleted.  A
    bitmap TOP holds that is broken down to BASE (in-use anywhere, BASE's copy
    too when the merge ran out of space, or a hole) is lost: every copy is
    removed and BitmapLost (exit 5) names it; re-creating it from TOP alone
    would miss every write older than TOP.

    Live (``domain``/``disk``, after ``blockcommit --active --pivot``): libvirt
    already merged TOP's bitmaps; verify that every checkpoint's bitmap is in
    the new active layer, recording and consistent, and that BASE has room to
    store its bitmaps when QEMU closes it (libvirt reports success and the
    bitmaps look fine in memory, but are lost at close on a full volume).  A
    checkpoint failing either is deleted (next backup: full, with the reason)
    and BitmapLost (exit 5) carries the report.
    """
    if _live_args(domain, disk):
        assert domain is not None and disk is not None
        with domain_lock(repo, domain, wait):
            return live.post_merge(top, base, domain, disk, connect, dry_run)
    return cold.merge_step("post-merge", top, base, dry_run, runner)


def check(*, images: Sequence[str] = (), domain: str | None = None, fix: bool = False,
          connect: str = DEFAULT_URI, repo: str | None = None,
          runner: proc.Runner | None = None, wait: float = 0.0,
          passphrase: Any = None) -> dict[str, Any]:
    """Walk the real chain of each image and report (and with ``fix`` repair) its bitmaps.

    Reported: orphans, in-use copies, holes (a name missing from a layer between
    two that hold it), granularity mismatches, images marked corrupt.  ``fix``
    removes every copy of a name that cannot be used (orphans, in-use, broken
    chain); granularity mismatches and corrupt images are left for the
    operator.  When problems remain, BitmapLost (exit 5) carries the report.

    ``domain``: walk each disk's real chain (QEMU's block nodes when running,
    qemu-img when shut off) and compare it with libvirt's domain XML (drift);
    report orphan bitmaps (no checkpoint owns them), checkpoints without a
    usable bitmap, in-use/inconsistent copies, holes, granularity mismatches,
    and with ``repo`` the backupkit checkpoints the latest backup does not
    use (``passphrase``: where an encrypted repository's passphrase comes from).
    ``fix`` deletes those checkpoints and removes the orphans (through libvirt
    when running), then re-checks.
    """
    if domain is not None:
        if images:
            raise UsageError("give either a domain or --image, not both")
        return domain_check.check_domain(domain, fix, connect, repo, wait, passphrase)
    return cold.check_images(images, fix, runner)
