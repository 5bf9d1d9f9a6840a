"""nbdkit Python plugin (API_VERSION 2): one backup of a backupkit repository, read-only.

Started by backupkit.ops.serve (never by hand): ``nbdkit python nbdkit_plugin.py
pythonpath=... pyversion=3.11 repo=URL config=PATH domain=D backup=ID disk=NAME
cache=BYTES``.  nbdkit runs it in Debian's /usr/bin/python3, so backupkit is
imported only once ``pythonpath`` (the caller's sys.path: the venv) is known.

A request that cannot be served (damaged or missing chunk, store error) gets
EIO and one line naming the damage goes to stderr (nbdkit's log); wrong data
is never sent.  The plugin holds the repository's shared lock for its whole
life, so gc cannot delete chunks of the backup being served.
"""

from __future__ import annotations

import builtins
import errno
import sys
import threading
from typing import Any

import nbdkit  # type: ignore[import-not-found]  # nbdkit's own module, only inside nbdkit

API_VERSION = 2

_params: dict[str, str] = {}
_state: dict[str, Any] = {}
_readers_lock = threading.Lock()


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def config(key: str, value: str) -> None:
    if key == "pythonpath":
        paths = [p for p in value.split(":") if p and p not in sys.path]
        sys.path[:0] = paths
        return
    if key not in ("pyversion", "repo", "config", "domain", "backup", "disk", "cache", "log",
                   "passphrase_file"):
        raise RuntimeError(f"unknown parameter {key!r}")
    _params[key] = value


def config_complete() -> None:
    want = _params.get("pyversion", "")
    have = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if want and want != have:
        raise RuntimeError(f"backupkit runs on Python {want} but nbdkit's python plugin on "
                           f"{have}: install backupkit for {have}")
    for key in ("repo", "domain", "backup", "disk"):
        if not _params.get(key):
            raise RuntimeError(f"missing parameter {key}=")
    from backupkit import config as bkconfig
    from backupkit.repo import Repository
    from backupkit.repo.url import open_storage

    cfg = bkconfig.load(_params["config"]) if _params.get("config") else None
    storage = open_storage(_params["repo"], cfg)
    passphrase = _passphrase(cfg)
    repo = (Repository.open(storage) if passphrase is None
            else Repository.open(storage, passphrase))  # type: ignore[call-arg,unused-ignore]
    manifest = repo.get_manifest(_params["domain"], _params["backup"])
    # A reader's lock (none: gc never deletes what a committed backup references).
    lock = repo.lock_read(0.0)
    lock.__enter__()
    _state.update(repo=repo, manifest=manifest, lock=lock, readers={})


def _passphrase(cfg: Any) -> Any:
    """Where an encrypted repository's passphrase comes from, as the command had it:
    passphrase_file= (its --passphrase-file), else what backupkit.repo.crypto looks at
    ($BACKUPKIT_PASSPHRASE and the systemd credential, inherited; config
    passphrase_file).  None where this backupkit has no encryption."""
    import importlib

    try:
        crypto = importlib.import_module("backupkit.repo.crypto")
    except ImportError:
        return None
    return crypto.Passphrase(file=_params.get("passphrase_file") or None,
                             config_file=getattr(cfg, "passphrase_file", None))


def _reader(disk: str) -> Any:
    from backupkit.ops.serve import DEFAULT_CACHE_BYTES, DiskReader

    readers: dict[str, Any] = _state["readers"]
    with _readers_lock:
        r = readers.get(disk)
        if r is None:
            repo, manifest = _state["repo"], _state["manifest"]
            if manifest.disk(disk) is None:
                return None
            cache = int(_params.get("cache") or DEFAULT_CACHE_BYTES)
            r = readers[disk] = DiskReader(repo, repo.load_index(manifest, disk), cache)
    return r


def list_exports(readonly: bool, is_tls: bool) -> list[str]:
    return ["", *(d.name for d in _state["manifest"].disks)]


def default_export(readonly: bool, is_tls: bool) -> str:
    return ""


def open(readonly: bool) -> Any:  # nbdkit's callback name (shadows the builtin)
    name = nbdkit.export_name() or _params["disk"]
    r = _reader(name)
    if r is None:
        nbdkit.set_error(errno.ENOENT)
        raise RuntimeError(f"no disk {name!r} in this backup")
    return r


def get_size(h: Any) -> int:
    return int(h.size)


def can_write(h: Any) -> bool:
    return False


def can_multi_conn(h: Any) -> bool:
    return True  # read-only: every connection sees the same data


def can_cache(h: Any) -> int:
    return int(nbdkit.CACHE_NONE)


def can_extents(h: Any) -> bool:
    return True


def _log(msg: str) -> None:
    """One line to stderr and to log= (nbdkit's daemon mode sends stderr to /dev/null)."""
    import time

    m = _state.get("manifest")
    where = f"{m.domain}/{m.id}" if m is not None else "?"
    line = f"backupkit serve {where}: {msg}"
    print(line, file=sys.stderr, flush=True)
    if _params.get("log"):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            with builtins.open(_params["log"], "a") as f:
                f.write(f"{stamp} {line}\n")
        except OSError as e:
            print(f"backupkit serve: cannot write {_params['log']}: {e}", file=sys.stderr)


def pread(h: Any, buf: Any, offset: int, flags: int) -> None:
    try:
        h.read_into(memoryview(buf), offset)
    except Exception as e:
        _log(f"read of {len(buf)} bytes at offset {offset} failed (EIO sent): {e}")
        nbdkit.set_error(errno.EIO)
        raise


def extents(h: Any, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    hole = int(nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
    return [(o, n, hole if is_hole else 0) for o, n, is_hole in h.extents(offset, count)]
