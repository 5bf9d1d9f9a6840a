"""workers.run_threads: the pool shape of copy, restore and verify."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import pytest

from backupkit.workers import run_threads, wait_all


def test_every_target_runs_and_the_call_waits_for_all() -> None:
    done: list[int] = []
    lock = threading.Lock()

    def target(i: int) -> None:
        with lock:
            done.append(i)

    run_threads("t", [functools.partial(target, i) for i in range(5)])
    assert sorted(done) == [0, 1, 2, 3, 4]


def test_first_failure_is_raised_after_the_others_stopped() -> None:
    stop = threading.Event()
    items = iter(range(1000))
    lock = threading.Lock()
    seen: list[int] = []
    ended: list[str] = []

    def work() -> None:
        try:
            while not stop.is_set():
                with lock:
                    item = next(items, None)
                if item is None:
                    return
                if item == 3:
                    raise ValueError("item 3 is bad")
                stop.wait(0.001)  # let the failure reach the others before the items run out
                with lock:
                    seen.append(item)
        finally:
            with lock:
                ended.append(threading.current_thread().name)

    with pytest.raises(ValueError, match="item 3 is bad"):
        run_threads("t", [work] * 3, stop=stop)
    assert stop.is_set()
    assert sorted(ended) == ["t-0", "t-1", "t-2"]  # none outlives the call
    assert len(seen) < 999


def test_background_threads_are_stopped_and_woken_when_the_targets_end() -> None:
    stop = threading.Event()
    cond = threading.Condition()
    state = {"background_ended": False}

    def background() -> None:
        with cond:
            while not stop.is_set():
                cond.wait()
        state["background_ended"] = True

    def wake() -> None:
        with cond:
            cond.notify_all()

    run_threads("t", [lambda: None], stop=stop, background=[background], wake=wake)
    assert state["background_ended"]


@pytest.mark.parametrize("how", ["wait_all", "run_threads"])
def test_an_interrupt_while_waiting_still_waits_for_every_thread(how: str) -> None:
    """A stop signal's KeyboardInterrupt in the waiting (main) thread: the call goes on
    waiting until the threads have ended, then raises it.  (Thread.join interrupted so
    on Python 3.11 marks the running thread stopped: the process then exited under its
    backup --jobs workers.)"""
    release = threading.Event()
    finished: list[str] = []
    interrupts: list[int] = []

    def slow() -> None:
        release.wait(10)
        time.sleep(0.3)  # still running well after the interrupt
        finished.append("slow")

    def on_usr1(_signum: int, _frame: object) -> None:
        release.set()
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGUSR1, on_usr1)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            if how == "wait_all":
                ended = threading.Event()

                def run() -> None:
                    try:
                        slow()
                    finally:
                        ended.set()

                threading.Thread(target=run, daemon=True).start()
                wait_all([ended], lambda: interrupts.append(1))
            else:
                run_threads("t", [slow])
        assert finished == ["slow"]  # the interrupt did not cut the wait short
        assert interrupts == ([1] if how == "wait_all" else [])
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, old)
