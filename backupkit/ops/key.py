"""backupkit key: export, import, passwd, recover and show the key of an encrypted repository.

Each command checks the key it is given before it writes anything: a wrong
passphrase, a paper key with a typo or a key of another repository is exit 2
with nothing written.  A new key file is made durable before an old one is
removed, so a repository never has fewer working key files than before.
"""

from __future__ import annotations

import logging
import os
import secrets
from datetime import UTC, datetime
from typing import Any

from backupkit.errors import CorruptRepository, NotFound, OperationFailed, UsageError, WrongKey
from backupkit.repo import Repository, crypto

log = logging.getLogger(__name__)

_SECRET_FILE_MAX = 64 * 1024


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _need_encrypted(repo: Repository) -> None:
    if not repo.encrypted:
        raise UsageError(f"repository {repo.path} is not encrypted: it has no key")


def read_small(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_SECRET_FILE_MAX + 1)
    except FileNotFoundError as e:
        raise NotFound(what, path) from e
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from e
    if len(data) > _SECRET_FILE_MAX:
        raise UsageError(f"{what} {path} is larger than {_SECRET_FILE_MAX} bytes")
    return data


def _write_new(path: str, data: bytes) -> None:
    """Create path (mode 0600, never replacing a file) and make it durable."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as e:
        raise UsageError(f"{path} exists; backupkit does not overwrite it") from e
    except OSError as e:
        raise OperationFailed(f"cannot create {path}: {e.strerror or e}") from e
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _store_key_file(repo: Repository, data: bytes) -> str:
    name = f"{crypto.KEYS_DIR}{secrets.token_hex(8)}.json"
    repo.storage.put_if_absent(name, data)
    repo.storage.flush()
    return name


def _new_key_file(repo: Repository, key: crypto.DataKey, passphrase: crypto.Passphrase
                  ) -> str:
    return _store_key_file(repo, crypto.wrap_key(key, passphrase.get(confirm=True), _now()))


def show(repo: Repository) -> dict[str, Any]:
    """Whether the repository is encrypted, its key files and its escrow (no secret)."""
    out: dict[str, Any] = {"repository": repo.path, "encrypted": repo.encrypted}
    if repo.encrypted:
        out["key_files"] = repo.key_files()
        try:
            doc = crypto.parse_escrow(repo.storage.get(crypto.ESCROW_KEY, crypto.KEYFILE_MAX))
            out["escrow"] = {"algorithm": doc.get("algorithm"),
                             "public_key_sha256": doc.get("public_key_sha256")}
        except NotFound:
            out["escrow"] = None
        except ValueError as e:
            raise CorruptRepository(f"{crypto.ESCROW_KEY} is malformed ({e})",
                                    path=repo.path) from e
    return out


def export(repo: Repository, passphrase: crypto.Passphrase, path: str, *, paper: bool
           ) -> dict[str, Any]:
    """Write the key to path: the key file that opens with the passphrase, or the paper form."""
    _need_encrypted(repo)
    opened = repo.unlock(passphrase)
    if paper:
        _write_new(path, crypto.paper_key(repo.key).encode())
    else:
        _write_new(path, repo.storage.get(opened, crypto.KEYFILE_MAX))
    log.info("exported %s key of %s to %s", "the paper" if paper else "a", repo.path, path)
    return {"repository": repo.path, "exported": path, "paper": paper}


def import_key(repo: Repository, passphrase: crypto.Passphrase, path: str, *, paper: bool
               ) -> dict[str, Any]:
    """Add a key file to the repository from an exported key file or a paper key.

    A key file must open with the passphrase; a paper key is wrapped in a new key
    file under the passphrase.  Either must be this repository's key.
    """
    _need_encrypted(repo)
    raw = read_small(path, "key file")
    if paper:
        try:
            text = raw.decode()
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: a paper key is text") from e
        key = crypto.read_paper_key(text, repo.hash_name)
        repo.adopt_key(key, f"the paper key {path}")
        stored = _new_key_file(repo, key, passphrase)
    else:
        doc = crypto.parse_key_file(raw, path)
        maybe = crypto.unwrap_key(doc, passphrase.get(), repo.hash_name)
        if maybe is None:
            raise WrongKey(f"the passphrase does not open the key file {path}")
        repo.adopt_key(maybe, f"the key file {path}")
        stored = _store_key_file(repo, raw)
    log.info("stored key file %s in %s", stored, repo.path)
    return {"repository": repo.path, "imported": path, "key_file": stored, "paper": paper}


def passwd(repo: Repository, passphrase: crypto.Passphrase, new: crypto.Passphrase
           ) -> dict[str, Any]:
    """Wrap the data key under a new passphrase; the old key file goes once the new is durable."""
    _need_encrypted(repo)
    old = repo.unlock(passphrase)
    stored = _new_key_file(repo, repo.key, new)
    repo.storage.delete(old)
    repo.storage.flush()
    log.info("new key file %s in %s; removed %s", stored, repo.path, old)
    return {"repository": repo.path, "key_file": stored, "removed": old}


def recover(repo: Repository, passphrase: crypto.Passphrase, master_key: str
            ) -> dict[str, Any]:
    """Open the escrow with the master private key; store a key file under the passphrase."""
    _need_encrypted(repo)
    pem = read_small(master_key, "master key")
    try:
        escrow = repo.storage.get(crypto.ESCROW_KEY, crypto.KEYFILE_MAX)
    except NotFound as e:
        raise NotFound("escrow", f"{repo.path}/{crypto.ESCROW_KEY}",
                       "the repository was created without --master-pubkey") from e
    key = crypto.unseal_from_master(escrow, pem, master_key, repo.hash_name, repo.path)
    repo.adopt_key(key, f"the escrow opened with {master_key}")
    stored = _new_key_file(repo, key, passphrase)
    log.info("recovered the key of %s with %s: new key file %s", repo.path, master_key, stored)
    return {"repository": repo.path, "key_file": stored, "recovered_with": master_key}
