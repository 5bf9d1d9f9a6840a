"""Test-only fault points: stop or kill this process at a named point of a run.

Production code calls :func:`point` at a few places where an interruption is
interesting (docs/reliability.md lists them).  It does nothing unless the
environment variable ``BACKUPKIT_FAULT_POINT`` names that point, so a normal
run pays one dictionary lookup per call.

``BACKUPKIT_FAULT_POINT=NAME`` makes the process SIGKILL itself at NAME, exactly
like ``kill -9`` from outside: no ``finally`` block, no ``atexit`` handler runs.
``BACKUPKIT_FAULT_ACTION=stop`` makes it SIGSTOP itself instead, so a test can
inject a fault from outside (kill QEMU, restart libvirtd, start a second
backup, ...) while the run is frozen at a known point, then SIGCONT it.

Points (see where they are called):

- ``before_first_chunk``: the export (backup job or qemu-nbd) and the new
  checkpoint exist, nothing has been read yet;
- ``mid_data``: the second chunk of a disk has been handed to the storing
  threads and every chunk before it is stored;
- ``after_index``: every disk's index is written, the manifest is not;
- ``after_manifest``: the manifest is committed (the backup exists); the job
  is not ended and the previous checkpoint is not deleted yet;
- ``hygiene_step_N``: a hygiene hook is about to make its N-th change (1-based:
  a ``qemu-img bitmap`` run, a libvirt bitmap removal or checkpoint deletion).

Points of gc's protocol with running writers (docs/format.md, "Locks and gc"):

- ``before_commit``: a writer (backup, copy, import) holding its writer and domain
  locks has stored every chunk and index; its lock is not "committing" yet;
- ``commit_after_epoch``: the writer's lock says "committing" and it has read
  ``gc/epoch``; the manifest is not written;
- ``gc_after_mark``: gc has marked and chosen its candidates; the epoch is unchanged;
- ``gc_before_sweep``: the epoch says "sweeping", gc waited for committing writers
  and re-read the manifests; nothing is deleted yet;
- ``gc_mid_sweep``: the first batch of chunks is deleted;
- ``gc_after_sweep``: every candidate is deleted; the epoch still says "sweeping".
"""

from __future__ import annotations

import os
import signal

ENV_POINT = "BACKUPKIT_FAULT_POINT"
ENV_ACTION = "BACKUPKIT_FAULT_ACTION"

POINTS = ("before_first_chunk", "mid_data", "after_index", "after_manifest")
GC_POINTS = ("gc_after_mark", "gc_before_sweep", "gc_mid_sweep", "gc_after_sweep")
COMMIT_POINTS = ("before_commit", "commit_after_epoch")


def armed(name: str) -> bool:
    """True if the environment asks for a fault at this point."""
    return os.environ.get(ENV_POINT) == name


def point(name: str) -> None:
    """No-op unless BACKUPKIT_FAULT_POINT == name; then SIGKILL (or SIGSTOP) this process."""
    if not armed(name):
        return
    if os.environ.get(ENV_ACTION, "kill") == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    os.kill(os.getpid(), signal.SIGKILL)
