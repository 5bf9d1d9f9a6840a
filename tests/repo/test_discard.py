"""A failed backup's unpublished chunks are dropped, never published later."""

from __future__ import annotations

from pathlib import Path

from backupkit.repo import Repository
from backupkit.repo.repository import chunk_key


def test_discard_pending_drops_unpublished_chunks(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), chunk_size=1 << 16)
    digest, stored = repo.put_chunk(b"x" * 4096)
    assert digest is not None and stored > 0
    repo.discard_pending()
    repo.storage.flush()  # nothing left to publish: must not fail
    assert not (tmp_path / "r" / chunk_key(digest)).exists()
    assert not list((tmp_path / "r" / "chunks").rglob(".tmp-*"))
    # The same content stored again is written again, and published.
    digest2, stored2 = repo.put_chunk(b"x" * 4096)
    assert (digest2, stored2 > 0) == (digest, True)
    repo.storage.flush()
    assert repo.get_chunk(digest) == b"x" * 4096
