"""The benchmark harness runs end to end at a tiny size (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need_tool

ROOT = Path(__file__).resolve().parent.parent


def bench(tmp_path: Path, report: str, *args: str, timeout: int
          ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run ``bench.run *args --out tmp_path/out``: it must succeed and write one JSON
    report matching the glob *report*; the run and that report."""
    cp = subprocess.run([sys.executable, "-m", "bench.run", *args, "--out", str(tmp_path / "out")],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert cp.returncode == 0, cp.stderr[-4000:]
    [path] = (tmp_path / "out").glob(report)
    return cp, json.loads(path.read_text())


@pytest.mark.libvirt
@pytest.mark.slow
def test_bench_runs_at_64m(libvirt_conn: Any, tmp_path: Path) -> None:
    need_tool("nbdcopy", "libnbd-bin")
    cp, doc = bench(tmp_path, "bench-64M-*.json", "--size", "64M", "--sweep", "256K",
                    "--no-peer", "--warm", "--encrypted", "--workdir", str(tmp_path / "work"),
                    timeout=120)
    assert "| backupkit full backup |" in cp.stdout
    names = {r["name"] for r in doc["rows"]}
    for want in ("nbdcopy export -> file (copy limit)", "backupkit full backup",
                 "incremental after 1% rewritten", "incremental after 10% rewritten",
                 "no-change incremental (CLI, warm cache)", "restore qcow2", "restore raw",
                 "verify --data", "encrypted full backup", "encrypted restore raw"):
        assert want in names
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["restore qcow2"]["extra"]["identical_to_convert"] is True
    assert rows["restore raw"]["extra"]["identical_to_convert"] is True
    assert rows["verify --data"]["extra"]["ok"] is True
    assert rows["incremental after 1% rewritten"]["extra"]["read_amplification"] < 3
    assert doc["peak_rss_mib"]["backup full"] > 0
    for label in ("backup full", "restore raw"):  # a Python start alone takes CPU
        assert doc["cpu"][label]["cpu_seconds"] > 0, label
    assert {"nbdcopy", "qemu-img convert -O raw"} <= doc["cpu"].keys()
    assert "CPU seconds (user + system) / wall seconds" in cp.stdout
    assert doc["chunk_sweep"][0]["chunk_size"] == 256 * 1024
    assert not (tmp_path / "work").exists()  # cleaned up


def test_bench_says_when_libvirt_is_down(tmp_path: Path) -> None:
    env = {**os.environ, "BACKUPKIT_TEST_URI": f"qemu:///system?socket={tmp_path}/no-such-sock"}
    cp = subprocess.run(
        [sys.executable, "-m", "bench.run", "--size", "64M", "--no-peer",
         "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert cp.returncode == 2, cp.stderr[-2000:]
    assert "Traceback" not in cp.stderr
    [line] = [x for x in cp.stderr.splitlines() if x.startswith("bench:")]
    assert "cannot connect to libvirt" in line and "start-libvirtd.sh" in line
    assert not (tmp_path / "out").exists()


def test_bench_scale_runs_at_10k(tmp_path: Path) -> None:
    """--only scale: a generated repository of 10,000 chunks, every command timed."""
    cp, doc = bench(tmp_path, "bench-scale-*.json", "--only", "scale", "--scale", "10K",
                    "--scale-repo", str(tmp_path / "scale"), timeout=300)
    [sc] = doc["scale"]
    assert sc["n"] == 10_000 and sc["info"]["backups"] == 5
    rows = {r["step"]: r for r in sc["rows"]}
    assert set(rows) == {"list", "prune --dry-run", "gc --dry-run", "gc", "verify",
                         "verify --data (one backup)"}
    assert all(r["rc"] == 0 for r in rows.values()), rows
    assert rows["gc"]["chunks_removed"] == sc["info"]["unreferenced"]
    assert "| 10,000 | local | 5 | gc |" in cp.stdout


@pytest.mark.libvirt
@pytest.mark.slow
def test_bench_s3_rows_at_64m(libvirt_conn: Any, s3_url: str, tmp_path: Path) -> None:
    _cp, doc = bench(tmp_path, "bench-64M-*.json", "--size", "64M", "--only", "s3",
                     "--repo", s3_url, "--repeat", "1", "--no-peer", "--warm",
                     "--workdir", str(tmp_path / "work"), timeout=300)
    rows = {r["name"]: r for r in doc["rows"]}
    for want in ("S3 full backup", "S3 incremental after 1% rewritten", "S3 restore raw",
                 "S3 no-change incremental (CLI, warm cache)", "S3 requests per backup"):
        assert want in rows
    req = rows["S3 requests per backup"]["extra"]
    assert req["full"]["PUT"] > 0
    # Per backup of one disk: the commit's check that the index is stored and that the
    # writer lock is still there; none per chunk: the 1 % incremental stores dozens of
    # chunks without asking for them first, and asks no more than the no-change one.
    heads = {k: v.get("HEAD", 0) for k, v in req.items() if isinstance(v, dict)}
    assert heads["incremental 1%"] <= heads["no-change incremental"] <= 2, req
    assert rows["S3 requests per backup"]["ok"] is True


@pytest.mark.libvirt
@pytest.mark.slow
def test_bench_scale_flags_run_small(libvirt_conn: Any, tmp_path: Path) -> None:
    """--sparse and --many at toy sizes: every row is there (no timing assertions)."""
    need_tool("nbdcopy", "libnbd-bin")
    _cp, doc = bench(tmp_path, "bench-huge-*.json", "--sparse", "64G", "--sparse-data", "8M",
                     "--sparse-extents", "4", "--many", "2", "--many-size", "32M",
                     "--many-jobs", "1,2", "--repeat", "1", "--warm",
                     "--workdir", str(tmp_path / "work"), timeout=600)
    rows = {r["name"]: r for r in doc["rows"]}
    for want in ("full backup", "no-change incremental (warm cache)",
                 "no-change incremental vs the same on a 1 GiB disk",
                 "incremental after 1 % of the data rewritten", "restore qcow2", "restore raw",
                 "verify (metadata)", "verify --data"):
        assert f"sparse 64G: {want}" in rows, want
    for fmt in ("qcow2", "raw"):
        extra = rows[f"sparse 64G: restore {fmt}"]["extra"]
        assert extra["identical_to_convert"] is True
        assert extra["on_disk_bytes"] < 64 << 20  # sparse
    assert doc["info"]["sparse"]["64G"]["index_bytes"] < 4096
    assert "2 domains, backup --jobs 2" in rows and "2 domains, one run each (sum)" in rows
    assert not (tmp_path / "work").exists()
