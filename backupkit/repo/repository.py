"""The repository (format v2; v3: encrypted): chunks, indexes, manifests, locks.

See docs/format.md.  An encrypted repository seals every chunk, index and
manifest with its data key (backupkit.repo.crypto) and names chunks by a keyed
hash; everything else works the same on both kinds.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import blake3
import zstandard

from backupkit.config import CHUNK_HASHES, CHUNK_SIZE_DEFAULT, CHUNK_SIZE_RANGE, chunk_size_ok
from backupkit.errors import (
    CorruptRepository,
    Error,
    InvalidName,
    KeyRequired,
    NotFound,
    OperationFailed,
    PermissionDenied,
    RepositoryError,
    UnsupportedFormat,
    UsageError,
    WrongKey,
)
from backupkit.fileio import Buffer
from backupkit.repo import crypto, fleet, locks
from backupkit.repo.index import Index, IndexFormatError, Piece
from backupkit.repo.manifest import Manifest
from backupkit.repo.names import check_name
from backupkit.repo.storage import (
    LocalStorage,
    ObjectInfo,
    ReadBuffer,
    Storage,
    aligned_buffer,
    list_all,
)
from backupkit.repo.url import open_storage

_B = TypeVar("_B", bound=Buffer)
log = logging.getLogger(__name__)

REPO_FORMAT = "backupkit-repository"
REPO_VERSION = 3  # the newest this code reads: 3 = encrypted (docs/format.md)
PLAIN_VERSION = 2  # unencrypted repositories are created as version 2, as before
ENCRYPTED_VERSION = 3
# The chunk hashes a repository may use; both give 32-byte digests.  BLAKE3 is the
# default for new repositories: 3.7-4.5x faster than sha256 (with SHA-NI) on one
# core here, and hashing every byte is a large part of backup, restore and verify.
_HASH_FUNCTIONS: dict[str, Callable[[Buffer], Any]] = {"blake3": blake3.blake3,
                                                       "sha256": hashlib.sha256}
HASHES = {name: _HASH_FUNCTIONS[name] for name in CHUNK_HASHES}
DEFAULT_HASH = CHUNK_HASHES[0]
CONFIG_KEY = "config.json"
CONFIG_MAX = 64 * 1024
MANIFEST_MAX = 16 * 1024 * 1024
INDEX_MAX = 256 * 1024 * 1024

CODEC_NONE = 0
CODEC_ZSTD = 1
_CODEC_NONE_B = bytes([CODEC_NONE])
_CODEC_ZSTD_B = bytes([CODEC_ZSTD])

MANIFEST_NAME = "manifest.json"
INDEX_SUFFIX = ".index"
#: Damaged chunks are moved here by verify (quarantine/<hex digest>.<time>-<random>), so
#: that deduplication no longer trusts them and the next backup stores the data afresh.
QUARANTINE = "quarantine"
#: Directories a new filesystem has in its root, which init may create a repository beside.


class ChunkMissing(CorruptRepository):
    """A chunk a backup references is not in the store (damage of the backup, not of a file)."""


@dataclass
class Listing:
    """The committed backups that could be read, and those that could not (with why)."""

    manifests: list[Manifest] = field(default_factory=list)  # oldest first
    damaged: list[tuple[str, str, Error]] = field(default_factory=list)  # domain, id, error

    def damaged_json(self) -> list[dict[str, Any]]:
        return [{"domain": d, "id": bid, "error": str(e)} for d, bid, e in self.damaged]


def chunk_key(digest: bytes) -> str:
    h = digest.hex()
    return f"chunks/{h[:2]}/{h}"


def backup_prefix(domain: str, backup_id: str) -> str:
    return f"backups/{domain}/{backup_id}/"


def manifest_key(domain: str, backup_id: str) -> str:
    return f"backups/{domain}/{backup_id}/{MANIFEST_NAME}"


def index_key(domain: str, backup_id: str, disk: str) -> str:
    return f"backups/{domain}/{backup_id}/{disk}{INDEX_SUFFIX}"


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Repository:
    """A backupkit repository.  Create with Repository.init, open with Repository.open."""

    def __init__(self, path: str, storage: Storage, config: dict[str, Any],
                 key: crypto.DataKey | None = None) -> None:
        self.path = path
        self.storage = storage
        self.config = config
        self.chunk_size: int = config["chunk_size"]
        self.compression_level: int = config["compression_level"]
        self.hash_name: str = config["hash"]  # _parse_config fills in a missing one
        self._hash = HASHES[self.hash_name]
        #: Encrypted (version 3): every object sealed, chunk names keyed (docs/format.md).
        self.encrypted = "encryption" in config
        self._key = key
        self._passphrase: crypto.Passphrase | None = None  # for a lazy unlock
        #: The largest chunk file: codec byte and data, plus nonce and tag when sealed.
        self.chunk_max = self.chunk_size + 1 + (crypto.OVERHEAD if self.encrypted else 0)
        self._tls = threading.local()
        self._zero_digests: dict[int, bytes] = {}
        self._zeros = memoryview(bytes(self.chunk_size))
        #: Timing of locks and gc (config: lock_refresh, lock_stale, max_clock_skew,
        #: gc_grace); the command line sets it from the configuration.
        self.lock_settings = locks.settings()
        self._writer: locks.Lock | None = None
        self._writer_users = 0
        self._writer_mx = threading.Lock()
        self._registrations: dict[str, fleet.Registration] = {}
        # Deduplication without asking the store (docs/format.md, "Deduplication"):
        # chunks known to be stored, from the indexes seeded (built lazily, at the first
        # put_chunk) and from what this process stored since.
        self._known_lock = threading.Lock()
        self._known: set[bytes] = set()
        self._seeds: list[Index] = []
        self._tracking = False  # between start_known() and forget_known(): a run's lock held
        #: Chunks put_chunk wrote (or queued) and their bytes, for this process.
        self.chunks_written = 0
        self.bytes_written = 0

    # -- creation ------------------------------------------------------------

    @classmethod
    def init(cls, location: str | Storage, *, chunk_size: int = CHUNK_SIZE_DEFAULT,
             compression_level: int = 1, hash_name: str = DEFAULT_HASH,
             encryption: crypto.Passphrase | None = None,
             master_pubkey: tuple[str, bytes] | None = None) -> Repository:
        """Create a repository at location: a path, a URL (backupkit.repo.url) or a Storage.

        With encryption (where the passphrase comes from), an encrypted repository
        (version 3) with a new data key in a key file; with master_pubkey (file
        name, PEM), also the data key sealed to that public key (escrow.json).
        """
        storage = open_storage(location) if isinstance(location, str) else location
        if master_pubkey is not None and encryption is None:
            raise UsageError("--master-pubkey needs --encryption")
        try:
            return cls._init(storage, chunk_size, compression_level, hash_name, encryption,
                             master_pubkey)
        except OSError as e:  # a read-only or forbidden place: say so, naming it
            if not isinstance(storage, LocalStorage):
                raise
            err = storage.os_error(e, "", "creating")
            if err is e:
                raise
            raise err from e

    @classmethod
    def _init(cls, storage: Storage, chunk_size: int, compression_level: int, hash_name: str,
              encryption: crypto.Passphrase | None,
              master_pubkey: tuple[str, bytes] | None) -> Repository:
        path = storage.location
        if hash_name not in HASHES:
            raise UsageError(f"unknown chunk hash {hash_name!r} "
                             f"(choose {' or '.join(sorted(HASHES))})")
        if not chunk_size_ok(chunk_size):
            raise UsageError(f"chunk size must be a power of two, {CHUNK_SIZE_RANGE}, "
                             f"not {chunk_size}")
        if not -7 <= compression_level <= 22 or compression_level == 0:
            # zstd reads 0 as "its default" (3): recording 0 would hide the level in use.
            raise UsageError(f"zstd compression level must be in -7..-1 or 1..22 "
                             f"(0 would mean zstd's default, 3), not {compression_level}")
        config: dict[str, Any] = {
            "format": REPO_FORMAT,
            "version": PLAIN_VERSION,
            "id": uuid.uuid4().hex,
            "created": _now_iso(),
            "chunk_size": chunk_size,
            "hash": hash_name,
            "compression": "zstd",
            "compression_level": compression_level,
        }
        key = None
        keyfile = escrow = None
        if encryption is not None:
            key = crypto.DataKey.generate(config["id"], hash_name)
            if master_pubkey is not None:  # checked before anything is written
                escrow = crypto.seal_to_master(key, master_pubkey[1], master_pubkey[0])
            keyfile = crypto.wrap_key(key, encryption.get(confirm=True), config["created"])
            config["version"] = ENCRYPTED_VERSION
            config["encryption"] = {"cipher": crypto.CIPHER,
                                    "chunk_names": f"{hash_name}-keyed",
                                    "kdf": "scrypt", "key_check": key.check}
        # Every check and question first (the passphrase above): nothing is written until
        # here, not even the directory.
        storage.create(CONFIG_KEY)
        if keyfile is not None:
            # The keys before config.json: a repository never exists without its key.
            storage.put_if_absent(f"{crypto.KEYS_DIR}{secrets.token_hex(8)}.json", keyfile)
            if escrow is not None:
                storage.put_if_absent(crypto.ESCROW_KEY, escrow)
            storage.flush()
        # Create-if-absent: of two inits racing for one location, one wins.
        if not storage.put_if_absent(CONFIG_KEY, json.dumps(config, indent=1).encode() + b"\n"):
            raise UsageError(f"{path} is already a backupkit repository")
        storage.flush()
        if storage.properties.local:
            for d in ("chunks", "backups", "locks"):
                os.mkdir(os.path.join(path, d), 0o755)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return cls(path, storage, config, key)

    @classmethod
    def open(cls, location: str | Storage, passphrase: crypto.Passphrase | None = None,
             *, lazy: bool = False) -> Repository:
        """Open the repository at location: a path, a URL (backupkit.repo.url) or a Storage.

        An encrypted repository is unlocked at once with passphrase when one is
        given (WrongKey, exit 2, before anything is written) unless lazy (for a
        caller that may only lock); else on first use, from passphrase or the
        default places ($BACKUPKIT_PASSPHRASE, systemd credential, a prompt).
        """
        storage = open_storage(location) if isinstance(location, str) else location
        path = storage.location
        if storage.properties.local and not os.path.isdir(path):
            raise NotFound("repository", path)
        try:
            raw = storage.get(CONFIG_KEY, CONFIG_MAX)
        except NotFound as e:
            if getattr(e, "what", "") == "bucket":
                raise
            raise NotFound("repository", path, "no config.json: not a backupkit repository"
                           ) from e
        except CorruptRepository as e:
            raise CorruptRepository(f"bad config.json: {e.reason}", path=path) from e
        repo = cls(path, storage, _parse_config(raw, path))
        if not repo.encrypted:
            repo._refuse_plaintext(passphrase)
        repo._passphrase = passphrase
        if repo.encrypted and passphrase is not None and not lazy:
            repo.unlock(passphrase)
        return repo

    def _refuse_plaintext(self, passphrase: crypto.Passphrase | None) -> None:
        """config.json is the one object nobody can authenticate: one that says
        "unencrypted" beside key files was replaced, and a client given a passphrase
        expects an encrypted repository.  Either way, writing in the clear is refused."""
        if self.storage.exists(crypto.ESCROW_KEY) or self.storage.children(crypto.KEYS_DIR):
            raise CorruptRepository(
                "config.json says the repository is not encrypted, but it holds key files: "
                "config.json was replaced or damaged; nothing is read or written in the clear",
                path=self.path)
        if passphrase is not None and (passphrase.file or passphrase.config_file):
            raise UsageError(
                f"repository {self.path} is not encrypted, but a passphrase file is "
                "configured (--passphrase-file or passphrase_file): check that this is the "
                "repository meant, or drop the passphrase setting")

    def sibling(self) -> Repository:
        """The same repository through a Storage of its own, for a second backup running
        at once in this process (``backup --jobs``): each has its own batch of chunks
        not yet published, so one backup's failure (discard_pending) cannot drop
        another's.  An encrypted repository is unlocked first, once for all."""
        key = self.key if self.encrypted else None
        new = Repository(self.path, self.storage.reopen(), self.config, key)
        new._passphrase = self._passphrase
        new.lock_settings = self.lock_settings
        return new

    # -- keys (encrypted repositories) ------------------------------------------

    @property
    def key(self) -> crypto.DataKey:
        """The data key of an encrypted repository (unlocked on first use)."""
        if self._key is None:
            if not self.encrypted:
                raise UsageError(f"repository {self.path} is not encrypted")
            self.unlock(self._passphrase or crypto.Passphrase())
        assert self._key is not None
        return self._key

    def key_files(self) -> list[str]:
        """Keys of the key files under keys/ (the escrow is not one)."""
        return [f"{crypto.KEYS_DIR}{n}" for n in self.storage.children(crypto.KEYS_DIR)
                if n.endswith(".json") and f"{crypto.KEYS_DIR}{n}" != crypto.ESCROW_KEY]

    def unlock(self, passphrase: crypto.Passphrase | bytes) -> str:
        """Open the data key with a passphrase: the key file that opened; WrongKey if none."""
        files = self.key_files()
        if not files:
            raise KeyRequired(
                f"repository {self.path} has no key file in keys/: restore one with "
                "'backupkit key import' (--paper for a paper key) or 'backupkit key recover "
                "--master-key FILE'")
        secret = passphrase if isinstance(passphrase, bytes) else passphrase.get()
        for name in files:
            try:
                doc = crypto.parse_key_file(self.storage.get(name, crypto.KEYFILE_MAX), name)
            except (UsageError, RepositoryError) as e:
                log.warning("repository %s: skipping key file %s: %s", self.path, name, e)
                continue
            if doc["repository"] != self.config["id"]:
                continue
            key = crypto.unwrap_key(doc, secret, self.hash_name)
            if key is not None:
                self.adopt_key(key, f"key file {name}")
                return name
        raise WrongKey(f"the passphrase opens none of the {len(files)} key file(s) of "
                       f"repository {self.path}")

    def adopt_key(self, key: crypto.DataKey, what: str) -> None:
        """Use key if it is this repository's (its check value matches config.json)."""
        if key.repo_id != self.config["id"]:
            raise WrongKey(f"{what} belongs to repository {key.repo_id}, not to {self.path} "
                           f"({self.config['id']})")
        if not hmac.compare_digest(key.check, self.config["encryption"]["key_check"]):
            raise WrongKey(f"{what} does not open repository {self.path} (its key check "
                           "differs)")
        self._key = key

    def _seal(self, data: Buffer, ad: bytes) -> bytes:
        return self.key.seal(data, ad)

    def _open_sealed(self, blob: Buffer, ad: bytes, what: str) -> bytes:
        plain = self.key.open(blob, ad)
        if plain is None:
            raise CorruptRepository(f"{what} fails authentication (tampered with, damaged, "
                                    "or another object put in its place)", path=self.path)
        return plain

    # -- locks (docs/format.md, "Locks and gc") ---------------------------------

    def lock_read(self, wait: float = 0.0) -> contextlib.AbstractContextManager[None]:
        """What readers (verify, restore, serve, copy's source) hold: nothing.

        A reader is never blocked by gc nor blocks it: gc deletes only chunks that no
        committed backup references.  (A backup deleted by prune while it is read
        fails that read, as the operator asked.)  `wait` is accepted for symmetry.
        """
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def lock_writer(self, wait: float = 0.0) -> Iterator[locks.Lock]:
        """The writer lock: held by whatever stores chunks and commits backups (backup,
        copy into this repository, import).  Writers never exclude each other nor gc;
        gc learns from it how old the oldest running writer is and waits for its
        commits (fleet.py).  Re-entrant within this Repository object."""
        with self._writer_mx:
            if self._writer is None:
                lock = locks.Lock(self.storage, "writer", f"repository {self.path}",
                                  self.lock_settings)
                lock.acquire(wait)
                self._writer = lock
            self._writer_users += 1
            writer = self._writer
        try:
            yield writer
        finally:
            with self._writer_mx:
                self._writer_users -= 1
                if self._writer_users == 0:
                    self._writer = None
                    writer.release()

    #: The name locks had when they were flock(2) files; it now means the writer lock.
    lock_shared = lock_writer

    def lock_exclusive(self, wait: float = 0.0) -> contextlib.AbstractContextManager[locks.Lock]:
        """The repository alone: excludes every other lock (no writer, gc, domain lock)."""
        return locks.hold(self.storage, "exclusive", f"repository {self.path}",
                          self.lock_settings, wait=wait)

    def lock_gc(self, wait: float = 0.0) -> contextlib.AbstractContextManager[locks.Lock]:
        """The gc lock: one gc at a time; backups go on (docs/format.md)."""
        return locks.hold(self.storage, "gc", f"gc of repository {self.path}",
                          self.lock_settings, wait=wait)

    def lock_domain(self, domain: str, wait: float = 0.0, uuid: str | None = None
                    ) -> contextlib.AbstractContextManager[locks.Lock]:
        """Exclusive per-domain lock (backup, prune, delete of that domain).

        Two locks conflict when the names are equal and the uuids too, or either is
        unknown (None).  Taken while this object holds the writer lock, it registers
        the backup with gc's protocol (fleet.register), checked at commit().
        """
        check_name("domain name", domain)  # now, not when the lock is entered
        return self._lock_domain(domain, wait, uuid)

    @contextlib.contextmanager
    def _lock_domain(self, domain: str, wait: float, uuid: str | None
                     ) -> Iterator[locks.Lock]:
        with locks.hold(self.storage, "domain", f"domain {domain}", self.lock_settings,
                        wait=wait, domain=domain, uuid=uuid) as lock:
            with self._writer_mx:
                writer = self._writer
            if writer is not None:
                self._registrations[domain] = fleet.register(writer, lock)
            try:
                yield lock
            finally:
                self._registrations.pop(domain, None)

    # -- chunks --------------------------------------------------------------

    def new_backup_id(self, now: datetime | None = None) -> str:
        now = (now or datetime.now(UTC)).astimezone(UTC)
        return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)

    def _cctx(self, level: int | None = None) -> Any:
        """This thread's compressor for level (default: the repository's level)."""
        level = self.compression_level if level is None else level
        cache = getattr(self._tls, "cctx", None)
        if cache is None:
            cache = self._tls.cctx = {}
        c = cache.get(level)
        if c is None:
            c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
        return c

    def _dctx(self) -> Any:
        d = getattr(self._tls, "dctx", None)
        if d is None:
            d = self._tls.dctx = zstandard.ZstdDecompressor()
        return d

    def digest(self, data: Buffer) -> bytes:
        """The chunk hash of data (the repository's: config.json "hash"; keyed if encrypted)."""
        if self.encrypted:
            return self.key.digest(data)
        return bytes(self._hash(data).digest())

    def _zero_digest(self, n: int) -> bytes:
        d = self._zero_digests.get(n)
        if d is None:
            d = self._zero_digests[n] = self.digest(bytes(n))
        return d

    def start_known(self) -> None:
        """A run begins under the shared lock: from now on chunks it stores are known,
        and seed_known() adds the chunks of indexes.  Nothing known from before."""
        with self._known_lock:
            self._known = set()
            self._seeds = []
            self._tracking = True

    def seed_known(self, index: Index) -> None:
        """Trust that every chunk index names is stored: put_chunk will not look for them.

        Only for the index of a committed backup that lacks no quarantined chunk
        (backup_parent checks that).  Quarantined chunks not stored again are
        left out all the same when the set is built: a seeded name can never stand
        for a chunk verify moved aside.  Valid while the shared lock is held (gc
        cannot remove a chunk a committed backup names); forget_known() ends it.
        """
        with self._known_lock:
            if self._tracking:
                self._seeds.append(index)

    def forget_known(self) -> None:
        """The run ends (or failed): drop every known chunk; put_chunk asks the store again."""
        with self._known_lock:
            self._known = set()
            self._seeds = []
            self._tracking = False

    def knows_chunk(self, digest: bytes) -> bool:
        """True if digest is known to be stored without asking the store."""
        if self._seeds:
            with self._known_lock:
                if self._seeds:
                    for idx in self._seeds:
                        self._known.update(idx.digests())
                    self._seeds = []
                    self._known.difference_update(self.lost_chunks())
        return digest in self._known

    def _learn(self, digest: bytes) -> None:
        with self._known_lock:
            if self._tracking:
                self._known.add(digest)

    def put_chunk(self, data: Buffer, level: int | None = None) -> tuple[bytes | None, int]:
        """Store one chunk: (its chunk hash, bytes newly written); (None, 0) for zeros.

        Thread-safe.  The chunk is published (made durable, then given its name)
        in batches, at the latest by the next write_index/commit (docs/format.md).
        A known chunk (seed_known, or stored before by this process) costs no
        request; an unknown one is written create-if-absent.  Only a local store
        is asked first (a stat costs less than compressing the chunk); an object
        store gets no HEAD: its If-None-Match PUT answers "exists" by itself.
        """
        n = memoryview(data).nbytes
        if not 0 < n <= self.chunk_size:
            raise ValueError(f"chunk of {n} bytes (chunk size is {self.chunk_size})")
        digest = self.digest(data)
        if digest == self._zero_digest(n):
            return None, 0
        if self.knows_chunk(digest):
            return digest, 0
        key = chunk_key(digest)
        if self.storage.properties.local and self.storage.exists(key):
            self._learn(digest)
            return digest, 0
        comp = self._cctx(level).compress(data)
        if len(comp) < n:
            parts: list[Buffer] = [_CODEC_ZSTD_B, comp]
        else:
            parts = [_CODEC_NONE_B, data]
        if self.encrypted:  # compressed first: ciphertext does not compress
            parts = self.key.seal_parts(parts, crypto.AD_CHUNK + digest)
        written = self.storage.put_if_absent(key, parts, deferred=True)
        self._learn(digest)
        if not written:
            return digest, 0
        size = sum(memoryview(p).nbytes for p in parts)
        with self._known_lock:
            self.chunks_written += 1
            self.bytes_written += size
        return digest, size

    def request_counts(self) -> dict[str, int] | None:
        """Requests sent to the store so far, by kind, if the store counts them (S3)."""
        counts = getattr(self.storage, "request_counts", None)
        return counts() if callable(counts) else None

    def has_chunk(self, digest: bytes) -> bool:
        return self.storage.exists(chunk_key(digest))

    def get_chunk(self, digest: bytes, *, verify: bool = True) -> bytes:
        """The chunk's data; CorruptRepository if missing, undecodable or not matching."""
        with self._missing_is_damage(digest):
            raw = self.storage.get(chunk_key(digest), self.chunk_max)
        return self._checked(self.decode_chunk(raw, digest), digest, verify)

    def chunk_buffer(self) -> ReadBuffer:
        """A buffer for read_chunk/read_slot: chunk_size + 1 bytes or more, page-aligned.

        Reads into it bypass the page cache where the store can (O_DIRECT): for a
        scan that reads each chunk once (verify --data), not for restore, whose
        prefetched buffered reads measured faster (see bench/RESULTS.md).
        """
        return aligned_buffer(self.chunk_max)

    def read_chunk(self, digest: bytes, buf: ReadBuffer, *, verify: bool = True) -> Buffer:
        """Like get_chunk, reading through buf (len >= chunk_size + 1) to spare allocations.

        The result may be a view into buf: use it before the next call with that buf.
        """
        with self._missing_is_damage(digest):
            raw = self.storage.get_into(chunk_key(digest), buf, self.chunk_max)
        return self._checked(self._decode(raw, digest), digest, verify)

    def read_slot(self, digest: bytes | None, pieces: Sequence[Piece], out: memoryview,
                  buf: ReadBuffer) -> None:
        """Put one slot together in out: its chunk (or zeros), then its pieces over it.

        buf (len >= chunk_size + 1) is scratch space.  Each chunk is hash-checked
        and must be exactly as long as what it fills; CorruptRepository otherwise.
        """
        def fill(d: bytes | None, dst: memoryview, what: str) -> None:
            if d is None:
                dst[:] = self._zeros[:len(dst)]
                return
            data = memoryview(self.read_chunk(d, buf))
            if data.nbytes != len(dst):
                raise CorruptRepository(f"chunk {d.hex()} holds {data.nbytes} bytes, {what} "
                                        f"needs {len(dst)}", path=self.path)
            dst[:] = data

        fill(digest, out, "the slot")
        for off, n, d in pieces:
            fill(d, out[off:off + n], f"a piece at {off}")

    @contextlib.contextmanager
    def _missing_is_damage(self, digest: bytes) -> Iterator[None]:
        """A chunk a backup references but the store lacks is damage (exit 5), not 'not found'."""
        try:
            yield
        except NotFound as e:
            raise ChunkMissing(self.missing_chunk(digest), path=self.path) from e

    def missing_chunk(self, digest: bytes) -> str:
        """Why a chunk is missing, as one phrase (naming its quarantined copy if any)."""
        try:
            moved = self.quarantined().get(digest)
        except Error:
            moved = None
        if moved:
            return (f"chunk {digest.hex()} is missing (verify quarantined it as damaged: "
                    f"{moved[-1]})")
        return f"chunk {digest.hex()} is missing"

    # -- quarantine ------------------------------------------------------------

    def quarantine_chunk(self, digest: bytes) -> str | None:
        """Move a damaged chunk to quarantine/: the key it got, or None if it was not damaged.

        From then on the chunk is missing: a backup that meets the same data stores
        it afresh, and every backup that references it reads as damaged (naming the
        chunk) until then.  The file is checked again once moved: should it be good
        after all (another verify quarantined the damaged one and a backup stored
        the chunk afresh meanwhile), it goes back.
        """
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        dest = f"{QUARANTINE}/{digest.hex()}.{stamp}-{secrets.token_hex(3)}"
        with self._known_lock:
            self._known.discard(digest)
        try:
            self.storage.move(chunk_key(digest), dest)
        except NotFound:
            return None
        try:
            raw = self.storage.get(dest, self.chunk_max)
            self._checked(self._decode(raw, digest), digest, True)
        except RepositoryError:
            return dest
        try:
            self.storage.move(dest, chunk_key(digest))
        except OperationFailed:  # stored afresh meanwhile
            self.storage.delete(dest)
        return None

    def quarantined(self) -> dict[bytes, list[str]]:
        """Chunk hash -> keys of its quarantined copies (oldest first)."""
        out: dict[bytes, list[str]] = {}
        for name in self.storage.children(f"{QUARANTINE}/"):
            head = name.split(".", 1)[0]
            try:
                digest = bytes.fromhex(head)
            except ValueError:
                continue
            if len(digest) == 32:
                out.setdefault(digest, []).append(f"{QUARANTINE}/{name}")
        return out

    def lost_chunks(self) -> set[bytes]:
        """Quarantined chunks not stored again since: what backups referencing them lack."""
        lost = set()
        for digest in self.quarantined():
            try:
                present = self.has_chunk(digest)
            except RepositoryError:
                present = False
            if not present:
                lost.add(digest)
        return lost

    def _checked(self, data: _B, digest: bytes, verify: bool) -> _B:
        if verify and self.digest(data) != digest:
            raise CorruptRepository(f"chunk {digest.hex()} does not match its hash "
                                    "(damaged data)", path=self.path)
        return data

    def decode_chunk(self, raw: Buffer, digest: bytes) -> bytes:
        return bytes(self._decode(raw, digest))

    def _decode(self, raw: Buffer, digest: bytes) -> Buffer:
        if self.encrypted:
            raw = self._open_sealed(raw, crypto.AD_CHUNK + digest, f"chunk {digest.hex()}")
        view = memoryview(raw)
        if len(view) < 2:
            raise CorruptRepository(f"chunk {digest.hex()} is truncated", path=self.path)
        codec = view[0]
        if codec == CODEC_NONE:
            return view[1:]
        if codec != CODEC_ZSTD:
            raise CorruptRepository(f"chunk {digest.hex()} has unknown codec {codec}",
                                    path=self.path)
        payload = view[1:]
        try:
            size = zstandard.frame_content_size(payload)
            if not 0 < size <= self.chunk_size:
                raise zstandard.ZstdError(f"bad content size {size}")
            data: bytes = self._dctx().decompress(payload, max_output_size=size,
                                                  allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise CorruptRepository(f"chunk {digest.hex()} cannot be decompressed: {e}",
                                    path=self.path) from e
        if len(data) != size:
            raise CorruptRepository(f"chunk {digest.hex()} has the wrong size", path=self.path)
        return data

    # -- indexes and manifests -------------------------------------------------

    def discard_pending(self) -> None:
        """A backup failed: its chunks not yet published are dropped (gc may remove them).

        They are forgotten as known too: a later run must store them again.
        """
        self.forget_known()
        self.storage.discard_pending()

    def write_index(self, domain: str, backup_id: str, disk: str, index: Index) -> dict[str, Any]:
        """Write one disk's index of an uncommitted backup; durable on return."""
        check_name("domain name", domain)
        check_name("backup id", backup_id)
        check_name("disk name", disk)
        if index.chunk_size != self.chunk_size:
            raise ValueError(f"index chunk size {index.chunk_size} != repository "
                             f"{self.chunk_size}")
        # Every chunk this index names must be durable before the index is.
        self.storage.flush()
        key = index_key(domain, backup_id, disk)
        data = index.to_bytes(self.compression_level)
        if self.encrypted:
            data = self._seal(data, crypto.AD_INDEX + key.encode())
        if len(data) > INDEX_MAX:
            raise OperationFailed(f"index of {disk} is {len(data)} bytes, more than the "
                                  f"{INDEX_MAX} a reader accepts")
        self.storage.replace(key, data)
        return {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest last, atomically: from now on the backup exists."""
        check_name("domain name", manifest.domain)
        check_name("backup id", manifest.id)
        for d in manifest.disks:
            check_name("disk name", d.name)
            key = index_key(manifest.domain, manifest.id, d.name)
            if d.index.get("key") != key:
                raise OperationFailed(f"disk {d.name}: index key {d.index.get('key')!r} "
                                      f"is not {key!r}")
            try:
                size = self.storage.size(key)
            except NotFound as e:
                raise OperationFailed(f"disk {d.name}: index {key} was not written") from e
            if size != d.index.get("size"):
                raise OperationFailed(f"disk {d.name}: index {key} has {size} bytes, "
                                      f"manifest says {d.index.get('size')}")
        self._check_known_still_stored(manifest)
        doc = json.dumps(manifest.to_json(), indent=1).encode() + b"\n"
        key = manifest_key(manifest.domain, manifest.id)
        if self.encrypted:
            doc = self._seal(doc, crypto.AD_MANIFEST + key.encode())
        if len(doc) > MANIFEST_MAX:
            raise OperationFailed(f"manifest is {len(doc)} bytes, more than {MANIFEST_MAX}")
        self.storage.flush()

        def put() -> None:
            if not self.storage.put_if_absent(key, doc):
                raise OperationFailed(
                    f"backup {manifest.domain}/{manifest.id} is already committed")
            self.storage.flush()

        def chunk_keys() -> Iterator[str]:
            for d in manifest.disks:
                for digest in self.load_index(manifest, d.name).digests():
                    yield chunk_key(digest)

        # With the writer and domain locks held: gc's commit protocol (fleet.py).
        fleet.commit(self._registrations.get(manifest.domain), put, chunk_keys)

    def _check_known_still_stored(self, manifest: Manifest) -> None:
        """A chunk trusted as known that verify quarantined meanwhile is not committed.

        verify --data runs beside backups: a chunk it moves aside after this run
        took it as known would be missing from the new backup.  One listing of
        quarantine/ (usually empty) tells; the new indexes are read only then.
        """
        with self._known_lock:
            known = self._known
        if not known:
            return
        lost = self.lost_chunks() & known
        if not lost:
            return
        for rec in manifest.disks:
            gone = lost & self.load_index(manifest, rec.name).digests()
            if gone:
                self.forget_known()
                raise OperationFailed(
                    f"disk {rec.name}: chunk {min(gone).hex()} was quarantined as damaged "
                    "by verify during this backup; nothing was committed, and the next "
                    "backup stores the data afresh")

    def read_manifest(self, domain: str, backup_id: str) -> Manifest:
        """One manifest by exact id; NotFound or CorruptRepository/UnsupportedFormat."""
        check_name("domain name", domain)
        check_name("backup id", backup_id)
        key = manifest_key(domain, backup_id)
        try:
            raw = self.storage.get(key, MANIFEST_MAX)
        except NotFound as e:
            raise NotFound("backup", f"{domain}/{backup_id}") from e
        except CorruptRepository as e:
            raise CorruptRepository(f"backup {domain}/{backup_id}: {e.reason}",
                                    path=self.path) from e
        if self.encrypted:
            raw = self._open_sealed(raw, crypto.AD_MANIFEST + key.encode(),
                                    f"backup {domain}/{backup_id}: manifest {key}")
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptRepository(f"{key}: not valid JSON ({e})", path=self.path) from e
        try:
            m = Manifest.from_json(doc, where=key)
        except RepositoryError as e:
            raise type(e)(f"{key}: {e.reason}", path=self.path) from e
        if m.domain != domain or m.id != backup_id:
            raise CorruptRepository(f"{key}: names backup {m.domain}/{m.id}", path=self.path)
        for d in m.disks:
            try:
                check_name("disk name", d.name)
            except InvalidName as e:
                raise CorruptRepository(f"{key}: {e}", path=self.path) from e
        return m

    def scan_backups(self, domain: str | None = None
                     ) -> Iterator[tuple[str, str, Manifest | Error]]:
        """Every committed backup as (domain, id, manifest or the error reading it).

        A directory without a manifest is an incomplete backup (gc removes it) and
        is skipped.  Anything unreadable (a damaged manifest, a special file, a
        name that cannot be a backup, a file the process may not read) is yielded
        with its error, never raised: one damaged backup hides no other.  An id of
        "" stands for a domain directory that cannot be read at all.
        """
        domains: Sequence[str]
        if domain is not None:
            check_name("domain name", domain)
            domains = [domain]
        else:
            domains = self.storage.children("backups/")
        for d in domains:
            try:
                check_name("domain name", d)
                ids = self.storage.children(f"backups/{d}/")
            except InvalidName as e:
                yield d, "", CorruptRepository(f"backups/{d}: {e}", path=self.path)
                continue
            except (RepositoryError, PermissionDenied) as e:
                yield d, "", e
                continue
            for bid in ids:
                try:
                    yield d, bid, self.read_manifest(d, bid)
                except InvalidName as e:
                    yield d, bid, CorruptRepository(f"backups/{d}/{bid}: {e}", path=self.path)
                except NotFound:
                    continue  # no manifest: incomplete (or removed meanwhile)
                except (RepositoryError, PermissionDenied) as e:
                    yield d, bid, e

    def backups(self, domain: str | None = None) -> Listing:
        """The committed backups that can be read (oldest first) and those that cannot."""
        listing = Listing()
        for d, bid, m in self.scan_backups(domain):
            if isinstance(m, Manifest):
                listing.manifests.append(m)
            else:
                listing.damaged.append((d, bid, m))
        listing.manifests.sort(key=Manifest.sort_key)
        return listing

    def list_objects(self) -> Iterator[ObjectInfo]:
        """Every object of the repository, in no particular order (storage.list_all:
        the chunk directories listed concurrently on a remote store)."""
        return list_all(self.storage)

    def list_backups(self, domain: str | None = None) -> list[Manifest]:
        """Committed backups, oldest first; a damaged manifest raises, naming it."""
        listing = self.backups(domain)
        if listing.damaged:
            raise listing.damaged[0][2]
        return listing.manifests

    def get_manifest(self, domain: str, backup: str) -> Manifest:
        """One backup by id, or "latest": the newest, which must be readable.

        A damaged backup older than the newest readable one does not matter here.
        """
        check_name("domain name", domain)
        if backup != "latest":
            return self.read_manifest(domain, backup)
        return self.latest(domain)

    def latest(self, domain: str, accept: Callable[[Manifest], bool] | None = None) -> Manifest:
        """The newest backup (of those ``accept`` takes), which must be readable: a
        damaged one newer than it raises (whoever wrote it)."""
        check_name("domain name", domain)
        listing = self.backups(domain)
        pool = [m for m in listing.manifests if accept is None or accept(m)]
        newest = pool[-1] if pool else None
        newer = [x for x in listing.damaged if newest is None or x[1] > newest.id]
        if newer:
            _d, bid, e = max(newer, key=lambda x: x[1])
            if not isinstance(e, RepositoryError):
                raise e
            raise type(e)(
                f"the latest backup {domain}/{bid} cannot be read ({e.reason}); give an "
                f"older backup's id (backupkit list {domain}) or delete it (backupkit "
                f"delete {domain} {bid})", path=self.path)
        if newest is None:
            raise NotFound("backup", f"{domain}/latest", "the domain has no backups")
        return newest

    def backup_parent(self, domain: str, accept: Callable[[Manifest], bool] | None = None
                      ) -> tuple[Manifest | None, str | None]:
        """The latest backup, if an incremental can start from it, else why not.

        (latest, None); (None, None) when the domain has no backup; (None, reason)
        when the latest backup cannot be read, an index of it cannot, or it lacks
        chunks verify quarantined: a backup must then be full, never fail.  With
        ``accept``, only the backups it takes count (those of the same domain UUID,
        backupkit.repo.chains); one that cannot be read counts, whoever wrote it.
        """
        try:
            latest = self.latest(domain, accept)
        except NotFound:
            return None, None
        except (RepositoryError, PermissionDenied) as e:
            return None, f"{e.reason if isinstance(e, RepositoryError) else e}"
        lost = self.lost_chunks()
        for rec in latest.disks:
            try:
                index = self.load_index(latest, rec.name)
            except (RepositoryError, PermissionDenied) as e:
                why = e.reason if isinstance(e, RepositoryError) else str(e)
                return None, f"the latest backup {domain}/{latest.id} is damaged: {why}"
            n = len(lost.intersection(index.digests())) if lost else 0
            if n:
                return None, (f"the latest backup {domain}/{latest.id} lacks {n} chunk(s) "
                              f"of disk {rec.name} that verify quarantined as damaged")
        return latest, None

    def load_index(self, manifest: Manifest, disk: str) -> Index:
        rec = manifest.disk(disk)
        where = f"backup {manifest.domain}/{manifest.id} disk {disk}"
        if rec is None:
            raise NotFound("disk", f"{manifest.domain}/{manifest.id}/{disk}")
        key = index_key(manifest.domain, manifest.id, rec.name)
        if rec.index.get("key") != key:
            raise CorruptRepository(f"{where}: index key {rec.index.get('key')!r} is not "
                                    f"{key!r}", path=self.path)
        try:
            data = self.storage.get(key, INDEX_MAX)
        except NotFound as e:
            raise CorruptRepository(f"{where}: index {key} is missing", path=self.path) from e
        except CorruptRepository as e:
            raise CorruptRepository(f"{where}: {e.reason}", path=self.path) from e
        if len(data) != rec.index.get("size") or \
                hashlib.sha256(data).hexdigest() != rec.index.get("sha256"):
            raise CorruptRepository(f"{where}: index {key} does not match the checksum in "
                                    "its manifest", path=self.path)
        if self.encrypted:
            data = self._open_sealed(data, crypto.AD_INDEX + key.encode(),
                                     f"{where}: index {key}")
        try:
            idx = Index.from_bytes(data, virtual_size=rec.virtual_size,
                                   chunk_size=self.chunk_size)
        except IndexFormatError as e:
            raise CorruptRepository(f"{where}: index {key}: {e}", path=self.path) from e
        except UnsupportedFormat as e:
            raise UnsupportedFormat(f"{where}: {e.reason}", path=self.path) from e
        if idx.chunk_size != self.chunk_size or idx.virtual_size != rec.virtual_size:
            raise CorruptRepository(
                f"{where}: index geometry {idx.virtual_size}/{idx.chunk_size} does not match "
                f"the manifest ({rec.virtual_size}) and repository ({self.chunk_size})",
                path=self.path)
        return idx

    def remove_backup(self, manifest: Manifest) -> None:
        """Delete a backup: manifest first (it stops existing), then its other files.

        The caller holds the domain lock and the shared repository lock.
        """
        check_name("domain name", manifest.domain)
        check_name("backup id", manifest.id)
        self.storage.delete(manifest_key(manifest.domain, manifest.id))
        self.storage.flush()
        self.remove_backup_dir(manifest.domain, manifest.id)

    def delete_backup(self, domain: str, backup_id: str) -> tuple[int, str | None]:
        """Delete one backup by id, readable or not: (bytes freed, why it was unreadable).

        The manifest goes first, whatever it is (a damaged file, a special file, a
        directory), so the backup stops existing at once; then everything else in
        its directory, never following a symlink.  NotFound when there is no
        backup of that id.  The caller holds the domain lock and the shared lock.
        """
        check_name("domain name", domain)
        check_name("backup id", backup_id)
        damage: str | None = None
        try:
            self.read_manifest(domain, backup_id)
        except NotFound:
            if backup_id not in self.storage.children(f"backups/{domain}/"):
                raise
            damage = "no manifest: an incomplete backup"
        except (RepositoryError, PermissionDenied) as e:
            damage = e.reason if isinstance(e, RepositoryError) else str(e)
        freed = 0
        with contextlib.suppress(RepositoryError):  # a directory that is not one: below
            freed += self.storage.delete_tree(manifest_key(domain, backup_id))
        freed += self.storage.delete_tree(backup_prefix(domain, backup_id))
        return freed, damage

    def remove_backup_dir(self, domain: str, backup_id: str) -> int:
        """Delete every file under a backup's directory; bytes freed."""
        freed = 0
        for info in list(self.storage.list(backup_prefix(domain, backup_id))):
            if self.storage.delete(info.key):
                freed += info.size
        for info in list(self.storage.leftovers(backup_prefix(domain, backup_id))):
            if self.storage.delete(info.key):
                freed += info.size
        self.storage.flush()
        return freed


def _parse_config(raw: bytes, path: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptRepository(f"config.json is not valid JSON ({e})", path=path) from e
    if not isinstance(doc, dict) or doc.get("format") != REPO_FORMAT:
        raise CorruptRepository("config.json is not a backupkit repository configuration",
                                path=path)
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptRepository("config.json has no valid version", path=path)
    if version > REPO_VERSION:
        raise UnsupportedFormat(
            f"repository format version {version} is newer than this backupkit supports "
            f"({REPO_VERSION}); upgrade backupkit", path=path)
    cs = doc.get("chunk_size")
    if not isinstance(cs, int) or isinstance(cs, bool) or not chunk_size_ok(cs):
        raise CorruptRepository(f"config.json: bad chunk_size {cs!r}", path=path)
    level = doc.get("compression_level", 3)
    if not isinstance(level, int) or isinstance(level, bool) or not -7 <= level <= 22:
        raise CorruptRepository(f"config.json: bad compression_level {level!r}", path=path)
    hash_name = doc.get("hash", "sha256")
    if not isinstance(hash_name, str) or hash_name not in HASHES \
            or (version == 1 and hash_name != "sha256"):
        raise CorruptRepository(f"config.json: unknown chunk hash {hash_name!r}", path=path)
    if doc.get("compression", "zstd") != "zstd":
        raise CorruptRepository("config.json: unknown compression", path=path)
    enc = doc.get("encryption")
    if (enc is not None or version >= ENCRYPTED_VERSION) and not (
            version >= ENCRYPTED_VERSION and isinstance(enc, dict)
            and enc.get("cipher") == crypto.CIPHER and enc.get("kdf") == "scrypt"
            and enc.get("chunk_names") == f"{hash_name}-keyed"
            and isinstance(enc.get("key_check"), str) and isinstance(doc.get("id"), str)):
        raise CorruptRepository(f"config.json: bad or unknown encryption {enc!r}", path=path)
    doc["hash"] = hash_name
    doc["compression_level"] = level
    return doc
