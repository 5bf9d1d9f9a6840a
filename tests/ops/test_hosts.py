"""Several hosts, one repository, on real running domains through the command line, against
a local repository (and the move on the real S3 gateway too: the repository's XML and
chunks read back from it; hosts played by $BACKUPKIT_HOST):

- a domain that moves to another host (its definition lost, defined again there from the
  XML in the repository, its qcow2 bitmaps with it) continues incremental from the first
  host's backup;
- two different domains of one name (two UUIDs) from two hosts never mix: the second
  host's first backup is full and says why, list names both hosts, 'latest' is each
  host's own, and prune keeps retention per domain.

The pure rules are unit-tested in tests/repo/test_chains.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests import rig
from tests.conftest import run_cli

pytestmark = pytest.mark.libvirt
MiB = rig.MiB


@pytest.fixture
def repo_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A local repository, or the S3 gateway's for a test parametrized with both."""
    if getattr(request, "param", "local") == "local":
        return str(tmp_path / "repo")
    return str(request.getfixturevalue("s3_url"))


def setup_cfg(tmp_path: Path, repo_url: str) -> Path:
    cfg = tmp_path / "bk.toml"
    cfg.write_text(f'repository = "{repo_url}"\nscratch_dir = "{tmp_path / "s"}"\n'
                   "chunk_size = 262144\n")
    cli(cfg, "hostA", "init", ok=True)
    return cfg


def cli(cfg: Path, host: str, *args: str, ok: bool = False) -> Any:
    cp = run_cli("--config", str(cfg), "--json", *args, env={"BACKUPKIT_HOST": host})
    doc = json.loads(cp.stdout)
    if ok:
        assert cp.returncode == 0, (args, doc, cp.stderr)
        return doc
    return cp.returncode, doc


def restore_equals(cfg: Path, host: str, name: str, backup: str, ref: Path, tmp: Path,
                   *extra: str) -> str:
    target = tmp / f"restore-{host}-{backup}-{len(list(tmp.iterdir()))}"
    doc = cli(cfg, host, "restore", name, backup, "--target", str(target), *extra, ok=True)
    rig.compare(ref, target / "vda.qcow2", "qcow2")
    return str(doc)


def undefine(td: rig.TestDomain) -> None:
    """Destroy (QEMU stores its persistent bitmaps in the images) and undefine, dropping
    libvirt's checkpoint metadata; the images stay."""
    td.stop()
    td.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)


@pytest.mark.parametrize("repo_url", ["local", "s3"], indirect=True)
def test_domain_moved_to_another_host_continues_incremental(
        make_domain: Callable[..., rig.TestDomain], repo_url: str, tmp_path: Path) -> None:
    td = make_domain([("qcow2", 32 * MiB)])
    cfg = setup_cfg(tmp_path, repo_url)
    refs: dict[str, Path] = {}
    ids = []
    for i, byte in enumerate((0x11, 0x12)):
        td.write("vda", i * MiB, 2 * MiB, byte)
        res = cli(cfg, "hostA", "backup", td.name, ok=True)
        assert res["mode"] == ("full" if i == 0 else "incremental"), res
        assert res["host"] == "hostA" and res["domain_uuid"] == td.dom.UUIDString()
        refs[res["id"]] = td.disks[0].snapshot_reference(tmp_path / f"ref-a{i}")
        ids.append(res["id"])

    # hostA is lost: the domain is defined on hostB from the XML in the repository (same
    # UUID), with its images and their bitmaps, but none of libvirt's checkpoint metadata.
    uuid = td.dom.UUIDString()
    xml = cli(cfg, "hostB", "show", td.name, "latest", ok=True)["domain_xml"]
    undefine(td)
    td.conn.defineXML(xml)
    assert td.dom.UUIDString() == uuid and td.dom.listAllCheckpoints(0) == []
    assert any(n.startswith("backupkit.") for n in rig.bitmaps(td.disks[0].path))
    td.start()

    td.write("vda", 8 * MiB, 1 * MiB, 0x13)
    res = cli(cfg, "hostB", "backup", td.name, ok=True)
    assert res["mode"] == "incremental", res["reason"]
    assert res["parent_id"] == ids[-1] and res["host"] == "hostB"
    assert any("redefined from the repository" in w for w in res.get("warnings", [])), res
    assert res["read_bytes"] < 4 * MiB, res  # only what changed since hostA's backup
    refs[res["id"]] = td.disks[0].snapshot_reference(tmp_path / "ref-b")
    ids.append(res["id"])

    listing = cli(cfg, "hostB", "list", td.name, ok=True)["backups"]
    assert [(b["id"], b["host"]) for b in listing] == [
        (ids[0], "hostA"), (ids[1], "hostA"), (ids[2], "hostB")]
    assert {b["domain_uuid"] for b in listing} == {uuid}
    assert cli(cfg, "hostB", "show", td.name, ids[2], ok=True)["host"] == "hostB"
    for bid, ref in refs.items():
        restore_equals(cfg, "hostB", td.name, bid, ref, tmp_path)
    # One chain: 'latest' is its newest whichever host asks.
    restore_equals(cfg, "hostA", td.name, "latest", refs[ids[2]], tmp_path)


