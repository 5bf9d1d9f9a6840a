"""Logging: one line per event; journal priority prefixes under systemd."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backupkit import log

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _run(tmp_path: Path, args: list[str], journal: str | None) -> tuple[int, str]:
    """Run ``python -m backupkit ARGS`` with stderr in a file; JOURNAL_STREAM=JOURNAL
    ("match" = the device:inode of that file, as systemd sets it)."""
    err = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items()
           if k not in ("JOURNAL_STREAM", "BACKUPKIT_REPO", "BACKUPKIT_CONFIG")}
    env["BACKUPKIT_CONFIG"] = "/dev/null"
    with err.open("wb") as f:
        if journal == "match":
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal is not None:
            env["JOURNAL_STREAM"] = journal
        cp = subprocess.run([sys.executable, "-m", "backupkit", *args], stdout=subprocess.PIPE,
                            stderr=f, env=env, timeout=60, check=False)
    return cp.returncode, err.read_text()


def test_failure_under_journal_has_priority_3_and_no_timestamp(tmp_path: Path) -> None:
    code, err = _run(tmp_path, ["--repo", str(tmp_path / "missing"), "list"], "match")
    assert code == 4
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("<3>"), err
    assert "missing" in lines[0]
    assert not TIMESTAMP.search(err)


def test_info_under_journal_has_priority_6(tmp_path: Path) -> None:
    code, err = _run(tmp_path, ["--repo", str(tmp_path / "r"), "init"], "match")
    assert code == 0, err
    assert err.splitlines() and all(line.startswith("<6>") for line in err.splitlines()), err
    assert not TIMESTAMP.search(err)


@pytest.mark.parametrize("journal", [None, "1:2", "garbage"])
def test_not_under_journal_has_timestamps(tmp_path: Path, journal: str | None) -> None:
    """JOURNAL_STREAM only counts when it names stderr itself (sd_journal_stream_fd(3)):
    a child whose stderr was redirected keeps timestamps."""
    code, err = _run(tmp_path, ["--repo", str(tmp_path / "missing"), "list"], journal)
    assert code == 4
    (line,) = err.splitlines()
    assert TIMESTAMP.match(line) and "ERROR" in line and not line.startswith("<")


def test_usage_error_under_journal(tmp_path: Path) -> None:
    code, err = _run(tmp_path, ["frobnicate"], "match")
    assert code == 2
    assert err.startswith("<3>") and len(err.splitlines()) == 1


def test_multiline_records_prefix_every_line() -> None:
    f = log.JournalFormatter()
    rec = logging.LogRecord("backupkit", logging.WARNING, __file__, 1, "a\nb", None, None)
    assert f.format(rec) == "<4>a\n<4>b"
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("backupkit", logging.ERROR, __file__, 1, "details", None,
                                sys.exc_info())
    lines = f.format(rec).splitlines()
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: boom"


def test_priorities() -> None:
    assert [log.priority(v) for v in (logging.DEBUG, logging.INFO, logging.WARNING,
                                      logging.ERROR, logging.CRITICAL)] == [7, 6, 4, 3, 2]
    assert log.priority(logging.INFO + 5) == 6


def test_backup_all_summary_lists_each_domain_outcome() -> None:
    from backupkit import render

    doc = {"backups": [{"domain": "a", "id": "x", "mode": "full", "reason": "no previous backup",
                        "read_bytes": 1 << 30, "stored_bytes": 5 << 20,
                        "duration_seconds": 12.34}],
           "failed": [{"domain": "b", "kind": "not_found", "message": "domain b\nnot found",
                       "exit_code": 4}]}
    lines = render.render(doc).splitlines()
    assert lines[0].split() == ["DOMAIN", "RESULT", "MODE", "READ", "STORED", "DURATION",
                                "REASON"]
    assert lines[1].split()[:3] == ["a", "ok", "full"] and "12.3s" in lines[1]
    assert "1.0 GiB" in lines[1] and "no previous backup" in lines[1]
    assert lines[2].split()[:2] == ["b", "FAILED"] and lines[2].endswith("domain b not found")
    assert len(lines) == 3
