"""Names that end up in repository paths: domains, disks, backup ids.

Every name is checked before it is joined into a storage key, so a name can
never climb out of its directory, hide as a dot file (where tmp files live) or
smuggle control characters into logs.
"""

from __future__ import annotations

from backupkit.errors import InvalidName

MAX_NAME = 200
#: A name is one path component, with an affix at most (``domain.NAME.lock``, 12 bytes):
#: bytes, not characters, are what a filesystem limits (255), and a character outside
#: ASCII takes 2-4 of them in UTF-8.
MAX_NAME_BYTES = 240


def check_name(what: str, name: object) -> str:
    """Return name if it is safe as one path component, else raise InvalidName (exit 2)."""
    if not isinstance(name, str):
        raise InvalidName(what, repr(name), "not a string")
    if not name:
        raise InvalidName(what, name, "empty")
    if len(name) > MAX_NAME:
        raise InvalidName(what, name[:40] + "...", f"longer than {MAX_NAME} characters")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidName(what, name.encode("utf-8", "replace").decode()[:40],
                          "not valid UTF-8") from None
    if size > MAX_NAME_BYTES:
        raise InvalidName(what, name[:40] + "...",
                          f"{size} bytes in UTF-8, more than the {MAX_NAME_BYTES} a file "
                          "name leaves room for")
    if "/" in name:
        raise InvalidName(what, name, "contains '/'")
    if "\0" in name:
        raise InvalidName(what, name, "contains a NUL character")
    if ".." in name:
        raise InvalidName(what, name, "contains '..'")
    if name.startswith("."):
        raise InvalidName(what, name, "starts with '.'")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidName(what, name, "contains control characters")
    return name
