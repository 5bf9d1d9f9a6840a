"""The command line: argparse, dispatch to the operations, JSON and exit codes.

Commands are thin: they build a request from arguments and config, call one
operation, and print its result.  Every failure is a backupkit.errors.Error
carrying its exit code; anything else is a bug and exits 1 with a one-line
message (the traceback only with -v).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from backupkit import __version__, config, errors
from backupkit import log as logsetup

log = logging.getLogger("backupkit")

Handler = Callable[[argparse.Namespace, config.Config], Any]


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors raise (exit 2, JSON document); no abbreviated options (--js is not --json)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        raise errors.UsageError(f"{self.prog}: {message}")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {text!r}")
    return value


def _jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be between 1 and 64: {text!r}")
    return value


def _wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=_seconds, metavar="SECONDS", default=None,
                   help="wait up to SECONDS for a busy lock instead of exiting 3")


def _host(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--host", metavar="HOST", type=_host_name, help=what)


def _host_name(text: str) -> str:
    try:
        return config.check_host(text, "--host")
    except errors.ConfigError as e:
        raise argparse.ArgumentTypeError(e.reason) from None


_LATEST_HOST = ("with 'latest': the newest backup of the domain of that name that HOST "
                "backed up (needed when hosts back up different domains of one name)")


def _domain_backup(p: argparse.ArgumentParser) -> None:
    """DOMAIN [BACKUP] [--host H]: the backup a restore, serve, mount or drill works on."""
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("backup", nargs="?", default="latest", metavar="BACKUP",
                   help="backup id or 'latest' (default)")
    _host(p, _LATEST_HOST)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="backupkit",
        description="Incremental backups of libvirt/QEMU domains over NBD with dirty bitmaps.",
        epilog="Exit codes: 0 ok, 1 failed, 2 usage/config, 3 busy, 4 not found, "
               "5 integrity, 6 partial, 7 interrupted. See backupkit(8).",
    )
    p.add_argument("--version", action="version", version=f"backupkit {__version__}")
    p.add_argument("--config", metavar="PATH",
                   help="TOML config (default $BACKUPKIT_CONFIG, else "
                        "/etc/backupkit/backupkit.toml)")
    p.add_argument("--repo", metavar="PATH|URL",
                   help="repository: a directory, file:///PATH or s3://BUCKET/PREFIX "
                        "(default: config 'repository', else $BACKUPKIT_REPO)")
    p.add_argument("--connect", metavar="URI", help="libvirt URI (default qemu:///system)")
    p.add_argument("--passphrase-file", metavar="PATH",
                   help="passphrase of an encrypted repository (else $BACKUPKIT_PASSPHRASE, "
                        "the systemd credential backupkit-passphrase, config passphrase_file)")
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON document on stdout; logs go to stderr")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    p.add_argument("-q", "--quiet", action="count", default=0,
                   help="less logging, no progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True,
                           parser_class=ArgumentParser)

    s = sub.add_parser("init", help="create an empty repository")
    s.add_argument("--chunk-size", type=_size, metavar="BYTES",
                   help=f"chunk size (power of two, {config.CHUNK_SIZE_RANGE}; default from "
                        "config, 1M)")
    s.add_argument("--compression-level", type=int, metavar="N",
                   help="zstd level recorded in the repository (-7..-1 or 1..22; default "
                        "from config, 1)")
    s.add_argument("--hash", choices=config.CHUNK_HASHES, default=config.CHUNK_HASHES[0],
                   help="chunk hash, fixed for the repository's life (default blake3, "
                        "about 4x faster; sha256 where a FIPS-approved hash is required)")
    s.add_argument("--encryption", action="store_true",
                   help="encrypt and authenticate everything (AES-256-GCM); the key is "
                        "wrapped by the passphrase")
    s.add_argument("--master-pubkey", metavar="FILE",
                   help="also seal the key to this X25519 or RSA public key (PEM), for "
                        "'key recover --master-key'")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("backup", help="back up domains (full or incremental)")
    s.add_argument("domains", nargs="*", metavar="DOMAIN")
    s.add_argument("--all", action="store_true", help="every domain libvirt knows")
    s.add_argument("--mode", choices=config.MODES, default=None,
                   help="auto (default): incremental when valid, else full with the reason")
    s.add_argument("--disk", action="append", default=[], metavar="NAME",
                   help="back up only this disk target (repeatable)")
    s.add_argument("--exclude-disk", action="append", default=[], metavar="NAME",
                   help="skip this disk target (repeatable)")
    s.add_argument("--quiesce", action="store_true", default=None,
                   help="freeze guest filesystems through the guest agent around checkpoint "
                        "creation only")
    s.add_argument("--jobs", type=_jobs, default=None, metavar="N",
                   help="back up N domains at once (--all or several DOMAINs; default: "
                        "config key jobs, else 4)")
    _wait(s)
    s.set_defaults(func=cmd_backup)

    s = sub.add_parser("list", help="list backups")
    s.add_argument("domain", nargs="?", metavar="DOMAIN")
    _host(s, "only the backups HOST wrote")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("show", help="show one backup's manifest")
    s.add_argument("domain", metavar="DOMAIN")
    s.add_argument("backup", metavar="BACKUP", help="backup id or 'latest'")
    _host(s, _LATEST_HOST)
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("restore", help="restore a backup's disks into a directory")
    _domain_backup(s)
    s.add_argument("--target", required=True, metavar="DIR", help="directory for <disk>.<format>")
    s.add_argument("--format", choices=("qcow2", "raw"), default="qcow2")
    s.add_argument("--disk", action="append", default=[], metavar="NAME",
                   help="restore only this disk (repeatable)")
    s.add_argument("--define", metavar="NEW_NAME",
                   help="also define a new domain (new name, UUID and MACs) using the disks")
    s.add_argument("--force", action="store_true", help="overwrite existing files")
    s.add_argument("--live", action="store_true",
                   help="with --define: start the domain at once from overlays on the backup's "
                        "export and copy the data in the background")
    s.add_argument("--detach", action="store_true",
                   help="with --live: return once the domain runs (see restore-status)")
    _wait(s)
    s.set_defaults(func=cmd_restore)

    s = sub.add_parser("restore-status", help="progress of a live restore (finishes it when done)")
    s.add_argument("name", metavar="NEW_NAME")
    s.add_argument("--abort", action="store_true",
                   help="give the live restore up: destroy and undefine the domain, stop the "
                        "server, remove the overlays")
    s.set_defaults(func=cmd_restore_status)

    s = sub.add_parser("serve", help="serve one backup's disk as a read-only NBD export")
    _domain_backup(s)
    s.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to serve on")
    s.add_argument("--disk", metavar="NAME",
                   help="disk of the default export (default: the backup's first disk; every "
                        "disk is also exported under its own name)")
    s.add_argument("--background", action="store_true",
                   help="return once the socket answers and print the server's PID")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("mount", help="mount a backup's filesystems read-only")
    _domain_backup(s)
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    s.add_argument("--disk", metavar="NAME", help="the disk to mount (default: the first)")
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("umount", help="undo backupkit mount (filesystems, loops, FUSE, server)")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.set_defaults(func=cmd_umount)

    s = sub.add_parser("drill", help="boot a throwaway copy of a backup and check it answers")
    _domain_backup(s)
    s.add_argument("--timeout", type=_seconds, default=300.0, metavar="SECONDS",
                   help="give up after SECONDS (default 300)")
    s.add_argument("--check", metavar="COMMAND",
                   help="also run COMMAND in the guest (guest-exec); exit 0 passes")
    s.set_defaults(func=cmd_drill)

    s = sub.add_parser("verify", help="check manifests, indexes and (with --data) chunks")
    s.add_argument("domain", nargs="?", metavar="DOMAIN")
    s.add_argument("backup", nargs="?", metavar="BACKUP")
    _host(s, "with DOMAIN: only the backups of the domain(s) of that name HOST backed up; "
             "with 'latest': as for restore")
    s.add_argument("--data", action="store_true", default=None,
                   help="read every chunk and check its hash; move damaged chunks to the "
                        "repository's quarantine/ so the next backup stores them afresh")
    s.add_argument("--repair", action="store_true",
                   help="store missing (quarantined) chunks again where another backup of "
                        "the same disk holds the same data")
    _wait(s)
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("prune", help="remove backups outside the retention policy")
    s.add_argument("domain", nargs="?", metavar="DOMAIN")
    for k in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        s.add_argument(f"--keep-{k}", type=int, metavar="N", default=None,
                       help=f"keep the newest {'N backups' if k == 'last' else k + ' backups'}"
                       + ("" if k == "last" else " (one per period, N periods)"))
    s.add_argument("--keep-within", type=_duration, metavar="DURATION", default=None,
                   help="keep every backup newer than DURATION (7d, 12h, 2w, 1m = 31 days, "
                        "1y = 365 days, or a sum such as 1y6m)")
    s.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    _wait(s)
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("delete", help="delete one backup by id, even one that cannot be read")
    s.add_argument("domain", metavar="DOMAIN")
    s.add_argument("backup", metavar="BACKUP", help="backup id")
    _wait(s)
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("gc", help="remove unreferenced chunks and leftovers of interrupted runs")
    s.add_argument("--dry-run", action="store_true", help="print what would be removed")
    _wait(s)
    s.set_defaults(func=cmd_gc)

    s = sub.add_parser("copy", help="copy backups to another repository (only missing chunks)")
    s.add_argument("domains", nargs="*", metavar="DOMAIN", help="default: every domain")
    s.add_argument("--to", required=True, metavar="PATH|URL", help="the target repository")
    s.add_argument("--latest", type=int, metavar="N",
                   help="only the N newest backups of each domain")
    s.add_argument("--to-passphrase-file", metavar="PATH",
                   help="passphrase of an encrypted target (else $BACKUPKIT_TO_PASSPHRASE, "
                        "else the source's)")
    s.set_defaults(func=cmd_copy)

    kp = sub.add_parser("key", help="the key of an encrypted repository")
    kps = kp.add_subparsers(dest="key_command", metavar="ACTION", required=True,
                            parser_class=ArgumentParser)
    s = kps.add_parser("show", help="key files and escrow (no secret)")
    s.set_defaults(func=cmd_key, key_action="show")
    for name, helptext in (("export", "write the key to FILE (never overwrites)"),
                           ("import", "add a key file from FILE (an export or a paper key)")):
        s = kps.add_parser(name, help=helptext)
        s.add_argument("file", metavar="FILE")
        s.add_argument("--paper", action="store_true",
                       help="the printable form: the key itself in checksummed lines")
        s.set_defaults(func=cmd_key, key_action=name)
    s = kps.add_parser("passwd", help="change the passphrase")
    s.add_argument("--new-passphrase-file", metavar="PATH",
                   help="the new passphrase (else $BACKUPKIT_NEW_PASSPHRASE, else a prompt)")
    s.set_defaults(func=cmd_key, key_action="passwd")
    s = kps.add_parser("recover", help="new key file from the master key escrow")
    s.add_argument("--master-key", required=True, metavar="FILE",
                   help="the master private key (PEM) matching init's --master-pubkey")
    s.set_defaults(func=cmd_key, key_action="recover")

    cp = sub.add_parser("checkpoint", help="list or delete libvirt checkpoints")
    cps = cp.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True,
                            parser_class=ArgumentParser)
    s = cps.add_parser("list", help="checkpoints with per-disk bitmap state")
    s.add_argument("domain", metavar="DOMAIN")
    s.set_defaults(func=cmd_checkpoint_list)
    s = cps.add_parser("delete", help="delete checkpoints with their bitmaps in every layer")
    s.add_argument("domain", metavar="DOMAIN")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("name", nargs="?", metavar="NAME")
    g.add_argument("--all", action="store_true", help="every checkpoint of the domain")
    _wait(s)
    s.set_defaults(func=cmd_checkpoint_delete)

    hy = sub.add_parser("hygiene", help="bitmap hygiene around backing-chain merges")
    hys = hy.add_subparsers(dest="hygiene_command", metavar="ACTION", required=True,
                            parser_class=ArgumentParser)
    for name, helptext in (
        ("pre-merge", "before merging TOP into BASE: remove stale bitmaps from BASE"),
        ("post-merge", "after the merge: add TOP-only bitmaps to BASE and merge their bits"),
    ):
        s = hys.add_parser(name, help=helptext)
        s.add_argument("--top", required=True, metavar="IMAGE")
        s.add_argument("--base", required=True, metavar="IMAGE")
        s.add_argument("--domain", metavar="DOMAIN", help="live: work through libvirt")
        s.add_argument("--disk", metavar="NAME", help="disk target with --domain")
        s.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
        _wait(s)
        s.set_defaults(func=cmd_hygiene_merge, merge_step=name)
    s = hys.add_parser("check", help="report (and with --fix repair) bitmap problems")
    s.add_argument("domain", nargs="?", metavar="DOMAIN")
    s.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="check image files instead of a domain (repeatable)")
    s.add_argument("--fix", action="store_true", help="repair what is safe")
    _wait(s)
    s.set_defaults(func=cmd_hygiene_check)
    return p


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = units.get(t[-1:], 1)
    try:
        return int(t[:-1] if t[-1:] in units else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None


def _duration(text: str) -> timedelta:
    d = config.parse_duration(text)
    if d is None:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: a number and h, d, w, m or y (7d, 12h, 1y6m)")
    return d


# --- context --------------------------------------------------------------------


def _repo_path(args: argparse.Namespace, cfg: config.Config, domain: str | None = None) -> str:
    path = args.repo
    if not path and domain:
        path = cfg.for_domain(domain).repository
    path = path or cfg.repository or os.environ.get("BACKUPKIT_REPO")
    if not path:
        raise errors.UsageError(
            "no repository: use --repo, 'repository' in the config, or $BACKUPKIT_REPO")
    return str(path)


def _passphrase(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.repo import crypto

    return crypto.Passphrase(file=args.passphrase_file, config_file=cfg.passphrase_file)


def _open_repo(args: argparse.Namespace, cfg: config.Config, domain: str | None = None,
               unlock: bool = True) -> Any:
    from backupkit.repo import Repository
    from backupkit.repo.url import open_storage

    repo = Repository.open(open_storage(_repo_path(args, cfg, domain), cfg),
                           _passphrase(args, cfg) if unlock else None)
    repo.lock_settings = _lock_settings(cfg)
    return repo


def _lock_settings(cfg: config.Config) -> Any:
    from backupkit.repo import locks

    return locks.settings(host=config.this_host(cfg), lock_refresh=cfg.lock_refresh,
                          lock_stale=cfg.lock_stale, max_clock_skew=cfg.max_clock_skew,
                          gc_grace=cfg.gc_grace)


def _uri(args: argparse.Namespace, cfg: config.Config) -> str:
    return str(args.connect or cfg.connect)


def _lock_wait(args: argparse.Namespace, cfg: config.Config) -> float:
    w = getattr(args, "wait", None)
    return float(w if w is not None else cfg.lock_wait)


# --- commands -------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.repo import Repository
    from backupkit.repo.url import open_storage

    path = _repo_path(args, cfg)
    pubkey = None
    if args.master_pubkey:
        from backupkit.ops.key import read_small

        pubkey = (args.master_pubkey, read_small(args.master_pubkey, "master public key"))
    # "is None", not "or": --chunk-size 0 is an error, never the default.
    repo = Repository.init(
        open_storage(path, cfg),
        chunk_size=cfg.chunk_size if args.chunk_size is None else args.chunk_size,
        compression_level=(cfg.backup.compression_level if args.compression_level is None
                           else args.compression_level),
        hash_name=args.hash, encryption=_passphrase(args, cfg) if args.encryption else None,
        master_pubkey=pubkey)
    log.info("initialized %srepository %s (chunk size %d, %s)",
             "encrypted " if repo.encrypted else "", repo.path, repo.chunk_size,
             repo.hash_name)
    return {"repository": repo.path, "chunk_size": repo.chunk_size, "hash": repo.hash_name,
            "encrypted": repo.encrypted}


def cmd_copy(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import transfer
    from backupkit.repo import Repository, crypto
    from backupkit.repo.url import open_storage

    src = _open_repo(args, cfg)
    to_env = os.environ.get("BACKUPKIT_TO_PASSPHRASE")
    pp = crypto.Passphrase(file=args.to_passphrase_file or args.passphrase_file,
                           config_file=cfg.passphrase_file,
                           env="BACKUPKIT_TO_PASSPHRASE" if to_env else crypto.PASSPHRASE_ENV)
    dst = Repository.open(open_storage(args.to, cfg), pp)
    dst.lock_settings = _lock_settings(cfg)
    return transfer.copy(src, dst, list(dict.fromkeys(args.domains)), args.latest)


def cmd_key(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import key
    from backupkit.repo import crypto

    repo = _open_repo(args, cfg, unlock=False)
    pp = _passphrase(args, cfg)
    action = args.key_action
    if action == "show":
        return key.show(repo)
    if action == "export":
        return key.export(repo, pp, args.file, paper=args.paper)
    if action == "import":
        return key.import_key(repo, pp, args.file, paper=args.paper)
    if action == "passwd":
        new = crypto.Passphrase(file=args.new_passphrase_file, env=crypto.NEW_PASSPHRASE_ENV,
                                what="new passphrase")
        return key.passwd(repo, pp, new)
    return key.recover(repo, pp, args.master_key)


def cmd_backup(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit import virt
    from backupkit.ops import backup as op
    from backupkit.progress import progress_factory

    if args.all and args.domains:
        raise errors.UsageError("give DOMAIN names or --all, not both")
    if not args.all and not args.domains:
        raise errors.UsageError("backup needs DOMAIN... or --all")
    host = config.this_host(cfg)
    with virt.connect(_uri(args, cfg)) as conn:
        names = conn.domain_names() if args.all else list(dict.fromkeys(args.domains))

        def request(name: str) -> op.Request:
            s = cfg.for_domain(name)
            quiesce: bool | str = s.quiesce
            if args.quiesce:
                quiesce = True
            return op.Request(
                domain=name, mode=args.mode or s.mode, disks=tuple(args.disk),
                exclude=tuple(args.exclude_disk) + s.exclude_disks, quiesce=quiesce,
                workers=s.workers, compression_level=s.compression_level,
                scratch_dir=cfg.scratch_dir, scratch_min_free=cfg.scratch_min_free,
                lock_wait=_lock_wait(args, cfg), host=host)

        hooks = op.Hooks(progress_start=progress_factory(args))
        repos = {_repo_path(args, cfg, n) for n in names}
        if len(names) == 1:
            repo = _open_repo(args, cfg, names[0])
            try:
                res = op.backup(repo, conn, request(names[0]), hooks)
            except errors.Error as e:
                _metrics(cfg, None, (names[0], e))
                e.context = f"{names[0]}: backup failed"  # the domain, as --all names it
                raise
            except KeyboardInterrupt as e:
                e.context = f"{names[0]}: backup"  # type: ignore[attr-defined]
                raise
            _log_summary(res)
            _metrics(cfg, res, None)
            _repo_metrics(cfg, repo, [res])
            return res
        if len(repos) > 1:
            raise errors.UsageError("--all with per-domain repositories: back up each "
                                    "domain separately")
        repo = _open_repo(args, cfg, names[0] if names else None)

        done: list[dict[str, Any]] = []

        def on_result(name: str, res: dict[str, Any] | None, err: errors.Error | None) -> None:
            if res:
                _log_summary(res)
                done.append(res)
            else:
                log.error("%s: FAILED: %s", name, err)
            _metrics(cfg, res, (name, err) if err else None)

        jobs = args.jobs or cfg.jobs
        try:
            return op.backup_many(repo, conn, names, request, hooks, on_result, jobs=jobs)
        finally:
            _repo_metrics(cfg, repo, done)


def _log_summary(res: dict[str, Any]) -> None:
    freeze = res.get("freeze_seconds")
    log.info("%s: backup %s done: mode=%s (%s) read=%d stored=%d duration=%.1fs%s",
             res["domain"], res["id"], res["mode"], res["reason"], res["read_bytes"],
             res["stored_bytes"], res["duration_seconds"],
             f" freeze={freeze:.3f}s" if freeze is not None else "")


def _metrics(cfg: config.Config, res: dict[str, Any] | None,
             failure: tuple[str, errors.Error] | None) -> None:
    if not cfg.metrics_textfile:
        return
    from backupkit import metrics

    try:
        metrics.record_backup(cfg.metrics_textfile, res, failure)
    except OSError as e:
        log.warning("cannot write metrics to %s: %s", cfg.metrics_textfile, e)


def _repo_metrics(cfg: config.Config, repo: Any,
                  backups: list[dict[str, Any]] | None = None) -> None:
    """Repository size and chunk count for the textfile.

    After backups: the totals plus what they stored (no listing), once the file has
    totals; otherwise (gc, a first backup) one listing of the whole repository.
    """
    if not cfg.metrics_textfile:
        return
    from backupkit import metrics

    try:
        if backups is not None and (
                not backups or metrics.add_backups(cfg.metrics_textfile, repo.path, backups)):
            return
        metrics.record_repository(cfg.metrics_textfile, repo.path, metrics.repository_stats(repo))
    except OSError as e:
        log.warning("cannot write metrics to %s: %s", cfg.metrics_textfile, e)


def cmd_list(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import inspect

    return inspect.list_backups(_open_repo(args, cfg, args.domain), args.domain, args.host)


def cmd_show(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import inspect

    repo = _open_repo(args, cfg, args.domain)
    return inspect.show(repo, args.domain, _backup(args, cfg, repo))


def _backup(args: argparse.Namespace, cfg: config.Config, repo: Any) -> str:
    """args.backup, with 'latest' made the id of one domain's newest backup when hosts back
    up different domains of that name (ops.inspect.resolve)."""
    from backupkit.ops import inspect

    return inspect.resolve(repo, args.domain, args.backup, host=args.host,
                           this_host=lambda: config.this_host(cfg),
                           local_uuid=lambda: _local_uuid(args, cfg, args.domain))


def _local_uuid(args: argparse.Namespace, cfg: config.Config, name: str) -> str | None:
    """The UUID of the domain defined here under that name; None if none (or no libvirt)."""
    try:
        from backupkit import virt

        with virt.connect(_uri(args, cfg)) as conn:
            return conn.domain(name).uuid()
    except (errors.Error, ImportError) as e:
        log.debug("no domain %s on %s: %s", name, _uri(args, cfg), e)
        return None


def cmd_restore(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import restore
    from backupkit.progress import progress_factory

    factory = progress_factory(args)
    if args.live or args.detach:
        return _restore_live(args, cfg, factory)
    repo = _open_repo(args, cfg, args.domain)
    args.backup = _backup(args, cfg, repo)
    progress = None
    if factory:
        m = repo.get_manifest(args.domain, args.backup)
        total = sum(d.data_bytes for d in m.disks if not args.disk or d.name in args.disk)
        progress = factory("restore", total)
    # A reader: gc never deletes chunks of a committed backup, so it runs meanwhile.
    with repo.lock_read(_lock_wait(args, cfg)):
        return restore.restore(
            repo, args.domain, args.backup, args.target,
            fmt=args.format, disks=tuple(args.disk), define=args.define, force=args.force,
            connect=_uri(args, cfg), progress=progress)


def _passphrase_file(args: argparse.Namespace) -> str | None:
    """An encrypted repository's --passphrase-file, for the nbdkit plugin to unlock it."""
    value = getattr(args, "passphrase_file", None)
    return str(value) if value else None


