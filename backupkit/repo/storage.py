"""Object storage under the repository: a small interface and its local implementation.

Keys are relative paths of "/"-separated components ("chunks/ab/ab12...").
The interface is deliberately what an S3-compatible store can offer too:
create-if-absent, whole-object get with a size cap, atomic replace, list by
prefix with sizes, delete.  Durability: ``put_if_absent`` makes the object's
content durable before it appears under its key; ``flush`` makes every key
created so far durable (local: fsync of the directories that changed, or one
syncfs when there are many);
``replace`` is fully durable when it returns.  ``put_if_absent(deferred=True)``
(used for chunks) writes a tmp file without fsync and publishes it at the next
``flush``: one syncfs(2) for the whole batch, then the links, instead of one
fsync (and journal commit) per chunk.

LocalStorage never follows a symlink inside the root: every path component is
opened relative to its parent's descriptor with O_NOFOLLOW.  A symlink or a
non-regular file where an object should be raises CorruptRepository.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import mmap
import os
import queue
import secrets
import stat
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Concatenate, NamedTuple, ParamSpec, Protocol, TypeVar

from backupkit.errors import (
    CorruptRepository,
    NoSpace,
    NotFound,
    OperationFailed,
    PermissionDenied,
    ReadOnly,
    UsageError,
)
from backupkit.fileio import Buffer, start_writeback
from backupkit.fileio import syncfs as _syncfs  # a module global: tests replace it

TMP_PREFIX = ".tmp-"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

ReadBuffer = bytearray | mmap.mmap  # what get_into reads into


class ObjectInfo(NamedTuple):
    key: str
    size: int
    #: When the object was last written (created or replaced), by the store's clock
    #: (local: st_mtime; S3: LastModified, whole seconds), in seconds since the epoch.
    #: Locks and gc judge age by it (docs/format.md, "Locks and gc").
    mtime: float = 0.0


class StoreProperties(NamedTuple):
    """What a store can do, so callers ask instead of testing its type (cf. restic's
    backend Properties)."""

    #: put_if_absent is atomic against other writers, in other processes and on other
    #: hosts too (local: link(2) of a complete file; S3: If-None-Match: * on one PUT).
    atomic_create: bool
    #: Parallel requests the store serves well (worker threads, connection pool size).
    concurrency: int
    #: prefetch(key) before a read pays off (the kernel reads ahead into its page cache).
    wants_prefetch_hint: bool
    #: get_into() into an aligned_buffer() reads past the page cache (O_DIRECT); other
    #: stores read into any buffer the same way.
    aligned_reads: bool
    #: The data sits on this host's filesystem.
    local: bool


class Storage(Protocol):
    #: What the store can do (a class or instance attribute).
    properties: StoreProperties

    @property
    def location(self) -> str:
        """Where the store is, for messages: a path or a URL such as s3://bucket/prefix."""
        ...

    def reopen(self) -> Storage:
        """Another Storage of the same location with state of its own (its own batch of
        deferred objects): for a second writer in the same process, so that one
        writer's discard_pending() cannot drop what another wrote."""
        ...

    def create(self, marker: str) -> None:
        """Get an empty location ready for a new repository (whose first object is marker).

        UsageError if it holds marker (already a repository) or anything else;
        NotFound if what holds it (an S3 bucket) does not exist.
        """
        ...

    def prefetch(self, key: str) -> None:
        """A hint that key will be read soon (no-op where it does not help; never raises)."""
        ...

    def put_if_absent(self, key: str, data: Buffer | Sequence[Buffer], *,
                      deferred: bool = False) -> bool:
        """Store data under key unless key exists; True if it was written.

        deferred=True lets the store batch durability: the object may appear
        under its key only at the next flush() (exists() sees it at once in
        this process).  It never appears before its content is durable.  A store
        that does not look before it writes (S3) may then answer True for a key
        that turns out to exist; the first object is kept either way.  Failures of
        deferred writes are raised by flush().
        """
        ...

    def get(self, key: str, max_size: int) -> bytes:
        """The whole object; NotFound if missing, CorruptRepository if bigger than max_size."""
        ...

    def get_into(self, key: str, buf: ReadBuffer, max_size: int | None = None) -> memoryview:
        """Read the object into buf; CorruptRepository if bigger than max_size (or len(buf)).

        A buffer from aligned_buffer() lets a store read past its cache.
        """
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under prefix ("" or "dir/.../"), tmp files excluded.

        (list_many() lists several prefixes, concurrently on a remote store.)

        A symlink or special file under prefix raises CorruptRepository (never skipped).
        """
        ...

    def leftovers(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Temporary objects of interrupted writes under prefix."""
        ...

    def children(self, prefix: str) -> Sequence[str]:
        """Names directly under prefix ("dir/.../"), sorted, tmp files excluded; [] if none.

        Names only (as an S3 listing with a delimiter gives them): whatever a name
        is, a reader finds out when it opens it.
        """
        ...

    def delete(self, key: str) -> bool:
        """Remove key (and now-empty parent directories); False if it did not exist."""
        ...

    def delete_many(self, keys: Sequence[str]) -> int:
        """Remove several keys (batched where the store can: S3 DeleteObjects, 1000 a
        request); how many were removed (a store that cannot tell, S3, counts every key).
        Durable on return, like delete() of each then flush()."""
        ...

    def delete_tree(self, prefix: str) -> int:
        """Remove everything under prefix, whatever it is (never following a symlink); bytes."""
        ...

    def move(self, key: str, new_key: str) -> None:
        """Rename key to new_key, whatever key is; never replaces new_key; durable on return."""
        ...

    def replace(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Atomically create or replace key; durable on return."""
        ...

    def flush(self) -> None:
        """Publish deferred objects and make every key created or deleted so far durable."""
        ...

    def discard_pending(self) -> None:
        """Drop deferred objects not yet published (after a failed backup)."""
        ...

    def bulk(self) -> contextlib.AbstractContextManager[None]:
        """A hint: many chunk reads or writes follow (a store may keep things open)."""
        ...


#: Objects a listing thread hands over at once (one S3 LIST page).
LIST_BATCH = 1000


class _ListFailed(NamedTuple):
    error: BaseException


def list_many(storage: Storage, prefixes: Sequence[str]) -> Iterator[ObjectInfo]:
    """Every object under each of prefixes (each "dir/.../", none under another), in
    no particular order: what ``storage.list`` gives for each, interleaved.

    A remote store (``properties.local`` false) lists up to ``properties.concurrency``
    prefixes at once, each listing in a thread of its own (S3: one LIST per 1,000 keys,
    one request at a time per listing, so a single listing waits for each page in
    turn); other stores list one prefix after another.  The capability is the store's
    properties, not a method each store implements (kopia's
    IterateAllPrefixesInParallel does the same over its small blob interface).

    The threads hand objects over a page (LIST_BATCH) at a time through a queue of
    ``concurrency`` pages: a slow consumer stops them, and memory holds a few pages,
    never a whole listing.  The first error of any listing is raised here as
    ``storage.list`` raised it (the same exception: the store's retries and timeouts
    apply to each request as in one listing); then, or when the consumer stops early,
    no new request starts and every thread has ended when this returns (a request
    under way is waited for, within the store's own timeouts).
    """
    workers = min(storage.properties.concurrency, len(prefixes))
    if storage.properties.local or workers <= 1:
        for prefix in prefixes:
            yield from storage.list(prefix)
        return
    todo = iter(prefixes)
    todo_lock = threading.Lock()
    pages: queue.Queue[list[ObjectInfo] | _ListFailed | None] = queue.Queue(maxsize=workers)
    stop = threading.Event()

    def hand_over(item: list[ObjectInfo] | _ListFailed | None) -> bool:
        while not stop.is_set():
            try:
                pages.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            while not stop.is_set():
                with todo_lock:
                    prefix = next(todo, None)
                if prefix is None:
                    break
                page: list[ObjectInfo] = []
                for info in storage.list(prefix):
                    if stop.is_set():
                        return  # the consumer is gone: no further page is asked for
                    page.append(info)
                    if len(page) >= LIST_BATCH:
                        if not hand_over(page):
                            return
                        page = []
                if page and not hand_over(page):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            hand_over(_ListFailed(e))
        finally:
            hand_over(None)

    threads = [threading.Thread(target=work, name=f"storage-list-{i}", daemon=True)
               for i in range(workers)]
    for t in threads:
        t.start()
    try:
        running = len(threads)
        while running:
            item = pages.get()
            if item is None:
                running -= 1
            elif isinstance(item, _ListFailed):
                raise item.error
            else:
                yield from item
    finally:
        stop.set()
        for t in threads:
            t.join()


def list_under(storage: Storage, prefix: str, names: Sequence[str]) -> Iterator[ObjectInfo]:
    """Every object under prefix+name/ for each of names (from ``children(prefix)``), and
    prefix+name itself where nothing is under it (an object: its size from one lookup,
    mtime 0), in no particular order; concurrently on a remote store (list_many)."""
    seen: set[str] = set()
    depth = prefix.count("/")
    for info in list_many(storage, [f"{prefix}{n}/" for n in names]):
        seen.add(info.key.split("/", depth + 1)[depth])
        yield info
    for n in names:
        if n in seen:
            continue
        # Nothing under it: an object named n, or a directory emptied meanwhile.
        with contextlib.suppress(NotFound):
            yield ObjectInfo(f"{prefix}{n}", storage.size(f"{prefix}{n}"))


#: Fewer objects than this under a prefix are listed with one plain request: a listing
#: page of S3 (and RGW) holds 1,000 keys.
ONE_PAGE = 1000


def _one_page(storage: Storage, prefix: str) -> list[ObjectInfo] | None:
    """Everything under prefix if it fits in one listing page (one request), else None.

    A small repository costs one LIST, not one per chunk directory (257): the first
    page of a plain listing says whether there is more.  When there is, that page is
    dropped and the caller fans out (one request lost, not an order assumed)."""
    it = storage.list(prefix)
    try:
        page = list(itertools.islice(it, ONE_PAGE))
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return page if len(page) < ONE_PAGE else None


def _plainly(storage: Storage, prefix: str) -> Iterable[ObjectInfo] | None:
    """The plain listing of prefix where no fan-out pays (a local store, or everything
    in one page), else None."""
    if storage.properties.local:
        return storage.list(prefix)
    return _one_page(storage, prefix)


def list_chunks(storage: Storage) -> Iterator[ObjectInfo]:
    """Every object under chunks/ (as ``storage.list("chunks/")``), in no particular order.

    On a remote store holding more than one listing page of chunks, the chunk
    directories (chunks/00/ .. chunks/ff/, found by one ``children`` request) are listed
    concurrently (list_under, list_many): on S3 the listing is what gc and verify cost,
    one LIST per 1,000 chunks, and 8 threads halved it (bench/RESULTS.md, "Chunk-count
    scaling"); fewer chunks than a page are one request.  A local store walks chunks/
    as before (sorted).  Whatever else lies under chunks/ is listed too (gc names it);
    an object directly under chunks/ comes with mtime 0 (it is never a chunk).
    """
    plain = _plainly(storage, "chunks/")
    if plain is not None:
        yield from plain
        return
    yield from list_under(storage, "chunks/", storage.children("chunks/"))


def list_all(storage: Storage) -> Iterator[ObjectInfo]:
    """Every object of the store (as ``storage.list("")``), in no particular order: on a
    remote store holding more than a listing page, the top-level directories, then the
    chunk directories, concurrently; objects at the top (config.json) come with mtime 0."""
    plain = _plainly(storage, "")
    if plain is not None:
        yield from plain
        return
    yield from list_under(storage, "", [n for n in storage.children("") if n != "chunks"])
    yield from list_chunks(storage)


_SYNCFS_DIRS = 8  # more changed directories than this: one syncfs instead of an fsync each

#: O_DIRECT reads need the buffer's address and the length aligned to the device's
#: logical block size; a page covers every common one (512 B, 4 KiB).
DIRECT_ALIGN = 4096
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer of at least size bytes (rounded up to DIRECT_ALIGN).

    get_into() reads into such a buffer with O_DIRECT, past the page cache.
    """
    return mmap.mmap(-1, -(-size // DIRECT_ALIGN) * DIRECT_ALIGN)


def _close_all(fds: dict[tuple[str, ...], int]) -> None:
    while fds:
        _key, fd = fds.popitem()
        with contextlib.suppress(OSError):
            os.close(fd)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _errors(doing: str) -> Callable[[Callable[Concatenate[LocalStorage, str, _P], _R]],
                                    Callable[Concatenate[LocalStorage, str, _P], _R]]:
    """Turn the operating system's refusals in an interface method into errors of their kind.

    ENOSPC is NoSpace, EACCES/EPERM PermissionDenied naming the path, EROFS ReadOnly:
    each one line with its path, never an "internal error".
    """
    def wrap(fn: Callable[Concatenate[LocalStorage, str, _P], _R]
             ) -> Callable[Concatenate[LocalStorage, str, _P], _R]:
        @functools.wraps(fn)
        def method(self: LocalStorage, key: str, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return fn(self, key, *args, **kwargs)
            except OSError as e:
                err = self.os_error(e, key, doing)
                if err is e:
                    raise
                raise err from e
        return method
    return wrap


def _split(key: str) -> list[str]:
    parts = key.split("/")
    for p in parts:
        if not p or p in (".", "..") or "\0" in p:
            raise OperationFailed(f"invalid storage key {key!r}")
    return parts


def _write_all(fd: int, bufs: Sequence[Buffer]) -> None:
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    while views:
        n = os.writev(fd, views)
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


# What the root of a new filesystem holds: a repository may be created there.
_FS_ROOT_DIRS = ("lost+found",)


class LocalStorage:
    """Storage in a local directory (see the module docstring)."""

    properties = StoreProperties(atomic_create=True, concurrency=4, wants_prefetch_hint=True,
                                 aligned_reads=True, local=True)

    #: Publish deferred objects once this many bytes are waiting.  Each publish is two
    #: syncfs(2) calls, and each makes the disk flush its cache, which stalls the reads
    #: of the disk being backed up when it shares the device: a 2 GiB full backup took
    #: 10.4 s with a publish every 256 MiB against 9.5 s with one at the end (mean of
    #: 4 alternated runs).  What a crash leaves (tmp files for gc) and a retry writes
    #: again is about one batch, plus what was written while it was being published.
    flush_bytes = 4 * 1024 * 1024 * 1024
    #: ... or once this many objects are waiting, so that small chunks (down to 4 KiB) do
    #: not fill the pending table (about 0.3-0.5 KiB an entry): with 4 KiB chunks this
    #: publishes every 256 MiB or less, as before.  While one writer publishes, the others
    #: keep writing; at twice this count a writer waits for the publish and then publishes
    #: what is pending itself, which caps the table at about 2 * flush_count entries.
    flush_count = 65536

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._dirty: set[str] = set()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        # key -> (directory parts, tmp name, size) of deferred objects not yet published
        self._pending: dict[str, tuple[Sequence[str], str, int]] = {}
        self._pending_bytes = 0
        # syncfs(2) reports only write-back errors that happen after the descriptor it is
        # given was opened, and each error only once per descriptor.  So the batch's
        # descriptor is opened before its first deferred write and stays open while any
        # deferred write or flush is in progress (_sync_users) or anything is pending;
        # then it is closed (an open descriptor keeps the filesystem busy).  A failed
        # sync is final (_failed): every later flush or deferred write raises it again
        # until discard_pending(), since a second syncfs would return 0 and publish the
        # chunks whose data was lost.
        self._sync_fd: int | None = None
        self._sync_fd_close: Any = None
        self._sync_users = 0
        self._failed: BaseException | None = None
        # Inside bulk(), descriptors of chunk directories ("chunks/ab") are opened once:
        # a chunk read or write then costs one dup(2) instead of walking three path
        # components (~9 % of a restore's worker time).  Only this process removes them
        # while it holds a repository lock (gc holds it exclusively), and delete()
        # forgets a directory before removing it.  Every user gets its own dup, so
        # invalidation never pulls a descriptor from under a thread.  Outside bulk()
        # nothing stays open (an open descriptor keeps the filesystem busy).  Limits:
        # dups share one directory offset, so the cache serves only *at() calls (never
        # scandir: _walk walks the path itself); and a delete() racing a cached open inside
        # bulk() could cache a directory just removed, which cannot happen today
        # because only gc deletes chunks, outside bulk() and under the exclusive lock.
        self._dir_fds: dict[tuple[str, ...], int] = {}
        self._dir_fds_users = 0  # bulk() depth: descriptors are cached only inside it
        self._dir_fds_close = weakref.finalize(self, _close_all, self._dir_fds)
        # get_into() with an aligned_buffer() reads with O_DIRECT.  verify --data reads
        # every chunk once: through the page cache that cost CPU on cores that also hash
        # and decompress (system time 0.73 s -> 0.28 s on the 4 GiB bench repository,
        # wall 3.19 s -> 3.01 s) and pushed the host's useful cache out.  Restore keeps
        # buffered reads: its prefetch thread measured faster there.  Direct reads are
        # coherent with cached writes (the kernel writes dirty pages back first).
        # False once a filesystem refused O_DIRECT (EINVAL): then reads use the cache.
        self.direct_reads = bool(_O_DIRECT)

    @property
    def location(self) -> str:
        return self.root

    def reopen(self) -> LocalStorage:
        return LocalStorage(self.root)

    def create(self, marker: str) -> None:
        path = self.root
        if os.path.lexists(path):
            if not os.path.isdir(path):
                raise UsageError(f"cannot create a repository at {path}: not a directory")
            if os.path.lexists(os.path.join(path, marker)):
                raise UsageError(f"{path} is already a backupkit repository")
            if [n for n in os.listdir(path) if not (
                    n in _FS_ROOT_DIRS and os.path.isdir(os.path.join(path, n))
                    and not os.path.islink(os.path.join(path, n)))]:
                raise UsageError(
                    f"cannot create a repository in {path}: the directory is not empty "
                    "and is not a repository")
        else:
            os.makedirs(path, 0o755, exist_ok=True)  # another init may race us here

    def prefetch(self, key: str) -> None:
        """Ask the kernel to start reading key's file (readahead), without waiting for it."""
        try:
            fd = self._open_file(key)
        except (OSError, NotFound, CorruptRepository):
            return  # the reader reports the problem
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _acquire_sync_fd(self) -> int:
        """The batch's descriptor, opened if needed; pair with _release_sync_fd."""
        with self._lock:
            if self._sync_fd is None:
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                self._sync_fd = fd
                self._sync_fd_close = weakref.finalize(self, os.close, fd)
            self._sync_users += 1
            return self._sync_fd

    def _release_sync_fd(self) -> None:
        with self._lock:
            self._sync_users -= 1
            self._close_sync_fd_if_idle()

    def _close_sync_fd_if_idle(self) -> None:
        """Close the batch's descriptor if nobody uses it and nothing is pending (holds _lock)."""
        if self._sync_users or self._pending or self._sync_fd is None:
            return
        self._sync_fd = None
        self._sync_fd_close()

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise self._failed

    def discard_pending(self) -> None:
        """Forget deferred objects not yet published, removing their tmp files.

        Called when a backup fails: its unpublished chunks must not be published
        later by another backup in the same process (gc may have removed them).
        """
        with self._flush_lock, self._lock:
            pending, self._pending, self._pending_bytes = self._pending, {}, 0
            self._failed = None  # the chunks whose sync failed are gone with the rest
            self._close_sync_fd_if_idle()
        for _key, (dirparts, tmp, _size) in pending.items():
            try:
                dfd = self._open_dir(dirparts, create=False)
            except OSError:
                continue
            try:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
            finally:
                os.close(dfd)

    # -- directory walking -------------------------------------------------

    def _corrupt(self, key: str, what: str) -> CorruptRepository:
        return CorruptRepository(f"{key}: {what}", path=self.root)

    def os_error(self, e: OSError, key: str, doing: str) -> BaseException:
        """The error of its kind for an OSError met while doing something to key (else e)."""
        path = os.path.join(self.root, key) if key else self.root
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return NoSpace(f"no space left on the repository's filesystem ({self.root}) "
                           f"while {doing} {key or self.root}")
        if e.errno in (errno.EACCES, errno.EPERM):
            return PermissionDenied(f"{doing} {key or 'the repository'}: {e.strerror}",
                                    path=path)
        if e.errno == errno.EROFS:
            return ReadOnly(f"{doing} {key or 'the repository'} needs to write", path=self.root)
        return e

    def _open_dir(self, parts: Sequence[str], create: bool) -> int:
        """A descriptor of root/parts, walked without following symlinks (caller closes it)."""
        if self._dir_fds_users and len(parts) == 2 and parts[0] == "chunks":
            key = (parts[0], parts[1])
            with self._lock:
                fd = self._dir_fds.get(key)
                if fd is not None:
                    return os.dup(fd)
            fd = self._walk_dir(parts, create)
            with self._lock, contextlib.suppress(OSError):  # out of descriptors: no cache
                if self._dir_fds_users and key not in self._dir_fds:
                    self._dir_fds[key] = os.dup(fd)
            return fd
        return self._walk_dir(parts, create)

    @contextlib.contextmanager
    def bulk(self) -> Iterator[None]:
        """Many chunk reads or writes follow: keep chunk directories open until the end."""
        with self._lock:
            self._dir_fds_users += 1
        try:
            yield
        finally:
            with self._lock:
                self._dir_fds_users -= 1
                if not self._dir_fds_users:
                    _close_all(self._dir_fds)

    def _forget_dir(self, parts: Sequence[str]) -> None:
        """Close the cached descriptor of a directory about to be removed."""
        with self._lock:
            fd = self._dir_fds.pop(tuple(parts), None)
        if fd is not None:
            os.close(fd)

    def _walk_dir(self, parts: Sequence[str], create: bool) -> int:
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise NotFound("repository", self.root) from e
        try:
            for i, p in enumerate(parts):
                try:
                    nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(p, 0o755, dir_fd=fd)
                        self._mark_dirty("/".join(parts[:i]))
                    except FileExistsError:
                        pass
                    nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise self._corrupt(
                            "/".join(parts[: i + 1]),
                            "is a symlink or not a directory; refusing to follow it",
                        ) from e
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _mark_dirty(self, dirkey: str) -> None:
        with self._lock:
            self._dirty.add(dirkey)

    def _tmp_name(self) -> str:
        return f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"

    def _write_tmp(self, dfd: int, key: str, data: Buffer | Sequence[Buffer],
                   sync: bool = True) -> str:
        bufs: Sequence[Buffer] = (
            [data] if isinstance(data, (bytes, bytearray, memoryview)) else data)
        tmp = self._tmp_name()
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
            dir_fd=dfd,
        )
        try:
            try:
                _write_all(fd, bufs)
                if sync:
                    os.fsync(fd)
                else:
                    start_writeback(fd)  # the batch's syncfs then finds little to write
            finally:
                os.close(fd)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space left on the repository's filesystem "
                              f"({self.root}) while writing {key}") from e
            raise
        return tmp

    # -- the interface -------------------------------------------------------

    @_errors("writing")
    def put_if_absent(self, key: str, data: Buffer | Sequence[Buffer], *,
                      deferred: bool = False) -> bool:
        parts = _split(key)
        with self._lock:
            if key in self._pending:
                return False
        dfd = self._open_dir(parts[:-1], create=True)
        name = parts[-1]
        try:
            if self._stat_regular(dfd, name, key) is not None:
                return False
            if deferred:
                self._check_failed()
                # Counted as a user of the batch's descriptor from before the write until
                # the chunk is pending, so no publish closes it in between.
                self._acquire_sync_fd()
                try:
                    tmp = self._write_tmp(dfd, key, data, sync=False)
                    size = sum(memoryview(b).nbytes for b in (
                        [data] if isinstance(data, (bytes, bytearray, memoryview)) else data))
                    with self._lock:
                        if key in self._pending:
                            raced = True
                        else:
                            raced = False
                            self._pending[key] = (parts[:-1], tmp, size)
                            self._pending_bytes += size
                        count = len(self._pending)
                        full = (self._pending_bytes >= self.flush_bytes
                                or count >= self.flush_count)
                finally:
                    self._release_sync_fd()
                if raced:
                    os.unlink(tmp, dir_fd=dfd)
                    return False
                if count >= 2 * self.flush_count:
                    self.flush()  # the table's hard cap: wait for the running publish
                elif full:
                    self._flush_if_idle()
                return True
            tmp = self._write_tmp(dfd, key, data)
            try:
                os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
            except FileExistsError:
                if self._stat_regular(dfd, name, key) is None:
                    raise
                return False
            finally:
                os.unlink(tmp, dir_fd=dfd)
            self._mark_dirty("/".join(parts[:-1]))
            return True
        finally:
            os.close(dfd)

    def _stat_regular(self, dfd: int, name: str, key: str) -> os.stat_result | None:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise self._corrupt(key, "is a symlink or not a regular file; refusing to use it")
        return st

    def _open_parent(self, key: str) -> tuple[int, str]:
        """A descriptor of key's directory and key's last part; NotFound if the directory is."""
        parts = _split(key)
        try:
            return self._open_dir(parts[:-1], create=False), parts[-1]
        except FileNotFoundError as e:
            raise NotFound("file", key) from e

    def _open_file(self, key: str, flags: int = 0) -> int:
        # A lock-free look (a dict lookup is atomic): every chunk read takes this path,
        # and the lock, shared with the writers and the descriptor cache, was contended
        # (6 % of a restore's worker time).  A key published meanwhile is found on disk.
        if key in self._pending:
            self.flush()
        dfd, name = self._open_parent(key)
        try:
            try:
                # O_NONBLOCK: a FIFO (or device) planted here must not block the open;
                # _read_fd then refuses anything but a regular file.
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                             | flags, dir_fd=dfd)
            except FileNotFoundError as e:
                raise NotFound("file", key) from e
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise self._corrupt(key, "is a symlink; refusing to follow it") from e
                raise
        finally:
            os.close(dfd)
        return fd

    def _read_fd(self, fd: int, key: str, view: memoryview, max_size: int,
                 align: int = 1) -> memoryview:
        """The file's bytes, read into view; each read asks for whole multiples of align."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise self._corrupt(key, "is not a regular file")
        if st.st_size > max_size:
            raise self._corrupt(
                key, f"is {st.st_size} bytes, more than the {max_size} allowed for it")
        end = min(-(-st.st_size // align) * align, len(view))
        pos = 0
        while pos < st.st_size:
            n = os.readv(fd, [view[pos:end]])
            if n == 0:
                break
            pos += n
        if pos != st.st_size:
            raise self._corrupt(key, "changed size while being read")
        return view[:pos]

    def _get_direct(self, key: str, buf: mmap.mmap, max_size: int) -> memoryview | None:
        """get_into with O_DIRECT; None if this filesystem refuses it (then never again)."""
        try:
            fd = self._open_file(key, _O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.direct_reads = False
            return None
        try:
            return self._read_fd(fd, key, memoryview(buf), max_size, DIRECT_ALIGN)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.direct_reads = False  # e.g. a logical block size above DIRECT_ALIGN
            return None
        finally:
            os.close(fd)

    @_errors("reading")
    def get(self, key: str, max_size: int) -> bytes:
        fd = self._open_file(key)
        try:
            size = os.fstat(fd).st_size
            buf = bytearray(min(size, max_size + 1))
            return bytes(self._read_fd(fd, key, memoryview(buf), max_size))
        finally:
            os.close(fd)

    @_errors("reading")
    def get_into(self, key: str, buf: ReadBuffer, max_size: int | None = None) -> memoryview:
        limit = len(buf) if max_size is None else min(max_size, len(buf))
        # An mmap's address is page-aligned; its length must be too (aligned_buffer's is),
        # or every read would ask for a length O_DIRECT refuses.
        if (self.direct_reads and isinstance(buf, mmap.mmap)
                and len(buf) % DIRECT_ALIGN == 0):
            view = self._get_direct(key, buf, limit)
            if view is not None:
                return view
        fd = self._open_file(key)
        try:
            return self._read_fd(fd, key, memoryview(buf), limit)
        finally:
            os.close(fd)

    @_errors("looking up")
    def exists(self, key: str) -> bool:
        if key in self._pending:  # lock-free, as in _open_file
            return True
        try:
            dfd, name = self._open_parent(key)
        except NotFound:
            return False
        try:
            return self._stat_regular(dfd, name, key) is not None
        finally:
            os.close(dfd)

    @_errors("looking up")
    def size(self, key: str) -> int:
        with self._lock:
            if key in self._pending:
                return self._pending[key][2]
        dfd, name = self._open_parent(key)
        try:
            st = self._stat_regular(dfd, name, key)
        finally:
            os.close(dfd)
        if st is None:
            raise NotFound("file", key)
        return st.st_size

    def _walk(self, prefix: str, tmp: bool) -> Iterator[ObjectInfo]:
        parts = _split(prefix.rstrip("/")) if prefix.strip("/") else []
        try:
            try:
                # Never a cached descriptor's dup: scandir moves the offset its dups share.
                dfd = self._walk_dir(parts, create=False)
            except FileNotFoundError:
                return
            yield from self._walk_fd(dfd, "/".join(parts), tmp)
        except OSError as e:
            err = self.os_error(e, prefix, "listing")
            if err is e:
                raise
            raise err from e

    def _walk_fd(self, dfd: int, base: str, tmp: bool) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(dfd) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                key = f"{base}/{e.name}" if base else e.name
                if e.is_dir(follow_symlinks=False):
                    try:
                        sub = os.open(e.name, _DIR_FLAGS, dir_fd=dfd)
                    except FileNotFoundError:
                        continue
                    yield from self._walk_fd(sub, key, tmp)
                    continue
                try:
                    st_ = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st_.st_mode):
                    raise self._corrupt(key, "is a symlink or special file; refusing to use it")
                if e.name.startswith(TMP_PREFIX) != tmp:
                    continue
                yield ObjectInfo(key, st_.st_size, st_.st_mtime)
        finally:
            os.close(dfd)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self._walk(prefix, tmp=False)

    def leftovers(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self._walk(prefix, tmp=True)

    @_errors("deleting")
    def delete(self, key: str) -> bool:
        parts = _split(key)
        try:
            dfd = self._open_dir(parts[:-1], create=False)
        except FileNotFoundError:
            return False
        try:
            try:
                os.unlink(parts[-1], dir_fd=dfd)
            except FileNotFoundError:
                return False
            except IsADirectoryError:
                # A directory where an object should be: remove it only if empty.
                self._forget_dir(parts)
                os.rmdir(parts[-1], dir_fd=dfd)
        finally:
            os.close(dfd)
        self._mark_dirty("/".join(parts[:-1]))
        # Remove parent directories left empty, never the top-level ones.
        for depth in range(len(parts) - 1, 1, -1):
            try:
                pfd = self._open_dir(parts[: depth - 1], create=False)
            except (FileNotFoundError, CorruptRepository):
                break
            try:
                self._forget_dir(parts[:depth])
                os.rmdir(parts[depth - 1], dir_fd=pfd)
            except OSError:
                break
            finally:
                os.close(pfd)
            self._mark_dirty("/".join(parts[: depth - 1]))
        return True

    def delete_many(self, keys: Sequence[str]) -> int:
        n = sum(1 for key in keys if self.delete(key))
        self.flush()
        return n

    @_errors("listing")
    def children(self, prefix: str) -> Sequence[str]:
        parts = _split(prefix.rstrip("/")) if prefix.strip("/") else []
        try:
            dfd = self._walk_dir(parts, create=False)
        except FileNotFoundError:
            return []
        try:
            with os.scandir(dfd) as it:
                return sorted(e.name for e in it if not e.name.startswith(TMP_PREFIX))
        finally:
            os.close(dfd)

    @_errors("deleting")
    def delete_tree(self, prefix: str) -> int:
        parts = _split(prefix.rstrip("/"))
        try:
            dfd = self._walk_dir(parts[:-1], create=False)
        except FileNotFoundError:
            return 0
        try:
            freed = self._remove_entry(dfd, parts[-1], parts)
        finally:
            os.close(dfd)
        self._mark_dirty("/".join(parts[:-1]))
        self.flush()
        return freed

    def _remove_entry(self, dfd: int, name: str, parts: Sequence[str]) -> int:
        """Remove dfd/name and, for a directory, everything in it; symlinks are not followed."""
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return 0
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dfd)
            return st.st_size if stat.S_ISREG(st.st_mode) else 0
        freed = 0
        self._forget_dir(parts)
        sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        try:
            with os.scandir(sub) as it:
                names = [e.name for e in it]
            for n in names:
                freed += self._remove_entry(sub, n, [*parts, n])
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=dfd)
        return freed

    @_errors("moving")
    def move(self, key: str, new_key: str) -> None:
        src, dst = _split(key), _split(new_key)
        try:
            sfd = self._open_dir(src[:-1], create=False)
        except FileNotFoundError as e:
            raise NotFound("file", key) from e
        try:
            dfd = self._open_dir(dst[:-1], create=True)
            try:
                try:
                    os.stat(dst[-1], dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    raise OperationFailed(f"cannot move {key}: {new_key} exists")
                try:
                    os.rename(src[-1], dst[-1], src_dir_fd=sfd, dst_dir_fd=dfd)
                except FileNotFoundError as e:
                    raise NotFound("file", key) from e
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        self._mark_dirty("/".join(src[:-1]))
        self._mark_dirty("/".join(dst[:-1]))
        self.flush()

    @_errors("writing")
    def replace(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        parts = _split(key)
        dfd = self._open_dir(parts[:-1], create=True)
        try:
            tmp = self._write_tmp(dfd, key, data)
            try:
                os.rename(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                os.unlink(tmp, dir_fd=dfd)
                raise
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.flush()

    def _flush_if_idle(self) -> None:
        """The batch is full: publish it, unless another thread is publishing already.

        Writers never queue behind a publish: while one thread waits for syncfs, the
        others keep writing tmp files (the next batch).  Before this, every writer
        that saw the batch full waited for the flush lock in turn, and the whole
        backup stalled for each syncfs (13 % of a full backup's thread time).
        """
        if not self._flush_lock.acquire(blocking=False):
            return
        try:
            self._flush_locked()
        finally:
            self._flush_lock.release()

    def flush(self) -> None:
        with self._flush_lock:
            try:
                self._flush_locked()
            except OSError as e:
                err = self.os_error(e, "", "writing")
                if err is e:
                    raise
                raise err from e

    def _flush_locked(self) -> None:
        self._check_failed()
        # One descriptor from before the first link to after the directories are synced.
        sync_fd = self._acquire_sync_fd()
        try:
            self._publish(sync_fd)
            with self._lock:
                dirty = sorted(self._dirty, key=len, reverse=True)
                self._dirty.clear()
            try:
                self._sync_dirs(dirty, sync_fd)
            except BaseException:
                with self._lock:
                    self._dirty.update(dirty)
                raise
        except (OSError, NoSpace) as e:
            self._failed = e
            raise
        finally:
            self._release_sync_fd()

    def _sync_error(self, e: OSError, what: str) -> BaseException:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return NoSpace(f"no space left on the repository's filesystem ({self.root}) "
                           f"while writing {what}")
        return e

    def _publish(self, sync_fd: int) -> None:
        """Make the deferred tmp files durable in one syncfs, then link them to their keys."""
        with self._lock:
            pending = dict(self._pending)
        if not pending:
            return
        try:
            _syncfs(sync_fd)
        except OSError as e:
            raise self._sync_error(e, "chunks") from e
        for key, (dirparts, tmp, _size) in pending.items():
            dfd = self._open_dir(dirparts, create=False)
            try:
                with contextlib.suppress(FileExistsError):  # same content, stored meanwhile
                    os.link(tmp, key.rsplit("/", 1)[-1], src_dir_fd=dfd, dst_dir_fd=dfd,
                            follow_symlinks=False)
                os.unlink(tmp, dir_fd=dfd)
            finally:
                os.close(dfd)
            self._mark_dirty("/".join(dirparts))
            with self._lock:
                self._pending.pop(key, None)
                self._pending_bytes -= _size

    def _sync_dirs(self, dirty: Sequence[str], sync_fd: int) -> None:
        if len(dirty) > _SYNCFS_DIRS:
            # A batch of chunks touches up to 256 directories: one syncfs commits them
            # all (fsync of each took 6 % of a full backup's thread time).
            try:
                _syncfs(sync_fd)
            except OSError as e:
                raise self._sync_error(e, "directories") from e
            return
        for dirkey in dirty:
            try:
                dfd = self._open_dir(_split(dirkey) if dirkey else [], create=False)
            except FileNotFoundError:
                continue
            try:
                os.fsync(dfd)
            except OSError as e:
                raise self._sync_error(e, f"directory {dirkey or '.'}") from e
            finally:
                os.close(dfd)
