"""LocalStorage batching: sync failures are final, the batch descriptor's lifetime, bulk()."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backupkit import errors
from backupkit.repo import storage as storage_mod
from backupkit.repo.storage import LocalStorage
from tests.conftest import IN_CI


def _store(tmp_path: Path) -> LocalStorage:
    root = tmp_path / "r"
    (root / "chunks").mkdir(parents=True)
    return LocalStorage(str(root))


def _chunk_keys(n: int) -> list[str]:
    """n keys spread over n different chunk directories."""
    return [f"chunks/{i:02x}/{i:02x}{'0' * 62}" for i in range(n)]


def _failing_syncfs(monkeypatch: pytest.MonkeyPatch, err: int, calls: list[int]) -> None:
    """syncfs fails once with err, then succeeds, like errseq: the error is reported once."""
    real = storage_mod._syncfs

    def syncfs(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(err, os.strerror(err))
        real(fd)

    monkeypatch.setattr(storage_mod, "_syncfs", syncfs)


def test_failed_syncfs_is_final_until_discard(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    st = _store(tmp_path)
    calls: list[int] = []
    _failing_syncfs(monkeypatch, errno.EIO, calls)
    k1, k2 = _chunk_keys(2)
    assert st.put_if_absent(k1, b"one", deferred=True)
    with pytest.raises(OSError, match="Input/output"):
        st.flush()
    # A second syncfs would return 0: nothing may be published after the failure.
    with pytest.raises(OSError):
        st.put_if_absent(k2, b"two", deferred=True)
    with pytest.raises(OSError):
        st.flush()
    assert len(calls) == 1
    assert not (Path(st.root) / k1).exists()
    st.discard_pending()
    assert not list(Path(st.root, "chunks").rglob(".tmp-*"))
    assert st.put_if_absent(k2, b"two", deferred=True)
    st.flush()
    assert (Path(st.root) / k2).read_bytes() == b"two"
    assert not (Path(st.root) / k1).exists()


def test_batch_is_published_at_flush_count_pending_objects(tmp_path: Path) -> None:
    st = _store(tmp_path)
    st.flush_count = 3  # small chunks: the pending table, not the bytes, fills first
    keys = _chunk_keys(4)
    for k in keys[:2]:
        assert st.put_if_absent(k, b"x", deferred=True)
    assert not any((Path(st.root) / k).exists() for k in keys[:2])
    assert st.put_if_absent(keys[2], b"x", deferred=True)  # the third one publishes all
    assert all((Path(st.root) / k).read_bytes() == b"x" for k in keys[:3])
    assert st.put_if_absent(keys[3], b"x", deferred=True)
    assert not (Path(st.root) / keys[3]).exists()
    st.flush()
    assert (Path(st.root) / keys[3]).read_bytes() == b"x"


def test_pending_table_is_capped_while_another_writer_publishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = _store(tmp_path)
    st.flush_count = 2
    # Another writer is publishing: the non-blocking publish finds the lock taken.
    monkeypatch.setattr(st, "_flush_if_idle", lambda: None)
    keys = _chunk_keys(4)
    for k in keys[:3]:
        assert st.put_if_absent(k, b"x", deferred=True)
    assert not any((Path(st.root) / k).exists() for k in keys[:3])
    assert st.put_if_absent(keys[3], b"x", deferred=True)  # 2 * flush_count: waits, publishes
    assert all((Path(st.root) / k).read_bytes() == b"x" for k in keys)


def test_full_batch_publish_failure_is_final_for_other_writers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = _store(tmp_path)
    st.flush_bytes = 4  # every deferred write fills the batch
    calls: list[int] = []
    _failing_syncfs(monkeypatch, errno.EIO, calls)
    k1, k2 = _chunk_keys(2)
    with pytest.raises(OSError):
        st.put_if_absent(k1, b"first", deferred=True)  # its publish fails
    with pytest.raises(OSError):
        st.put_if_absent(k2, b"second", deferred=True)  # must not publish k1
    assert not (Path(st.root) / k1).exists()
    assert len(calls) == 1


def test_directory_sync_enospc_is_no_space(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    st = _store(tmp_path)
    keys = _chunk_keys(storage_mod._SYNCFS_DIRS + 1)
    calls: list[int] = []
    real = storage_mod._syncfs

    def syncfs(fd: int) -> None:  # the chunks sync, the directories do not
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(storage_mod, "_syncfs", syncfs)
    for k in keys:
        st.put_if_absent(k, k.encode(), deferred=True)
    with pytest.raises(errors.NoSpace, match="directories"):
        st.flush()
    # One descriptor from before the links to after the directory sync.
    assert calls[0] == calls[1]
    with pytest.raises(errors.NoSpace):
        st.flush()


def test_many_directories_one_syncfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = _store(tmp_path)
    calls: list[int] = []
    real = storage_mod._syncfs
    monkeypatch.setattr(storage_mod, "_syncfs", lambda fd: (calls.append(fd), real(fd))[1])
    fsynced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(storage_mod.os, "fsync", lambda fd: (fsynced.append(fd),
                                                              real_fsync(fd))[1])
    for k in _chunk_keys(storage_mod._SYNCFS_DIRS + 1):
        st.put_if_absent(k, b"x", deferred=True)
    st.flush()
    assert len(calls) == 2 and not fsynced  # chunks, then all directories at once
    assert st._sync_fd is None  # nothing pending: the descriptor is closed
    for k in _chunk_keys(2):
        assert (Path(st.root) / k).read_bytes() == b"x"


def test_batch_descriptor_stays_open_during_a_deferred_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A publish finishing while a write is in flight must not close the write's descriptor."""
    st = _store(tmp_path)
    k1, k2 = _chunk_keys(2)
    st.put_if_absent(k1, b"one", deferred=True)
    real_write_tmp = st._write_tmp
    seen: dict[str, Any] = {}

    def write_tmp(dfd: int, key: str, data: Any, sync: bool = True) -> str:
        seen["before"] = st._sync_fd
        t = threading.Thread(target=st.flush)  # publishes k1: nothing else is pending
        t.start()
        t.join()
        seen["after"] = st._sync_fd
        return real_write_tmp(dfd, key, data, sync)

    monkeypatch.setattr(st, "_write_tmp", write_tmp)
    st.put_if_absent(k2, b"two", deferred=True)
    assert (Path(st.root) / k1).exists()
    assert seen["before"] is not None and seen["after"] == seen["before"]
    monkeypatch.undo()
    st.flush()
    assert (Path(st.root) / k2).read_bytes() == b"two"
    assert st._sync_fd is None


