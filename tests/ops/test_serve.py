"""serve: any backup as a read-only NBD export (real nbdkit, qemu-img, nbdinfo)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupkit import errors
from backupkit.ops import serve
from backupkit.repo import Repository
from backupkit.repo.repository import chunk_key
from tests.conftest import run_cli
from tests.repo.helpers import CHUNK, KiB, MiB, at, make_backup, rand, text, write_image

pytestmark = pytest.mark.skipif(
    not os.environ.get("CI") and not os.path.exists(
        "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-python-plugin.so"),
    reason="nbdkit-plugin-python is not installed (scripts/setup.sh)")

SIZE = 8 * MiB + 12 * KiB


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)


@pytest.fixture
def points(repo: Repository, tmp_path: Path) -> list[tuple[str, Path]]:
    """A full and two incrementals (pieces, holes made of data): (id, reference image)."""
    img = tmp_path / "vda.raw"
    write_image(img, SIZE, [(0, rand(300 * KiB, 1)), (3 * MiB + 5, text(700 * KiB)),
                            (8 * MiB, rand(12 * KiB, 2))])
    out = []
    parent = None
    for i, writes in enumerate([[], [(100 * KiB, rand(8 * KiB, 4)), (6 * MiB, b"hello")],
                                [(0, bytes(300 * KiB)), (7 * MiB, rand(MiB, 6))]]):
        write_image(img, SIZE, writes)
        parent = make_backup(repo, "vm1", {"vda": img, "vdb": img}, now=at(2026, 1, 1 + i),
                             parent=parent)
        ref = tmp_path / f"ref-{i}.raw"
        shutil.copyfile(img, ref)
        out.append((parent.id, ref))
    return out


@pytest.fixture
def served(repo: Repository, tmp_path: Path) -> Iterator[list[serve.Server]]:
    servers: list[serve.Server] = []
    yield servers
    for s in servers:
        s.stop()


def compare(ref: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), url],
                          capture_output=True, text=True, check=False)


def test_every_backup_serves_equal_to_its_point_in_time(
        repo: Repository, points: list[tuple[str, Path]], tmp_path: Path,
        served: list[serve.Server]) -> None:
    for n, (bid, ref) in enumerate(points):
        sock = tmp_path / f"s{n}.sock"
        srv, res = serve.start(repo, str(tmp_path / "repo"), None, "vm1", bid, str(sock),
                               log_path=str(tmp_path / f"s{n}.log"), cache_bytes=4 * CHUNK)
        served.append(srv)
        assert res["id"] == bid and res["disk"] == "vda" and res["virtual_size"] == SIZE
        assert (os.stat(sock).st_mode & 0o777) == 0o600
        cp = compare(ref, res["url"])
        assert cp.returncode == 0, cp.stdout + cp.stderr
        # every disk under its own export name too
        cp = compare(ref, serve.nbd_url(str(sock), "vdb"))
        assert cp.returncode == 0, cp.stdout + cp.stderr
    # holes are reported as holes (qemu-img map over NBD sees base:allocation)
    m = json.loads(subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "raw", served[0].socket and
         serve.nbd_url(served[0].socket)], capture_output=True, text=True, check=True).stdout)
    assert any(e["zero"] for e in m) and any(e["data"] for e in m)


def test_damaged_chunk_is_eio_for_that_request_only(
        repo: Repository, points: list[tuple[str, Path]], tmp_path: Path,
        served: list[serve.Server]) -> None:
    bid, _ref = points[0]
    index = repo.load_index(repo.get_manifest("vm1", bid), "vda")
    digest = index[1]  # slot 1: 64..128 KiB, random data
    assert digest is not None
    path = tmp_path / "repo" / chunk_key(digest)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    log = tmp_path / "s.log"
    # detached (nbdkit's daemon): its log still gets the damage
    srv, res = serve.start(repo, str(tmp_path / "repo"), None, "vm1", bid,
                           str(tmp_path / "s.sock"), log_path=str(log), detach=True)
    served.append(srv)
    url = res["url"]
    good = subprocess.run(["nbdcopy", "--request-size=65536", url, "-"],
                          capture_output=True, check=False)
    assert good.returncode != 0  # the whole disk includes the damaged slot
    # A read of slot 0 and of slot 2 still works; slot 1 is an I/O error, not data.
    for off, ok in ((0, True), (2 * CHUNK, True), (CHUNK, False)):
        cp = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", f"read {off} {CHUNK}", url],
                            capture_output=True, text=True, check=False)
        out = cp.stdout + cp.stderr
        assert ("Input/output error" not in out) is ok, out
    assert digest.hex() in log.read_text()
    assert "EIO" in log.read_text()


def test_cli_background_prints_pid_and_serves(repo: Repository,
                                              points: list[tuple[str, Path]],
                                              tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"
    cp = run_cli("--repo", str(tmp_path / "repo"), "--json", "serve", "vm1", "latest",
                 "--socket", str(sock), "--disk", "vdb", "--background", check=True)
    doc = json.loads(cp.stdout)
    try:
        assert doc["id"] == points[-1][0] and doc["disk"] == "vdb" and doc["pid"] > 0
        assert compare(points[-1][1], doc["url"]).returncode == 0
        # gc runs while a backup is served (it never removes a committed backup's
        # chunks), and the export still reads equal afterwards.
        gc = run_cli("--repo", str(tmp_path / "repo"), "gc")
        assert gc.returncode == 0, gc.stderr
        assert compare(points[-1][1], doc["url"]).returncode == 0
    finally:
        serve.stop_pid(doc["pid"])
        serve.remove_socket(str(sock))
    assert not sock.exists()


def test_cli_foreground_serves_until_sigterm(repo: Repository,
                                             points: list[tuple[str, Path]],
                                             tmp_path: Path) -> None:
    sock = tmp_path / "f.sock"
    env = {**os.environ, "BACKUPKIT_CONFIG": "/dev/null"}
    p = subprocess.Popen([sys.executable, "-m", "backupkit", "--repo", str(tmp_path / "repo"),
                          "--json", "serve", "vm1", points[0][0], "--socket", str(sock)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while not serve.answers(str(sock)):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        assert compare(points[0][1], serve.nbd_url(str(sock))).returncode == 0
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert json.loads(out)["stopped"] is True
    assert not sock.exists()


def test_cli_refusals(repo: Repository, points: list[tuple[str, Path]],
                      tmp_path: Path) -> None:
    base = ("--repo", str(tmp_path / "repo"), "serve", "vm1")
    sock = str(tmp_path / "x.sock")
    assert run_cli(*base, "nope", "--socket", sock).returncode == errors.EXIT_NOT_FOUND
    assert run_cli(*base, "--disk", "vdz", "--socket", sock).returncode == \
        errors.EXIT_NOT_FOUND
    assert run_cli(*base, "--socket", str(tmp_path / "no/dir/s.sock")).returncode == \
        errors.EXIT_NOT_FOUND
    assert not Path(sock).exists()


def test_serves_from_an_s3_repository(s3_url: str, tmp_path: Path,
                                      served: list[serve.Server]) -> None:
    repo = Repository.init(s3_url, chunk_size=CHUNK)
    img = write_image(tmp_path / "vda.raw", SIZE, [(5, rand(200 * KiB, 7)), (7 * MiB, text(KiB))])
    m = make_backup(repo, "vm1", {"vda": img}, now=at(2026, 2, 1))
    srv, res = serve.start(repo, s3_url, None, "vm1", m.id, str(tmp_path / "s.sock"))
    served.append(srv)
    cp = compare(Path(img), res["url"])
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_serves_an_encrypted_repository(tmp_path: Path) -> None:
    """The plugin unlocks it from the command's --passphrase-file (passed by path)."""
    from backupkit.repo import crypto

    secret = tmp_path / "pass"
    secret.write_text("correct horse battery\n")
    repo = Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK,
                           encryption=crypto.Passphrase(file=str(secret)))
    img = write_image(tmp_path / "vda.raw", SIZE, [(5, rand(200 * KiB, 8)), (7 * MiB, text(KiB))])
    make_backup(repo, "vm1", {"vda": img}, now=at(2026, 2, 2))
    sock = tmp_path / "e.sock"
    cp = run_cli("--repo", str(tmp_path / "repo"), "--passphrase-file", str(secret), "--json",
                 "serve", "vm1", "--socket", str(sock), "--background")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    try:
        res = compare(Path(img), doc["url"])
        assert res.returncode == 0, res.stdout + res.stderr + Path(doc["log"]).read_text()
    finally:
        serve.stop_pid(doc["pid"])
        serve.remove_socket(str(sock))
