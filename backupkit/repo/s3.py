"""Storage in an S3-compatible object store (AWS S3, Ceph RGW, MinIO), through botocore.

The object-store commit protocol (docs/format.md, "Object stores"):

- Every object is written with one PUT (chunks are at most 64 MiB, indexes 256 MiB,
  far below S3's 5 GiB single-PUT limit): no multipart upload, so an interrupted run
  leaves no incomplete upload behind, and ``leftovers()`` has nothing to list.  A PUT is
  atomic: the object appears whole or not at all, and is durable once acknowledged.
  So there is no tmp object, no rename and no fsync.
- ``put_if_absent`` sends ``If-None-Match: *`` (create-if-absent, honoured by AWS S3
  since 2024, Ceph RGW and MinIO on single PUTs; a store may ignore it on multipart
  completion, which we never use).  412 means another writer was first.
- ``put_if_absent(deferred=True)`` (chunks) hands the PUT to a pool of upload threads
  and returns; at most ``max_inflight`` bytes are queued or on the wire (memory stays
  bounded), ``flush()`` waits for every upload and raises the first failure (and keeps
  raising it until ``discard_pending()``).  Chunks and indexes are therefore stored
  before the manifest that names them, which is written last as the commit point.
- Retries (throttling such as 503 SlowDown, 5xx, dropped connections) are botocore's
  ``standard`` retry mode with exponential backoff and jitter, not a loop of ours.

Credentials, region and endpoint come from the usual AWS places (environment,
``~/.aws/config`` and ``credentials``, a profile), settings in backupkit's config
override them (``S3Settings``).  With an explicit endpoint (any S3-compatible server)
path-style addressing is the default: Ceph RGW and MinIO need no DNS per bucket then.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from backupkit.errors import CorruptRepository, NotFound, OperationFailed, UsageError
from backupkit.fileio import Buffer
from backupkit.repo.storage import ObjectInfo, ReadBuffer, StoreProperties

#: Where remote stores keep their host-local lock files (see S3Storage.lock_root).
ROOT_LOCK_DIR = "/var/lib/backupkit/locks"

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_NO_BUCKET_CODES = {"NoSuchBucket"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
               "InvalidToken", "ExpiredToken"}
_READ_PIECE = 256 * 1024  # a GET body is copied into the caller's buffer in pieces this big


@dataclass(frozen=True)
class S3Settings:
    """What backupkit's config may set; None: botocore's own resolution (environment,
    ~/.aws files, defaults)."""

    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing_style: str | None = None  # "path", "virtual" or "auto"
    max_attempts: int = 10
    concurrency: int = 8


_sessions: dict[tuple[str | None, str | None], Any] = {}
_sessions_lock = threading.Lock()


def _session(profile: str | None, region: str | None) -> Any:
    """One boto3 session per (profile, region): its second client costs ~15 ms, not ~300
    (the service model is loaded once)."""
    with _sessions_lock:
        s = _sessions.get((profile, region))
        if s is None:
            try:
                s = boto3.session.Session(profile_name=profile, region_name=region)
            except botocore.exceptions.ProfileNotFound as e:
                raise UsageError(f"S3: {e}") from e
            _sessions[(profile, region)] = s
        return s


def _body(data: Buffer | Sequence[Buffer]) -> bytes:
    """The object's bytes in one piece (a copy: the caller may reuse its buffers)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return b"".join(data)


def _code(e: botocore.exceptions.ClientError) -> str:
    err = e.response.get("Error", {})
    code = str(err.get("Code") or "")
    status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code or status


