"""Prometheus textfile output (node_exporter textfile-collector convention).

One file ([metrics] textfile) holds the last values for every domain (label
``domain``) and every repository (label ``repository``).  Each update reads the
file back, replaces the samples of the domain or repository it is about, and
rewrites the whole file atomically (temporary file in the same directory, fsync,
rename), so node_exporter never sees a half-written file.  Concurrent updates
(several backupkit-backup@ units at once) are serialized with flock() on the
directory, so none loses another's samples.

The names below are documented in backupkit(8), METRICS.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from backupkit.errors import Error

# name -> (label, help).  Order is the order in the file.
DOMAIN_METRICS: dict[str, str] = {
    "backupkit_last_attempt_timestamp_seconds":
        "Unix time the last backup attempt of the domain ended.",
    "backupkit_last_success_timestamp_seconds":
        "Unix time the last successful backup of the domain ended.",
    "backupkit_last_result": "1 if the last backup attempt succeeded, 0 if it failed.",
    "backupkit_last_exit_code": "Exit code of the last backup attempt (0 on success).",
    "backupkit_last_duration_seconds": "Duration of the last successful backup.",
    "backupkit_last_read_bytes": "Bytes read from the disks by the last successful backup.",
    "backupkit_last_stored_bytes": "Bytes newly stored by the last successful backup.",
    "backupkit_last_incremental":
        "1 if the last successful backup was incremental, 0 if it was full.",
    "backupkit_last_freeze_seconds":
        "Guest filesystem freeze window of the last successful backup (quiesced only).",
}
# Written by backupkit drill (per domain too).
DRILL_METRICS: dict[str, str] = {
    "backupkit_drill_last_timestamp_seconds": "Unix time the last restore drill ended.",
    "backupkit_drill_last_result": "1 if the last restore drill passed, 0 if it failed.",
    "backupkit_drill_seconds_to_agent":
        "Seconds from the start of the last passed drill to the guest agent answering.",
}
REPOSITORY_METRICS: dict[str, str] = {
    "backupkit_repository_size_bytes":
        "Bytes used by the repository (chunks, indexes and manifests).",
    "backupkit_repository_chunks": "Number of chunks stored in the repository.",
    "backupkit_repository_backups": "Number of backups in the repository.",
    "backupkit_repository_updated_timestamp_seconds":
        "Unix time the repository totals were last counted by listing the store "
        "(gc; backups add what they stored in between).",
}
METRICS = {**{n: ("domain", h) for n, h in DOMAIN_METRICS.items()},
           **{n: ("domain", h) for n, h in DRILL_METRICS.items()},
           **{n: ("repository", h) for n, h in REPOSITORY_METRICS.items()}}

Samples = dict[tuple[str, str], float]
_LINE = re.compile(r'^([a-z_]+)\{(domain|repository)="((?:[^"\\]|\\.)*)"\} (\S+)$')


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), s)


def _format(v: float) -> str:
    if math.isfinite(v) and v == int(v) and abs(v) < 1 << 53:
        return str(int(v))
    return repr(float(v))


def read(path: str) -> Samples:
    """The samples in an existing textfile ({} if there is none); unknown lines are dropped."""
    samples: Samples = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = _LINE.match(line.strip())
                if m and METRICS.get(m.group(1), ("",))[0] == m.group(2):
                    with contextlib.suppress(ValueError):
                        samples[(m.group(1), _unescape(m.group(3)))] = float(m.group(4))
    except FileNotFoundError:
        pass
    return samples


def render(samples: Samples) -> str:
    out = []
    for name, (label, help_text) in METRICS.items():
        rows = sorted((k, v) for (n, k), v in samples.items() if n == name)
        if not rows:
            continue
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} gauge")
        out += [f'{name}{{{label}="{_escape(k)}"}} {_format(v)}' for k, v in rows]
    return "\n".join(out) + "\n"


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update(path: str, new: Samples, drop: set[tuple[str, str]] | None = None) -> None:
    """Merge NEW into the file (removing DROP), atomically and under the lock."""
    with _locked(path):
        samples = read(path)
        for key in drop or ():
            samples.pop(key, None)
        samples.update(new)
        write_atomic(path, render(samples))


def backup_samples(result: dict[str, Any] | None, failure: tuple[str, Error] | None,
                   now: float) -> tuple[Samples, set[tuple[str, str]]]:
    """Samples for one backup outcome, and stale samples to remove."""
    new: Samples = {}
    drop: set[tuple[str, str]] = set()
    if result is not None:
        d = str(result["domain"])
        new[("backupkit_last_attempt_timestamp_seconds", d)] = now
        new[("backupkit_last_success_timestamp_seconds", d)] = now
        new[("backupkit_last_result", d)] = 1
        new[("backupkit_last_exit_code", d)] = 0
        new[("backupkit_last_duration_seconds", d)] = float(result["duration_seconds"])
        new[("backupkit_last_read_bytes", d)] = float(result["read_bytes"])
        new[("backupkit_last_stored_bytes", d)] = float(result["stored_bytes"])
        new[("backupkit_last_incremental", d)] = float(result["mode"] == "incremental")
        freeze = result.get("freeze_seconds")
        if freeze is not None:
            new[("backupkit_last_freeze_seconds", d)] = float(freeze)
        else:
            drop.add(("backupkit_last_freeze_seconds", d))
    elif failure is not None:
        d, err = failure
        new[("backupkit_last_attempt_timestamp_seconds", d)] = now
        new[("backupkit_last_result", d)] = 0
        new[("backupkit_last_exit_code", d)] = float(err.exit_code)
    return new, drop


def record_backup(path: str, result: dict[str, Any] | None,
                  failure: tuple[str, Error] | None, now: float | None = None) -> None:
    """Record one domain's backup outcome: RESULT on success, (domain, error) on failure."""
    new, drop = backup_samples(result, failure, time.time() if now is None else now)
    if new:
        update(path, new, drop)


