"""Run by test_crash.py in a child process: back up an image and SIGKILL ourselves at a point.

    python -m tests.repo.crash_helper REPO IMAGE DOMAIN

BACKUPKIT_CRASH_AT names the point: mid_chunk (a chunk's tmp file written, not
linked), after_chunks, after_index, before_manifest, after_manifest, or nothing.
The hooks are installed here, by wrapping functions, so the product code has none.
"""

from __future__ import annotations

import os
import signal
import sys

from backupkit.repo import Repository, repository
from backupkit.repo.importer import import_raw_images


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    path, image, domain = sys.argv[1:4]
    point = os.environ.get("BACKUPKIT_CRASH_AT", "")
    real_link = os.link

    def link(src: str, dst: str, **kw: object) -> None:
        if dst == "manifest.json" and point == "before_manifest":
            die()
        if dst != "manifest.json" and point == "mid_chunk":
            die()
        real_link(src, dst, **kw)  # type: ignore[arg-type]
        if dst == "manifest.json" and point == "after_manifest":
            die()

    os.link = link  # type: ignore[assignment]
    real_write_index = repository.Repository.write_index
    real_commit = repository.Repository.commit

    def write_index(self: Repository, *a: object) -> dict[str, object]:
        if point == "after_chunks":
            die()
        return real_write_index(self, *a)  # type: ignore[arg-type]

    def commit(self: Repository, *a: object) -> None:
        if point == "after_index":
            die()
        real_commit(self, *a)  # type: ignore[arg-type]

    repository.Repository.write_index = write_index  # type: ignore[method-assign]
    repository.Repository.commit = commit  # type: ignore[method-assign]
    repo = Repository.open(path)
    m = import_raw_images(repo, domain, {"vda": image})
    print(m.id)


if __name__ == "__main__":
    main()
