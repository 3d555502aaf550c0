"""The use cases of qsnap, as a library (the CLI is a thin shell over these).

    from qsnap import service
    service.create("disk.qcow2", "before-upgrade", description="pre dist-upgrade")
    for entry in service.list_snapshots("disk.qcow2").entries: ...
    service.restore("disk.qcow2", "before-upgrade")   # takes a safety snapshot first
    service.backup("disk.qcow2", "before-upgrade", "backups/before-upgrade.qcow2.zst")

Names are imported on first use, so `import qsnap.service` stays cheap for `qsnap list`.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_EXPORTS = {
    "Context": "qsnap.service.snapshots",
    "CreateResult": "qsnap.service.snapshots",
    "DeleteResult": "qsnap.service.snapshots",
    "ListResult": "qsnap.service.snapshots",
    "RestoreResult": "qsnap.service.snapshots",
    "SnapshotEntry": "qsnap.service.snapshots",
    "check": "qsnap.service.snapshots",
    "create": "qsnap.service.snapshots",
    "delete": "qsnap.service.snapshots",
    "info": "qsnap.service.snapshots",
    "list_snapshots": "qsnap.service.snapshots",
    "resolve": "qsnap.service.snapshots",
    "restore": "qsnap.service.snapshots",
    "backup": "qsnap.service.backups",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qsnap.service' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
