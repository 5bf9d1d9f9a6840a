"""One shape for the worker pools of backup (copy), restore and verify.

Each runs a few threads that take items from one shared iterator under a lock
until it is empty.  :func:`run_threads` starts them, waits, and hands the first
failure back to the caller; what a thread does with an item stays with the
operation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence


def run_threads(name: str, targets: Sequence[Callable[[], None]], *,
                stop: threading.Event | None = None,
                background: Sequence[Callable[[], None]] = (),
                wake: Callable[[], None] | None = None) -> None:
    """Run each target on a thread of its own (``NAME-i``) and wait for all of them.

    The first exception raised in any thread (interrupts included) is raised
    here once every thread has ended.  When a thread fails, ``stop`` is set and
    ``wake`` called, so that the others end at their next item.  ``background``
    threads (restore's read-ahead) run beside the targets until the targets are
    done; then ``stop`` is set and ``wake`` called for them.  An interrupt of
    the waiting thread does the same and still waits for every thread: none
    outlives the call (restore closes the output file next, whose descriptor
    number could be reused).
    """
    stop = stop if stop is not None else threading.Event()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def halt() -> None:
        stop.set()
        if wake is not None:
            wake()

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                with lock:
                    errors.append(e)
                halt()
        return run

    workers = [threading.Thread(target=guarded(fn), name=f"{name}-{i}", daemon=True)
               for i, fn in enumerate(targets)]
    extra = [threading.Thread(target=guarded(fn), name=f"{name}-background-{i}", daemon=True)
             for i, fn in enumerate(background)]
    started: list[threading.Thread] = []
    try:
        for t in [*workers, *extra]:
            t.start()
            started.append(t)
        for t in started:
            if t in workers:
                t.join()
    finally:
        halt()
        for t in started:
            t.join()
    if errors:
        raise errors[0]
