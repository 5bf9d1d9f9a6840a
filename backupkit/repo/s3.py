"""Storage in an S3-compatible object store (AWS S3, Ceph RGW, MinIO), through botocore.

The object-store commit protocol (docs/format.md, "Object stores"):

- Every object is written with one PUT (chunks are at most 64 MiB, indexes 256 MiB,
  far below S3's 5 GiB single-PUT limit): backupkit starts no multipart upload, so an
  interrupted run of ours leaves no incomplete upload behind.  A PUT is atomic: the
  object appears whole or not at all, and is durable once acknowledged.  So there is
  no tmp object, no rename and no fsync.  ``leftovers()`` lists the incomplete
  multipart uploads under the prefix (another tool's, or an older version's), and
  ``delete()`` of such a leftover aborts the upload: gc frees their parts.
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
  One rule of ours bounds them: until the endpoint has answered once (any HTTP
  answer), a connection that cannot be made is tried ``FIRST_CONTACT_ATTEMPTS`` times
  only, so a wrong or dead endpoint fails within seconds; once it answered, the full
  budget rides out a gateway restart.

Credentials, region and endpoint come from the usual AWS places (environment,
``~/.aws/config`` and ``credentials``, a profile), settings in backupkit's config
override them (``S3Settings``).  With an explicit endpoint (any S3-compatible server)
path-style addressing is the default: Ceph RGW and MinIO need no DNS per bucket then.
"""

from __future__ import annotations

import contextlib
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

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_NO_BUCKET_CODES = {"NoSuchBucket"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
               "InvalidToken", "ExpiredToken"}