def test_same_name_different_domains_on_two_hosts(
        make_domain: Callable[..., rig.TestDomain], repo_url: str, tmp_path: Path) -> None:
    first = make_domain([("qcow2", 32 * MiB)])
    name = first.name
    cfg = setup_cfg(tmp_path, repo_url)
    refs: dict[str, Path] = {}
    a_ids = []
    for i, byte in enumerate((0x21, 0x22)):
        first.write("vda", i * MiB, 2 * MiB, byte)
        res = cli(cfg, "hostA", "backup", name, ok=True)
        refs[res["id"]] = first.disks[0].snapshot_reference(tmp_path / f"ref-a{i}")
        a_ids.append(res["id"])
    uuid_a = first.dom.UUIDString()

    # hostB's "web" is another domain under the same name: new images, a new UUID (its
    # images even hold no bitmap of the repository's checkpoints).
    undefine(first)
    other = make_domain([("qcow2", 32 * MiB)], running=False)
    other.dom.undefine()
    first.conn.defineXML(rig.domain_xml(name, other.disks))
    second = rig.TestDomain(first.conn, name, other.workdir, other.disks)
    uuid_b = second.dom.UUIDString()
    assert uuid_b != uuid_a
    second.start()

    b_ids = []
    for i, byte in enumerate((0x31, 0x32)):
        second.write("vda", 4 * MiB + i * MiB, 2 * MiB, byte)
        res = cli(cfg, "hostB", "backup", name, ok=True)
        if i == 0:
            assert res["mode"] == "full", res
            assert "another domain" in res["reason"] and "hostA" in res["reason"], res
            assert uuid_b in res["reason"], res
        else:
            assert res["mode"] == "incremental" and res["parent_id"] == b_ids[0], res
        assert res["domain_uuid"] == uuid_b
        refs[res["id"]] = second.disks[0].snapshot_reference(tmp_path / f"ref-b{i}")
        b_ids.append(res["id"])

    listing = cli(cfg, "hostA", "list", name, ok=True)["backups"]
    assert [(b["host"], b["domain_uuid"]) for b in listing] == [
        ("hostA", uuid_a), ("hostA", uuid_a), ("hostB", uuid_b), ("hostB", uuid_b)]
    text = run_cli("--config", str(cfg), "list", name).stdout
    assert "hostA" in text and "hostB" in text

    # 'latest' is the domain defined here under that name (hostB's), whoever asks ...
    restore_equals(cfg, "hostB", name, "latest", refs[b_ids[-1]], tmp_path)
    restore_equals(cfg, "hostA", name, "latest", refs[b_ids[-1]], tmp_path)
    # ... or --host's; on a host with no such domain and no backup of it: exit 2, one line.
    restore_equals(cfg, "hostB", name, "latest", refs[a_ids[-1]], tmp_path, "--host", "hostA")
    elsewhere = ("--connect", "test:///default")  # a libvirt without that domain
    cp = run_cli("--config", str(cfg), *elsewhere, "show", name, "latest",
                 env={"BACKUPKIT_HOST": "hostC"})
    assert cp.returncode == 2, cp.stderr
    assert "hostA, hostB" in cp.stderr and "--host" in cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1, cp.stderr
    assert cli(cfg, "hostA", *elsewhere, "show", name, "latest", ok=True)["id"] == a_ids[-1]

    # Retention per domain: hostB's newer backups never push out hostA's.
    res = cli(cfg, "hostB", "prune", name, "--keep-last", "1", ok=True)
    assert (res["kept"], res["removed"]) == (2, 2), res
    listing = cli(cfg, "hostB", "list", name, ok=True)["backups"]
    assert [b["id"] for b in listing] == [a_ids[-1], b_ids[-1]]
    cli(cfg, "hostB", "gc", ok=True)
    cli(cfg, "hostB", "verify", "--data", ok=True)
    restore_equals(cfg, "hostB", name, a_ids[-1], refs[a_ids[-1]], tmp_path)
    restore_equals(cfg, "hostB", name, "latest", refs[b_ids[-1]], tmp_path)


def test_hygiene_keeps_the_checkpoint_of_its_own_domain(
        make_domain: Callable[..., rig.TestDomain], tmp_path: Path) -> None:
    """hygiene check --fix keeps the checkpoint of this domain's latest backup even when
    another host's domain of the same name backed up later (it used to take that one for
    'the latest backup' and delete ours, costing the next incremental)."""
    import uuid

    from backupkit.repo import Repository
    from backupkit.repo.importer import import_raw_images

    td = make_domain([("qcow2", 16 * MiB)])
    cfg = setup_cfg(tmp_path, str(tmp_path / "repo"))
    td.write("vda", 0, 1 * MiB, 0x41)
    mine = cli(cfg, "hostA", "backup", td.name, ok=True)
    img = tmp_path / "other.raw"
    img.write_bytes(b"\x42" * MiB)
    import_raw_images(Repository.open(str(tmp_path / "repo")), td.name, {"vda": str(img)},
                      host="hostB", domain_uuid=str(uuid.uuid4()))
    res = cli(cfg, "hostA", "hygiene", "check", td.name, "--fix", ok=True)
    assert mine["checkpoint"] in [c.getName() for c in td.dom.listAllCheckpoints(0)], res
    td.write("vda", 2 * MiB, 1 * MiB, 0x43)
    res = cli(cfg, "hostA", "backup", td.name, ok=True)
    assert res["mode"] == "incremental" and res["parent_id"] == mine["id"], res