def record_drill(path: str, result: dict[str, Any], now: float | None = None) -> None:
    """Record one restore drill's outcome (backupkit drill)."""
    d = str(result["domain"])
    new: Samples = {("backupkit_drill_last_timestamp_seconds", d): time.time()
                    if now is None else now,
                    ("backupkit_drill_last_result", d): float(bool(result["passed"]))}
    if result["passed"] and result.get("seconds_to_agent") is not None:
        new[("backupkit_drill_seconds_to_agent", d)] = float(result["seconds_to_agent"])
    update(path, new)


def repository_stats(repo: Any) -> dict[str, int]:
    """Size, chunk and backup counts of an open backupkit.repo.Repository.

    Lists the whole repository (one stat per file, or one LIST request per 1000
    objects on S3, the chunk directories 8 at a time: Repository.list_objects):
    cheap for thousands of chunks, a minute for millions on S3.  So only gc (which
    lists everything anyway) and the first backup recorded for a repository count
    this way; backups add what they wrote (add_backups).
    """
    size = chunks = backups = 0
    for info in repo.list_objects():
        size += info.size
        if info.key.startswith("chunks/"):
            chunks += 1
        elif info.key.startswith("backups/") and info.key.endswith("/manifest.json"):
            backups += 1
    return {"size_bytes": size, "chunks": chunks, "backups": backups}


def record_repository(path: str, repo_path: str, stats: dict[str, int],
                      now: float | None = None) -> None:
    """Record a repository's stats (from repository_stats) under label repository=REPO_PATH."""
    now = time.time() if now is None else now
    update(path, {
        ("backupkit_repository_size_bytes", repo_path): float(stats["size_bytes"]),
        ("backupkit_repository_chunks", repo_path): float(stats["chunks"]),
        ("backupkit_repository_backups", repo_path): float(stats["backups"]),
        ("backupkit_repository_updated_timestamp_seconds", repo_path): now,
    })


_REPO_TOTALS = ("backupkit_repository_size_bytes", "backupkit_repository_chunks",
                "backupkit_repository_backups")


def add_backups(path: str, repo_path: str, results: list[dict[str, Any]]) -> bool:
    """Add what backups wrote to the repository totals in the textfile, without listing.

    Chunks only appear between two gc runs (prune and delete leave them to gc), so
    the count from the last gc plus the chunks and bytes each backup stored is the
    repository's size as long as this host is its only writer; gc sets it exact
    again.  False (nothing changed) if the file has no totals for repo_path yet:
    the caller then counts once with repository_stats.
    """
    with _locked(path):
        samples = read(path)
        keys = [(n, repo_path) for n in _REPO_TOTALS]
        if not all(k in samples for k in keys):
            return False
        samples[keys[0]] += sum(float(r.get("stored_bytes", 0)) for r in results)
        samples[keys[1]] += sum(float(r.get("stored_chunks", 0)) for r in results)
        samples[keys[2]] += len(results)
        write_atomic(path, render(samples))
    return True


def write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".backupkit-metrics.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
