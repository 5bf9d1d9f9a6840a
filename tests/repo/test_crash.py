"""Crash at every point of a backup (SIGKILL in a child): the repository stays consistent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from backupkit.ops.gc import gc
from backupkit.ops.restore import restore
from backupkit.ops.verify import verify
from backupkit.repo import Repository
from tests.repo.helpers import MiB, make_backup, rand, text, write_image

ROOT = Path(__file__).resolve().parents[2]


def run_helper(repo: Repository, image: str, point: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BACKUPKIT_CRASH_AT": point}
    return subprocess.run([sys.executable, "-m", "tests.repo.crash_helper", repo.path, image,
                           "vm1"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("point", ["mid_chunk", "after_chunks", "after_index",
                                   "before_manifest", "after_manifest"])
def test_crash_points(repo: Repository, tmp_path: Path, point: str) -> None:
    img = write_image(tmp_path / "a.raw", 2 * MiB, [(0, rand(300_000, 1))])
    first = make_backup(repo, "vm1", {"vda": img})
    write_image(img, 2 * MiB, [(MiB, text(200_000, 7))])  # new data for the crashed run
    cp = run_helper(repo, img, point)
    assert cp.returncode == -signal.SIGKILL, cp.stderr

    backups = Repository.open(repo.path).list_backups()
    committed = point == "after_manifest"
    assert next(m.id for m in backups) == first.id
    assert len(backups) == (2 if committed else 1)

    # Whatever was committed verifies and restores; the lock died with the process.
    verify(repo, data=True)
    restore(repo, "vm1", "latest", str(tmp_path / "out"), fmt="raw")
    if committed:
        assert Path(tmp_path / "out" / "vda.raw").read_bytes() == Path(img).read_bytes()

    leftovers_before = list(repo.storage.leftovers())
    res = gc(repo)
    assert not list(repo.storage.leftovers())
    if point in ("mid_chunk", "after_chunks"):
        # Chunks are published in batches: before the first index they are tmp files.
        assert res["tmp_files_removed"] == len(leftovers_before) >= 1
    if point in ("after_index", "before_manifest"):
        assert res["chunks_removed"] >= 1  # the crashed run's new chunks
    if point in ("after_index", "before_manifest"):
        assert len(res["incomplete_backups_removed"]) == 1
        assert not list(repo.storage.list("backups/vm1/" + res["incomplete_backups_removed"][0]
                                          .split("/")[1] + "/"))
    if committed:
        assert res["chunks_removed"] == 0 and res["incomplete_backups_removed"] == []
    verify(repo, data=True)
    # And the next backup works normally.
    make_backup(repo, "vm1", {"vda": img})
    assert len(repo.list_backups("vm1")) == len(backups) + 1
