"""An encrypted repository with a real domain, through the command line, on the local
store and on S3 (the Ceph gateway of scripts/start-s3.sh): init --encryption with a
master key made by openssl, full and incremental backups, restores equal to the disk,
verify --data, prune, gc; a wrong passphrase is exit 2 with nothing written (no object,
no checkpoint); then the key-loss drill: every key file deleted, access restored from
the paper key and, deleted again, from the master key, each followed by a restore."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backupkit.repo import Repository
from tests import rig
from tests.conftest import run_cli

pytestmark = pytest.mark.libvirt
MiB = rig.MiB


def objects(location: str) -> set[str]:
    return {o.key for o in Repository.open(location).storage.list("")
            if not o.key.startswith("locks/")}


def drop_key_files(location: str) -> None:
    repo = Repository.open(location)
    for key in repo.key_files():
        repo.storage.delete(key)
    repo.storage.flush()
    assert not repo.key_files()


@pytest.mark.parametrize("store", ["local", "s3"])
def test_encrypted_round_trip_and_key_loss_drill(
        store: str, make_domain: Callable[..., rig.TestDomain], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    location = (request.getfixturevalue("s3_url") if store == "s3"
                else str(tmp_path / "repo"))
    td = make_domain([("qcow2", 16 * MiB)], running=False)
    (tmp_path / "pass").write_text("a long passphrase\n")
    (tmp_path / "wrong").write_text("not it\n")
    cfg = tmp_path / "bk.toml"
    cfg.write_text(f'repository = "{location}"\nscratch_dir = "{tmp_path / "s"}"\n'
                   f'chunk_size = 262144\npassphrase_file = "{tmp_path / "pass"}"\n')

    def cli(*args: str) -> tuple[int, Any]:
        cp = run_cli("--config", str(cfg), "--json", *args)
        return cp.returncode, json.loads(cp.stdout)

    master, pub = tmp_path / "master.pem", tmp_path / "master.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "X25519", "-out", str(master)],
                   check=True)
    subprocess.run(["openssl", "pkey", "-in", str(master), "-pubout", "-out", str(pub)],
                   check=True)
    rc, res = cli("init", "--encryption", "--master-pubkey", str(pub))
    assert rc == 0 and res["encrypted"] is True, res

    refs: list[tuple[str, Path]] = []
    for i, (off, length, byte) in enumerate([(0, 3 * MiB, 0x61), (0, 3 * MiB, 0x62)]):
        td.write("vda", off, length, byte)
        rc, res = cli("backup", td.name)
        assert rc == 0, res
        assert res["mode"] == ("full" if i == 0 else "incremental"), res
        refs.append((res["id"], td.disks[0].snapshot_reference(tmp_path / f"ref{i}")))

    def restored(bid: str, name: str) -> None:
        target = tmp_path / name
        rc, res = cli("restore", td.name, bid, "--target", str(target))
        assert rc == 0, res
        ref = dict(refs)[bid]
        rig.compare(ref, target / "vda.qcow2", "qcow2")

    for bid, _ in refs:
        restored(bid, f"restore-{bid}")
    rc, res = cli("verify", "--data")
    assert rc == 0, res
    # hygiene check reads the latest manifest with the config's passphrase_file too.
    rc, res = cli("hygiene", "check", td.name)
    assert rc == 0, res

    # A wrong passphrase: exit 2, one line, no object and no checkpoint made.
    before = objects(location)
    checkpoints = [c.getName() for c in td.dom.listAllCheckpoints(0)]
    td.write("vda", 0, 4096, 0x63)
    cp = run_cli("--config", str(cfg), "--passphrase-file", str(tmp_path / "wrong"),
                 "--json", "backup", td.name)
    assert cp.returncode == 2, cp.stderr
    assert json.loads(cp.stdout)["error"]["kind"] == "wrong_key"
    assert objects(location) == before
    assert [c.getName() for c in td.dom.listAllCheckpoints(0)] == checkpoints

    rc, res = cli("prune", td.name, "--keep-last", "1")
    assert rc == 0, res
    rc, res = cli("gc")
    assert rc == 0 and res["chunks_removed"] > 0, res
    rc, res = cli("verify", "--data")
    assert rc == 0, res
    latest = refs[-1][0]
    restored(latest, "after-gc")

    # Key-loss drill 1: the paper key.
    paper = tmp_path / "paper.txt"
    rc, res = cli("key", "export", "--paper", str(paper))
    assert rc == 0, res
    drop_key_files(location)
    rc, res = cli("list")
    assert rc == 2 and res["error"]["kind"] == "key_required", res
    rc, res = cli("key", "import", "--paper", str(paper))
    assert rc == 0, res
    restored(latest, "after-paper")

    # Key-loss drill 2: the master key.
    drop_key_files(location)
    rc, res = cli("key", "recover", "--master-key", str(master))
    assert rc == 0, res
    restored(latest, "after-master")
