"""Read-only guest filesystems over the qcow2 reader's guest bytes.

    from qsnap.qcow2 import open_image
    from qsnap.guestfs import CachedDevice, Qcow2Device, Slice, ExtFilesystem, read_partitions, choose_partition

    with open_image("disk.qcow2") as image:
        disk = CachedDevice(Qcow2Device(image, snapshot))          # snapshot: a Snapshot, or None
        part = choose_partition(read_partitions(disk), None)         # MBR / GPT / whole disk
        fs = ExtFilesystem(CachedDevice(Slice(disk.device, part.start, part.size)))
        fs.lookup("/etc/hostname"), fs.dir_entries(inode), fs.iter_data(inode)
        fs.free_ranges()                                             # (byte offset, length) free per the bitmaps

Layers: below ``service/``, above ``qcow2/``. Reads guest bytes only through the qcow2 reader (or a raw
file), never spawns processes, never writes, never prints. Damage is :class:`CorruptFilesystem`
(exit 10); a disk without a readable ext filesystem is :class:`GuestFsError` (exit 14); a missing
path is :class:`GuestPathNotFound` (exit 15).
"""

from __future__ import annotations

from qsnap.guestfs.device import CachedDevice, FileDevice, Qcow2Device, Slice
from qsnap.guestfs.ext import DirEntry, ExtFilesystem, Inode, Run
from qsnap.guestfs.partitions import Partition, choose_partition, read_partitions

__all__ = [
    "CachedDevice",
    "DirEntry",
    "ExtFilesystem",
    "FileDevice",
    "Inode",
    "Partition",
    "Qcow2Device",
    "Run",
    "Slice",
    "choose_partition",
    "read_partitions",
]
