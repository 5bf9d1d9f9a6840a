"""Progress bars (tqdm) on a TTY only: never with --json, -q, or under systemd."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from backupkit import log as logsetup

Progress = Callable[[int], None]


def enabled(args: argparse.Namespace) -> bool:
    return (sys.stderr.isatty() and not getattr(args, "json", False)
            and getattr(args, "quiet", 0) == 0 and not logsetup.under_journal())


def progress_factory(args: argparse.Namespace) -> Callable[[str, int], Progress | None] | None:
    """A factory making one bar per disk, or None when bars are off."""
    if not enabled(args):
        return None
    from tqdm import tqdm

    def start(label: str, total: int) -> Progress:
        bar = tqdm(total=total or None, desc=label, unit="B", unit_scale=True,
                   unit_divisor=1024, file=sys.stderr, leave=False, dynamic_ncols=True)

        def update(n: int) -> None:
            bar.update(n)
            if bar.total and bar.n >= bar.total:
                bar.refresh()  # draw the final state: tqdm throttles redraws
                bar.close()

        return update

    return start
