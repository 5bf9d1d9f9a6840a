"""A domain's life in the repository, on a real running domain, through the CLI:
several backups with different writes, each restored on its own (qcow2 and raw),
prune by policy, gc, and verify --data finding a flipped byte."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backupkit.repo import Repository
from backupkit.repo.repository import chunk_key
from tests import rig
from tests.conftest import run_cli

pytestmark = pytest.mark.libvirt
MiB = rig.MiB


def cli(cfg: Path, *args: str) -> Any:
    cp = run_cli("--config", str(cfg), "--json", *args)
    doc = json.loads(cp.stdout)
    return cp.returncode, doc


def test_backups_restore_prune_gc_verify(make_domain: Callable[..., rig.TestDomain],
                                         repo_path: Path, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 32 * MiB), ("raw", 8 * MiB)])
    cfg = tmp_path / "bk.toml"
    cfg.write_text(f'repository = "{repo_path}"\nscratch_dir = "{tmp_path / "s"}"\n'
                   "chunk_size = 262144\n")
    assert cli(cfg, "init")[0] == 0

    refs: list[tuple[str, dict[str, Path]]] = []
    writes = [(0, 2 * MiB, 0x10), (1 * MiB, 64 * 1024, 0x20), (20 * MiB, 3 * MiB, 0x30),
              (5 * MiB, 1 * MiB, 0x40)]
    for i, (off, length, byte) in enumerate(writes):
        td.write("vda", 30 * MiB, 512 * 1024, byte + 1)  # content owned by this backup alone
        td.write("vda", off, length, byte)
        td.write("vdb", (i * MiB) % (8 * MiB), 4096, byte)
        rc, res = cli(cfg, "backup", td.name)
        assert rc == 0, res
        assert res["mode"] == ("full" if i == 0 else "incremental")
        refs.append((res["id"], {d.target: d.snapshot_reference(tmp_path / f"r{i}{d.target}")
                                 for d in td.disks}))

    # Every backup restores on its own, equal to the disks at its start.
    for bid, ref in refs:
        for fmt in ("qcow2", "raw"):
            target = tmp_path / f"restore-{bid}-{fmt}"
            rc, res = cli(cfg, "restore", td.name, bid, "--target", str(target),
                          "--format", fmt)
            assert rc == 0, res
            for disk, path in ref.items():
                rig.compare(path, target / f"{disk}.{fmt}", fmt)

    # Prune keeps exactly the two newest; gc frees what only the others used.
    rc, plan = cli(cfg, "prune", td.name, "--keep-last", "2", "--dry-run")
    assert rc == 0, plan
    rc, res = cli(cfg, "prune", td.name, "--keep-last", "2")
    assert rc == 0, res
    rc, listing = cli(cfg, "list", td.name)
    assert [b["id"] for b in listing["backups"]] == [bid for bid, _ in refs[2:]]
    rc, res = cli(cfg, "gc")
    assert rc == 0, res
    assert res["chunks_removed"] > 0
    rc, res = cli(cfg, "verify", "--data")
    assert rc == 0, res
    for bid, ref in refs[2:]:
        target = tmp_path / f"after-gc-{bid}"
        assert cli(cfg, "restore", td.name, bid, "--target", str(target))[0] == 0
        for disk, path in ref.items():
            rig.compare(path, target / f"{disk}.qcow2", "qcow2")

    # One flipped byte in a chunk only the newest backup uses: exit 5 naming it alone.
    repo = Repository.open(str(repo_path))
    newest = repo.get_manifest(td.name, refs[3][0])
    older = repo.get_manifest(td.name, refs[2][0])
    only_newest = (repo.load_index(newest, "vda").digests()
                   - repo.load_index(older, "vda").digests())
    victim = repo_path / chunk_key(sorted(d for d in only_newest if d)[0])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    rc, doc = cli(cfg, "verify", "--data")
    assert rc == 5
    damaged = doc["error"]["report"]["damaged"]
    assert [(d["domain"], d["id"]) for d in damaged] == [(td.name, refs[3][0])]
    assert damaged[0]["disks"][0]["name"] == "vda"