def _status(e: botocore.exceptions.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


class S3Storage:
    """Storage under s3://bucket/prefix (see the module docstring)."""

    #: Bytes of deferred uploads queued or in flight at most (bounded memory).
    max_inflight = 64 * 1024 * 1024

    def __init__(self, bucket: str, prefix: str = "",
                 settings: S3Settings | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._root = f"{self.prefix}/" if self.prefix else ""
        self.settings = settings = settings or S3Settings()
        self.properties = StoreProperties(
            atomic_create=True, concurrency=settings.concurrency, wants_prefetch_hint=False,
            aligned_reads=False, local=False)
        session = _session(settings.profile, settings.region)
        endpoint = (settings.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        style = settings.addressing_style or ("path" if endpoint else None)
        # botocore's standard retry mode (backoff with jitter on throttling, 5xx and
        # dropped connections); $AWS_RETRY_MODE and $AWS_MAX_ATTEMPTS still apply.  Ten
        # attempts ride out a gateway restart (3-5 s for Ceph RGW here); an endpoint
        # that stays unreachable fails after about 20 s.
        retries: dict[str, Any] = {}
        if not os.environ.get("AWS_RETRY_MODE"):
            retries["mode"] = "standard"
        if not os.environ.get("AWS_MAX_ATTEMPTS"):
            retries["max_attempts"] = settings.max_attempts
        config = botocore.config.Config(
            retries=retries,
            max_pool_connections=settings.concurrency + 2,
            connect_timeout=10, read_timeout=120,
            s3={"addressing_style": style} if style else None,
            # S3-compatible servers (Ceph 16 among them) reject the CRC trailers that
            # botocore >= 1.36 adds by default; our own hashes cover every object.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.endpoint = endpoint
        with _sessions_lock:  # a session is not thread-safe
            self._client: Any = session.client("s3", endpoint_url=settings.endpoint or None,
                                               config=config)
        self._cond = threading.Condition()
        self._pending: dict[str, int] = {}  # key -> size of deferred uploads not yet done
        self._inflight = 0
        self._failed: BaseException | None = None
        self._pool: ThreadPoolExecutor | None = None

    # -- naming and errors ----------------------------------------------------------

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


    def reopen(self) -> S3Storage:
        return S3Storage(self.bucket, self.prefix, self.settings)

    @property
    def lock_root(self) -> str:
        if os.geteuid() == 0:
            base = ROOT_LOCK_DIR
        else:
            state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
            base = os.path.join(state, "backupkit", "locks")
        ident = f"{self.endpoint or ''} {self.location}".encode()
        path = os.path.join(base, "s3-" + hashlib.sha256(ident).hexdigest()[:20])
        os.makedirs(path, 0o700, exist_ok=True)
        return path

    def _key(self, key: str) -> str:
        parts = key.split("/")
        if any(not p or p in (".", "..") or "\0" in p for p in parts):
            raise OperationFailed(f"invalid storage key {key!r}")
        return self._root + key

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """One clear line for everything botocore raises."""
        try:
            yield
        except botocore.exceptions.ClientError as e:
            code = _code(e)
            msg = e.response.get("Error", {}).get("Message") or code
            if code in _NO_BUCKET_CODES:
                raise NotFound("bucket", self.bucket) from e
            if code in _AUTH_CODES:
                raise UsageError(f"{self.location}: {what}: access denied ({code}: {msg}); "
                                 "check the S3 credentials") from e
            raise OperationFailed(f"{self.location}: {what}: {code}: {msg}") from e
        except botocore.exceptions.NoCredentialsError as e:
            raise UsageError(f"{self.location}: no S3 credentials (set AWS_ACCESS_KEY_ID "
                             "and AWS_SECRET_ACCESS_KEY, or a profile)") from e
        except botocore.exceptions.BotoCoreError as e:
            raise OperationFailed(f"{self.location}: {what}: {e}") from e

    # -- the interface ----------------------------------------------------------------

    def create(self, marker: str) -> None:
        with self._errors("checking the bucket"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except botocore.exceptions.ClientError as e:
                if _status(e) == 404 or _code(e) in _NO_BUCKET_CODES:
                    raise NotFound("bucket", self.bucket,
                                   "create it first; backupkit never creates buckets") from e
                raise
        if self.exists(marker):
            raise UsageError(f"{self.location} is already a backupkit repository")
        with self._errors("listing"):
            resp = self._client.list_objects_v2(Bucket=self.bucket, Prefix=self._root,
                                                MaxKeys=1)
        if resp.get("KeyCount", 0) or resp.get("Contents"):
            raise UsageError(f"cannot create a repository in {self.location}: the prefix "
                             "is not empty and is not a repository")

    def prefetch(self, key: str) -> None:
        return None

    def _put_new(self, key: str, body: bytes) -> bool:
        """PUT with If-None-Match: *; False if the key existed (412)."""
        k = self._key(key)
        with self._errors(f"writing {key}"):
            try:
                self._client.put_object(Bucket=self.bucket, Key=k, Body=body,
                                        IfNoneMatch="*")
                return True
            except botocore.exceptions.ClientError as e:
                status = _status(e)
                if status not in (409, 412):
                    raise
                retried = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
            if status == 409:
                # AWS: a concurrent conditional write to the key was in progress.
                if self._head(key) is not None:
                    return False
                raise OperationFailed(f"{self.location}: writing {key}: a concurrent write "
                                      "conflicted; try again")
            if not retried:
                return False  # 412: another writer was first
            # 412 after a retry: it may be our own first attempt, whose answer was lost;
            # then the stored object holds our bytes.
            try:
                return self._get_bytes(key, len(body)) == body
            except (NotFound, CorruptRepository):
                return False

    def put_if_absent(self, key: str, data: Buffer | Sequence[Buffer], *,
                      deferred: bool = False) -> bool:
        self._key(key)
        body = _body(data)
        if not deferred:
            return self._put_new(key, body)
        with self._cond:
            if self._failed is not None:
                raise self._failed
            if key in self._pending:
                return False
            while self._inflight and self._inflight + len(body) > self.max_inflight:
                self._cond.wait()
            if self._failed is not None:
                raise self._failed
            self._pending[key] = len(body)
            self._inflight += len(body)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.properties.concurrency,
                                                thread_name_prefix="s3-upload")
            pool = self._pool
        pool.submit(self._upload, key, body)
        return True

    def _upload(self, key: str, body: bytes) -> None:
        try:
            self._put_new(key, body)
        except BaseException as e:
            with self._cond:
                if self._failed is None:
                    self._failed = e
        finally:
            with self._cond:
                self._pending.pop(key, None)
                self._inflight -= len(body)
                self._cond.notify_all()

    def _wait_idle(self) -> None:
        with self._cond:
            while self._inflight:
                self._cond.wait()

    def flush(self) -> None:
        self._wait_idle()
        with self._cond:
            if self._failed is not None:
                raise self._failed

    def discard_pending(self) -> None:
        # Uploads cannot be called back: wait for them.  Those that landed are chunks no
        # manifest names (gc removes them); the recorded failure is forgotten.
        self._wait_idle()
        with self._cond:
            self._failed = None

    def _head(self, key: str) -> int | None:
        """The object's size, None if it does not exist."""
        with self._errors(f"looking up {key}"):
            try:
                resp = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except botocore.exceptions.ClientError as e:
                if _status(e) == 404 or _code(e) in _NOT_FOUND_CODES:
                    return None
                raise
        return int(resp["ContentLength"])

    def exists(self, key: str) -> bool:
        if key in self._pending:
            return True
        return self._head(key) is not None

    def size(self, key: str) -> int:
        with self._cond:
            if key in self._pending:
                return self._pending[key]
        n = self._head(key)
        if n is None:
            raise NotFound("file", key)
        return n

    def _open(self, key: str, max_size: int) -> tuple[Any, int]:
        """A GET's streaming body and its length; NotFound, CorruptRepository if too big."""
        if key in self._pending:
            self._wait_idle()
        with self._errors(f"reading {key}"):
            try:
                resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            except botocore.exceptions.ClientError as e:
                if _code(e) in _NO_BUCKET_CODES:
                    raise  # _errors: NotFound("bucket")
                if _status(e) == 404 or _code(e) in _NOT_FOUND_CODES:
                    raise NotFound("file", key) from e
                raise
        body, size = resp["Body"], int(resp["ContentLength"])
        if size > max_size:
            body.close()
            raise CorruptRepository(
                f"{key}: is {size} bytes, more than the {max_size} allowed for it",
                path=self.location)
        return body, size

    def _get_bytes(self, key: str, max_size: int) -> bytes:
        body, size = self._open(key, max_size)
        with self._errors(f"reading {key}"):
            try:
                data: bytes = body.read()
            finally:
                body.close()
        if len(data) != size:
            raise CorruptRepository(f"{key}: changed size while being read",
                                    path=self.location)
        return data

    def get(self, key: str, max_size: int) -> bytes:
        return self._get_bytes(key, max_size)

    def get_into(self, key: str, buf: ReadBuffer, max_size: int | None = None) -> memoryview:
        limit = len(buf) if max_size is None else min(max_size, len(buf))
        body, size = self._open(key, limit)
        view = memoryview(buf)
        pos = 0
        with self._errors(f"reading {key}"):
            try:
                for piece in body.iter_chunks(_READ_PIECE):
                    n = len(piece)
                    if pos + n > size:
                        break
                    view[pos:pos + n] = piece
                    pos += n
            finally:
                body.close()
        if pos != size:
            raise CorruptRepository(f"{key}: changed size while being read",
                                    path=self.location)
        return view[:pos]

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        if prefix.strip("/"):
            self._key(prefix.strip("/"))
        full = self._root + prefix
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors(f"listing {prefix or '/'}"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(self._root):]
                    if not key or key.endswith("/"):
                        continue  # a "directory" marker some tools create
                    yield ObjectInfo(key, int(obj["Size"]))

    def leftovers(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Single PUTs only: an interrupted write leaves nothing (no tmp object, no
        # incomplete multipart upload).  Chunks uploaded by a run that never committed
        # are ordinary unreferenced chunks, for gc.
        return iter(())

    def delete(self, key: str) -> bool:
        if self._head(key) is None:
            return False
        with self._errors(f"deleting {key}"):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        return True

    def children(self, prefix: str) -> Sequence[str]:
        if prefix.strip("/"):
            self._key(prefix.strip("/"))
        full = self._root + prefix
        names: set[str] = set()
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors(f"listing {prefix or '/'}"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
                for cp in page.get("CommonPrefixes", ()):
                    names.add(cp["Prefix"][len(full):].rstrip("/"))
                for obj in page.get("Contents", ()):
                    names.add(obj["Key"][len(full):])
        names.discard("")
        return sorted(names)

    def delete_tree(self, prefix: str) -> int:
        """The object named prefix, if any, and every object under prefix/ (no symlinks here)."""
        key = prefix.rstrip("/")
        freed = 0
        size = self._head(key)
        if size is not None:
            with self._errors(f"deleting {key}"):
                self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
            freed += size
        for info in list(self.list(key + "/")):
            with self._errors(f"deleting {info.key}"):
                self._client.delete_object(Bucket=self.bucket, Key=self._key(info.key))
            freed += info.size
        return freed

    def move(self, key: str, new_key: str) -> None:
        """Copy then delete (S3 has no rename): a crash in between leaves both, never
        neither; new_key is checked first and is never replaced."""
        if self._head(new_key) is not None:
            raise OperationFailed(f"cannot move {key}: {new_key} exists")
        if self._head(key) is None:
            raise NotFound("file", key)
        with self._errors(f"moving {key}"):
            self._client.copy_object(Bucket=self.bucket, Key=self._key(new_key),
                                     CopySource={"Bucket": self.bucket, "Key": self._key(key)})
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def replace(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        body = _body(data)
        with self._errors(f"writing {key}"):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body)

    def bulk(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()
