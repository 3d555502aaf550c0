"""A pure-Python, read-only reader of QEMU's qcow2 format.

    with qsnap.qcow2.open_image("disk.qcow2") as image:
        image.snapshots()                     # tuple[Snapshot, ...], table order
        image.info()                          # ImageInfo, as `qemu-img info` fills it
        image.read(0, 4096, snapshot=snap)    # guest bytes of a snapshot (None: current)
        image.iter_extents(snap)              # data / compressed / zero / unallocated runs

Standard library only at import time (zstandard is imported when a zstd cluster is read).
Opens files read-only, spawns nothing, prints nothing. Errors: ImageError (exit 7) for a
missing file or one that is not qcow2 (and for encrypted data or external data files,
which it refuses to read); CorruptImage (exit 10) naming the broken structure.
"""

from __future__ import annotations

from qsnap.qcow2.format import Header, SnapshotEntry
from qsnap.qcow2.image import (
    COMPRESSED,
    DATA,
    UNALLOCATED,
    ZERO,
    Extent,
    Layer,
    Qcow2Image,
    open_image,
)

__all__ = [
    "COMPRESSED",
    "DATA",
    "UNALLOCATED",
    "ZERO",
    "Extent",
    "Header",
    "Layer",
    "Qcow2Image",
    "SnapshotEntry",
    "open_image",
]
