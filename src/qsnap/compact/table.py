"""The one qcow2 structure qsnap writes by hand: the snapshot table of the compacted image.

No QEMU tool sets a snapshot's ID, date, VM clock, icount or VM-state size: ``qemu-img
snapshot -c`` stamps the time of the call, the next free ID and no VM state. So the new image's
snapshots are created by QEMU with placeholder names, and their table is then rewritten in
place with the source's entries, keeping only the two fields that belong to the new file.

Snapshot table entry ("== Snapshots ==" in docs/interop/qcow2.txt), every field big-endian:

    0 -  7  l1_table_offset    from the NEW image (where QEMU put this snapshot's L1 copy)
    8 - 11  l1_size            from the NEW image (its L1 entries)
   12 - 13  id_str_size        \\
   14 - 15  name_size           |
   16 - 19  date_sec            |
   20 - 23  date_nsec           |  from the SOURCE entry, byte for byte
   24 - 31  vm_clock_nsec       |
   32 - 35  vm_state_size       |
   36 - 39  extra_data_size     |
   40 -     extra data: vm_state_size_large (8), disk_size (8), icount (8), unknown (kept)
            then the unique ID string, then the name (neither NUL-terminated)
            /
   "Padding to round up the snapshot table entry size to the next multiple of 8."

Extra data shorter than 24 bytes is widened to 24 with the values QEMU itself writes when it
rewrites a table (block/qcow2-snapshot.c qcow2_write_snapshots): vm_state_size_large = the
32-bit size, disk_size = the image's virtual size, icount = -1 ("not recorded").

The table must end up in exactly the clusters QEMU allocated (and counted references for): the
header's snapshots_offset and nb_snapshots stay as QEMU wrote them, and the placeholder names
were sized so QEMU's table has the same length (see :func:`placeholder_name`).
"""

from __future__ import annotations

import os
import struct

from qsnap.core.errors import QsnapError
from qsnap.qcow2 import format as fmt
from qsnap.qcow2.image import Qcow2Image

QEMU_EXTRA = 24  # sizeof(QCowSnapshotExtraData) in QEMU 7.2
QEMU_NAME_MAX = 255  # QEMUSnapshotInfo.name is char[256]
PLACEHOLDER = "qsnap-compact-"


class TableMismatch(QsnapError):
    """The rebuilt snapshot table does not fit where QEMU put the table."""

    exit_code = 1


def source_entry_bytes(image: Qcow2Image, entry: fmt.SnapshotEntry) -> bytes:
    """ENTRY as it will be written (without l1 fields yet): the source's bytes, extra data
    widened to QEMU's 24 bytes when shorter."""
    raw = image._read_exact(entry.table_offset, entry.entry_size, f"snapshot table entry {entry.position}")
    head = bytearray(raw[: fmt.SNAPSHOT_HEADER.size])
    extra = bytearray(raw[fmt.SNAPSHOT_HEADER.size : fmt.SNAPSHOT_HEADER.size + entry.extra_data_size])
    rest = raw[fmt.SNAPSHOT_HEADER.size + entry.extra_data_size :]
    if len(extra) < QEMU_EXTRA:
        defaults = struct.pack(">QQq", entry.vm_state_size, image.virtual_size, fmt.ICOUNT_NONE)
        extra += defaults[len(extra) :]
        struct.pack_into(">I", head, 36, len(extra))  # extra_data_size
    return bytes(head + extra + rest)


def entry_size_for(id_len: int, name_len: int) -> int:
    """The size QEMU gives a new snapshot's entry (before padding)."""
    return fmt.SNAPSHOT_HEADER.size + QEMU_EXTRA + id_len + name_len


def placeholder_name(wanted_size: int, new_id: str) -> str:
    """A name that makes QEMU's entry WANTED_SIZE bytes long (clamped to what QEMU accepts:
    1..255 characters). Placeholders need not be unique: they are only ever created (the
    temporary snapshots, looked up by name, are named PLACEHOLDER + "tmp-N", which no run of
    "x" equals)."""
    length = wanted_size - entry_size_for(len(new_id), 0)
    return "x" * max(1, min(QEMU_NAME_MAX, length))


def next_id(existing: list[str]) -> str:
    """The ID QEMU gives the next snapshot (find_new_snapshot_id: highest numeric ID + 1)."""
    best = 0
    for ident in existing:
        try:
            best = max(best, int(ident))
        except ValueError:
            continue
    return str(best + 1)


def table_bytes(entries: list[bytes]) -> bytes:
    """Entries laid out as QEMU lays them: each starts at a multiple of 8."""
    out = bytearray()
    for e in entries:
        out += bytes(-len(out) % 8)
        out += e
    return bytes(out)


def rewrite(path: str | os.PathLike[str], source_entries: list[bytes]) -> None:
    """Rewrite the snapshot table of the image at PATH (no process may have it open) with
    SOURCE_ENTRIES, one per snapshot in table order, keeping each snapshot's L1 fields."""
    with Qcow2Image(path) as new:
        header = new.header
        cs = new.cluster_size
        current = new.snapshot_entries()
        if len(current) != len(source_entries):
            raise TableMismatch(
                f"The new image has {len(current)} snapshots, not {len(source_entries)}: the table was not rewritten."
            )
        patched = []
        for made, raw in zip(current, source_entries, strict=True):
            e = bytearray(raw)
            struct.pack_into(">QI", e, 0, made.l1_table_offset, made.l1_size)  # bytes 0-11
            patched.append(bytes(e))
        table = table_bytes(patched)
        old_size = fmt.snapshot_table_size(header, current)
        clusters = (old_size + cs - 1) // cs
        if (len(table) + cs - 1) // cs != clusters:
            raise TableMismatch(
                f"The rebuilt snapshot table needs {len(table)} bytes but QEMU allocated {clusters} "
                f"cluster(s) of {cs} bytes for it: the table was not rewritten.",
            )
        offset = header.snapshots_offset
        file_size = new.file_size
    # zeros over the rest of QEMU's table, inside its clusters but not past the end of the file
    # (QEMU does not pad a table it writes at the end: neither do we)
    table += bytes(max(0, min(clusters * cs, file_size - offset) - len(table)))
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        view = memoryview(table)
        pos = offset
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
        os.fsync(fd)
    finally:
        os.close(fd)
