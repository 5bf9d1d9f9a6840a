"""Encrypted repositories (format version 3): keys, key files, paper keys, escrow.

One random 32-byte *data key* per repository.  Everything else is derived from it
with HKDF-SHA256 (distinct labels): the AES-256-GCM key that seals chunks, indexes
and manifests, the key of the keyed chunk hash (BLAKE3 keyed mode, or HMAC-SHA256
for a sha256 repository) that names chunks, and a check value in config.json that
tells a wrong key from a damaged object.

The data key is stored only wrapped: in key files under ``keys/`` (AES-256-GCM under
a key derived from a passphrase with scrypt, memory-hard), and optionally in
``escrow.json`` sealed to an organisation's public key (X25519 or RSA), so that
whoever holds the matching private key can restore access when every key file is
gone.  Its paper form is the data key itself, in checksummed lines (docs/format.md).

Every sealed object is ``nonce (12) || ciphertext || tag (16)`` with associated data
naming what the object is and where it belongs (a chunk: its name; an index or a
manifest: its key), so an object swapped for another valid one fails authentication.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import json
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from backupkit.errors import CorruptRepository, KeyRequired, UsageError, WrongKey
from backupkit.fileio import Buffer

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE  # bytes a sealed object has more than its plaintext
CIPHER = "aes-256-gcm"
KEYS_DIR = "keys/"
ESCROW_KEY = "escrow.json"  # beside keys/, not in it: it outlives losing every key file
KEYFILE_MAX = 64 * 1024
#: scrypt cost of new key files: N=2^15, r=8 needs 32 MiB and ~0.1 s here; recorded in
#: each key file, so it can grow later without breaking old files.
SCRYPT_N = 1 << 15
SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_MAXMEM = 1 << 30
#: Names of the passphrase in its places (docs/format.md, man/backupkit.8).
PASSPHRASE_ENV = "BACKUPKIT_PASSPHRASE"
NEW_PASSPHRASE_ENV = "BACKUPKIT_NEW_PASSPHRASE"
CREDENTIAL_NAME = "backupkit-passphrase"

AD_CHUNK = b"backupkit chunk\0"
AD_INDEX = b"backupkit index\0"
AD_MANIFEST = b"backupkit manifest\0"
AD_KEYFILE = b"backupkit key\0"
AD_ESCROW = b"backupkit escrow\0"


def _hkdf(secret: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None,
                info=b"backupkit " + label).derive(secret)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a string")
    try:
        return base64.b64decode(text.encode(), validate=True)
    except ValueError as e:
        raise ValueError(f"{what} is not base64") from e


class DataKey:
    """A repository's data key and the keys derived from it."""

    def __init__(self, secret: bytes, repo_id: str, hash_name: str) -> None:
        if len(secret) != KEY_SIZE:
            raise ValueError("a data key is 32 bytes")
        self.secret = secret
        self.repo_id = repo_id
        self._aes_key = _hkdf(secret, b"aes-256-gcm")
        self._aead = AESGCM(self._aes_key)
        name_key = _hkdf(secret, b"chunk names")
        self.digest: Callable[[Buffer], bytes]
        if hash_name == "blake3":
            self.digest = lambda data: bytes(blake3.blake3(data, key=name_key).digest())
        else:
            self.digest = lambda data: hmac.digest(name_key, data, "sha256")
        self.check = hmac.digest(_hkdf(secret, b"key check"), repo_id.encode(),
                                 "sha256").hex()

    @classmethod
    def generate(cls, repo_id: str, hash_name: str) -> DataKey:
        return cls(secrets.token_bytes(KEY_SIZE), repo_id, hash_name)

    def seal(self, data: Buffer, ad: bytes) -> bytes:
        """nonce || AES-256-GCM(data) || tag, authenticated with ad."""
        nonce = secrets.token_bytes(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, data, ad)

    def seal_parts(self, parts: list[Buffer], ad: bytes) -> list[Buffer]:
        """seal(b"".join(parts)) as parts to write one after the other, without joining
        (a 1 MiB chunk copied into a new buffer costs more than sealing it)."""
        nonce = secrets.token_bytes(NONCE_SIZE)
        enc = Cipher(algorithms.AES(self._aes_key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(ad)
        out: list[Buffer] = [nonce]
        out += [enc.update(p) for p in parts]
        enc.finalize()
        out.append(enc.tag)
        return out

    def open(self, blob: Buffer, ad: bytes) -> bytes | None:
        """The plaintext, or None when the object fails authentication."""
        view = memoryview(blob)
        if view.nbytes < OVERHEAD:
            return None
        try:
            return self._aead.decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], ad)
        except InvalidTag:
            return None


