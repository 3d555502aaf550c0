"""Partition tables: MBR (with extended/logical partitions), GPT, or a disk that is one filesystem.

MBR: the classic layout ("Master boot record", partition entry table at byte 446, four 16-byte
entries, signature 0x55AA at 510; extended partitions 0x05/0x0F/0x85 hold a chain of EBRs whose
first entry is a logical partition relative to that EBR and whose second points at the next EBR
relative to the extended partition's start; logical partitions are numbered from 5, as Linux does).
GPT: UEFI specification 2.10, section 5.3 ("GUID Partition Table (GPT) Disk Layout"): header at
LBA 1 (backup at the last LBA), entries at ``PartitionEntryLBA``; both CRC32s are checked.
Sectors are 512 bytes (what QEMU's virtual disks use).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from typing import NamedTuple

from qsnap.core.errors import CorruptFilesystem, GuestFsError
from qsnap.guestfs.device import CachedDevice

SECTOR = 512
MBR_ENTRY = struct.Struct("<B3sB3sII")  # status, CHS first, type, CHS last, LBA first, sectors
EXTENDED_TYPES = (0x05, 0x0F, 0x85)
MBR_TYPES = {
    0x07: "NTFS/exFAT", 0x0B: "FAT32", 0x0C: "FAT32 (LBA)", 0x63: "GNU HURD", 0x82: "Linux swap", 0x83: "Linux",
    0x8E: "Linux LVM", 0xA5: "FreeBSD", 0xEE: "GPT protective", 0xEF: "EFI System", 0xFD: "Linux RAID",
    0x05: "Extended", 0x0F: "Extended (LBA)", 0x85: "Linux extended",
}
LINUX_MBR_TYPES = (0x83, 0x63)
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
GPT_TYPES = {
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux /home",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
}
MAX_LOGICAL = 128  # an EBR chain longer than this is a loop or damage
EXT_MAGIC_OFFSET = 1024 + 0x38


class Partition(NamedTuple):
    """One partition (or the whole disk when the scheme is ``none``)."""

    number: int  # 1-4 primary, 5... logical (MBR); 1... (GPT); 0 whole disk
    start: int  # bytes from the start of the disk
    size: int  # bytes
    scheme: str  # "mbr", "gpt" or "none"
    type: str  # MBR type as "0x83", GPT type GUID, or "" for a whole disk
    type_name: str
    name: str  # GPT partition name
    bootable: bool
    filesystem: str | None  # "ext" (ext2/3/4), another recognised filesystem's name, or None

    def to_json(self) -> dict[str, object]:
        return {"number": self.number, "start": self.start, "size": self.size, "scheme": self.scheme,
                "type": self.type, "type_name": self.type_name, "name": self.name, "bootable": self.bootable,
                "filesystem": self.filesystem}


def _has_ext_magic(device: CachedDevice, start: int) -> bool:
    return device.read(start + EXT_MAGIC_OFFSET, 2) == b"\x53\xef"


#: (offset, magic, name) of filesystems and containers qsnap recognises but does not read.
SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"LUKS\xba\xbe", "LUKS (encrypted)"),
    (0, b"XFSB", "XFS"),
    (3, b"NTFS    ", "NTFS"),
    (3, b"EXFAT   ", "exFAT"),
    (0x36, b"FAT1", "FAT"),
    (0x52, b"FAT32   ", "FAT"),
    (0x10040, b"_BHRfS_M", "btrfs"),
    (0x218, b"LVM2 001", "LVM physical volume"),
    (0xFF6, b"SWAPSPACE2", "Linux swap"),
    (0x8001, b"CD001", "ISO 9660"),
)


def detect_filesystem(device: CachedDevice, start: int, size: int) -> str | None:
    """'ext' for ext2/3/4, the name of another known filesystem, or None."""
    if size > EXT_MAGIC_OFFSET + 2 and _has_ext_magic(device, start):
        return "ext"
    for offset, magic, name in SIGNATURES:
        if offset + len(magic) <= size and device.read(start + offset, len(magic)) == magic:
            return name
    return None


def read_partitions(device: CachedDevice) -> list[Partition]:
    """The disk's partitions in number order; a disk without a table is one ``none`` partition."""
    mbr = device.read(0, SECTOR)
    entries = [MBR_ENTRY.unpack_from(mbr, 446 + 16 * i) for i in range(4)]
    valid_mbr = mbr[510:512] == b"\x55\xaa" and all(e[0] in (0, 0x80) for e in entries)
    if not valid_mbr or not any(e[2] and e[5] for e in entries):
        return [_whole_disk(device)]
    if any(e[2] == 0xEE for e in entries):
        return _gpt(device)
    return _mbr(device, entries)


def _whole_disk(device: CachedDevice) -> Partition:
    fs = detect_filesystem(device, 0, device.size)
    return Partition(0, 0, device.size, "none", "", "whole disk", "", False, fs)


def _mbr(device: CachedDevice, entries: list[tuple[int, bytes, int, bytes, int, int]]) -> list[Partition]:
    parts: list[Partition] = []
    for i, (status, _, ptype, _, lba, sectors) in enumerate(entries):
        if not ptype or not sectors:
            continue
        start, size = lba * SECTOR, sectors * SECTOR
        _check_inside(device, start, size, f"MBR partition {i + 1}")
        parts.append(_mbr_partition(device, i + 1, start, size, ptype, status))
        if ptype in EXTENDED_TYPES:
            parts.extend(_logical(device, start, size))
    return parts