def test_bulk_caches_chunk_directories_and_closes_them(tmp_path: Path) -> None:
    st = _store(tmp_path)
    k1, k2 = _chunk_keys(2)
    st.put_if_absent(k1, b"one")
    assert not st._dir_fds  # outside bulk() nothing stays open
    with st.bulk():
        assert st.get(k1, 10) == b"one"
        assert st.exists(k1)
        assert list(st._dir_fds) == [("chunks", "00")]
        with st.bulk():  # nested: still cached
            st.put_if_absent(k2, b"two")
        assert len(st._dir_fds) == 2
        # Deleting a directory's last object removes the directory and forgets it.
        assert st.delete(k1)
        assert ("chunks", "00") not in st._dir_fds
        assert not (Path(st.root) / "chunks" / "00").exists()
        st.put_if_absent(k1, b"again")  # recreated, not written into the removed one
        assert (Path(st.root) / k1).read_bytes() == b"again"
    assert not st._dir_fds


def test_listing_inside_bulk_does_not_share_a_cached_directory(tmp_path: Path) -> None:
    st = _store(tmp_path)
    keys = [f"chunks/00/00{i:062x}" for i in range(3)]
    for k in keys:
        st.put_if_absent(k, b"x")
    with st.bulk():
        assert st.exists(keys[0])  # caches chunks/00
        assert [o.key for o in st.list("chunks/00/")] == keys
        assert [o.key for o in st.list("chunks/00/")] == keys  # a second listing sees all
        assert st.get(keys[2], 10) == b"x"


