"""Backups of qcow2 snapshots: export (qcow2, gzip, zstd, raw, incremental, encrypted),
manifests, verification, import and archival. See docs/backup.md.

Library functions receive already-resolved inputs (an image path, a :class:`Snapshot`);
the service layer resolves names, takes the image lock and, when a VM runs, provides a
temporary snapshot for the current state. Compression and crypto modules load lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsnap.backup.model import (
    ArchiveResult,
    BackupResult,
    Check,
    EncryptionSpec,
    ImportResult,
    VerifyReport,
    detect_format,
    load_manifest,
    manifest_path,
)
from qsnap.backup.partial import InsufficientSpace

if TYPE_CHECKING:
    from qsnap.backup.archiving import archive
    from qsnap.backup.export import export_snapshot
    from qsnap.backup.importer import import_backup
    from qsnap.backup.verify import verify_backup

__all__ = [
    "ArchiveResult",
    "BackupResult",
    "Check",
    "EncryptionSpec",
    "ImportResult",
    "InsufficientSpace",
    "VerifyReport",
    "archive",
    "detect_format",
    "export_snapshot",
    "import_backup",
    "load_manifest",
    "manifest_path",
    "verify_backup",
]

_LAZY = {
    "export_snapshot": "qsnap.backup.export",
    "verify_backup": "qsnap.backup.verify",
    "import_backup": "qsnap.backup.importer",
    "archive": "qsnap.backup.archiving",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
