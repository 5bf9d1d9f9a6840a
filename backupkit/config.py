"""TOML configuration: strict (unknown keys and wrong types are errors naming file and key).

The schema below is the single source of truth for every key; the tests check that
man/backupkit.toml.5 and config/backupkit.toml document each of them.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from backupkit.errors import ConfigError

DEFAULT_PATH = "/etc/backupkit/backupkit.toml"
DEFAULT_CONNECT = "qemu:///system"
MAX_CONFIG_SIZE = 1 << 20

# A repository's chunk size: a power of two in this range, the one check for the
# config's chunk_size, `init --chunk-size` and the repository format itself.
CHUNK_SIZE_MIN = 4 << 10
CHUNK_SIZE_MAX = 64 << 20
CHUNK_SIZE_DEFAULT = 1 << 20
CHUNK_SIZE_RANGE = "4K..64M"  # as --help and the man pages say it
# The chunk hashes a repository may use (`init --hash`); the first is the default.
CHUNK_HASHES = ("blake3", "sha256")


def chunk_size_ok(n: int) -> bool:
    """Whether ``n`` is a chunk size a repository may have."""
    return n > 0 and not n & (n - 1) and CHUNK_SIZE_MIN <= n <= CHUNK_SIZE_MAX


# Units of a prune --keep-within duration, as borg counts them: a month is 31 days,
# a year 365.
DURATION_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1),
                  "m": timedelta(days=31), "y": timedelta(days=365)}


def parse_duration(text: str) -> timedelta | None:
    """``7d``, ``12h``, ``2w``, ``1m``, ``1y`` or a sum (``1y6m``); None if not one (or 0)."""
    parts = re.findall(r"(\d+)([hdwmy])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    total = sum((int(n) * DURATION_UNITS[u] for n, u in parts), timedelta())
    return total if total > timedelta(0) else None


QUIESCE_VALUES = (True, False, "try")
MODES = ("auto", "full", "incremental")
HOST_ENV = "BACKUPKIT_HOST"
#: A host identity: what `list` shows and manifests record.  A subset of what a repository
#: accepts as a name (backupkit.repo.names): safe as one path component, and printable.
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
#: Domains one ``backup --all`` backs up at once.  Measured on 2 cores (bench/RESULTS.md,
#: ``--many 8``): 4 was the fastest in both runs that timed it (0.76 of the single runs'
#: sum against 0.94 for 2 in the quietest run), at 126 MiB.
DEFAULT_JOBS = 4


@dataclass(frozen=True)
class DomainSettings:
    """Settings that may differ per domain (``[domains.NAME]`` overrides ``[backup]``)."""

    repository: str | None = None
    mode: str = "auto"
    exclude_disks: tuple[str, ...] = ()
    quiesce: bool | str = False
    workers: int = 2
    compression_level: int = 1


@dataclass(frozen=True)
class Config:
    path: str | None = None
    repository: str | None = None
    connect: str = DEFAULT_CONNECT
    scratch_dir: str = "/var/lib/backupkit/scratch"
    scratch_min_free: int = 512 << 20
    lock_wait: float = 0.0
    lock_refresh: float | None = None  # None: backupkit.repo.locks.Settings's default
    lock_stale: float | None = None
    max_clock_skew: float | None = None
    gc_grace: float | None = None
    chunk_size: int = CHUNK_SIZE_DEFAULT
    jobs: int = DEFAULT_JOBS
    backup: DomainSettings = field(default_factory=DomainSettings)
    domains: dict[str, dict[str, Any]] = field(default_factory=dict)
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 7
    keep_weekly: int = 4
    keep_monthly: int = 6
    keep_yearly: int = 0
    keep_within: str | None = None  # a duration (parse_duration), None: rule off
    verify_data: bool = False
    metrics_textfile: str | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_profile: str | None = None
    s3_addressing_style: str | None = None
    passphrase_file: str | None = None
    host: str | None = None  # as configured; this_host() applies $BACKUPKIT_HOST and the default

    def for_domain(self, name: str) -> DomainSettings:
        """The backup settings for one domain, its overrides applied."""
        settings = self.backup
        if self.repository and settings.repository is None:
            settings = replace(settings, repository=self.repository)
        overrides = self.domains.get(name, {})
        return replace(settings, **overrides) if overrides else settings


# key -> (expected type(s), description) for each table; used for validation and docs.
_TOP: dict[str, tuple[tuple[type, ...], str]] = {
    "repository": ((str,), "repository path"),
    "connect": ((str,), "libvirt URI"),
    "scratch_dir": ((str,), "directory for backup scratch files and sockets"),
    "scratch_min_free": ((int,), "bytes kept free on the scratch filesystem"),
    "lock_wait": ((int, float), "seconds to wait for a busy lock"),
    "lock_refresh": ((int, float), "seconds between refreshes of a held lock (default 60)"),
    "lock_stale": ((int, float), "a lock not refreshed for this many seconds is stale "
                   "(default 600)"),
    "max_clock_skew": ((int, float), "largest difference allowed between this host's "
                       "clock and the store's, seconds (default 300)"),
    "gc_grace": ((int, float), "gc keeps unreferenced objects younger than this, seconds "
                 "(default 3600; at least 2 * max_clock_skew)"),
    "chunk_size": ((int,), "chunk size for new repositories (bytes)"),
    "jobs": ((int,), "domains backed up at once by backup --all or several DOMAINs"),
    "passphrase_file": ((str,), "file holding the passphrase of an encrypted repository"),
    "host": ((str,), "this host's name in the repository (else the machine's host name)"),
}
_BACKUP: dict[str, tuple[tuple[type, ...], str]] = {
    "repository": ((str,), "repository path for this domain"),
    "mode": ((str,), "auto, full or incremental"),
    "exclude_disks": ((list,), "disk targets not to back up"),
    "quiesce": ((bool, str), "freeze guest filesystems: true, false or \"try\""),
    "workers": ((int,), "threads hashing and compressing"),
    "compression_level": ((int,), "zstd level for new chunks"),
}
_PRUNE_COUNTS = tuple(f"keep_{k}" for k in
                      ("last", "hourly", "daily", "weekly", "monthly", "yearly"))
_PRUNE: dict[str, tuple[tuple[type, ...], str]] = {
    **{k: ((int,), k.replace("_", " ")) for k in _PRUNE_COUNTS},
    "keep_within": ((str,), "keep every backup newer than this duration (7d, 12h, 2w, 1m, 1y)"),
}
_VERIFY: dict[str, tuple[tuple[type, ...], str]] = {"data": ((bool,), "re-read every chunk")}
_METRICS: dict[str, tuple[tuple[type, ...], str]] = {
    "textfile": ((str,), "Prometheus textfile path"),
}
# s3:// repositories; each key overrides the AWS setting of the same meaning.
_S3: dict[str, tuple[tuple[type, ...], str]] = {
    "endpoint": ((str,), "S3 endpoint URL (else $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL)"),
    "region": ((str,), "S3 region (else $AWS_DEFAULT_REGION, ~/.aws/config)"),
    "profile": ((str,), "profile in ~/.aws/credentials and ~/.aws/config"),
    "addressing_style": ((str,), "path, virtual or auto (default: path with an endpoint)"),
}
TABLES: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "": _TOP, "backup": _BACKUP, "prune": _PRUNE, "verify": _VERIFY, "metrics": _METRICS,
    "s3": _S3,
}
ADDRESSING_STYLES = ("path", "virtual", "auto")
# Keys accepted inside [domains.NAME].
DOMAIN_KEYS = _BACKUP


def all_keys() -> list[str]:
    """Every accepted key, dotted (``backup.mode``), for documentation checks."""
    keys = []
    for table, spec in TABLES.items():
        keys += [f"{table}.{k}" if table else k for k in spec]
    keys += [f"domains.NAME.{k}" for k in DOMAIN_KEYS]
    return keys


def _check(path: str, where: str, table: dict[str, Any],
           spec: dict[str, tuple[tuple[type, ...], str]]) -> None:
    for key, value in table.items():
        name = f"{where}.{key}" if where else key
        if key not in spec:
            raise ConfigError(f"unknown key {name!r}", path)
        types, _ = spec[key]
        if isinstance(value, bool) and bool not in types:
            raise ConfigError(f"{name} must be {types[0].__name__}, not bool", path)
        if not isinstance(value, types):
            raise ConfigError(
                f"{name} must be {' or '.join(t.__name__ for t in types)}, "
                f"not {type(value).__name__}", path)


def _domain_settings(path: str, where: str, t: dict[str, Any]) -> dict[str, Any]:
    _check(path, where, t, _BACKUP)
    out: dict[str, Any] = dict(t)
    if "mode" in out and out["mode"] not in MODES:
        raise ConfigError(f"{where}.mode must be one of {', '.join(MODES)}", path)
    if "quiesce" in out and out["quiesce"] not in QUIESCE_VALUES:
        raise ConfigError(f"{where}.quiesce must be true, false or \"try\"", path)
    if "exclude_disks" in out:
        if not all(isinstance(d, str) for d in out["exclude_disks"]):
            raise ConfigError(f"{where}.exclude_disks must be a list of strings", path)
        out["exclude_disks"] = tuple(out["exclude_disks"])
    if "workers" in out and not 1 <= out["workers"] <= 64:
        raise ConfigError(f"{where}.workers must be between 1 and 64", path)
    if "compression_level" in out and not 1 <= out["compression_level"] <= 19:
        raise ConfigError(f"{where}.compression_level must be between 1 and 19", path)
    return out


def parse(doc: dict[str, Any], path: str) -> Config:
    """Validate a parsed TOML document and build a Config (pure)."""
    top = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in doc.items() if isinstance(v, dict)}
    _check(path, "", top, _TOP)
    kw: dict[str, Any] = dict(top)
    for name, t in tables.items():
        if name == "backup":
            kw["backup"] = DomainSettings(**_domain_settings(path, "backup", t))
        elif name == "domains":
            domains = {}
            for dom, dt in t.items():
                if not isinstance(dt, dict):
                    raise ConfigError(f"domains.{dom} must be a table", path)
                domains[dom] = _domain_settings(path, f"domains.{dom}", dt)
            kw["domains"] = domains
        elif name in ("prune", "verify", "metrics", "s3"):
            _check(path, name, t, TABLES[name])
            for key, value in t.items():
                kw[{"verify": "verify_", "metrics": "metrics_", "s3": "s3_"}.get(name, "")
                   + key] = value
        else:
            raise ConfigError(f"unknown table [{name}]", path)
    sd = kw.get("scratch_dir")
    if sd is not None and (not sd.strip() or not os.path.isabs(sd)):
        raise ConfigError(f"scratch_dir must be an absolute directory path, not {sd!r}", path)
    if not 1 <= kw.get("jobs", DEFAULT_JOBS) <= 64:
        raise ConfigError("jobs must be between 1 and 64", path)
    if kw.get("scratch_min_free", 0) < 0:
        raise ConfigError("scratch_min_free must not be negative", path)
    for key in _PRUNE_COUNTS:
        if kw.get(key, 0) < 0:
            raise ConfigError(f"prune.{key} must not be negative", path)
    if "keep_within" in kw and parse_duration(kw["keep_within"]) is None:
        raise ConfigError(f"prune.keep_within must be a duration such as 7d, 12h, 2w, 1m or "
                          f"1y, not {kw['keep_within']!r}", path)
    if kw.get("s3_addressing_style", "path") not in ADDRESSING_STYLES:
        raise ConfigError(f"s3.addressing_style must be one of {', '.join(ADDRESSING_STYLES)}",
                          path)
    if "host" in kw:
        check_host(kw["host"], path)
    for key in ("lock_refresh", "lock_stale"):
        if key in kw and kw[key] <= 0:
            raise ConfigError(f"{key} must be positive", path)
    for key in ("max_clock_skew", "gc_grace"):
        if key in kw and kw[key] < 0:
            raise ConfigError(f"{key} must not be negative", path)
    if not chunk_size_ok(kw.get("chunk_size", CHUNK_SIZE_DEFAULT)):
        raise ConfigError(f"chunk_size must be a power of two, {CHUNK_SIZE_RANGE}", path)
    return Config(path=path, **kw)


def check_host(name: str, where: str) -> str:
    """A host name as a repository records it: letters, digits, '.', '-', '_' (exit 2)."""
    if not _HOST.fullmatch(name) or ".." in name:
        raise ConfigError(f"host: invalid name {name!r}: 1 to 200 letters, digits, '.', '-' or "
                          "'_', starting with a letter or digit", where)
    return name


def this_host(cfg: Config | None = None) -> str:
    """This host's identity in a repository: $BACKUPKIT_HOST, else config ``host``, else
    the machine's host name (socket.gethostname())."""
    env = os.environ.get(HOST_ENV)
    if env is not None:
        if not env:
            raise ConfigError("is set but empty: unset it to use the config's host or the "
                              "machine's host name", f"${HOST_ENV}")
        return check_host(env, f"${HOST_ENV}")
    if cfg is not None and cfg.host is not None:
        return cfg.host
    name = socket.gethostname()
    try:
        return check_host(name, "the machine's host name")
    except ConfigError as e:
        raise ConfigError(f"{e.reason}; set host in the config or ${HOST_ENV}",
                          "the machine's host name") from None


def load(path: str | None = None) -> Config:
    """Load the config: an explicit path must exist; the default may be missing."""
    explicit = path is not None
    if path is None:
        env = os.environ.get("BACKUPKIT_CONFIG")
        if env == "":
            raise ConfigError("is set but empty: unset it to use the default "
                              f"{DEFAULT_PATH}, or give a file", "$BACKUPKIT_CONFIG")
        path = env or DEFAULT_PATH
        explicit = env is not None
    elif not path:
        raise ConfigError("empty path given (--config \"\")", "--config")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_SIZE + 1)
    except FileNotFoundError:
        if explicit:
            raise ConfigError("no such file", path) from None
        return Config()
    except OSError as e:
        raise ConfigError(e.strerror or str(e), path) from e
    if len(data) > MAX_CONFIG_SIZE:
        raise ConfigError(f"larger than {MAX_CONFIG_SIZE} bytes", path)
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"malformed TOML: {e}", path) from e
    return parse(doc, path)