# -- passphrases ------------------------------------------------------------------


def _read_secret_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(KEYFILE_MAX + 1)
    except OSError as e:
        raise UsageError(f"cannot read the {what} {path}: {e.strerror or e}") from e
    return _strip_newline(data, f"{what} {path}")


def _strip_newline(data: bytes, where: str) -> bytes:
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise UsageError(f"the {where} is empty")
    return data


@dataclass(frozen=True)
class Passphrase:
    """Where the passphrase comes from, in order (first found wins):

    ``--passphrase-file`` (file), ``$BACKUPKIT_PASSPHRASE``, the systemd credential
    ``$CREDENTIALS_DIRECTORY/backupkit-passphrase`` (``LoadCredential=``), config
    ``passphrase_file`` (config_file), then a prompt when stdin is a terminal.
    Never the command line itself.
    """

    file: str | None = None
    config_file: str | None = None
    env: str = PASSPHRASE_ENV
    what: str = "passphrase"

    def get(self, confirm: bool = False) -> bytes:
        if self.file:
            return _read_secret_file(self.file, "passphrase file")
        value = os.environ.get(self.env)
        if value:
            return value.encode()
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds and self.env == PASSPHRASE_ENV:
            path = os.path.join(creds, CREDENTIAL_NAME)
            if os.path.exists(path):
                return _read_secret_file(path, "systemd credential")
        if self.config_file:
            return _read_secret_file(self.config_file, "passphrase file (config "
                                     "passphrase_file)")
        if sys.stdin.isatty():
            first = getpass.getpass(f"{self.what}: ")
            if confirm and getpass.getpass(f"{self.what} (again): ") != first:
                raise UsageError(f"the two {self.what}s differ")
            if first:
                return first.encode()
        raise KeyRequired(
            f"no {self.what}: give it in ${self.env}"
            + (", --passphrase-file, the systemd credential backupkit-passphrase or "
               "config passphrase_file" if self.env == PASSPHRASE_ENV else
               " or --new-passphrase-file"))


# -- key files --------------------------------------------------------------------


def _scrypt(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM,
                          dklen=KEY_SIZE)


def wrap_key(key: DataKey, passphrase: bytes, created: str) -> bytes:
    """A key file: the data key under a key derived from passphrase (scrypt)."""
    salt = secrets.token_bytes(16)
    kek = AESGCM(_scrypt(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P))
    nonce = secrets.token_bytes(NONCE_SIZE)
    data = nonce + kek.encrypt(nonce, key.secret, AD_KEYFILE + key.repo_id.encode())
    doc = {"format": "backupkit-key", "version": 1, "repository": key.repo_id,
           "created": created,
           "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
                   "salt": _b64(salt)},
           "cipher": CIPHER, "data": _b64(data)}
    return json.dumps(doc, indent=1).encode() + b"\n"


def parse_key_file(raw: bytes, where: str) -> dict[str, Any]:
    """The key file's JSON, checked for shape; UsageError naming where if malformed."""
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != "backupkit-key":
            raise ValueError("not a backupkit key file")
        if doc.get("version") != 1:
            raise ValueError(f"key file version {doc.get('version')!r} is not 1")
        kdf = doc["kdf"]
        if not isinstance(kdf, dict) or kdf.get("name") != "scrypt" or doc["cipher"] != CIPHER:
            raise ValueError("unknown key derivation or cipher")
        for k in ("n", "r", "p"):
            v = kdf[k]
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 1 << 24:
                raise ValueError(f"bad scrypt parameter {k}")
        n, r, p = kdf["n"], kdf["r"], kdf["p"]
        # What hashlib.scrypt itself accepts: a power of two above 1, within its memory.
        if n < 2 or n & (n - 1) or 128 * r * n + 128 * r * p > _SCRYPT_MAXMEM:
            raise ValueError("scrypt parameters out of range")
        _unb64(kdf["salt"], "salt")
        _unb64(doc["data"], "data")
        if not isinstance(doc["repository"], str):
            raise ValueError("no repository id")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{where}: malformed key file ({e})") from e
    return doc


