"""Where a repository lives: a path or a URL, turned into its Storage.

    /srv/backup, relative/dir      a local directory
    file:///srv/backup             the same, as a URL (no host part)
    s3://BUCKET[/PREFIX]           an S3-compatible object store (backupkit.repo.s3)

Anything else that looks like a URL (``scheme:``, ``scheme://``) is a usage error
(exit 2), never a local directory named after the scheme.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import TYPE_CHECKING

from backupkit.errors import UsageError
from backupkit.repo.storage import LocalStorage, Storage

if TYPE_CHECKING:
    from backupkit.config import Config
    from backupkit.repo.s3 import S3Settings

SCHEMES = ("file", "s3")
# "s3:", "S3://", "ftp://": a scheme, then ":"; a relative path holding a colon later
# on ("backups/a:b") is still a path.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# S3 bucket names: 3-63 of a-z 0-9 . -, starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _usage(location: str, why: str) -> UsageError:
    return UsageError(f"invalid repository location {location!r}: {why}")


def parse(location: str) -> tuple[str, str, str]:
    """(scheme, bucket or "", path or prefix) of a repository location; UsageError if bad.

    scheme is "file" for a plain path.
    """
    if not location:
        raise _usage(location, "empty")
    m = _SCHEME.match(location)
    if m is None:
        return "file", "", location
    scheme = m.group(1).lower()
    if scheme not in SCHEMES:
        raise _usage(location, f"unknown scheme {m.group(1)!r} (use a path, file:///PATH or "
                               "s3://BUCKET/PREFIX; a directory whose name holds a colon: "
                               "./NAME)")
    u = urllib.parse.urlsplit(location)
    if not location[m.end():].startswith("//"):
        raise _usage(location, f"write {scheme}://...")
    if u.query or u.fragment or "?" in location or "#" in location:
        raise _usage(location, "no query or fragment allowed")
    if scheme == "file":
        if u.netloc not in ("", "localhost"):
            raise _usage(location, "a file URL names no host (file:///PATH)")
        path = urllib.parse.unquote(u.path)
        if not path.startswith("/"):
            raise _usage(location, "a file URL needs an absolute path")
        return "file", "", path
    bucket = u.netloc
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise _usage(location, f"invalid bucket name {bucket!r}")
    prefix = u.path.strip("/")
    if prefix and any(p in ("", ".", "..") for p in prefix.split("/")):
        raise _usage(location, f"invalid prefix {u.path!r}")
    return "s3", bucket, prefix


def s3_settings(config: Config | None) -> S3Settings:
    from backupkit.repo.s3 import S3Settings

    if config is None:
        return S3Settings()
    return S3Settings(endpoint=config.s3_endpoint, region=config.s3_region,
                      profile=config.s3_profile, addressing_style=config.s3_addressing_style)


def open_storage(location: str, config: Config | None = None) -> Storage:
    """The Storage for a repository location (no I/O for a local one)."""
    scheme, bucket, path = parse(location)
    if scheme == "s3":
        from backupkit.repo.s3 import S3Storage  # boto3 loads only for S3 repositories

        return S3Storage(bucket, path, s3_settings(config))
    return LocalStorage(path)