def _stored_and_spied(where: Path, size: int, monkeypatch: pytest.MonkeyPatch
                      ) -> tuple[LocalStorage, bytes, list[int]]:
    """A storage at ``where`` holding chunks/ab/k (``size`` random bytes), and the flags
    of every os.open from now on."""
    st = LocalStorage(str(where))
    data = os.urandom(size)
    st.replace("chunks/ab/k", data)
    flags: list[int] = []
    real_open = os.open

    def spy(path: Any, flag: int, *args: Any, **kw: Any) -> int:
        flags.append(flag)
        return real_open(path, flag, *args, **kw)

    monkeypatch.setattr(os, "open", spy)
    return st, data, flags


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 65536, 1024 * 1024 + 1])
def test_get_into_an_aligned_buffer_reads_past_the_cache(tmp_path: Path, size: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    st, data, flags = _stored_and_spied(tmp_path, size, monkeypatch)
    buf = storage_mod.aligned_buffer(1024 * 1024 + 1)
    assert len(buf) == 1024 * 1024 + 4096
    assert bytes(st.get_into("chunks/ab/k", buf)) == data
    # Where tmp_path's filesystem refuses O_DIRECT, the read falls back to the cache.
    assert st.direct_reads == _supports_o_direct(tmp_path)
    if st.direct_reads:
        assert flags[-1] & os.O_DIRECT
    # A bytearray is never aligned: the page cache as before.
    assert bytes(st.get_into("chunks/ab/k", bytearray(size))) == data
    assert not flags[-1] & os.O_DIRECT


def _supports_o_direct(path: Path) -> bool:
    probe = path / "o-direct-probe"
    probe.write_bytes(b"x")
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError as e:
        assert e.errno == errno.EINVAL
        return False
    finally:
        probe.unlink()


@pytest.fixture
def direct_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory on a filesystem that takes O_DIRECT: tmp_path, else beside the
    checkout or /var/tmp (tmp_path is often a tmpfs, which refuses it).  None of them:
    skipped, a failure under CI=true (the direct branch would go untested)."""
    candidates = [tmp_path, Path(__file__).resolve().parents[2], Path("/var/tmp")]
    for base in candidates:
        if not os.access(base, os.W_OK):
            continue
        d = Path(tempfile.mkdtemp(prefix="backupkit-odirect-", dir=base))
        if _supports_o_direct(d):
            try:
                yield d
            finally:
                shutil.rmtree(d)
            return
        shutil.rmtree(d)
    where = ", ".join(str(c) for c in candidates)
    if IN_CI:
        pytest.fail(f"no filesystem taking O_DIRECT among {where}")
    pytest.skip(f"no filesystem taking O_DIRECT among {where}")


@pytest.mark.parametrize("size", [1, 4096, 65536, 1024 * 1024 + 1])
def test_direct_reads_on_a_filesystem_that_takes_them(direct_dir: Path, size: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The O_DIRECT branch itself, wherever tmp_path may be: reads bypass the cache."""
    st, data, flags = _stored_and_spied(direct_dir, size, monkeypatch)
    buf = storage_mod.aligned_buffer(1024 * 1024 + 1)
    assert bytes(st.get_into("chunks/ab/k", buf)) == data
    assert st.direct_reads
    assert flags and flags[-1] & os.O_DIRECT
    assert bytes(st.get_into("chunks/ab/k", buf)) == data  # and again: no fallback
    assert st.direct_reads and flags[-1] & os.O_DIRECT


def test_direct_read_checks_like_a_buffered_one(tmp_path: Path) -> None:
    st = LocalStorage(str(tmp_path))
    st.replace("chunks/ab/big", bytes(8193))
    buf = storage_mod.aligned_buffer(8192)
    with pytest.raises(errors.CorruptRepository, match="more than the 8192 allowed"):
        st.get_into("chunks/ab/big", buf)
    # The limit is max_size, not the buffer's length rounded up to a page.
    big = storage_mod.aligned_buffer(8193)
    assert len(big) == 12288
    with pytest.raises(errors.CorruptRepository, match="more than the 8000 allowed"):
        st.get_into("chunks/ab/big", big, 8000)
    assert bytes(st.get_into("chunks/ab/big", big, 8193)) == bytes(8193)
    with pytest.raises(errors.NotFound):
        st.get_into("chunks/ab/missing", buf)
    os.symlink(tmp_path / "chunks/ab/big", tmp_path / "chunks/ab/link")
    with pytest.raises(errors.CorruptRepository, match="symlink"):
        st.get_into("chunks/ab/link", buf)


@pytest.mark.parametrize("where", ["open", "read"])
def test_filesystem_without_o_direct_falls_back_for_good(tmp_path: Path, where: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    st = LocalStorage(str(tmp_path))
    st.replace("chunks/ab/k", b"hello")
    real_open, real_readv = os.open, os.readv
    direct_fds: set[int] = set()

    def no_direct_open(path: Any, flag: int, *args: Any, **kw: Any) -> int:
        if flag & os.O_DIRECT and where == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flag, *args, **kw)
        if flag & os.O_DIRECT:
            direct_fds.add(fd)
        else:
            direct_fds.discard(fd)  # the number of a closed direct descriptor, reused
        return fd

    def no_direct_readv(fd: int, bufs: Any) -> int:
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_readv(fd, bufs)

    monkeypatch.setattr(os, "open", no_direct_open)
    monkeypatch.setattr(os, "readv", no_direct_readv)
    buf = storage_mod.aligned_buffer(4096)
    assert bytes(st.get_into("chunks/ab/k", buf)) == b"hello"
    assert not st.direct_reads  # not tried again
    assert bytes(st.get_into("chunks/ab/k", buf)) == b"hello"


def test_an_mmap_of_odd_length_is_read_through_the_cache(tmp_path: Path) -> None:
    st = LocalStorage(str(tmp_path))
    st.replace("chunks/ab/k", b"hello")
    odd = mmap.mmap(-1, 5000)  # page-aligned address, length not a multiple of a block
    assert bytes(st.get_into("chunks/ab/k", odd)) == b"hello"
    assert st.direct_reads == _supports_o_direct(tmp_path)  # not switched off by it
