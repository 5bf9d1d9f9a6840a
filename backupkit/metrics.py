"""Prometheus textfile output (node_exporter textfile-collector convention).

The file holds one sample set per domain; each run rewrites it atomically
(temporary file in the same directory, fsync, rename) keeping the other
domains' last values, read back from the file itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from typing import Any

from backupkit.errors import Error

_METRICS = {
    "backupkit_last_attempt_timestamp_seconds": "Time of the last backup attempt.",
    "backupkit_last_success_timestamp_seconds": "Time of the last successful backup.",
    "backupkit_last_result": "1 if the last backup succeeded, 0 if it failed.",
    "backupkit_last_duration_seconds": "Duration of the last successful backup.",
    "backupkit_last_read_bytes": "Bytes read by the last successful backup.",
    "backupkit_last_stored_bytes": "Bytes newly stored by the last successful backup.",
    "backupkit_last_incremental": "1 if the last successful backup was incremental.",
}
_LINE = re.compile(r'^(\w+)\{domain="((?:[^"\\]|\\.)*)"\} (\S+)$')


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), s)


def read(path: str) -> dict[tuple[str, str], float]:
    samples: dict[tuple[str, str], float] = {}
    try:
        with open(path) as f:
            for line in f:
                m = _LINE.match(line.strip())
                if m and m.group(1) in _METRICS:
                    samples[(m.group(1), _unescape(m.group(2)))] = float(m.group(3))
    except FileNotFoundError:
        pass
    return samples


def render(samples: dict[tuple[str, str], float]) -> str:
    out = []
    for name, help_text in _METRICS.items():
        rows = sorted((d, v) for (n, d), v in samples.items() if n == name)
        if not rows:
            continue
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} gauge")
        out += [f'{name}{{domain="{_escape(d)}"}} {v:g}' for d, v in rows]
    return "\n".join(out) + "\n"


def record_backup(path: str, result: dict[str, Any] | None,
                  failure: tuple[str, Error] | None, now: float | None = None) -> None:
    now = time.time() if now is None else now
    samples = read(path)
    if result is not None:
        d = str(result["domain"])
        samples[("backupkit_last_attempt_timestamp_seconds", d)] = now
        samples[("backupkit_last_success_timestamp_seconds", d)] = now
        samples[("backupkit_last_result", d)] = 1
        samples[("backupkit_last_duration_seconds", d)] = float(result["duration_seconds"])
        samples[("backupkit_last_read_bytes", d)] = float(result["read_bytes"])
        samples[("backupkit_last_stored_bytes", d)] = float(result["stored_bytes"])
        samples[("backupkit_last_incremental", d)] = float(result["mode"] == "incremental")
    elif failure is not None:
        d = failure[0]
        samples[("backupkit_last_attempt_timestamp_seconds", d)] = now
        samples[("backupkit_last_result", d)] = 0
    write_atomic(path, render(samples))


def write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".backupkit-metrics.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
