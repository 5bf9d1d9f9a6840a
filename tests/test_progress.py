"""Progress bars: on a TTY only; never with --json, -q, or under systemd."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pytest

from backupkit import cli, progress

SCRIPT = textwrap.dedent("""
    import sys, time
    from backupkit import cli, progress
    args = cli.build_parser().parse_args(sys.argv[1:])
    factory = progress.progress_factory(args)
    print("enabled" if factory else "disabled", flush=True)
    if factory:
        bar = factory("vda", 8 << 20)
        for _ in range(8):
            bar(1 << 20)
            time.sleep(0.06)
""")


def _run_on(stderr: str, argv: list[str], journal: bool = False) -> tuple[str, str]:
    """Run SCRIPT with stderr on a pty ("tty") or a pipe ("pipe"); (stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if stderr == "pipe":
        cp = subprocess.run([sys.executable, "-c", SCRIPT, *argv], capture_output=True,
                            text=True, env=env, timeout=60, check=True)
        return cp.stdout, cp.stderr
    master, slave = pty.openpty()
    # A fresh pty is 0x0; tqdm sizes the bar from the terminal like on a real one.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        if journal:  # as systemd would set it if this stream were the journal
            st = os.fstat(slave)
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        with subprocess.Popen([sys.executable, "-c", SCRIPT, *argv], stdout=subprocess.PIPE,
                              stderr=slave, env=env, text=True) as proc:
            os.close(slave)
            slave = -1
            chunks = []
            while True:
                ready, _, _ = select.select([master], [], [], 30)
                if not ready:
                    proc.kill()
                    pytest.fail("no output from the child")
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the pty
                    break
                if not data:
                    break
                chunks.append(data)
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0
        return out, b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_bar_on_a_tty_shows_bytes_rate_and_eta() -> None:
    out, err = _run_on("tty", ["restore", "vm", "--target", "/x"])
    assert out.strip() == "enabled"
    assert "vda" in err
    assert "8.00M" in err or "8.0M" in err, err  # total, in binary units
    assert "B/s" in err, err  # rate
    assert "<" in err, err  # elapsed<remaining (ETA)
    assert "100%" in err, err


@pytest.mark.parametrize("argv", [["--json", "restore", "vm", "--target", "/x"],
                                  ["-q", "restore", "vm", "--target", "/x"],
                                  ["-qq", "backup", "--all"]])
def test_no_bar_with_json_or_quiet_even_on_a_tty(argv: list[str]) -> None:
    out, err = _run_on("tty", argv)
    assert out.strip() == "disabled" and err == ""


def test_no_bar_under_systemd() -> None:
    out, err = _run_on("tty", ["backup", "--all"], journal=True)
    assert out.strip() == "disabled" and err == ""


def test_no_bar_when_stderr_is_not_a_tty() -> None:
    out, err = _run_on("pipe", ["backup", "--all"])
    assert out.strip() == "disabled" and err == ""


def test_enabled_needs_everything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    parse = cli.build_parser().parse_args
    assert progress.enabled(parse(["backup", "--all"]))
    assert not progress.enabled(parse(["--json", "backup", "--all"]))
    assert not progress.enabled(parse(["-q", "backup", "--all"]))
    assert progress.enabled(parse(["-v", "backup", "--all"]))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not progress.enabled(parse(["backup", "--all"]))
