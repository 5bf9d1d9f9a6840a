"""Running external programs: errors keep stderr, children never outlive us."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import shlex
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Protocol

from backupkit.errors import CommandFailed, Interrupted, NotFound

log = logging.getLogger("backupkit.proc")


class Runner(Protocol):
    def __call__(
        self, cmd: Sequence[str], *, input: bytes | None = None, timeout: float | None = None
    ) -> bytes: ...


def run(
    cmd: Sequence[str], *, input: bytes | None = None, timeout: float | None = None
) -> bytes:
    """Run cmd to completion and return its stdout; raise CommandFailed with stderr."""
    log.debug("Running %s", shlex.join(cmd))
    try:
        cp = subprocess.run(
            list(cmd),
            input=input,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise NotFound("program", cmd[0], "is it installed?") from e
    except subprocess.TimeoutExpired as e:
        raise CommandFailed(shlex.join(cmd), -1, f"timed out after {timeout}s") from e
    if cp.returncode != 0:
        stderr = cp.stderr.decode("utf-8", "replace")
        raise CommandFailed(cmd[0] + " " + " ".join(cmd[1:3]), cp.returncode, stderr,
                            cp.stdout)
    return cp.stdout


_PR_SET_PDEATHSIG = 1

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _StopState:
    held = 0  # open hold_signals() calls
    pending: str | None = None  # a stop signal received while held
    lock = threading.Lock()  # held is counted from several threads (backup --jobs)


_stop = _StopState()


def hold_signals() -> None:
    """From now until the matching :func:`release_signals`, a stop signal does not
    interrupt: it is remembered.  For steps that must not be cut in two: a guest's
    filesystems frozen until their thaw, a backup's commit until its job has ended
    (an interrupt between them would delete the checkpoint a committed backup needs,
    or leave the job writing scratch data nobody watches)."""
    with _stop.lock:
        _stop.held += 1


def release_signals() -> str | None:
    """End one :func:`hold_signals`; the name of a stop signal received meanwhile once
    the last hold ends (the caller decides: raise, or finish and say so), else None."""
    with _stop.lock:
        _stop.held -= 1
        return _stop.pending if not _stop.held else None


def stop_requested() -> str | None:
    """The stop signal received so far (held or not), if any."""
    return _stop.pending


def raise_if_stopped() -> None:
    """Raise :class:`Interrupted` for a stop signal received while signals were held."""
    if _stop.pending and not _stop.held:
        raise Interrupted(_stop.pending)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """hold_signals() for a block; a stop signal received inside is raised as
    :class:`Interrupted` when the block ends (unless it ends with an exception)."""
    hold_signals()
    try:
        yield
    finally:
        name = release_signals()
    if name:
        raise Interrupted(name)


def stop_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread.

    SIGTERM is what ``kill``, ``timeout(1)`` and a systemd stop timeout send, and
    SIGHUP what a closed terminal sends: each must clean up like Ctrl-C (abort the
    job, delete the new checkpoint, remove the scratch directory).  Only the first
    signal interrupts; later ones are logged and ignored, so a second Ctrl-C or a
    repeated ``systemctl stop`` cannot cut the cleanup short (SIGKILL still can).
    A signal ignored when we start stays ignored (``nohup`` ignores SIGHUP, a shell
    ignores SIGINT for ``cmd &``).  Call from the main thread.
    """
    _stop.held, _stop.pending = 0, None
    handled = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]

    def first(signum: int, _frame: object) -> None:
        for s in handled:
            signal.signal(s, again)
        name = signal.Signals(signum).name
        _stop.pending = name
        if _stop.held:
            log.warning("%s received: stopping once the current step is done", name)
            return
        raise Interrupted(name)

    def again(signum: int, _frame: object) -> None:
        log.warning("%s received while stopping: still cleaning up",
                    signal.Signals(signum).name)

    for s in handled:
        signal.signal(s, first)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the parent dies, even of SIGKILL (Linux prctl)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Process:
    """A long-running child: a context manager that terminates, then kills it."""

    def __init__(self, cmd: Sequence[str], *, stop_timeout: float = 5.0) -> None:
        self.cmd = list(cmd)
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        log.debug("Starting %s", shlex.join(self.cmd))
        try:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, preexec_fn=_die_with_parent,
            )
        except FileNotFoundError as e:
            raise NotFound("program", self.cmd[0], "is it installed?") from e
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def error(self) -> CommandFailed:
        """The failure of a child that exited early, with its stderr."""
        assert self.proc is not None
        rc = self.proc.wait()
        stderr = ""
        if self.proc.stderr:
            stderr = self.proc.stderr.read().decode("utf-8", "replace")
            self.proc.stderr.close()
        return CommandFailed(self.cmd[0], rc, stderr)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not terminate, killing it", self.cmd[0])
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()

    def __enter__(self) -> Process:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
