"""proc.stop_on_signals: SIGINT, SIGTERM, SIGHUP raise Interrupted once (pure logic)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from backupkit import proc
from backupkit.errors import EXIT_INTERRUPTED, Interrupted


@pytest.fixture(autouse=True)
def restore_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in proc.STOP_SIGNALS}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_first_signal_interrupts_later_ones_do_not() -> None:
    proc.stop_on_signals()
    with pytest.raises(Interrupted) as info:
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0)  # let the handler run
    assert str(info.value) == "interrupted by SIGTERM"
    assert info.value.exit_code == EXIT_INTERRUPTED == 7
    assert isinstance(info.value, KeyboardInterrupt), "must pass 'except Exception'"
    os.kill(os.getpid(), signal.SIGHUP)  # during the cleanup: logged, ignored
    os.kill(os.getpid(), signal.SIGINT)


def test_ignored_signal_stays_ignored() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    proc.stop_on_signals()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
