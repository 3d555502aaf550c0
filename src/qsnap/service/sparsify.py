"""Guest byte ranges that the current state's filesystems mark free (for ``compact --sparsify``).

Every ext2/3/4 partition of the disk (GNU/Hurd's ext2 included) is asked for its free-block map
(:meth:`qsnap.guestfs.ExtFilesystem.free_ranges`: the block bitmaps, uninitialised groups built
from their metadata). Only those ranges may become zero clusters: partitions holding anything
else, partition tables and space outside partitions are kept. A filesystem whose journal needs
recovery is refused (its bitmaps may be stale), as virt-sparsify refuses a dirty filesystem.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qsnap.core.errors import GuestFsError
from qsnap.core.models import Snapshot
from qsnap.guestfs.device import CachedDevice, Qcow2Device, Slice
from qsnap.guestfs.ext import ExtFilesystem
from qsnap.guestfs.partitions import read_partitions
from qsnap.qcow2.image import Qcow2Image


@dataclass
class FreeSpace:
    """Free guest ranges (offset, length), sorted and merged, and what was looked at."""

    ranges: list[tuple[int, int]] = field(default_factory=list)
    filesystems: list[str] = field(default_factory=list)  # "partition 1: ext4, 812.0 MiB free"
    skipped: list[str] = field(default_factory=list)  # partitions not read, and why

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self.ranges)


def free_guest_ranges(image: Qcow2Image, snapshot: Snapshot | None = None, *, align: int = 1) -> FreeSpace:
    """The free ranges of every ext filesystem of SNAPSHOT (None: the current state), shrunk to
    ALIGN boundaries (a cluster: only whole clusters can become zero clusters)."""
    disk = CachedDevice(Qcow2Device(image, snapshot))
    result = FreeSpace()
    raw: list[tuple[int, int]] = []
    for part in read_partitions(disk):
        label = f"partition {part.number}" if part.number else "whole disk"
        if part.filesystem != "ext":
            result.skipped.append(f"{label}: {part.filesystem or 'no filesystem recognised'}")
            continue
        fs = ExtFilesystem(CachedDevice(Slice(disk.device, part.start, part.size)))
        if fs.needs_recovery:
            raise GuestFsError(
                f"The {fs.kind} filesystem on {label} was not cleanly unmounted (its journal needs recovery), "
                "so its free-block map cannot be trusted for --sparsify.",
                hint="shut the guest down cleanly (or boot it once), then compact again",
            )
        free = 0
        for offset, length in fs.free_ranges():
            raw.append((part.start + offset, length))
            free += length
        result.filesystems.append(f"{label}: {fs.kind}, {free} bytes free")
    for offset, length in sorted(raw):
        start = -(-offset // align) * align
        end = (offset + length) // align * align
        if end <= start:
            continue
        if result.ranges and result.ranges[-1][0] + result.ranges[-1][1] >= start:
            last_start, last_len = result.ranges[-1]
            result.ranges[-1] = (last_start, max(last_start + last_len, end) - last_start)
        else:
            result.ranges.append((start, end - start))
    return result
