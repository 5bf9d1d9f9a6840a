"""backupkit's checkpoints in libvirt: whose they are (the name prefix) and the one deleter.

Every checkpoint (and bitmap) backupkit creates is named
``backupkit.<repository id, 8 hex digits>.<backup id>``; the prefix tells which
repository's it is, so that two repositories backing up one domain each clean up
only their own.  :func:`delete_checkpoint` is the only place that deletes one:
the backup (its leftovers, a failed run's new checkpoint, the previous one after
a commit), ``checkpoint delete`` and ``hygiene`` all go through it.
"""

from __future__ import annotations

import contextlib
import logging
import re

from backupkit import qemu
from backupkit.errors import Error, NotFound
from backupkit.virt import Domain

log = logging.getLogger("backupkit.virt")

PREFIX = "backupkit."


def checkpoint_prefix(repository_id: str) -> str:
    """``backupkit.<repository id, 8 hex digits>.``: whose checkpoint it is.

    A repository without an id (none was ever created without one) falls back
    to the bare prefix.
    """
    rid = repository_id[:8]
    return f"{PREFIX}{rid}." if re.fullmatch(r"[0-9a-f]{8}", rid) else PREFIX


def owned(checkpoint: str, prefix: str) -> bool:
    """Is this checkpoint (or bitmap) name one of this repository's?

    Names from before repository ids (``backupkit.<backup id>``, no second dot) are
    treated as the repository's that backs the domain up, as they always were.
    """
    if not checkpoint.startswith(PREFIX):
        return False
    return checkpoint.startswith(prefix) or "." not in checkpoint[len(PREFIX):]


def delete_checkpoint(dom: Domain, name: str, running: bool, *, broken: bool = False) -> str:
    """Delete a checkpoint with its bitmap in every layer of every disk's chain.

    Returns how: "checkpoint and its bitmaps", "already gone", "metadata only
    (bitmap already gone)" or "checkpoint and its bitmaps (cold)".

    Running: through libvirt.  libvirt refuses ("bitmap ... not found in backing
    chain") when a bitmap is already gone, e.g. after a QEMU killed with SIGKILL
    lost the bitmaps it created; the metadata must go anyway, or the next backup
    would trust a checkpoint without a bitmap.  That fallback is taken when no
    layer holds a bitmap of that name any more, or always with ``broken`` (the
    caller found the bitmap unusable: hygiene).

    Shut off: ``qemu-img bitmap --remove`` on every layer of the real chain (a
    shut-off domain's XML has no <backingStore>), then libvirt's metadata.
    """
    if running:
        try:
            dom.delete_checkpoint(name)
            return "checkpoint and its bitmaps"
        except NotFound:
            return "already gone"
        except Error as e:
            if not broken and any(b.get("name") == name
                                  for bs in dom.block_bitmaps().values() for b in bs):
                raise
            log.warning("%s: deleting checkpoint %s with its bitmaps failed (%s); "
                        "deleting its metadata", dom.name, name, e)
            dom.delete_checkpoint(name, metadata_only=True)
            return "metadata only (bitmap already gone)"
    for d in dom.disks():
        if not d.can_bitmap:
            continue
        for layer in qemu.chain(d.path, fmt=d.format, force_share=False):
            if layer.format == "qcow2" and layer.bitmap(name) is not None:
                qemu.bitmap_remove(layer.filename, name, fmt=layer.format)
    with contextlib.suppress(NotFound):
        dom.delete_checkpoint(name, metadata_only=True)
    return "checkpoint and its bitmaps (cold)"