def unwrap_key(doc: dict[str, Any], passphrase: bytes, hash_name: str) -> DataKey | None:
    """The data key of a parsed key file, or None if passphrase does not open it."""
    kdf = doc["kdf"]
    try:
        kek = AESGCM(_scrypt(passphrase, _unb64(kdf["salt"], "salt"), kdf["n"], kdf["r"],
                             kdf["p"]))
    except ValueError:  # parameters scrypt refuses: this file opens nothing
        return None
    blob = _unb64(doc["data"], "data")
    try:
        secret = kek.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:],
                             AD_KEYFILE + doc["repository"].encode())
    except (InvalidTag, ValueError):
        return None
    if len(secret) != KEY_SIZE:
        return None
    return DataKey(secret, doc["repository"], hash_name)


# -- paper keys -------------------------------------------------------------------

_PAPER_LINES = 6
_PAPER_BYTES = 8  # per line: 48 bytes = repository id (16) + data key (32)


def _line_check(n: int, data: bytes) -> str:
    return hashlib.sha256(bytes([n]) + data).hexdigest()[:4]


def paper_key(key: DataKey) -> str:
    """The data key in printable lines, each with a 4-digit checksum of its own."""
    payload = bytes.fromhex(key.repo_id) + key.secret
    out = [f"backupkit paper key for repository {key.repo_id}",
           "Whoever holds this can read every backup of that repository: keep it safe.",
           "Each line: number, four groups of four hex digits, then that line's checksum.",
           ""]
    for i in range(_PAPER_LINES):
        chunk = payload[i * _PAPER_BYTES:(i + 1) * _PAPER_BYTES]
        h = chunk.hex()
        groups = " ".join(h[j:j + 4] for j in range(0, len(h), 4))
        out.append(f"{i + 1}: {groups}  {_line_check(i + 1, chunk)}")
    return "\n".join(out) + "\n"


def read_paper_key(text: str, hash_name: str) -> DataKey:
    """Parse a paper key as typed back; UsageError naming the first bad or missing line."""
    lines: dict[int, bytes] = {}
    for raw in text.splitlines():
        head, sep, rest = raw.partition(":")
        if not sep or not head.strip().isdigit():
            continue
        n = int(head.strip())
        digits = "".join(c for c in rest.lower() if not c.isspace() and c != "-")
        if not 1 <= n <= _PAPER_LINES:
            raise UsageError(f"paper key line {n}: there are only {_PAPER_LINES} lines")
        if len(digits) != 2 * _PAPER_BYTES + 4 or any(c not in "0123456789abcdef"
                                                      for c in digits):
            raise UsageError(f"paper key line {n}: expected {2 * _PAPER_BYTES + 4} hex digits "
                             f"(four groups and a checksum), found {len(digits)} characters")
        data = bytes.fromhex(digits[:-4])
        if _line_check(n, data) != digits[-4:]:
            raise UsageError(f"paper key line {n}: checksum does not match (a typo in "
                             "this line)")
        lines[n] = data
    for n in range(1, _PAPER_LINES + 1):
        if n not in lines:
            raise UsageError(f"paper key line {n} is missing")
    payload = b"".join(lines[n] for n in range(1, _PAPER_LINES + 1))
    return DataKey(payload[16:], payload[:16].hex(), hash_name)


# -- escrow (master key) ------------------------------------------------------------


