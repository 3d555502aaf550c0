"""The use cases of qsnap, as a library (the CLI is a thin shell over these).

    from qsnap import service
    service.create("disk.qcow2", "before-upgrade", description="pre dist-upgrade")
    for entry in service.list_snapshots("disk.qcow2").entries: ...
    service.restore("disk.qcow2", "before-upgrade")   # takes a safety snapshot first
"""

from qsnap.service.snapshots import (
    Context,
    CreateResult,
    DeleteResult,
    ListResult,
    RestoreResult,
    SnapshotEntry,
    check,
    create,
    delete,
    info,
    list_snapshots,
    resolve,
    restore,
)

__all__ = [
    "Context",
    "CreateResult",
    "DeleteResult",
    "ListResult",
    "RestoreResult",
    "SnapshotEntry",
    "check",
    "create",
    "delete",
    "info",
    "list_snapshots",
    "resolve",
    "restore",
]
