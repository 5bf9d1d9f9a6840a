"""Repository locations: paths, file:// and s3:// URLs; anything else is a usage error."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupkit import errors
from backupkit.repo.storage import LocalStorage
from backupkit.repo.url import open_storage, parse
from tests.conftest import run_cli


@pytest.mark.parametrize(("location", "want"), [
    ("/srv/backup", ("file", "", "/srv/backup")),
    ("relative/dir", ("file", "", "relative/dir")),
    ("./vm:old", ("file", "", "./vm:old")),
    ("file:///srv/backup", ("file", "", "/srv/backup")),
    ("file://localhost/srv/b%20k", ("file", "", "/srv/b k")),
    ("s3://bucket", ("s3", "bucket", "")),
    ("s3://my.bucket-1/a/b/", ("s3", "my.bucket-1", "a/b")),
    ("S3://bucket/p", ("s3", "bucket", "p")),
])
def test_parse(location: str, want: tuple[str, str, str]) -> None:
    assert parse(location) == want


@pytest.mark.parametrize("location", [
    "", "ftp://host/x", "s3:bucket/x", "s3:/bucket", "s3://", "s3://Bucket/x", "s3://b/x",
    "s3://bucket/a//b", "s3://bucket/../x", "s3://bucket/x?versionId=1", "file://host/x",
    "file:relative", "vm:old",
])
def test_bad_locations_are_usage_errors(location: str) -> None:
    with pytest.raises(errors.UsageError):
        parse(location)


def test_local_locations_open_without_io(tmp_path: Path) -> None:
    st = open_storage(f"file://{tmp_path}/not-yet")
    assert isinstance(st, LocalStorage) and st.root == f"{tmp_path}/not-yet"
    assert not (tmp_path / "not-yet").exists()


def test_cli_unknown_scheme_exits_2_and_creates_nothing() -> None:
    for location in ("ftp://host/x", "s3:/bucket/x"):
        cp = run_cli("--repo", location, "init")
        assert cp.returncode == 2, cp.stderr
        assert "invalid repository location" in cp.stderr
        assert len(cp.stderr.strip().splitlines()) == 1
    assert not Path("s3:").exists() and not Path("ftp:").exists()  # in the current directory
