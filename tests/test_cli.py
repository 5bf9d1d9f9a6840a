"""The command line contract: exit codes, one-line errors, one JSON document."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
