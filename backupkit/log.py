"""Logging to stderr: one line per event.

Under systemd (JOURNAL_STREAM set) lines carry no timestamp (journald adds
one) and start with a syslog priority prefix such as ``<3>``, so
``journalctl -p err`` shows failures.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def under_journal() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{record.getMessage()}"


def setup(verbosity: int = 0) -> None:
    """verbosity: -1 quiet (warnings), 0 info, 1+ debug."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    if under_journal():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("backupkit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # ovirt-imageio logs each NBD connection at INFO.
    for name in ("nbd", "nbdutil"):
        logging.getLogger(name).setLevel(logging.WARNING)
