"""A full filesystem: NoSpace with a clear message, no tmp file left by the failed write."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupkit import errors
from backupkit.repo import Index, Repository
from tests.repo.helpers import CHUNK, rand


@pytest.mark.root
def test_no_space(small_fs: Path) -> None:
    repo = Repository.init(str(small_fs / "repo"), chunk_size=CHUNK)
    with pytest.raises(errors.NoSpace) as e:
        for i in range(64):  # 4 MiB of incompressible chunks into 1 MiB
            repo.put_chunk(rand(CHUNK, i))
    assert e.value.exit_code == 1
    assert "no space left" in str(e.value) and str(small_fs) in str(e.value)
    # The chunks written before are waiting to be published; the failed one left nothing.
    pending = len(repo.storage._pending)  # type: ignore[attr-defined]
    assert len(list(repo.storage.leftovers())) == pending == i
    with pytest.raises(errors.NoSpace):
        repo.write_index("vm1", "id1", "vda", Index(CHUNK * 200_000, CHUNK,
                                                    [rand(32, 1)] * 200_000))
    assert not list(repo.storage.leftovers("backups/"))
