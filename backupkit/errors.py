"""Every failure backupkit reports, one class each, with its exit code.

Exceptions carry their fields and format their own one-line message; the CLI
prints ``str(err)`` and exits with ``err.exit_code``.  ``kind`` is the stable
machine-readable name used in ``--json`` error documents.
"""

from __future__ import annotations

from typing import Any

# Exit codes: the contract (shared/CONTRACT.md, man/backupkit.8).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_NOT_FOUND = 4
EXIT_INTEGRITY = 5
EXIT_PARTIAL = 6
# 7, not 130 (128+SIGINT): one code for SIGINT, SIGTERM and SIGHUP alike, that no
# shell produces by itself, so it always means "backupkit was interrupted and
# cleaned up" (a process killed before it could clean up shows as a signal).
EXIT_INTERRUPTED = 7


class Error(Exception):
    """Base of every error backupkit reports to the user."""

    exit_code = EXIT_FAILED
    kind = "failed"
    msg = "{reason}"
    context = ""  # what was being done, for the error line ("vm1: backup failed")

    def __init__(self, reason: str = "", **fields: Any) -> None:
        self.reason = reason
        self.fields = fields
        for key, value in fields.items():
            setattr(self, key, value)
        super().__init__(reason)

    def __str__(self) -> str:
        try:
            text = self.msg.format(reason=self.reason, **self.fields)
        except (KeyError, IndexError):
            text = self.reason
        # One line, always: stderr of external tools may span several.
        return " ".join(text.split())

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": self.kind,
            "message": str(self),
            "exit_code": self.exit_code,
        }
        for key, value in self.fields.items():
            if isinstance(value, (str, int, float, bool, list, dict)) or value is None:
                doc[key] = value
        return doc


class OperationFailed(Error):
    """The operation failed (exit 1)."""


class UsageError(Error):
    exit_code = EXIT_USAGE
    kind = "usage"


class ConfigError(UsageError):
    kind = "config"
    msg = "{path}: {reason}"

    def __init__(self, reason: str, path: str) -> None:
        super().__init__(reason, path=path)


class InvalidName(UsageError):
    kind = "invalid_name"
    msg = "invalid {what} {name!r}: {reason}"

    def __init__(self, what: str, name: str, reason: str) -> None:
        super().__init__(reason, what=what, name=name)


class KeyRequired(UsageError):
    """An encrypted repository and no passphrase (or key) to open it with."""

    kind = "key_required"


class WrongKey(UsageError):
    """The passphrase or key given does not open the repository (nothing is written)."""

    kind = "wrong_key"


class Busy(Error):
    exit_code = EXIT_BUSY
    kind = "busy"
    msg = "{what} is locked by {holder}"

    def __init__(self, what: str, holder: str) -> None:
        super().__init__(f"{what} is locked", what=what, holder=holder)


class NotFound(Error):
    exit_code = EXIT_NOT_FOUND
    kind = "not_found"
    msg = "{what} not found: {name}"

    def __init__(self, what: str, name: str, reason: str = "") -> None:
        super().__init__(reason, what=what, name=name)

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} ({self.reason})" if self.reason else base


class IntegrityError(Error):
    exit_code = EXIT_INTEGRITY
    kind = "integrity"


class RepositoryError(Error):
    """The repository is damaged, unreadable or of an unsupported format."""

    kind = "repository"
    msg = "repository {path}: {reason}"

    def __init__(self, reason: str, path: str) -> None:
        super().__init__(reason, path=path)


class CorruptRepository(RepositoryError):
    exit_code = EXIT_INTEGRITY
    kind = "corrupt"


class UnsupportedFormat(RepositoryError):
    kind = "unsupported_format"


class NoSpace(OperationFailed):
    kind = "no_space"


class PermissionDenied(OperationFailed):
    """The operating system refused access to a file (EACCES, EPERM); names the path."""

    kind = "permission_denied"
    msg = "permission denied: {path} ({reason})"

    def __init__(self, reason: str, path: str) -> None:
        super().__init__(reason, path=path)


class ReadOnly(OperationFailed):
    """A write was needed on a read-only filesystem (EROFS)."""

    kind = "read_only"
    msg = "{path} is on a read-only filesystem: {reason}"

    def __init__(self, reason: str, path: str) -> None:
        super().__init__(reason, path=path)


class CommandFailed(OperationFailed):
    """An external command exited non-zero; its stderr is kept."""

    kind = "command_failed"
    msg = "{cmd} failed (exit {rc}): {stderr}"
    cmd: str
    rc: int
    stderr: str

    def __init__(self, cmd: str, rc: int, stderr: str, stdout: bytes = b"") -> None:
        super().__init__(stderr, cmd=cmd, rc=rc, stderr=stderr.strip())
        self.stdout = stdout  # for commands whose non-zero exits still carry a result


class LibvirtError(OperationFailed):
    """A libvirt call failed; the libvirt message is kept."""

    kind = "libvirt"
    msg = "{op}: {reason}"

    def __init__(self, op: str, reason: str, code: int | None = None) -> None:
        super().__init__(reason, op=op, code=code)


class NbdError(OperationFailed):
    kind = "nbd"
    msg = "NBD {op}: {reason}"

    def __init__(self, op: str, reason: str) -> None:
        super().__init__(reason, op=op)


class ModeUnavailable(OperationFailed):
    """--mode incremental was asked for but cannot be honoured."""

    kind = "incremental_unavailable"
    msg = "{domain}: incremental backup impossible: {reason}"

    def __init__(self, domain: str, reason: str) -> None:
        super().__init__(reason, domain=domain)


class QuiesceFailed(OperationFailed):
    kind = "quiesce"
    msg = "{domain}: cannot quiesce: {reason}"

    def __init__(self, domain: str, reason: str) -> None:
        super().__init__(reason, domain=domain)


class BitmapLost(IntegrityError):
    kind = "bitmap_lost"


class Partial(Error):
    exit_code = EXIT_PARTIAL
    kind = "partial"


class ImageInUse(OperationFailed):
    """A cold (qemu-img) operation met an image that a running process holds open."""

    kind = "image_in_use"
    msg = "{image}: {reason}"


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived (exit 7); raised in the main thread.

    A KeyboardInterrupt, not an Error: ``except Exception`` (one domain's failure
    must not cost the others) must let it through, so the whole run stops and
    each level cleans up on the way out.
    """

    exit_code = EXIT_INTERRUPTED
    kind = "interrupted"

    def __init__(self, signame: str = "SIGINT") -> None:
        self.signame = signame
        super().__init__(signame)

    def __str__(self) -> str:
        return f"interrupted by {self.signame}"
