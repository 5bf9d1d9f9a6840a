"""An in-memory Storage for fast tests of pure repository logic (never a proof for a real store).

It follows the Storage contract (tests/repo/test_store_contract.py runs against it):
deferred objects become visible to other instances sharing the same ``objects`` only
at flush(), like a store that publishes in batches.  Modification times come from
``clock`` (time.time by default; a test may pass a fake one to age objects) and are
shared, like the objects, by every instance on the same ``objects``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from backupkit.errors import CorruptRepository, NotFound, OperationFailed, UsageError
from backupkit.fileio import Buffer
from backupkit.repo.storage import ObjectInfo, ReadBuffer, StoreProperties


def _bytes(data: Buffer | Sequence[Buffer]) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return b"".join(bytes(b) for b in data)


def _check(key: str) -> None:
    if any(not p or p in (".", "..") or "\0" in p for p in key.split("/")):
        raise OperationFailed(f"invalid storage key {key!r}")


#: id(objects) -> key -> modification time, shared by the instances on one objects dict.
_MTIMES: dict[int, dict[str, float]] = {}


class MemoryStorage:
    properties = StoreProperties(atomic_create=True, concurrency=4, wants_prefetch_hint=False,
                                 aligned_reads=False, local=False)

    def __init__(self, objects: dict[str, bytes] | None = None, name: str = "mem",
                 clock: Callable[[], float] | None = None) -> None:
        self.objects: dict[str, bytes] = {} if objects is None else objects
        self.mtimes = _MTIMES.setdefault(id(self.objects), {})
        self.clock = clock or time.time
        self.name = name
        self._pending: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def reopen(self) -> MemoryStorage:
        return MemoryStorage(self.objects, self.name)

    @property
    def location(self) -> str:
        return f"memory://{self.name}"

    def _stamp(self, key: str) -> None:
        self.mtimes[key] = self.clock()

    def create(self, marker: str) -> None:
        with self._lock:
            if marker in self.objects:
                raise UsageError(f"{self.location} is already a backupkit repository")
            if self.objects:
                raise UsageError(f"cannot create a repository in {self.location}: not empty")

    def prefetch(self, key: str) -> None:
        return None

    def put_if_absent(self, key: str, data: Buffer | Sequence[Buffer], *,
                      deferred: bool = False) -> bool:
        _check(key)
        body = _bytes(data)
        with self._lock:
            if key in self.objects or key in self._pending:
                return False
            (self._pending if deferred else self.objects)[key] = body
            if not deferred:
                self._stamp(key)
            return True

    def _find(self, key: str) -> bytes:
        with self._lock:
            data = self._pending.get(key, self.objects.get(key))
        if data is None:
            raise NotFound("file", key)
        return data

    def get(self, key: str, max_size: int) -> bytes:
        data = self._find(key)
        if len(data) > max_size:
            raise CorruptRepository(f"{key}: bigger than {max_size}", path=self.location)
        return data

    def get_into(self, key: str, buf: ReadBuffer, max_size: int | None = None) -> memoryview:
        limit = len(buf) if max_size is None else min(max_size, len(buf))
        data = self.get(key, limit)
        view = memoryview(buf)
        view[:len(data)] = data
        return view[:len(data)]

    def exists(self, key: str) -> bool:
        with self._lock:
            return key in self._pending or key in self.objects

    def size(self, key: str) -> int:
        return len(self._find(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._lock:
            items = sorted((k, len(v), self.mtimes.get(k, 0.0))
                           for k, v in self.objects.items() if k.startswith(prefix))
        return iter([ObjectInfo(k, n, t) for k, n, t in items])

    def leftovers(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return iter(())

    def delete(self, key: str) -> bool:
        _check(key)
        with self._lock:
            return self.objects.pop(key, None) is not None

    def delete_many(self, keys: Sequence[str]) -> int:
        return sum(1 for k in keys if self.delete(k))

    def children(self, prefix: str) -> Sequence[str]:
        with self._lock:
            return sorted({k[len(prefix):].split("/")[0] for k in self.objects
                           if k.startswith(prefix) and len(k) > len(prefix)})

    def delete_tree(self, prefix: str) -> int:
        key = prefix.rstrip("/")
        with self._lock:
            gone = [k for k in self.objects if k == key or k.startswith(key + "/")]
            return sum(len(self.objects.pop(k)) for k in gone)

    def move(self, key: str, new_key: str) -> None:
        _check(key)
        _check(new_key)
        with self._lock:
            if new_key in self.objects:
                raise OperationFailed(f"cannot move {key}: {new_key} exists")
            if key not in self.objects:
                raise NotFound("file", key)
            self.objects[new_key] = self.objects.pop(key)
            self._stamp(new_key)

    def replace(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        _check(key)
        body = _bytes(data)
        with self._lock:
            self.objects[key] = body
            self._stamp(key)

    def flush(self) -> None:
        with self._lock:
            for k, v in self._pending.items():
                if k not in self.objects:
                    self.objects[k] = v
                    self._stamp(k)
            self._pending.clear()

    def discard_pending(self) -> None:
        with self._lock:
            self._pending.clear()

    def bulk(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()
