"""restore: write the disks of one backup into a directory, as qcow2 or sparse raw.

Every backup restores on its own from its index (no chain replay); a slot with
pieces is put together in memory (its chunk, then its pieces over it).  Only data
chunks are written: holes stay holes (a sparse raw file, unallocated qcow2
clusters).  Several threads read, decompress, check and write chunks at once
(zstd and the chunk hash release the GIL) with plain pwrite; qcow2 output is laid out
by backupkit.qcow2 (data clusters as they arrive, metadata and header at the
end), so it costs about what raw output costs.  Each disk is written to
"<disk>.<fmt>.tmp-<pid>" and renamed to "<disk>.<fmt>" only when every disk is
complete, so a failed restore never leaves a half-written file under a final name.
A qcow2 image is checked by ``qemu-img check`` (its metadata only) before that.
A restore killed outright (SIGKILL, power loss) leaves its tmp files behind: the
next restore of that backup's disks into the same directory removes those of
processes that no longer exist.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from backupkit import faults, qcow2, qemu
from backupkit.errors import CorruptRepository, NoSpace, NotFound, OperationFailed, UsageError
from backupkit.fileio import Buffer, Writeback, pwrite_all
from backupkit.qcow2 import Qcow2Writer
from backupkit.repo import Index, Manifest, Repository
from backupkit.repo.names import check_name
from backupkit.repo.repository import chunk_key
from backupkit.workers import run_threads

log = logging.getLogger("backupkit.restore")

FORMATS = ("qcow2", "raw")

def default_workers() -> int:
    """One worker per CPU this process may run on (its affinity mask), 2 to 8.

    A cgroup CPU quota (cpu.max) is not read: a quota of fewer CPUs than the mask
    gets more workers than CPUs, which costs some contention, not correctness.

    The workers' work is CPU work (hash check, zstd, copies); the reads are kept in
    flight by the prefetch thread, not by more workers.  On two cores, 2 workers
    restored the 4 GiB bench repository 7-11 % faster than 4 (GIL and cache
    contention), alternated A/B in bench/RESULTS.md.
    """
    return min(8, max(2, len(os.sched_getaffinity(0))))

#: Chunk buffers that remote_workers' threads may hold at most, all together.
REMOTE_BUFFERS = 256 * 1024 * 1024


def remote_workers(repo: Repository) -> int:
    """Workers for reading chunks from an object store: a worker waits for one GET at a
    time and no kernel reads ahead of it, so as many as the store serves requests in
    parallel, as long as their chunk buffers stay within REMOTE_BUFFERS."""
    per_worker: int = 2 * repo.chunk_max  # a chunk buffer, and a slot buffer for pieces
    concurrency: int = repo.storage.properties.concurrency
    return max(2, min(concurrency, REMOTE_BUFFERS // per_worker))


RAW_GRANULARITY = 4096  # filesystem block: zero blocks of this size are not written
QCOW2_GRANULARITY = 65536  # qcow2 cluster size (QEMU's default), smaller only for smaller chunks
# How far ahead of the workers the kernel is asked to read: the chunk files of the next
# 64 MiB of slots, and at least 8 slots (8 chunks of the largest size; piece files
# of those slots come on top).
PREFETCH_BYTES = 64 << 20

Progress = Callable[[int], object]


class _Writer(Protocol):
    def write(self, offset: int, data: Buffer) -> None: ...


class _RawWriter:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._writeback = Writeback(fd)

    def write(self, offset: int, data: Buffer) -> None:
        pwrite_all(self.fd, data, offset)
        self._writeback.wrote(memoryview(data).nbytes)


@dataclass
class _Job:
    name: str
    index: Index
    final: str
    tmp: str


_FIND_BELOW = 16384


def _data_runs(view: memoryview, zero: bytes) -> list[tuple[int, int]]:
    """(start, end) of the runs of view that are not all zero, at len(zero) granularity."""
    gran = len(zero)
    n = len(view)
    # Fast path at 4 KiB (almost every chunk): no zero block of gran bytes anywhere,
    # aligned or not, found by one memmem in C (~30 us per MiB) instead of 256 slice
    # compares (~65-100 us).  At 64 KiB the 16 compares (~5 us) beat memmem (~200 us).
    if gran < _FIND_BELOW and _find(view, zero) < 0:
        return [(0, n)]
    runs: list[tuple[int, int]] = []
    start = -1
    for pos in range(0, n, gran):
        if zero.startswith(view[pos:pos + gran]):  # memcmp, not a Python loop
            if start >= 0:
                runs.append((start, pos))
                start = -1
        elif start < 0:
            start = pos
    if start >= 0:
        runs.append((start, n))
    return runs


def _find(view: memoryview, sub: bytes) -> int:
    """-1 if sub certainly does not occur in view, else a position to look at (C speed).

    memoryview has no find(): search the object it views instead.  For a view into
    a larger reused buffer a hit may lie outside the view (a false "maybe"); a miss
    is always exact, which is all the fast path needs.
    """
    obj = view.obj
    if isinstance(obj, bytes | bytearray):
        return obj.find(sub)
    return 0


def _prefetch(repo: Repository, digest: bytes) -> None:
    """Hint the store that a chunk is read soon (readahead where that helps)."""
    if repo.storage.properties.wants_prefetch_hint:
        repo.storage.prefetch(chunk_key(digest))


def _copy_chunks(repo: Repository, index: Index, writers: Sequence[_Writer],
                 progress: Progress | None, granularity: int) -> None:
    """Write every data chunk of index through the writers, one thread per writer.

    A prefetch thread keeps the kernel reading the chunk files of the next
    PREFETCH_BYTES of slots (posix_fadvise WILLNEED), so the workers find them in
    the page cache instead of waiting for one cold read each.
    """
    items = list(index.slots())
    slots = iter(items)
    lock = threading.Lock()
    taken = threading.Condition(lock)
    ntaken = 0
    stop = threading.Event()
    cs = repo.chunk_size
    zero = bytes(granularity)
    ahead = max(8, PREFETCH_BYTES // cs)  # slots

    def prefetch() -> None:
        for i, (_slot, digest, pieces) in enumerate(items):
            with taken:
                while i >= ntaken + ahead and not stop.is_set():
                    taken.wait(0.5)
            if stop.is_set():
                return
            if digest is not None:
                _prefetch(repo, digest)
            for _off, _n, d in pieces:
                if d is not None:
                    _prefetch(repo, d)

    def work(writer: _Writer) -> None:
        nonlocal ntaken
        buf = bytearray(repo.chunk_max)
        slot_buf: bytearray | None = None  # a pieced slot is put together here
        while not stop.is_set():
            with lock:
                item = next(slots, None)
                ntaken += 1
                taken.notify()
            if item is None:
                return
            slot, digest, pieces = item
            n = index.slot_length(slot)
            if pieces:
                if slot_buf is None:
                    slot_buf = bytearray(cs)
                view = memoryview(slot_buf)[:n]
                repo.read_slot(digest, pieces, view, buf)
            else:
                assert digest is not None
                view = memoryview(repo.read_chunk(digest, buf))
                if view.nbytes != n:
                    raise CorruptRepository(
                        f"chunk {digest.hex()} holds {view.nbytes} bytes, slot {slot} "
                        f"needs {n}", path=repo.path)
            # Zero blocks inside a chunk stay holes in the output too.
            for a, b in _data_runs(view, zero):
                writer.write(slot * cs + a, view[a:b])
            if progress is not None:
                done = n if digest is not None else index.slot_data_bytes(slot)
                with lock:
                    progress(done)

    def wake() -> None:
        with taken:
            taken.notify_all()

    with repo.storage.bulk():
        # Also on an interrupt, run_threads waits for every worker: none may outlive
        # the output file's descriptor, which the caller closes next (its number could
        # be reused by another open).
        run_threads("restore", [functools.partial(work, w) for w in writers], stop=stop,
                    background=[prefetch] if PREFETCH_BYTES else [], wake=wake)


def _restore_raw(repo: Repository, job: _Job, workers: int, progress: Progress | None) -> None:
    fd = os.open(job.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, job.index.virtual_size)
        writer = _RawWriter(fd)
        _copy_chunks(repo, job.index, [writer] * workers, progress, RAW_GRANULARITY)
        os.fsync(fd)
    finally:
        os.close(fd)


def _qcow2_cluster(repo: Repository) -> int:
    """64 KiB (qemu-img's default), or the chunk size if smaller.

    Every write starts at a chunk boundary, or at a zero-run boundary inside a chunk at
    the cluster granularity: both are cluster aligned while clusters are no larger than
    chunks (chunks are powers of two from 4 KiB).
    """
    return min(QCOW2_GRANULARITY, repo.chunk_size)


def _restore_qcow2(repo: Repository, job: _Job, workers: int,
                   progress: Progress | None) -> None:
    cluster = _qcow2_cluster(repo)
    fd = os.open(job.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        writer = Qcow2Writer(fd, job.index.virtual_size, cluster)
        _copy_chunks(repo, job.index, [writer] * workers, progress, cluster)
        writer.finish()
        os.fsync(fd)
    finally:
        os.close(fd)
    # The image's metadata as QEMU reads it (refcounts, L1/L2 tables; cheap: no data is
    # read) before it gets its final name: a writer bug must not reach a domain.
    qemu.check(job.tmp, "qcow2")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove_leftovers(target_dir: str, disks: Iterable[str]) -> list[str]:
    """Remove "<disk>.<fmt>.tmp-<pid>" files of restores that were killed; their paths.

    Only names a restore of these disks writes, only regular files, and only when
    no process of that pid exists (a running restore's files are never touched).
    """
    try:
        names = os.listdir(target_dir)
    except FileNotFoundError:
        return []
    alternatives = "|".join(re.escape(d) for d in disks)
    pattern = re.compile(rf"(?:{alternatives})\.(?:{'|'.join(FORMATS)})\.tmp-([0-9]+)")
    removed = []
    for name in names:
        m = pattern.fullmatch(name)
        if not m or int(m[1]) == os.getpid() or _pid_alive(int(m[1])):
            continue
        path = os.path.join(target_dir, name)
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.unlink(path)
                removed.append(path)
                log.info("removed %s, left by a restore that was killed", path)
    return removed


def _install(tmp: str, final: str, force: bool) -> None:
    """Move tmp to final; without force never replace an existing file (even a racing one)."""
    if force:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise UsageError(f"{final} already exists (use --force to overwrite it)") from None
    except OSError:
        # Filesystems without hard links: check, then rename.
        if os.path.lexists(final):
            raise UsageError(f"{final} already exists (use --force to overwrite it)") from None
        os.rename(tmp, final)
        return
    os.unlink(tmp)


def _select(manifest: Manifest, disks: Iterable[str]) -> list[str]:
    wanted = list(dict.fromkeys(disks))
    if not wanted:
        return [d.name for d in manifest.disks]
    for name in wanted:
        check_name("disk name", name)  # exit 2 for '/', '..', NUL: not a lookup miss
        if manifest.disk(name) is None:
            have = ", ".join(d.name for d in manifest.disks) or "none"
            raise NotFound("disk", f"{manifest.domain}/{manifest.id}/{name}",
                           f"the backup has: {have}")
    return wanted


def restore(repo: Repository, domain: str, backup: str, target_dir: str, *,
            fmt: str = "qcow2", disks: Sequence[str] = (), define: str | None = None,
            force: bool = False, connect: str = "qemu:///system",
            progress: Progress | None = None, workers: int | None = None) -> dict[str, Any]:
    """Restore backup (an id or "latest") of domain into target_dir as <disk>.<fmt>.

    progress, if given, is called (from worker threads, one call at a time)
    with the number of bytes just written.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown restore format {fmt!r} (choose {' or '.join(FORMATS)})")
    if workers is None:
        workers = default_workers()
        if not repo.storage.properties.local:
            workers = max(workers, remote_workers(repo))
    if workers < 1:
        raise UsageError("workers must be at least 1")
    if define:
        check_name("domain name", define)  # before anything is read or written
    started = time.monotonic()
    manifest = repo.get_manifest(domain, backup)
    names = _select(manifest, disks)
    target_dir = os.path.abspath(target_dir)
    if os.path.lexists(target_dir) and not os.path.isdir(target_dir):
        raise UsageError(f"restore target {target_dir} is not a directory")
    if define:
        # Refuse an existing domain name before writing any data.
        from backupkit import virt as _virt

        if _virt.domain_exists(connect, define):
            raise UsageError(f"domain {define!r} already exists; choose another --define name")
    # Read and check every index before writing anything.
    jobs = []
    for name in names:
        final = os.path.join(target_dir, f"{name}.{fmt}")
        if os.path.lexists(final) and not force:
            raise UsageError(f"{final} already exists (use --force to overwrite it)")
        jobs.append(_Job(name, repo.load_index(manifest, name), final,
                         f"{final}.tmp-{os.getpid()}"))
        if fmt == "qcow2":
            try:
                qcow2.check_geometry(jobs[-1].index.virtual_size, _qcow2_cluster(repo))
            except ValueError as e:
                raise UsageError(f"disk {name} cannot be restored as qcow2: {e} "
                                 "(restore it as raw)") from None
    if define:
        # The new domain's QEMU (an unprivileged user) must reach the files.
        from backupkit import virt as _virt

        _virt.make_reachable_dir(connect, manifest.domain_xml, target_dir)
    else:
        os.makedirs(target_dir, exist_ok=True)
    _remove_leftovers(target_dir, [d.name for d in manifest.disks])

    results = []
    done: list[_Job] = []
    try:
        for job in jobs:
            t0 = time.monotonic()
            log.info("Restoring %s/%s disk %s to %s", domain, manifest.id, job.name, job.final)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(job.tmp)  # our own pid: a leftover of a previous process
            done.append(job)
            if fmt == "raw":
                _restore_raw(repo, job, workers, progress)
            else:
                _restore_qcow2(repo, job, workers, progress)
            results.append({
                "name": job.name,
                "path": job.final,
                "format": fmt,
                "virtual_size": job.index.virtual_size,
                "data_bytes": job.index.data_bytes,
                "duration_seconds": round(time.monotonic() - t0, 3),
            })
        faults.point("restore_before_install")
        for job in jobs:
            _install(job.tmp, job.final, force)
    except BaseException as e:
        for job in done:
            with contextlib.suppress(OSError):
                os.unlink(job.tmp)
        if isinstance(e, OSError):
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space left in {target_dir} while restoring "
                              f"{domain}/{manifest.id}") from e
            raise OperationFailed(f"restore into {target_dir}: {e}") from e
        raise
    dirfd = os.open(target_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)

    result: dict[str, Any] = {
        "domain": manifest.domain,
        "id": manifest.id,
        "created": manifest.created,
        "target": target_dir,
        "format": fmt,
        "disks": results,
        "virtual_size": sum(r["virtual_size"] for r in results),
        "data_bytes": sum(r["data_bytes"] for r in results),
        "duration_seconds": round(time.monotonic() - started, 3),
        "defined": None,
    }
    if define:
        # New name, UUID and MACs; disks pointing at the restored files; no checkpoints.
        from backupkit import virt as _virt

        paths = {str(r["name"]): str(r["path"]) for r in results}
        result["defined"] = _virt.define_restored(connect, manifest, define, paths)
    return result
