"""Damaged, hostile or future metadata: clear one-line errors, documented exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest

from backupkit import errors
from backupkit.repo import Index, Manifest, Repository
from backupkit.repo.repository import CONFIG_MAX, INDEX_MAX, MANIFEST_MAX, chunk_key
from tests.repo.helpers import MiB, make_backup, rand, write_image


def tree_state(root: str) -> dict[str, str]:
    """Every path with its content hash or link target: proves nothing was touched."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if name.endswith(".lock"):
                continue
            if os.path.islink(p):
                out[p] = "link:" + os.readlink(p)
            elif os.path.isfile(p):
                out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            else:
                out[p] = "dir"
    return out


@pytest.fixture
def backed_up(repo: Repository, tmp_path: Path) -> tuple[Repository, Manifest]:
    img = write_image(tmp_path / "a.raw", MiB, [(0, rand(200_000, 1))])
    return repo, make_backup(repo, "vm1", {"vda": img})


def one_line(e: BaseException) -> str:
    s = str(e)
    assert "\n" not in s
    return s


# -- config ---------------------------------------------------------------------

@pytest.mark.parametrize("content, cls, match", [
    (b"", errors.CorruptRepository, "not valid JSON"),
    (b'{"format": "backupkit-repository", "vers', errors.CorruptRepository, "not valid JSON"),
    (b"\xff\xfe garbage", errors.CorruptRepository, "not valid JSON"),
    (b"[1, 2]", errors.CorruptRepository, "not a backupkit repository"),
    (b'{"format": "backupkit-repository", "version": 4, "chunk_size": 65536}',
     errors.UnsupportedFormat, "version 4 is newer"),
    (b'{"format": "backupkit-repository", "version": 2, "chunk_size": 65536, '
     b'"hash": "md5"}', errors.CorruptRepository, "unknown chunk hash 'md5'"),
    (b'{"format": "backupkit-repository", "version": 2, "chunk_size": 65536, '
     b'"hash": ["blake3"]}', errors.CorruptRepository, "unknown chunk hash"),
    # Version 1 predates blake3: a version 1 repository that names it was not written by us.
    (b'{"format": "backupkit-repository", "version": 1, "chunk_size": 65536, '
     b'"hash": "blake3"}', errors.CorruptRepository, "unknown chunk hash 'blake3'"),
    (b'{"format": "backupkit-repository", "version": 1, "chunk_size": 1000}',
     errors.CorruptRepository, "chunk_size"),
    (b'{"format": "backupkit-repository", "version": 1, "chunk_size": 65536, '
     b'"compression": "lz4"}', errors.CorruptRepository, "compression"),
])
def test_bad_config(repo: Repository, content: bytes, cls: type[errors.Error],
                    match: str) -> None:
    Path(repo.path, "config.json").write_bytes(content)
    with pytest.raises(cls, match=match) as e:
        Repository.open(repo.path)
    assert type(e.value) is cls
    assert repo.path in one_line(e.value)


def test_oversized_config(repo: Repository) -> None:
    Path(repo.path, "config.json").write_bytes(b" " * (CONFIG_MAX + 1))
    with pytest.raises(errors.CorruptRepository, match="more than"):
        Repository.open(repo.path)


