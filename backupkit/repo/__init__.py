"""The backup repository: its format (versions 1 to 3, ``repository.REPO_VERSION``) is in
docs/format.md."""

from backupkit.repo import chains
from backupkit.repo.index import Index
from backupkit.repo.manifest import DiskRecord, Manifest
from backupkit.repo.names import check_name
from backupkit.repo.repository import Repository
from backupkit.repo.storage import LocalStorage, ObjectInfo, Storage

__all__ = [
    "DiskRecord",
    "Index",
    "LocalStorage",
    "Manifest",
    "ObjectInfo",
    "Repository",
    "Storage",
    "chains",
    "check_name",
]