def cmd_serve(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import serve

    location = _repo_path(args, cfg, args.domain)
    repo = _open_repo(args, cfg, args.domain)
    return serve.serve(repo, location, cfg.path, args.domain, _backup(args, cfg, repo),
                       args.socket,
                       disk=args.disk, background=args.background,
                       passphrase_file=_passphrase_file(args))


def cmd_mount(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import mount

    location = _repo_path(args, cfg, args.domain)
    repo = _open_repo(args, cfg, args.domain)
    return mount.mount(repo, location, cfg.path, args.domain, _backup(args, cfg, repo),
                       args.mountpoint,
                       disk=args.disk, passphrase_file=_passphrase_file(args))


def cmd_umount(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import mount

    return mount.umount(args.mountpoint)


def _restore_live(args: argparse.Namespace, cfg: config.Config, factory: Any) -> Any:
    from backupkit.ops import live

    if not args.live:
        raise errors.UsageError("--detach needs --live")
    if not args.define:
        raise errors.UsageError("--live needs --define NEW_NAME")
    if args.format != "qcow2" or args.force:
        raise errors.UsageError("--live writes qcow2 overlays; --format raw and --force "
                                "do not apply")
    location = _repo_path(args, cfg, args.domain)
    repo = _open_repo(args, cfg, args.domain)
    return live.live_restore(repo, location, cfg.path, args.domain, _backup(args, cfg, repo),
                             args.target,
                             args.define, disks=tuple(args.disk), connect=_uri(args, cfg),
                             detach=args.detach, progress=factory,
                             passphrase_file=_passphrase_file(args))


def cmd_restore_status(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import live

    if args.abort:
        return live.abort_command(args.name)
    return live.status(args.name)


def cmd_drill(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import drill

    location = _repo_path(args, cfg, args.domain)
    repo = _open_repo(args, cfg, args.domain)
    result: dict[str, Any] | None = None
    try:
        result = drill.drill(repo, location, cfg.path, args.domain, _backup(args, cfg, repo),
                             connect=_uri(args, cfg), timeout=args.timeout, check=args.check,
                             passphrase_file=_passphrase_file(args))
        return result
    except drill.DrillFailed as e:
        result = e.fields.get("result")
        raise
    finally:
        if result is not None and cfg.metrics_textfile:
            from backupkit import metrics

            try:
                metrics.record_drill(cfg.metrics_textfile, result)
            except OSError as e:
                log.warning("cannot write metrics to %s: %s", cfg.metrics_textfile, e)


def cmd_verify(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import verify
    from backupkit.progress import progress_factory

    data = cfg.verify_data if args.data is None else args.data
    if args.host and not args.domain:
        raise errors.UsageError("--host needs DOMAIN (verify DOMAIN [latest] --host HOST)")
    repo = _open_repo(args, cfg, args.domain)
    backup = args.backup and _backup(args, cfg, repo)
    return verify.verify(repo, args.domain, backup,
                         data=bool(data), repair=args.repair, wait=_lock_wait(args, cfg),
                         progress_start=progress_factory(args),
                         host=args.host if backup is None else None)


def cmd_prune(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import prune

    keys = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
    given = {k: getattr(args, f"keep_{k}") for k in keys}
    within = args.keep_within
    if all(v is None for v in given.values()) and within is None:
        given = {k: getattr(cfg, f"keep_{k}") for k in keys}
        within = config.parse_duration(cfg.keep_within) if cfg.keep_within else None
    policy = prune.Policy(last=given["last"] or 0, hourly=given["hourly"] or 0,
                          daily=given["daily"] or 0, weekly=given["weekly"] or 0,
                          monthly=given["monthly"] or 0, yearly=given["yearly"] or 0,
                          within=within)
    return prune.prune(_open_repo(args, cfg, args.domain), args.domain, policy,
                       dry_run=args.dry_run, wait=_lock_wait(args, cfg))


def cmd_delete(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import prune

    return prune.delete(_open_repo(args, cfg, args.domain), args.domain, args.backup,
                        wait=_lock_wait(args, cfg))


def cmd_gc(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import gc

    repo = _open_repo(args, cfg)
    result = gc.gc(repo, dry_run=args.dry_run, wait=_lock_wait(args, cfg))
    _repo_metrics(cfg, repo)
    return result


def cmd_checkpoint_list(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import checkpoint

    return checkpoint.list_checkpoints(_uri(args, cfg), args.domain)


def cmd_checkpoint_delete(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import checkpoint

    return checkpoint.delete(_uri(args, cfg), args.domain, None if args.all else args.name,
                             repo_path=_optional_repo(args, cfg, args.domain),
                             wait=_lock_wait(args, cfg))


def _optional_repo(args: argparse.Namespace, cfg: config.Config, domain: str | None
                   ) -> str | None:
    try:
        return _repo_path(args, cfg, domain)
    except errors.UsageError:
        return None


def cmd_hygiene_merge(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import hygiene

    if bool(args.domain) != bool(args.disk):
        raise errors.UsageError("--domain and --disk go together")
    fn = hygiene.pre_merge if args.merge_step == "pre-merge" else hygiene.post_merge
    return fn(args.top, args.base, domain=args.domain, disk=args.disk,
              connect=_uri(args, cfg), dry_run=args.dry_run,
              repo=_optional_repo(args, cfg, args.domain) if args.domain else None,
              wait=_lock_wait(args, cfg))


def cmd_hygiene_check(args: argparse.Namespace, cfg: config.Config) -> Any:
    from backupkit.ops import hygiene

    if bool(args.domain) == bool(args.image):
        raise errors.UsageError("hygiene check needs DOMAIN or --image PATH..., not both")
    return hygiene.check(images=list(args.image), domain=args.domain, fix=args.fix,
                         passphrase=_passphrase(args, cfg),
                         connect=_uri(args, cfg),
                         repo=_optional_repo(args, cfg, args.domain),
                         wait=_lock_wait(args, cfg))


# --- main -----------------------------------------------------------------------


def _json_text(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n"


def _human_text(doc: Any) -> str:
    from backupkit import render

    text = render.render(doc)
    return text.rstrip("\n") + "\n" if text else ""


def _write(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head: not our failure to report
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115


def _print_json(doc: Any) -> None:
    _write(_json_text(doc))


def _print_human(doc: Any) -> None:
    _write(_human_text(doc))


def _error_line(e: errors.Error) -> str:
    """``vm1: backup failed: reason``: the context first, the domain named once."""
    text = str(e)
    if not e.context:
        return text
    subject = e.context.split(": ")[0]
    return f"{e.context}: {text.removeprefix(subject + ': ')}"


def main(argv: Sequence[str] | None = None) -> int:
    from backupkit import proc

    previous = {s: signal.getsignal(s) for s in proc.STOP_SIGNALS}
    proc.stop_on_signals()
    try:
        return _main(argv)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv
    verbosity = 0
    try:
        args = build_parser().parse_args(argv)
        verbosity = args.verbose - args.quiet
        logsetup.setup(verbosity)
        cfg = config.load(args.config)
        result = args.func(args, cfg)
        # Render inside the try: a rendering bug must still give one JSON document.
        text = _json_text(result) if args.json else _human_text(result) if verbosity >= 0 else ""
        if not args.json and args.command == "backup" and logsetup.under_journal(sys.stdout):
            text = ""  # the journal has one line per backup already; no summary there
    except errors.Error as e:
        if not logging.getLogger("backupkit").handlers:
            logsetup.setup(verbosity)
        log.error("%s", _error_line(e))
        result_doc = e.fields.get("result")
        if not want_json and verbosity >= 0 and isinstance(result_doc, dict):
            _print_human(result_doc)  # e.g. the per-domain table of a partial --all
        if verbosity > 0:
            log.exception("details")
        if want_json:
            _print_json({"error": e.to_json()})
        return e.exit_code
    except KeyboardInterrupt as e:
        # SIGINT, SIGTERM or SIGHUP (proc.stop_on_signals): every level has cleaned up.
        if not logging.getLogger("backupkit").handlers:
            logsetup.setup(verbosity)
        what = str(e) if isinstance(e, errors.Interrupted) else "interrupted by SIGINT"
        context = getattr(e, "context", "")
        message = f"{context} {what}" if context else what
        log.error("%s", message)
        if want_json:
            _print_json({"error": {"kind": "interrupted", "message": message,
                                   "exit_code": errors.EXIT_INTERRUPTED}})
        return errors.EXIT_INTERRUPTED
    except Exception as e:  # a bug: still one line, still a JSON document
        log.error("internal error: %s: %s", type(e).__name__, e)
        if verbosity > 0:
            log.exception("details")
        if want_json:
            _print_json({"error": {"kind": "internal", "message": f"{type(e).__name__}: {e}",
                                   "exit_code": errors.EXIT_FAILED}})
        return errors.EXIT_FAILED
    _write(text)
    return errors.EXIT_OK
