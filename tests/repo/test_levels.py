"""A backup's compression level (config, per domain) applies to the chunks it writes."""

from __future__ import annotations

import random
from pathlib import Path

from backupkit.repo import Repository


def test_put_chunk_honours_the_level(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), chunk_size=1 << 20)
    assert repo.compression_level == 1  # the default for new repositories
    rnd = random.Random(7)
    words = [bytes(rnd.choices(b"abcdefghij klmnop", k=rnd.randint(2, 9))) for _ in range(500)]
    text = b" ".join(rnd.choice(words) for _ in range(200_000))[: 1 << 20]
    _, fast = repo.put_chunk(text, 1)
    other = bytearray(text)
    other[0] ^= 1  # another chunk, same compressibility
    _, small = repo.put_chunk(bytes(other), 19)
    assert 0 < small < fast
    assert repo.get_chunk(repo.put_chunk(text)[0] or b"") == text  # reads back whatever level
