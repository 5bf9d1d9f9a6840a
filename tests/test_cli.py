"""The command line contract: exit codes, one-line errors, one JSON document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backupkit import cli
from tests.conftest import run_cli


@pytest.fixture(autouse=True)
def no_host_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs must not read this host's /etc/backupkit or the caller's env."""
    monkeypatch.setenv("BACKUPKIT_CONFIG", "/dev/null")
    monkeypatch.delenv("BACKUPKIT_REPO", raising=False)


@pytest.mark.parametrize(("argv", "says"), [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["backup"], "backup needs DOMAIN... or --all"),
    (["backup", "a", "--all"], "not both"),
    (["hygiene", "check"], "hygiene check needs DOMAIN or --image PATH"),
])
def test_usage_errors_exit_2(argv: list[str], says: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--json", *argv]) == 2
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["error"]["exit_code"] == 2 and doc["error"]["kind"] == "usage"
    assert says in doc["error"]["message"], doc
    assert len(err.strip().splitlines()) == 1, err


def test_missing_explicit_config_exit_2(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", str(tmp_path / "none.toml"), "list"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_no_repository_configured(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("BACKUPKIT_REPO", raising=False)
    monkeypatch.setenv("BACKUPKIT_CONFIG", "/dev/null")
    assert cli.main(["list"]) == 2
    assert "no repository" in capsys.readouterr().err


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
    assert "unrecognized arguments: --js" in capsys.readouterr().err
