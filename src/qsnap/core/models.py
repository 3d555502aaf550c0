"""Typed models for what qsnap reads and does (immutable records, no behaviour).

They are NamedTuples rather than frozen dataclasses on purpose: `qsnap list` imports them on
every run, and `dataclasses` drags in `inspect` (~10-20 ms of start-up on these machines);
at run time they come from qsnap.core.records, which does not import `typing` either.
"""

from __future__ import annotations

from datetime import UTC, datetime

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: see qsnap.core.records
if TYPE_CHECKING:
    from typing import Any, NamedTuple
else:
    from qsnap.core.records import NamedTuple


class Snapshot(NamedTuple):
    """One internal snapshot of a qcow2 image, as QEMU reports it."""

    id: str
    name: str
    date: datetime  # timezone-aware, UTC
    vm_state_size: int
    vm_clock_ns: int
    disk_size: int | None = None
    icount: int | None = None

    @property
    def has_vm_state(self) -> bool:
        return self.vm_state_size > 0

    @classmethod
    def from_qapi(cls, entry: dict[str, Any]) -> Snapshot:
        """From QEMU's SnapshotInfo (``qemu-img info --output=json``, QMP block node info)."""
        date = datetime.fromtimestamp(int(entry.get("date-sec", 0)), tz=UTC).replace(
            microsecond=int(entry.get("date-nsec", 0)) // 1000
        )
        return cls(
            id=str(entry["id"]),
            name=str(entry["name"]),
            date=date,
            vm_state_size=int(entry.get("vm-state-size", 0)),
            vm_clock_ns=int(entry.get("vm-clock-sec", 0)) * 1_000_000_000 + int(entry.get("vm-clock-nsec", 0)),
            disk_size=None,
            icount=entry.get("icount"),
        )

    @property
    def date_iso(self) -> str:
        return self.date.astimezone(UTC).isoformat().replace("+00:00", "Z")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "date": self.date_iso,
            "vm_state_size": self.vm_state_size,
            "vm_clock_ns": self.vm_clock_ns,
            "disk_size": self.disk_size,
        }


class ImageInfo(NamedTuple):
    """What `qemu-img info` (or the qcow2 reader) says about an image."""

    path: str
    format: str
    virtual_size: int
    actual_size: int  # bytes allocated on the host filesystem
    file_size: int  # apparent length of the file
    cluster_size: int | None
    snapshots: tuple[Snapshot, ...]
    compat: str | None = None
    compression_type: str | None = None
    refcount_bits: int | None = None
    lazy_refcounts: bool | None = None
    extended_l2: bool | None = None
    corrupt: bool | None = None
    encrypted: bool = False
    backing_file: str | None = None
    dirty: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.path,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "actual_size": self.actual_size,
            "file_size": self.file_size,
            "cluster_size": self.cluster_size,
            "snapshot_count": len(self.snapshots),
            "compat": self.compat,
            "compression_type": self.compression_type,
            "refcount_bits": self.refcount_bits,
            "lazy_refcounts": self.lazy_refcounts,
            "extended_l2": self.extended_l2,
            "corrupt": self.corrupt,
            "encrypted": self.encrypted,
            "backing_file": self.backing_file,
            "dirty": self.dirty,
        }


class CheckResult(NamedTuple):
    """The verdict of `qemu-img check`."""

    path: str
    corruptions: int
    leaks: int
    check_errors: int
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    raw: dict[str, Any] | None = None  # qemu-img's own JSON

    @property
    def clean(self) -> bool:
        return self.corruptions == 0 and self.leaks == 0 and self.check_errors == 0

    @property
    def verdict(self) -> str:
        if self.corruptions or self.check_errors:
            return "corrupt"
        if self.leaks:
            return "leaks"
        return "clean"

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.path,
            "verdict": self.verdict,
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "check_errors": self.check_errors,
            "image_end_offset": self.image_end_offset,
            "total_clusters": self.total_clusters,
            "allocated_clusters": self.allocated_clusters,
            "fragmented_clusters": self.fragmented_clusters,
        }