def _mbr_partition(device: CachedDevice, number: int, start: int, size: int, ptype: int, status: int) -> Partition:
    fs = None if ptype in EXTENDED_TYPES else detect_filesystem(device, start, size)
    return Partition(number, start, size, "mbr", f"0x{ptype:02x}", MBR_TYPES.get(ptype, "unknown"), "",
                     status == 0x80, fs)


def _logical(device: CachedDevice, ext_start: int, ext_size: int) -> list[Partition]:
    parts: list[Partition] = []
    ebr = ext_start
    seen: set[int] = set()
    number = 5
    while True:
        if ebr in seen or len(seen) >= MAX_LOGICAL:
            raise CorruptFilesystem(f"The chain of extended boot records loops or exceeds {MAX_LOGICAL} entries.")
        seen.add(ebr)
        sector = device.read(ebr, SECTOR)
        if sector[510:512] != b"\x55\xaa":
            raise CorruptFilesystem(f"The extended boot record at byte {ebr} has no 0x55AA signature.")
        first = MBR_ENTRY.unpack_from(sector, 446)
        nxt = MBR_ENTRY.unpack_from(sector, 462)
        if first[2] and first[5]:
            start, size = ebr + first[4] * SECTOR, first[5] * SECTOR
            _check_inside(device, start, size, f"logical partition {number}")
            parts.append(_mbr_partition(device, number, start, size, first[2], first[0]))
            number += 1
        if not (nxt[2] and nxt[5]):
            return parts
        ebr = ext_start + nxt[4] * SECTOR
        if ebr >= ext_start + ext_size:
            raise CorruptFilesystem(f"An extended boot record points past the extended partition (byte {ebr}).")


def _check_inside(device: CachedDevice, start: int, size: int, what: str) -> None:
    if start + size > device.size:
        raise CorruptFilesystem(
            f"The partition table says {what} ends at byte {start + size}, past the disk's end ({device.size})."
        )


def _gpt(device: CachedDevice) -> list[Partition]:
    last_lba = device.size // SECTOR - 1
    problems = []
    for lba in (1, last_lba):
        try:
            return _gpt_at(device, lba)
        except CorruptFilesystem as exc:
            problems.append(str(exc))
    raise CorruptFilesystem(f"Neither GPT header is valid: {problems[0]}")


def _gpt_at(device: CachedDevice, lba: int) -> list[Partition]:
    raw = device.read(lba * SECTOR, SECTOR)
    (sig, _rev, hsize, hcrc, _res, _cur, _alt, _first, _last, _guid, entries_lba, count, esize,
     ecrc) = GPT_HEADER.unpack_from(raw)
    if sig != b"EFI PART":
        raise CorruptFilesystem(f"no 'EFI PART' signature at LBA {lba}")
    if not 92 <= hsize <= SECTOR or zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:hsize]) != hcrc:
        raise CorruptFilesystem(f"the GPT header at LBA {lba} fails its CRC32")
    if not 128 <= esize <= 4096 or esize % 8 or count > 1024:
        raise CorruptFilesystem(f"the GPT header at LBA {lba} declares {count} entries of {esize} bytes")
    table = device.read(entries_lba * SECTOR, count * esize)
    if zlib.crc32(table) != ecrc:
        raise CorruptFilesystem(f"the GPT partition entries of the header at LBA {lba} fail their CRC32")
    parts = []
    for i in range(count):
        type_guid, _uniq, first, last, attrs, name = GPT_ENTRY.unpack_from(table, i * esize)
        if type_guid == bytes(16):
            continue
        start, size = first * SECTOR, (last - first + 1) * SECTOR
        if last < first:
            raise CorruptFilesystem(f"GPT partition {i + 1} ends before it starts")
        _check_inside(device, start, size, f"GPT partition {i + 1}")
        tguid = str(uuid.UUID(bytes_le=type_guid))
        label = name.decode("utf-16-le", "replace").split("\0", 1)[0]
        fs = detect_filesystem(device, start, size)
        parts.append(Partition(i + 1, start, size, "gpt", tguid, GPT_TYPES.get(tguid, "unknown"), label,
                               bool(attrs & 4), fs))
    return parts


def choose_partition(parts: list[Partition], number: int | None) -> Partition:
    """Partition NUMBER, else the first Linux partition holding an ext filesystem, else the first ext one."""
    if number is not None:
        for p in parts:
            if p.number == number:
                if p.filesystem not in (None, "ext"):
                    raise GuestFsError(f"Partition {number} holds {p.filesystem}, not ext2/ext3/ext4 (the only "
                                       "filesystems qsnap reads).")
                return p
        have = ", ".join(str(p.number) for p in parts) or "none"
        raise GuestFsError(f"There is no partition {number} on this disk (partitions: {have}).")
    ext = [p for p in parts if p.filesystem == "ext"]
    linux = [p for p in ext if p.type in ("", *(f"0x{t:02x}" for t in LINUX_MBR_TYPES))
             or p.type_name.startswith("Linux")]
    if linux or ext:
        return (linux or ext)[0]
    described = ", ".join(f"{p.number} ({p.type_name}{', ' + p.filesystem if p.filesystem else ''})"
                          for p in parts)
    raise GuestFsError(
        f"No ext2/ext3/ext4 filesystem found on this disk (partitions: {described}).",
        hint="pick one with --partition N; qsnap reads ext2 (GNU/Hurd's too), ext3 and ext4",
    )