def _fingerprint(pub: Any) -> str:
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def seal_to_master(key: DataKey, pem: bytes, where: str) -> bytes:
    """escrow.json: the data key sealed to a public key (X25519 or RSA >= 2048, PEM)."""
    try:
        pub = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{where}: not a PEM public key ({e})") from e
    ad = AD_ESCROW + key.repo_id.encode()
    doc: dict[str, Any] = {"format": "backupkit-escrow", "version": 1,
                           "repository": key.repo_id, "public_key_sha256": _fingerprint(pub)}
    if isinstance(pub, x25519.X25519PublicKey):
        eph = x25519.X25519PrivateKey.generate()
        eph_pub = eph.public_key().public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw)
        kek = _hkdf(eph.exchange(pub) + eph_pub, b"escrow x25519")
        nonce = secrets.token_bytes(NONCE_SIZE)
        doc.update(algorithm="x25519-hkdf-sha256-aes-256-gcm", ephemeral=_b64(eph_pub),
                   data=_b64(nonce + AESGCM(kek).encrypt(nonce, key.secret, ad)))
    elif isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < 2048:
            raise UsageError(f"{where}: an RSA master key needs at least 2048 bits")
        doc.update(algorithm="rsa-oaep-sha256", data=_b64(pub.encrypt(key.secret, _oaep(ad))))
    else:
        raise UsageError(f"{where}: the master public key must be X25519 or RSA")
    return json.dumps(doc, indent=1).encode() + b"\n"


def _oaep(label: bytes) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()),
                        algorithm=hashes.SHA256(), label=label)


def parse_escrow(raw: bytes) -> dict[str, Any]:
    """escrow.json as JSON; ValueError if malformed."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(str(e)) from e
    if not isinstance(doc, dict) or doc.get("format") != "backupkit-escrow" \
            or not isinstance(doc.get("repository"), str) \
            or not isinstance(doc.get("algorithm"), str):
        raise ValueError("not a backupkit escrow")
    return doc


def unseal_from_master(escrow: bytes, pem: bytes, where: str, hash_name: str,
                       repo_path: str) -> DataKey:
    """The data key from escrow.json with the master private key (PEM, unencrypted)."""
    try:
        priv = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{where}: not an unencrypted PEM private key ({e})") from e
    try:
        doc = parse_escrow(escrow)
        repo_id = doc["repository"]
        ad = AD_ESCROW + repo_id.encode()
        blob = _unb64(doc.get("data"), "data")
        algorithm = doc["algorithm"]
    except ValueError as e:
        raise CorruptRepository(f"{ESCROW_KEY} is malformed ({e})", path=repo_path) from e
    if isinstance(priv, x25519.X25519PrivateKey) and algorithm.startswith("x25519"):
        if _fingerprint(priv.public_key()) != doc.get("public_key_sha256"):
            raise WrongKey(f"{where} is not the master key this repository was sealed to")
        eph_pub = _unb64(doc.get("ephemeral"), "ephemeral")
        kek = _hkdf(priv.exchange(x25519.X25519PublicKey.from_public_bytes(eph_pub))
                    + eph_pub, b"escrow x25519")
        try:
            secret = AESGCM(kek).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], ad)
        except InvalidTag as e:
            raise CorruptRepository(f"{ESCROW_KEY} fails authentication (damaged or "
                                    "tampered with)", path=repo_path) from e
    elif isinstance(priv, rsa.RSAPrivateKey) and algorithm == "rsa-oaep-sha256":
        if _fingerprint(priv.public_key()) != doc.get("public_key_sha256"):
            raise WrongKey(f"{where} is not the master key this repository was sealed to")
        try:
            secret = priv.decrypt(blob, _oaep(ad))
        except ValueError as e:
            raise CorruptRepository(f"{ESCROW_KEY} fails authentication (damaged or "
                                    "tampered with)", path=repo_path) from e
    else:
        raise WrongKey(f"{where} is not the kind of key the escrow was sealed to "
                       f"({algorithm})")
    if len(secret) != KEY_SIZE:
        raise CorruptRepository(f"{ESCROW_KEY} holds no data key", path=repo_path)
    return DataKey(secret, repo_id, hash_name)
