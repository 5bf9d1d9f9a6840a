"""Prometheus textfile: parsed back with prometheus_client's parser; atomic, merged."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from backupkit import errors, metrics

parser = pytest.importorskip("prometheus_client.parser")


def _families(path: Path) -> dict[str, Any]:
    return {f.name: f for f in parser.text_string_to_metric_families(path.read_text())}


def _value(fams: dict[str, Any], name: str, **labels: str) -> float:
    # prometheus_client strips a trailing _total etc. only for counters; ours are gauges.
    for s in fams[name].samples:
        if s.labels == labels:
            return float(s.value)
    raise KeyError((name, labels))


def _result(domain: str, mode: str = "incremental", **kw: Any) -> dict[str, Any]:
    return {"domain": domain, "id": "x", "mode": mode, "reason": "r",
            "duration_seconds": 12.5, "read_bytes": 1 << 30, "stored_bytes": 123456789,
            "freeze_seconds": kw.get("freeze")}


def test_success_then_failure_then_other_domain(tmp_path: Path) -> None:
    path = tmp_path / "backupkit.prom"
    metrics.record_backup(str(path), _result('we"ird\\vm', freeze=0.25), None, now=1000.0)
    fams = _families(path)
    assert set(fams) == {n for n in metrics.DOMAIN_METRICS}
    for fam in fams.values():
        assert fam.type == "gauge" and fam.documentation
    d = 'we"ird\\vm'
    assert _value(fams, "backupkit_last_success_timestamp_seconds", domain=d) == 1000.0
    assert _value(fams, "backupkit_last_attempt_timestamp_seconds", domain=d) == 1000.0
    assert _value(fams, "backupkit_last_result", domain=d) == 1
    assert _value(fams, "backupkit_last_exit_code", domain=d) == 0
    assert _value(fams, "backupkit_last_duration_seconds", domain=d) == 12.5
    assert _value(fams, "backupkit_last_read_bytes", domain=d) == 1 << 30
    assert _value(fams, "backupkit_last_stored_bytes", domain=d) == 123456789
    assert _value(fams, "backupkit_last_incremental", domain=d) == 1
    assert _value(fams, "backupkit_last_freeze_seconds", domain=d) == 0.25

    err = errors.OperationFailed("boom")
    metrics.record_backup(str(path), None, (d, err), now=2000.0)
    metrics.record_backup(str(path), _result("vm2", mode="full"), None, now=3000.0)
    fams = _families(path)
    assert _value(fams, "backupkit_last_attempt_timestamp_seconds", domain=d) == 2000.0
    assert _value(fams, "backupkit_last_success_timestamp_seconds", domain=d) == 1000.0
    assert _value(fams, "backupkit_last_result", domain=d) == 0
    assert _value(fams, "backupkit_last_exit_code", domain=d) == 1
    assert _value(fams, "backupkit_last_stored_bytes", domain=d) == 123456789
    assert _value(fams, "backupkit_last_incremental", domain="vm2") == 0
    assert _value(fams, "backupkit_last_result", domain="vm2") == 1
    with pytest.raises(KeyError):  # no freeze window: no stale sample
        _value(fams, "backupkit_last_freeze_seconds", domain="vm2")
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["backupkit.prom"]  # no temp files left


def test_repository_metrics(tmp_path: Path) -> None:
    from backupkit.repo import Repository

    repo = Repository.init(str(tmp_path / "repo"), chunk_size=65536)
    for i in range(3):
        repo.put_chunk(bytes([i + 1]) * 65536)
    repo.storage.flush()  # chunks are published in batches
    stats = metrics.repository_stats(repo)
    assert stats["chunks"] == 3 and stats["backups"] == 0
    on_disk = sum(f.stat().st_size for f in (tmp_path / "repo").rglob("*") if f.is_file())
    assert stats["size_bytes"] == on_disk
    path = tmp_path / "m.prom"
    metrics.record_backup(str(path), _result("vm1"), None, now=5.0)
    metrics.record_repository(str(path), repo.path, stats, now=6.0)
    fams = _families(path)
    assert _value(fams, "backupkit_repository_chunks", repository=repo.path) == 3
    assert _value(fams, "backupkit_repository_size_bytes", repository=repo.path) == on_disk
    assert _value(fams, "backupkit_repository_backups", repository=repo.path) == 0
    assert _value(fams, "backupkit_repository_updated_timestamp_seconds",
                  repository=repo.path) == 6.0
    assert _value(fams, "backupkit_last_result", domain="vm1") == 1


def test_unknown_and_broken_lines_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "m.prom"
    path.write_text('garbage\nbackupkit_last_result{domain="a"} notanumber\n'
                    'other_metric{domain="a"} 1\nbackupkit_last_result{repository="a"} 1\n'
                    'backupkit_last_result{domain="keep"} 1\n')
    metrics.record_backup(str(path), None, ("b", errors.NotFound("domain", "b")), now=1.0)
    fams = _families(path)
    assert _value(fams, "backupkit_last_result", domain="keep") == 1
    assert _value(fams, "backupkit_last_exit_code", domain="b") == 4
    assert "other_metric" not in path.read_text() and "garbage" not in path.read_text()


def test_concurrent_updates_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "m.prom")
    threads = [threading.Thread(target=metrics.record_backup,
                                args=(path, _result(f"vm{i}"), None))
               for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fams = _families(Path(path))
    assert {s.labels["domain"] for s in fams["backupkit_last_result"].samples} == \
        {f"vm{i}" for i in range(16)}


def test_write_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.prom"
    metrics.record_backup(str(path), _result("vm1"), None, now=1.0)
    before = path.read_text()

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        metrics.record_backup(str(path), _result("vm2"), None, now=2.0)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.prom"]


def test_backups_add_to_the_totals_without_listing(tmp_path: Path) -> None:
    path = tmp_path / "backupkit.prom"
    # No totals yet: the caller must count once.
    assert not metrics.add_backups(str(path), "s3://b/r", [{"stored_bytes": 5}])
    metrics.record_repository(str(path), "s3://b/r",
                              {"size_bytes": 1000, "chunks": 10, "backups": 2}, now=7.0)
    assert metrics.add_backups(str(path), "s3://b/r", [
        {"stored_bytes": 300, "stored_chunks": 3}, {"stored_bytes": 20, "stored_chunks": 1}])
    fams = _families(path)
    assert _value(fams, "backupkit_repository_size_bytes", repository="s3://b/r") == 1320
    assert _value(fams, "backupkit_repository_chunks", repository="s3://b/r") == 14
    assert _value(fams, "backupkit_repository_backups", repository="s3://b/r") == 4
    # The time of the last count by listing stays: it says how old the baseline is.
    assert _value(fams, "backupkit_repository_updated_timestamp_seconds",
                  repository="s3://b/r") == 7.0
