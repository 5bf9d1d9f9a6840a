"""Logging to stderr: one line per event.

On a terminal or in a file, each line starts with a timestamp and the level.
When stderr is connected to the journal (systemd sets ``JOURNAL_STREAM`` to the
``device:inode`` of the stream it gave the service), lines carry no timestamp
(journald adds one) and start with a syslog priority prefix such as ``<3>``
(sd-daemon(3)), so ``journalctl -p err`` shows failures.  Following
sd_journal_stream_fd(3), JOURNAL_STREAM only counts when it names the stream
stderr really is: a child whose stderr was redirected elsewhere keeps
timestamps.  A message that spans several lines (a traceback with -v) gets the
prefix on each line, so every line keeps its priority.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def priority(levelno: int) -> int:
    """The syslog priority (0 emerg .. 7 debug) of a logging level."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def under_journal(stream: TextIO | None = None) -> bool:
    """True when STREAM (default stderr) is the journal stream systemd connected."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    """``<N>message`` with no timestamp; every line of a multi-line record prefixed."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class LineFormatter(logging.Formatter):
    """``2024-05-01 01:02:03 ERROR   message`` for terminals and files."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")


def setup(verbosity: int = 0) -> None:
    """verbosity: -1 quiet (warnings), 0 info, 1+ debug."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter() if under_journal() else LineFormatter())
    root = logging.getLogger("backupkit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # ovirt-imageio logs each NBD connection at INFO; its warnings get our format
    # (without a handler they would reach stderr bare, through logging.lastResort).
    for name in ("nbd", "nbdutil"):
        lib = logging.getLogger(name)
        lib.setLevel(logging.WARNING)
        lib.handlers[:] = [handler]
        lib.propagate = False