_READ_PIECE = 256 * 1024  # a GET body is copied into the caller's buffer in pieces this big
#: Attempts to connect before the endpoint has answered once (then: the full budget).
FIRST_CONTACT_ATTEMPTS = 3
#: Marks the pseudo-key of an incomplete multipart upload in leftovers().
_UPLOAD_MARK = "#multipart-upload="


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
        # attempts (about 20 s of backoff, botocore 1.44) ride out a gateway restart
        # (3-5 s for Ceph RGW here) when each thread has its own client (_client); an
        # endpoint that never answered gets FIRST_CONTACT_ATTEMPTS (_first_contact).
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
        self._new_client_args = (session, settings.endpoint or None, config)
        self._clients = threading.local()
        self._answered = False  # the endpoint has answered once (_first_contact)
        # Requests by kind, counted as they go on the wire (every attempt, retries too).
        self._counts: dict[str, int] = {}
        self._counts_lock = threading.Lock()
        self._clients.client = self._new_client()
        self._uploads: dict[str, tuple[str, str]] = {}  # leftovers(): pseudo-key -> upload
        self._cond = threading.Condition()
        self._pending: dict[str, int] = {}  # key -> size of deferred uploads not yet done
        self._inflight = 0
        self._failed: BaseException | None = None
        self._pool: ThreadPoolExecutor | None = None

    def _new_client(self) -> Any:
        session, endpoint, config = self._new_client_args
        with _sessions_lock:  # a session is not thread-safe
            client = session.client("s3", endpoint_url=endpoint, config=config)
        client.meta.events.register_first("needs-retry.s3", self._first_contact)
        client.meta.events.register("before-send.s3", self._count_request)
        client.meta.events.register("after-call.s3.PutObject", self._count_put_answer)
        return client

    @property
    def _client(self) -> Any:
        """This thread's botocore client: one per thread, because botocore's standard
        retry mode gives each client one retry quota (500 units, 14 per retry: about
        35 retries) shared by all its threads.  Eight uploads meeting a gateway that
        restarts used it up within half a second (measured: 9 threads, 0.2-0.6 s), and
        the run failed at once; with a client each, every request keeps its attempts
        (about 20 s of backoff), which rides out a restart.  ~15 ms per client."""
        client = getattr(self._clients, "client", None)
        if client is None:
            client = self._clients.client = self._new_client()
        return client

    def _first_contact(self, response: Any = None, caught_exception: Any = None,
                       attempts: int = 0, **_kw: Any) -> None:
        """botocore's needs-retry hook, called first after every attempt: stop retrying a
        connection that cannot be made until the endpoint has answered once.

        A wrong endpoint, or a gateway that is down when the command starts, then fails
        within seconds (exit 1) instead of after the whole backoff budget (half a
        minute); a gateway that goes away in the middle of a run, after answering, is
        retried with the full budget.  Returns None: botocore's own handler decides."""
        if response is not None:
            self._answered = True
        elif (not self._answered and attempts >= FIRST_CONTACT_ATTEMPTS
              and isinstance(caught_exception, botocore.exceptions.EndpointConnectionError)):
            raise caught_exception

    # -- request counting -----------------------------------------------------------

    def _count(self, kind: str) -> None:
        with self._counts_lock:
            self._counts[kind] = self._counts.get(kind, 0) + 1

    def _count_request(self, request: Any, **_kw: Any) -> None:
        method = str(getattr(request, "method", "") or "").upper()
        if method == "GET" and "list-type=" in str(getattr(request, "url", "")):
            method = "LIST"
        self._count(method or "OTHER")

    def _count_put_answer(self, http_response: Any, **_kw: Any) -> None:
        if getattr(http_response, "status_code", 0) == 412:
            self._count("PUT_EXISTED")  # a create-if-absent PUT found the object there

    def request_counts(self) -> dict[str, int]:
        """Requests sent so far by kind: PUT, GET, HEAD, LIST, DELETE (every attempt),
        and PUT_EXISTED: conditional PUTs answered 412 (the object was there)."""
        with self._counts_lock:
            return dict(self._counts)

    # -- naming and errors ----------------------------------------------------------

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


    def reopen(self) -> S3Storage:
        return S3Storage(self.bucket, self.prefix, self.settings)

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
        except botocore.exceptions.EndpointConnectionError as e:
            how = ("it has not answered yet: check the endpoint (AWS_ENDPOINT_URL_S3 or "
                   "s3.endpoint) and that the server runs" if not self._answered
                   else "it stopped answering in the middle of the run")
            raise OperationFailed(f"{self.location}: {what}: {e} ({how})") from e
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
                # settle=False: this very upload is pending; waiting for it would wait
                # for ourselves (a hang seen after a gateway restart).
                return self._get_bytes(key, len(body), settle=False) == body
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

    def _open(self, key: str, max_size: int, settle: bool = True) -> tuple[Any, int]:
        """A GET's streaming body and its length; NotFound, CorruptRepository if too big.

        settle: first wait for a deferred upload of this key (never from an upload
        thread reading back its own object)."""
        if settle and key in self._pending:
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

    def _get_bytes(self, key: str, max_size: int, settle: bool = True) -> bytes:
        body, size = self._open(key, max_size, settle)
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
                    yield ObjectInfo(key, int(obj["Size"]), obj["LastModified"].timestamp())

    def leftovers(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Incomplete multipart uploads under prefix, as ``KEY#multipart-upload=ID``
        pseudo-keys (their size: the parts uploaded); ``delete()`` of one aborts it.

        backupkit writes with single PUTs only: an interrupted write of ours leaves no
        tmp object and no upload (chunks uploaded by a run that never committed are
        ordinary unreferenced chunks, for gc).  An upload here was started by another
        tool or an older version; nothing can complete it into the repository, and its
        parts are stored (and billed) until it is aborted.  One listing request per
        1,000 uploads, one per upload for its size."""
        if prefix.strip("/"):
            self._key(prefix.strip("/"))
        full = self._root + prefix
        paginator = self._client.get_paginator("list_multipart_uploads")
        with self._errors(f"listing incomplete uploads under {prefix or '/'}"):
            uploads = [(u["Key"], u["UploadId"])
                       for page in paginator.paginate(Bucket=self.bucket, Prefix=full)
                       for u in page.get("Uploads", ())]
        for key, upload_id in uploads:
            rel = key[len(self._root):]
            size = 0
            with self._errors(f"listing the parts of an upload to {rel}"):
                try:
                    for page in self._client.get_paginator("list_parts").paginate(
                            Bucket=self.bucket, Key=key, UploadId=upload_id):
                        size += sum(int(p.get("Size", 0)) for p in page.get("Parts", ()))
                except botocore.exceptions.ClientError as e:
                    if _code(e) != "NoSuchUpload":
                        raise
                    continue  # completed or aborted meanwhile
            pseudo = f"{rel}{_UPLOAD_MARK}{upload_id}"
            self._uploads[pseudo] = (key, upload_id)
            yield ObjectInfo(pseudo, size)

    def _abort_upload(self, pseudo: str) -> bool:
        key, upload_id = self._uploads[pseudo]
        with self._errors(f"aborting the incomplete upload to {key[len(self._root):]}"):
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                    UploadId=upload_id)
            except botocore.exceptions.ClientError as e:
                if _code(e) != "NoSuchUpload":
                    raise
                return False
        del self._uploads[pseudo]
        return True

    def delete(self, key: str) -> bool:
        if key in self._uploads:
            return self._abort_upload(key)
        if self._head(key) is None:
            return False
        with self._errors(f"deleting {key}"):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        return True

    def delete_many(self, keys: Sequence[str]) -> int:
        """DeleteObjects, 1000 keys a request.  S3 answers "deleted" for a key that did
        not exist too, so the count is of the keys asked for, less those it refused."""
        done = 0
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            with self._errors(f"deleting {len(batch)} objects"):
                resp = self._client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True})
            errs = resp.get("Errors") or []
            if errs:
                e = errs[0]
                raise OperationFailed(f"{self.location}: deleting {e.get('Key')}: "
                                      f"{e.get('Code')}: {e.get('Message')} "
                                      f"({len(errs)} of {len(batch)} refused)")
            done += len(batch)
        return done

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