def test_symlinked_config(repo: Repository, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.json"
    os.rename(Path(repo.path, "config.json"), real)
    os.symlink(real, Path(repo.path, "config.json"))
    with pytest.raises(errors.CorruptRepository, match="symlink"):
        Repository.open(repo.path)


# -- manifests ---------------------------------------------------------------

def manifest_path(repo: Repository, m: Manifest) -> Path:
    return Path(repo.path, "backups", m.domain, m.id, "manifest.json")


@pytest.mark.parametrize("mutate, cls, match", [
    (lambda raw, doc: raw[: len(raw) // 2], errors.CorruptRepository, "not valid JSON"),
    (lambda raw, doc: b"\x00\x01garbage", errors.CorruptRepository, "not valid JSON"),
    (lambda raw, doc: b"[]", errors.CorruptRepository, "not a JSON object"),
    (lambda raw, doc: json.dumps({**doc, "version": 7}).encode(), errors.UnsupportedFormat,
     "version 7 is newer"),
    (lambda raw, doc: json.dumps({**doc, "disks": "vda"}).encode(), errors.CorruptRepository,
     "disks"),
    (lambda raw, doc: json.dumps({**doc, "created": 5}).encode(), errors.CorruptRepository,
     "created"),
    (lambda raw, doc: json.dumps({**doc, "created": "yesterday"}).encode(),
     errors.CorruptRepository, "ISO 8601"),
    (lambda raw, doc: json.dumps({**doc, "quiesced": 1}).encode(), errors.CorruptRepository,
     "quiesced"),
    (lambda raw, doc: json.dumps({**doc, "id": "other"}).encode(), errors.CorruptRepository,
     "names backup"),
    (lambda raw, doc: json.dumps(
        {**doc, "disks": [{**doc["disks"][0], "name": "../../etc"}]}).encode(),
     errors.CorruptRepository, "disk name"),
    (lambda raw, doc: json.dumps(
        {**doc, "disks": [{**doc["disks"][0], "virtual_size": -1}]}).encode(),
     errors.CorruptRepository, "negative"),
])
def test_bad_manifest(backed_up: tuple[Repository, Manifest], mutate, cls, match) -> None:  # type: ignore[no-untyped-def]
    repo, m = backed_up
    p = manifest_path(repo, m)
    raw = p.read_bytes()
    p.write_bytes(mutate(raw, json.loads(raw)))
    before = tree_state(repo.path)
    with pytest.raises(cls, match=match) as e:
        repo.get_manifest("vm1", m.id)
    assert type(e.value) is cls
    assert "manifest.json" in one_line(e.value)
    with pytest.raises(cls):
        repo.list_backups()  # nothing skipped silently
    with pytest.raises(cls):
        repo.get_manifest("vm1", "latest")
    assert tree_state(repo.path) == before


def test_oversized_manifest(backed_up: tuple[Repository, Manifest]) -> None:
    repo, m = backed_up
    with open(manifest_path(repo, m), "ab") as f:
        f.truncate(MANIFEST_MAX + 1)
    with pytest.raises(errors.CorruptRepository, match="more than"):
        repo.get_manifest("vm1", m.id)


# -- indexes -----------------------------------------------------------------

def rewrite_index(repo: Repository, m: Manifest, data: bytes) -> None:
    """Replace the index and fix its checksum in the manifest (a consistent forgery)."""
    Path(repo.path, m.disks[0].index["key"]).write_bytes(data)
    p = manifest_path(repo, m)
    doc = json.loads(p.read_bytes())
    doc["disks"][0]["index"].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    p.write_text(json.dumps(doc))


def test_index_checksum_mismatch(backed_up: tuple[Repository, Manifest]) -> None:
    repo, m = backed_up
    p = Path(repo.path, m.disks[0].index["key"])
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1
    p.write_bytes(raw)
    with pytest.raises(errors.CorruptRepository, match="does not match the checksum"):
        repo.load_index(m, "vda")


@pytest.mark.parametrize("make, cls, match", [
    (lambda raw: raw[:20], errors.CorruptRepository, "truncated"),
    (lambda raw: raw[:-3], errors.CorruptRepository, "payload"),
    (lambda raw: b"NOTINDEX" + raw[8:], errors.CorruptRepository, "magic"),
    (lambda raw: raw[:8] + struct.pack("<I", 9) + raw[12:], errors.UnsupportedFormat,
     "version 9 is newer"),
    (lambda raw: raw[:16] + struct.pack("<QQ", 1 << 50, (1 << 50) // 65536) + raw[32:],
     errors.CorruptRepository, "header says"),  # a decompression bomb is refused
    (lambda raw: raw[:24] + struct.pack("<Q", 3) + raw[32:], errors.CorruptRepository,
     "inconsistent header"),
])
def test_bad_index(backed_up: tuple[Repository, Manifest], make, cls, match) -> None:  # type: ignore[no-untyped-def]
    repo, m = backed_up
    raw = Path(repo.path, m.disks[0].index["key"]).read_bytes()
    rewrite_index(repo, m, make(raw))
    m = repo.get_manifest("vm1", m.id)
    with pytest.raises(cls, match=match) as e:
        repo.load_index(m, "vda")
    assert type(e.value) is cls
    assert "vm1" in one_line(e.value)


def test_oversized_index(backed_up: tuple[Repository, Manifest]) -> None:
    repo, m = backed_up
    with open(Path(repo.path, m.disks[0].index["key"]), "ab") as f:
        f.truncate(INDEX_MAX + 1)
    with pytest.raises(errors.CorruptRepository, match="more than"):
        repo.load_index(m, "vda")


# -- symlinks planted in the repository ---------------------------------------------

def test_symlinked_manifest(backed_up: tuple[Repository, Manifest], tmp_path: Path) -> None:
    repo, m = backed_up
    p = manifest_path(repo, m)
    real = tmp_path / "m.json"
    os.rename(p, real)
    os.symlink(real, p)
    with pytest.raises(errors.CorruptRepository, match="symlink"):
        repo.get_manifest("vm1", m.id)


def test_symlinked_domain_dir(backed_up: tuple[Repository, Manifest], tmp_path: Path) -> None:
    repo, m = backed_up
    d = Path(repo.path, "backups", "vm1")
    os.rename(d, tmp_path / "outside")
    os.symlink(tmp_path / "outside", d)
    with pytest.raises(errors.CorruptRepository, match="symlink"):
        repo.get_manifest("vm1", m.id)
    with pytest.raises(errors.CorruptRepository, match="symlink"):
        repo.list_backups()
    with pytest.raises(errors.CorruptRepository, match="symlink"):  # no write through it
        repo.write_index("vm1", "newid", "vda", Index(0, repo.chunk_size))
    assert not (tmp_path / "outside" / "newid").exists()


def test_symlinked_chunk_and_chunk_dir(backed_up: tuple[Repository, Manifest],
                                       tmp_path: Path) -> None:
    repo, m = backed_up
    digest = repo.load_index(m, "vda")[0]
    assert digest is not None
    p = Path(repo.path, chunk_key(digest))
    real = tmp_path / "chunk"
    os.rename(p, real)
    os.symlink(real, p)
    with pytest.raises(errors.CorruptRepository, match="symlink"):
        repo.get_chunk(digest)
    with pytest.raises(errors.CorruptRepository, match="symlink"):
        repo.put_chunk(rand(200_000, 1)[:repo.chunk_size])
    os.unlink(p)
    os.rename(real, p)
    cdir = p.parent
    os.rename(cdir, tmp_path / "cdir")
    os.symlink(tmp_path / "cdir", cdir)
    with pytest.raises(errors.CorruptRepository, match="symlink"):
        repo.get_chunk(digest)
