from __future__ import annotations

from pathlib import Path

import pytest

from backupkit.repo import Repository
from tests.repo.helpers import CHUNK


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)
