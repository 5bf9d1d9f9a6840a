"""The manifest: one JSON document per backup; a backup exists iff its manifest does."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from backupkit.errors import CorruptRepository, UnsupportedFormat

MANIFEST_VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
# The domain's own <uuid> element (a <secret uuid='...'/> is an attribute, never matched).
_XML_UUID = re.compile(r"<uuid>\s*([0-9a-fA-F-]{32,36})\s*</uuid>")


class ManifestFormatError(ValueError):
    pass


@dataclass
class DiskRecord:
    name: str
    source: str
    format: str
    virtual_size: int
    read_bytes: int
    stored_bytes: int
    data_bytes: int
    index: dict[str, Any]  # {"key": storage key, "sha256": hex, "size": bytes} from write_index
    # How this disk was copied and why: a raw disk is "full" inside an incremental backup.
    mode: str = ""
    reason: str = ""


@dataclass
class Manifest:
    id: str
    domain: str
    created: str
    mode: str
    reason: str
    checkpoint: str | None
    parent_checkpoint: str | None
    parent_id: str | None
    started: str
    finished: str
    duration_seconds: float
    quiesced: bool
    freeze_seconds: float | None
    domain_xml: str
    checkpoint_xml: str | None
    disks: list[DiskRecord] = field(default_factory=list)
    version: int = MANIFEST_VERSION
    # Who wrote it and of which domain (older manifests have neither: None).  A domain's
    # backups form one chain per (name, UUID): see backupkit.repo.chains.
    host: str | None = None
    domain_uuid: str | None = None

    @property
    def created_at(self) -> datetime:
        """created as an aware datetime (UTC when the string has no offset)."""
        t = datetime.fromisoformat(self.created)
        return t if t.tzinfo is not None else t.replace(tzinfo=UTC)

    def sort_key(self) -> tuple[datetime, str]:
        return (self.created_at, self.id)

    @property
    def chain_uuid(self) -> str | None:
        """The domain's UUID: recorded, else the ``<uuid>`` of the domain XML (older
        manifests), else None."""
        if self.domain_uuid:
            return self.domain_uuid.lower()
        found = _XML_UUID.search(self.domain_xml)
        return found.group(1).lower() if found else None

    @property
    def logical_size(self) -> int:
        return sum(d.virtual_size for d in self.disks)

    @property
    def stored_size(self) -> int:
        return sum(d.stored_bytes for d in self.disks)

    @property
    def data_bytes(self) -> int:
        return sum(d.data_bytes for d in self.disks)

    def disk(self, name: str) -> DiskRecord | None:
        for d in self.disks:
            if d.name == name:
                return d
        return None

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        # version first: a reader checks it before anything else.
        return {"version": doc.pop("version"), **doc}

    @classmethod
    def from_json(cls, doc: Any, where: str = "manifest") -> Manifest:
        """Validate and build; CorruptRepository / UnsupportedFormat naming `where`."""
        try:
            return _parse(doc)
        except ManifestFormatError as e:
            raise CorruptRepository(f"invalid manifest: {e}", path=where) from e
        except _Newer as e:
            raise UnsupportedFormat(
                f"manifest format version {e.args[0]} is newer than this backupkit supports "
                f"({MANIFEST_VERSION}); upgrade backupkit", path=where) from None


class _Newer(Exception):
    pass


_NUM = (int, float)
_MANIFEST_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    # name: (accepted types, nullable)
    "id": ((str,), False),
    "domain": ((str,), False),
    "created": ((str,), False),
    "mode": ((str,), False),
    "reason": ((str,), False),
    "checkpoint": ((str,), True),
    "parent_checkpoint": ((str,), True),
    "parent_id": ((str,), True),
    "started": ((str,), False),
    "finished": ((str,), False),
    "duration_seconds": (_NUM, False),
    "quiesced": ((bool,), False),
    "freeze_seconds": (_NUM, True),
    "domain_xml": ((str,), False),
    "checkpoint_xml": ((str,), True),
}
_DISK_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "source": (str,),
    "format": (str,),
    "virtual_size": (int,),
    "read_bytes": (int,),
    "stored_bytes": (int,),
    "data_bytes": (int,),
}


def _check(doc: dict[str, Any], name: str, types: tuple[type, ...], nullable: bool,
           where: str) -> Any:
    if name not in doc:
        raise ManifestFormatError(f"{where}missing field {name!r}")
    value = doc[name]
    if value is None and nullable:
        return None
    # bool is an int in Python: accept it only where bool is wanted.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ManifestFormatError(f"{where}field {name!r} has the wrong type")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise ManifestFormatError(f"{where}field {name!r} is negative")
    if isinstance(value, float) and not value >= 0:
        raise ManifestFormatError(f"{where}field {name!r} is negative or NaN")
    return value


def _parse(doc: Any) -> Manifest:
    if not isinstance(doc, dict):
        raise ManifestFormatError("not a JSON object")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestFormatError("missing or bad 'version'")
    if version > MANIFEST_VERSION:
        raise _Newer(version)
    values = {name: _check(doc, name, types, nullable, "")
              for name, (types, nullable) in _MANIFEST_FIELDS.items()}
    for name in ("created", "started", "finished"):
        try:
            datetime.fromisoformat(values[name])
        except ValueError as e:
            raise ManifestFormatError(f"field {name!r} is not an ISO 8601 time") from e
    if values["mode"] not in ("full", "incremental"):
        raise ManifestFormatError(f"bad mode {values['mode']!r}")
    disks_doc = doc.get("disks")
    if not isinstance(disks_doc, list):
        raise ManifestFormatError("field 'disks' is not a list")
    disks = []
    seen = set()
    for i, d in enumerate(disks_doc):
        where = f"disks[{i}]: "
        if not isinstance(d, dict):
            raise ManifestFormatError(f"{where}not an object")
        dv = {name: _check(d, name, types, False, where) for name, types in _DISK_FIELDS.items()}
        if dv["name"] in seen:
            raise ManifestFormatError(f"{where}duplicate disk {dv['name']!r}")
        seen.add(dv["name"])
        index = d.get("index")
        if not isinstance(index, dict):
            raise ManifestFormatError(f"{where}field 'index' is not an object")
        key = _check(index, "key", (str,), False, where + "index: ")
        sha = _check(index, "sha256", (str,), False, where + "index: ")
        size = _check(index, "size", (int,), False, where + "index: ")
        if not _HEX64.fullmatch(sha):
            raise ManifestFormatError(f"{where}index: bad sha256")
        mode = d.get("mode", "")
        reason = d.get("reason", "")
        if mode not in ("", "full", "incremental") or not isinstance(reason, str):
            raise ManifestFormatError(f"{where}bad mode or reason")
        disks.append(DiskRecord(index={"key": key, "sha256": sha, "size": size},
                                mode=mode, reason=reason, **dv))
    # Optional (added later; absent in older manifests): null or a string.
    for name in ("host", "domain_uuid"):
        value = doc.get(name)
        if value is not None and not isinstance(value, str):
            raise ManifestFormatError(f"field {name!r} has the wrong type")
        values[name] = value
    values["duration_seconds"] = float(values["duration_seconds"])
    if values["freeze_seconds"] is not None:
        values["freeze_seconds"] = float(values["freeze_seconds"])
    return Manifest(version=version, disks=disks, **values)
