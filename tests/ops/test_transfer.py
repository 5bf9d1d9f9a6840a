"""backupkit copy through the command line: a plain local repository into an encrypted
one (local, and S3 on the real gateway), only missing chunks sent, restores equal to
the images, a second copy skipping everything, --latest, encrypted -> plain, and a
damaged source chunk stopping the copy of that backup with nothing of it visible."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from backupkit.repo import Repository, crypto
from backupkit.repo.repository import chunk_key
from tests.conftest import run_cli
from tests.repo.helpers import CHUNK, at, make_backup, rand, text, write_image


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, Any]:
    cp = run_cli("--json", *args, env={"BACKUPKIT_PASSPHRASE": "copy test", **(env or {})})
    return cp.returncode, json.loads(cp.stdout)


def source(tmp_path: Path) -> tuple[Repository, dict[tuple[str, str], bytes]]:
    src = Repository.init(str(tmp_path / "src"), chunk_size=CHUNK)
    images: dict[tuple[str, str], bytes] = {}
    for d, seed in (("vm-a", 1), ("vm-b", 2)):
        img = tmp_path / f"{d}.raw"
        write_image(img, 6 * CHUNK, [(0, rand(2 * CHUNK, seed)), (3 * CHUNK, text(CHUNK))])
        m = make_backup(src, d, {"vda": img}, now=at(2026, 12, 1))
        images[(d, m.id)] = img.read_bytes()
        write_image(img, 6 * CHUNK, [(CHUNK, rand(CHUNK // 2, seed + 10))])
        m = make_backup(src, d, {"vda": img}, now=at(2026, 12, 2), parent=m)
        images[(d, m.id)] = img.read_bytes()
    return src, images


def restores(repo: str, images: dict[tuple[str, str], bytes], tmp_path: Path) -> None:
    for (d, bid), data in images.items():
        target = tmp_path / f"r-{d}-{bid}"
        shutil.rmtree(target, ignore_errors=True)
        rc, res = cli("--repo", repo, "restore", d, bid, "--target", str(target),
                      "--format", "raw")
        assert rc == 0, res
        assert (target / "vda.raw").read_bytes() == data


@pytest.mark.parametrize("store", ["local", "s3"])
def test_plain_to_encrypted_and_back(store: str, tmp_path: Path,
                                     request: pytest.FixtureRequest) -> None:
    src, images = source(tmp_path)
    dst = (request.getfixturevalue("s3_url") if store == "s3" else str(tmp_path / "dst"))
    rc, res = cli("--repo", dst, "init", "--encryption", "--chunk-size", str(CHUNK))
    assert rc == 0, res

    rc, res = cli("--repo", src.path, "copy", "--to", dst)
    assert rc == 0, res
    assert sorted((c["domain"], c["id"]) for c in res["copied"]) == sorted(images)
    assert res["chunks_sent"] > 0
    restores(dst, images, tmp_path)
    rc, res = cli("--repo", dst, "verify", "--data")
    assert rc == 0, res

    # Again: every backup is there, nothing is sent.
    rc, res = cli("--repo", src.path, "copy", "--to", dst)
    assert rc == 0, res
    assert res["copied"] == [] and len(res["skipped"]) == 4 and res["chunks_sent"] == 0

    # Encrypted -> plain (another passphrase-less target), the newest of vm-b only.
    plain = tmp_path / "plain"
    Repository.init(str(plain), chunk_size=CHUNK)
    rc, res = cli("--repo", dst, "copy", "--to", str(plain), "vm-b", "--latest", "1")
    assert rc == 0, res
    newest_b = max(bid for d, bid in images if d == "vm-b")
    assert [(c["domain"], c["id"]) for c in res["copied"]] == [("vm-b", newest_b)]
    restores(str(plain), {("vm-b", newest_b): images[("vm-b", newest_b)]}, tmp_path)


def test_damaged_source_chunk_stops_that_backup(tmp_path: Path) -> None:
    src, images = source(tmp_path)
    dst = tmp_path / "dst"
    (tmp_path / "pass").write_text("other\n")
    Repository.init(str(dst), chunk_size=CHUNK,
                    encryption=crypto.Passphrase(file=str(tmp_path / "pass")))
    first_a = min(bid for d, bid in images if d == "vm-a")
    m = src.get_manifest("vm-a", first_a)
    victim = sorted(d for d in src.load_index(m, "vda").digests() if d)[0]
    path = Path(src.path) / chunk_key(victim)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    rc, res = cli("--repo", src.path, "copy", "--to", str(dst), "vm-a",
                  "--to-passphrase-file", str(tmp_path / "pass"))
    assert rc == 5, res
    assert victim.hex() in res["error"]["message"]
    # Nothing of that backup is visible in the target.
    rc, listing = cli("--repo", str(dst), "--passphrase-file", str(tmp_path / "pass"), "list")
    assert rc == 0 and listing["backups"] == [], listing


def test_copy_keeps_hosts_and_latest_counts_per_domain(tmp_path: Path) -> None:
    """Two hosts' different domains named "web": --latest 1 copies the newest of each
    (not only the newer host's), and each copy keeps its host and UUID."""
    from backupkit.repo.importer import import_raw_images

    src = Repository.init(str(tmp_path / "src"), chunk_size=CHUNK)
    img = write_image(tmp_path / "a.raw", 2 * CHUNK, [(0, rand(CHUNK, 7))])
    made = [import_raw_images(src, "web", {"vda": img}, now=at(2026, 12, day), host=host,
                              domain_uuid=uuid)
            for day, host, uuid in ((1, "hostA", "a" * 32), (2, "hostA", "a" * 32),
                                    (3, "hostB", "b" * 32), (4, "hostB", "b" * 32))]
    Repository.init(str(tmp_path / "dst"), chunk_size=CHUNK)
    rc, res = cli("--repo", str(tmp_path / "src"), "copy", "--to", str(tmp_path / "dst"),
                  "--latest", "1")
    assert rc == 0, res
    assert sorted(c["id"] for c in res["copied"]) == [made[1].id, made[3].id]
    got = Repository.open(str(tmp_path / "dst")).list_backups("web")
    assert [(m.id, m.host, m.domain_uuid) for m in got] == [
        (made[1].id, "hostA", "a" * 32), (made[3].id, "hostB", "b" * 32)]
