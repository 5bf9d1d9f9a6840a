"""A domain backed up to S3 through the command line, on the real Ceph gateway of
scripts/start-s3.sh: init, a full and an incremental backup, list, restore of each
(equal to the disks at backup time), verify --data, prune and gc.

The domain is shut off: backups of running domains fail on a stock host until issue
24 (scratch directory permissions for QEMU's user) lands; the repository side, which
is what this tests, is the same for both."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import rig
from tests.conftest import run_cli

pytestmark = pytest.mark.libvirt
MiB = rig.MiB


def cli(cfg: Path, *args: str) -> tuple[int, Any]:
    cp = run_cli("--config", str(cfg), "--json", *args)
    return cp.returncode, json.loads(cp.stdout)


def test_backup_restore_verify_on_s3(make_domain: Callable[..., rig.TestDomain], s3_url: str,
                                     tmp_path: Path) -> None:
    td = make_domain([("qcow2", 16 * MiB)], running=False)
    cfg = tmp_path / "bk.toml"
    cfg.write_text(f'repository = "{s3_url}"\nscratch_dir = "{tmp_path / "s"}"\n'
                   "chunk_size = 262144\n")
    rc, res = cli(cfg, "init")
    assert rc == 0, res
    assert res["repository"] == s3_url

    refs: list[tuple[str, Path]] = []
    for i, (off, length, byte) in enumerate([(0, 3 * MiB, 0x51), (0, 3 * MiB, 0x52)]):
        td.write("vda", off, length, byte)
        rc, res = cli(cfg, "backup", td.name)
        assert rc == 0, res
        assert res["mode"] == ("full" if i == 0 else "incremental"), res
        refs.append((res["id"], td.disks[0].snapshot_reference(tmp_path / f"ref{i}")))

    rc, listing = cli(cfg, "list", td.name)
    assert rc == 0, listing
    assert [b["id"] for b in listing["backups"]] == [bid for bid, _ in refs]

    for bid, ref in refs:
        target = tmp_path / f"restore-{bid}"
        rc, res = cli(cfg, "restore", td.name, bid, "--target", str(target))
        assert rc == 0, res
        rig.compare(ref, target / "vda.qcow2", "qcow2")

    rc, res = cli(cfg, "verify", "--data")
    assert rc == 0, res

    # prune and gc work through the store too; the kept backup still restores.
    rc, res = cli(cfg, "prune", td.name, "--keep-last", "1")
    assert rc == 0, res
    rc, res = cli(cfg, "gc")
    assert rc == 0, res
    assert res["chunks_removed"] > 0, res
    rc, listing = cli(cfg, "list", td.name)
    assert [b["id"] for b in listing["backups"]] == [refs[-1][0]]
    rc, res = cli(cfg, "verify", "--data")
    assert rc == 0, res
    target = tmp_path / "restore-after-gc"
    rc, res = cli(cfg, "restore", td.name, "--target", str(target))
    assert rc == 0, res
    rig.compare(refs[-1][1], target / "vda.qcow2", "qcow2")
