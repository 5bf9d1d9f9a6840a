"""The command line contract: exit codes, one-line errors, one JSON document."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from backupkit import cli, errors
from tests.conftest import run_cli

# The test's own config: a value no default has, so a test can tell it was read.
TEST_CONFIG = "chunk_size = 65536\n"


@pytest.fixture(autouse=True)
def test_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """In-process runs read this test file, never this host's /etc/backupkit or the
    caller's environment."""
    path = tmp_path / "backupkit-test.toml"
    path.write_text(TEST_CONFIG)
    monkeypatch.setenv("BACKUPKIT_CONFIG", str(path))
    monkeypatch.delenv("BACKUPKIT_REPO", raising=False)
    return str(path)


def error_of(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    """The JSON error document of a --json run, after checking stderr is one line."""
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1, err
    doc = json.loads(out)["error"]
    assert isinstance(doc, dict)
    return doc


def test_the_test_config_is_the_one_read(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--json", "--repo", str(tmp_path / "r"), "init"]) == 0
    assert json.loads(capsys.readouterr().out)["chunk_size"] == 65536


@pytest.mark.parametrize(("argv", "says"), [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["backup"], "backup needs DOMAIN... or --all"),
    (["backup", "a", "--all"], "not both"),
    (["hygiene", "check"], "hygiene check needs DOMAIN or --image PATH"),
])
def test_usage_errors_exit_2(argv: list[str], says: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--json", *argv]) == 2
    doc = error_of(capsys)
    assert doc["exit_code"] == 2 and doc["kind"] == "usage"
    assert says in str(doc["message"]), doc


def test_missing_explicit_config_exit_2(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--json", "--config", str(tmp_path / "none.toml"), "list"]) == 2
    doc = error_of(capsys)
    assert doc["kind"] == "config" and doc["exit_code"] == 2
    assert "no such file" in str(doc["message"]), doc


@pytest.mark.parametrize(("size", "ok"), [
    ("2K", False), ("4K", True), ("64M", True), ("128M", False), ("3M", False)])
def test_chunk_size_range(tmp_path: Path, size: str, ok: bool,
                          capsys: pytest.CaptureFixture[str]) -> None:
    """One range for init, the config and --help: 4K..64M, powers of two."""
    from backupkit import config

    argv = ["--json", "--repo", str(tmp_path / "r"), "init", "--chunk-size", size]
    if ok:
        assert cli.main(argv) == 0
        assert json.loads(capsys.readouterr().out)["chunk_size"] == cli._size(size)
    else:
        assert cli.main(argv) == 2
        doc = error_of(capsys)
        assert doc["kind"] == "usage" and config.CHUNK_SIZE_RANGE in str(doc["message"])
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"chunk_size = {cli._size(size)}\n")
    if ok:
        assert config.load(str(cfg)).chunk_size == cli._size(size)
    else:
        with pytest.raises(errors.ConfigError, match=re.escape(config.CHUNK_SIZE_RANGE)):
            config.load(str(cfg))


def test_no_repository_configured(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("BACKUPKIT_REPO", raising=False)
    assert cli.main(["--json", "list"]) == 2
    doc = error_of(capsys)
    assert doc["kind"] == "usage" and "no repository" in str(doc["message"]), doc


def test_json_stdout_is_one_document_in_a_child_process(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    cp = run_cli("--json", "--repo", str(repo), "init")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["repository"]
    cp = run_cli("--json", "--repo", str(repo), "list")
    assert json.loads(cp.stdout) == {"backups": [], "damaged": []}
    cp = run_cli("--json", "--repo", str(tmp_path / "missing"), "list")
    assert cp.returncode == 4
    assert json.loads(cp.stdout)["error"]["kind"] == "not_found"
    assert "Traceback" not in cp.stderr


def test_no_abbreviated_options(capsys: pytest.CaptureFixture[str]) -> None:
    # "--js" must not silently mean "--json" (or anything else).
    assert cli.main(["--js", "list"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "unrecognized arguments: --js" in err


def test_hosts_in_list_show_and_latest(tmp_path: Path) -> None:
    """Two hosts' different domains named alike (synthetic backups, no libvirt domain of
    that name): list and show name the host, 'latest' is this host's, or exit 2 naming
    the hosts and asking for --host, which picks; an id needs no host."""
    import filecmp
    import uuid
    from datetime import UTC, datetime

    from backupkit.repo import Repository
    from backupkit.repo.importer import import_raw_images
    from tests.repo.helpers import MiB, rand, write_image

    repo = Repository.init(str(tmp_path / "r"), chunk_size=64 * 1024)
    name = f"bk-hosts-{uuid.uuid4().hex[:8]}"
    images, ids = {}, {}
    for n, (host, dom_uuid) in enumerate([("hostA", str(uuid.uuid4())), (None, None),
                                          ("hostB", str(uuid.uuid4())),
                                          ("hostA", None), ("hostB", None)]):
        if dom_uuid is None and host is not None:  # a second backup of the same domain
            dom_uuid = repo.list_backups(name)[-2 if host == "hostA" else -1].domain_uuid
        images[n] = write_image(tmp_path / f"{n}.raw", MiB, [(0, rand(4096, n))])
        m = import_raw_images(repo, name, {"vda": images[n]},
                              now=datetime(2026, 1, 1 + n, tzinfo=UTC), host=host,
                              domain_uuid=dom_uuid)
        ids[n] = m.id

    def cli_(*args: str, host: str = "hostC") -> tuple[int, Any]:
        cp = run_cli("--json", "--repo", str(tmp_path / "r"), *args,
                     env={"BACKUPKIT_HOST": host})
        return cp.returncode, json.loads(cp.stdout)

    rc, doc = cli_("list", name)
    assert rc == 0
    assert [(b["id"], b["host"]) for b in doc["backups"]] == [
        (ids[0], "hostA"), (ids[1], None), (ids[2], "hostB"), (ids[3], "hostA"),
        (ids[4], "hostB")]
    rc, doc = cli_("list", name, "--host", "hostB")
    assert [b["id"] for b in doc["backups"]] == [ids[2], ids[4]]
    text = run_cli("--repo", str(tmp_path / "r"), "list", name).stdout
    assert text.split("\n")[0].split()[:3] == ["DOMAIN", "HOST", "ID"]
    assert f"{name}  -      {ids[1]}" in text and f"{name}  hostB  {ids[4]}" in text

    cp = run_cli("--repo", str(tmp_path / "r"), "show", name, "latest",
                 env={"BACKUPKIT_HOST": "hostC"})
    assert cp.returncode == 2, cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1, cp.stderr
    assert "hostA, hostB" in cp.stderr and "--host" in cp.stderr
    assert cli_("show", name, "latest", host="hostA")[1]["id"] == ids[3]
    assert cli_("show", name, "latest", host="hostB")[1]["id"] == ids[4]
    rc, doc = cli_("show", name, "latest", "--host", "hostA")
    assert (rc, doc["id"], doc["host"]) == (0, ids[3], "hostA")
    assert cli_("show", name, ids[2])[1]["host"] == "hostB"
    rc, doc = cli_("show", name, "latest", "--host", "hostZ")
    assert rc == 4 and "hostZ" in doc["error"]["message"]
    rc, doc = cli_("show", name, "latest", "--host", "bad host")
    assert rc == 2

    out = tmp_path / "out"
    rc, doc = cli_("restore", name, "--host", "hostA", "--target", str(out),
                   "--format", "raw")
    assert rc == 0, doc
    assert filecmp.cmp(out / "vda.raw", images[3], shallow=False)
    rc, doc = cli_("restore", name, "--target", str(tmp_path / "out2"))
    assert rc == 2, doc
    # verify DOMAIN --host: that host's chain, the legacy backup (no host) with hostA's.
    rc, doc = cli_("verify", name, "--host", "hostA")
    assert (rc, doc["backups_checked"]) == (0, 3), doc
    rc, doc = cli_("verify", name)
    assert (rc, doc["backups_checked"]) == (0, 5), doc
