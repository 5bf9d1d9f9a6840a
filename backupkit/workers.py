"""One shape for the worker pools of backup (copy), restore and verify.

Each runs a few threads that take items from one shared iterator under a lock
until it is empty.  :func:`run_threads` starts them, waits, and hands the first
failure back to the caller; what a thread does with an item stays with the
operation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence


def wait_all(done: Sequence[threading.Event],
             on_interrupt: Callable[[], None] | None = None) -> None:
    """Wait until every event is set; each thread sets its own as its last step.

    An interrupt of the waiting thread (a stop signal's KeyboardInterrupt) calls
    ``on_interrupt`` once, goes on waiting, and is raised once all are set.

    Not ``Thread.join``: on Python 3.11 a join interrupted by a signal handler's
    exception takes the lock the still-running thread holds for being alive
    (threading._wait_for_tstate_lock's bpo-45274 clean-up) and marks the thread
    stopped, so every later join returns at once and ``is_alive()`` says False while
    it runs.  A stop signal during ``backup --jobs`` then let the process exit under
    its workers (a scratch directory and chunk tmp files left, seen in CI).
    """
    interrupted: BaseException | None = None
    for ev in done:
        while True:
            try:
                if ev.wait(0.2):
                    break
            except KeyboardInterrupt as e:
                if interrupted is None:
                    interrupted = e
                    if on_interrupt is not None:
                        on_interrupt()
    if interrupted is not None:
        raise interrupted


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
    the waiting thread does the same and still waits for every thread (wait_all):
    none outlives the call (restore closes the output file next, whose descriptor
    number could be reused).
    """
    stop = stop if stop is not None else threading.Event()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def halt() -> None:
        stop.set()
        if wake is not None:
            wake()

    def guarded(fn: Callable[[], None], ended: threading.Event) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                with lock:
                    errors.append(e)
                halt()
            finally:
                ended.set()
        return run

    def thread(fn: Callable[[], None], tname: str) -> tuple[threading.Thread, threading.Event]:
        ended = threading.Event()
        return threading.Thread(target=guarded(fn, ended), name=tname, daemon=True), ended

    workers = [thread(fn, f"{name}-{i}") for i, fn in enumerate(targets)]
    extra = [thread(fn, f"{name}-background-{i}") for i, fn in enumerate(background)]
    started: list[tuple[threading.Thread, threading.Event]] = []
    try:
        for t, ended in [*workers, *extra]:
            t.start()
            started.append((t, ended))
        wait_all([ended for t, ended in started if (t, ended) in workers], halt)
    finally:
        halt()
        wait_all([ended for _t, ended in started], halt)
    if errors:
        raise errors[0]
