"""On-disk structures of qcow2, as field tables that cite the spec.

Every struct follows ``docs/interop/qcow2.txt`` in QEMU's tree (the section is named next to
each table) and the limits QEMU 7.2 enforces when it opens an image (``block/qcow2.h``,
``block/qcow2.c`` qcow2_do_open, ``block/qcow2-snapshot.c`` qcow2_read_snapshots). The
tables are declared like QEMU's ``tests/qemu-iotests/qcow2_format.py``: (struct format,
field name), big-endian. Parsing here is pure: bytes in, values out, errors raised; no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from qsnap.core.errors import CorruptImage, ImageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: see qsnap.core.records
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from qsnap.core.records import NamedTuple

# ------------------------------------------------------------------ QEMU's limits (block/qcow2.h)

MAGIC = b"QFI\xfb"
MIN_CLUSTER_BITS = 9  # "Must not be less than 9 (i.e. 512 byte clusters)"
MAX_CLUSTER_BITS = 21  # "qemu ... implementation limit of 2 MB"
MIN_EXTENDED_L2_CLUSTER_BITS = 14  # "Extended L2 Entries then cluster_bits must be at least 14"
MAX_L1_SIZE = 0x2000000  # QCOW_MAX_L1_SIZE: 32 MiB of L1 table (bytes)
MAX_REFTABLE_SIZE = 0x800000  # QCOW_MAX_REFTABLE_SIZE: 8 MiB of refcount table (bytes)
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOTS_SIZE = 0x4000000  # QCOW_MAX_SNAPSHOTS_SIZE: 64 MiB of snapshot table
MAX_SNAPSHOT_EXTRA_DATA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_BACKING_FILE_NAME = 1023  # "Must not be longer than 1023 bytes"
SUBCLUSTERS = 32  # "== Extended L2 Entries ==": 32 subclusters per cluster
COMPRESSED_SECTOR = 512  # QCOW2_COMPRESSED_SECTOR_SIZE

# ------------------------------------------------------------------ "== Header =="

# Version 2 header: bytes 0-71.
HEADER_V2_FIELDS: tuple[tuple[str, str], ...] = (
    ("4s", "magic"),  # 0-3    QCOW magic string ("QFI\xfb")
    ("I", "version"),  # 4-7    2 or 3
    ("Q", "backing_file_offset"),  # 8-15   0 if no backing file
    ("I", "backing_file_size"),  # 16-19  length of the backing file name, <= 1023
    ("I", "cluster_bits"),  # 20-23  1 << cluster_bits is the cluster size
    ("Q", "size"),  # 24-31  virtual disk size in bytes
    ("I", "crypt_method"),  # 32-35  0 none, 1 AES, 2 LUKS
    ("I", "l1_size"),  # 36-39  entries in the active L1 table
    ("Q", "l1_table_offset"),  # 40-47  cluster aligned
    ("Q", "refcount_table_offset"),  # 48-55  cluster aligned
    ("I", "refcount_table_clusters"),  # 56-59
    ("I", "nb_snapshots"),  # 60-63
    ("Q", "snapshots_offset"),  # 64-71  cluster aligned
)
# Version 3 adds bytes 72-103 (header_length >= 104).
HEADER_V3_FIELDS: tuple[tuple[str, str], ...] = (
    ("Q", "incompatible_features"),  # 72-79
    ("Q", "compatible_features"),  # 80-87
    ("Q", "autoclear_features"),  # 88-95
    ("I", "refcount_order"),  # 96-99   refcount_bits = 1 << refcount_order, <= 6
    ("I", "header_length"),  # 100-103 >= 104, multiple of 8
)
# "=== Additional fields (version 3 and higher) ===": present when header_length > offset.
COMPRESSION_TYPE_OFFSET = 104  # 1 byte: 0 zlib, 1 zstd

HEADER_V2 = struct.Struct(">" + "".join(f for f, _ in HEADER_V2_FIELDS))
HEADER_V3 = struct.Struct(">" + "".join(f for f, _ in HEADER_V2_FIELDS + HEADER_V3_FIELDS))
assert HEADER_V2.size == 72 and HEADER_V3.size == 104

# incompatible_features bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# compatible_features bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}
CRYPT_METHODS = {0: None, 1: "aes", 2: "luks"}

# ------------------------------------------------------------------ "=== Header extensions ==="

EXTENSION = struct.Struct(">II")  # 0-3 type, 4-7 length of the data; data padded to 8
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# "== Feature name table ==": 48-byte entries
FEATURE_NAME_FIELDS: tuple[tuple[str, str], ...] = (
    ("B", "type"),  # 0     0 incompatible, 1 compatible, 2 autoclear
    ("B", "bit"),  # 1     0-63
    ("46s", "name"),  # 2-47  padded with zeros
)
FEATURE_NAME = struct.Struct(">" + "".join(f for f, _ in FEATURE_NAME_FIELDS))

# "== Bitmaps extension ==": fields of the extension data
BITMAPS_EXT_FIELDS: tuple[tuple[str, str], ...] = (
    ("I", "nb_bitmaps"),  # 0-3
    ("I", "reserved"),  # 4-7
    ("Q", "bitmap_directory_size"),  # 8-15
    ("Q", "bitmap_directory_offset"),  # 16-23 cluster aligned
)
BITMAPS_EXT = struct.Struct(">" + "".join(f for f, _ in BITMAPS_EXT_FIELDS))

# "=== Bitmap directory ===": fixed part of one entry (then extra data, name, pad to 8)
BITMAP_DIR_FIELDS: tuple[tuple[str, str], ...] = (
    ("Q", "bitmap_table_offset"),  # 0-7
    ("I", "bitmap_table_size"),  # 8-11 entries
    ("I", "flags"),  # 12-15
    ("B", "type"),  # 16
    ("B", "granularity_bits"),  # 17
    ("H", "name_size"),  # 18-19
    ("I", "extra_data_size"),  # 20-23
)
BITMAP_DIR_ENTRY = struct.Struct(">" + "".join(f for f, _ in BITMAP_DIR_FIELDS))

# "== Full disk encryption header pointer =="
CRYPTO_HEADER_FIELDS: tuple[tuple[str, str], ...] = (
    ("Q", "offset"),  # 0-7  cluster aligned
    ("Q", "length"),  # 8-15
)
CRYPTO_HEADER = struct.Struct(">" + "".join(f for f, _ in CRYPTO_HEADER_FIELDS))

# ------------------------------------------------------------------ "== Cluster mapping =="

# L1 table entry: bits 9-55 L2 table offset, 56-62 reserved, 63 COPIED (active L1 only).
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
# L2 table entry: bit 62 compressed, bit 63 COPIED; standard cluster descriptor bits 9-55
# host offset, bit 0 "reads as zero" (v3 without extended L2).
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
# "== Extended L2 Entries ==": second 64 bits = subcluster bitmap
L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF
# Refcount table entry: bits 9-63 refcount block offset.
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00


def compressed_fields(cluster_bits: int) -> tuple[int, int, int]:
    """(offset mask, size shift, size mask) of a "Compressed Clusters Descriptor".

    x = 62 - (cluster_bits - 8): bits 0..x-1 are the host offset, bits x..61 the number
    of additional 512-byte sectors (QEMU: cluster_offset_mask, csize_shift, csize_mask).
    """
    shift = 62 - (cluster_bits - 8)
    return (1 << shift) - 1, shift, (1 << (cluster_bits - 8)) - 1


# ------------------------------------------------------------------ "== Snapshots =="

# Snapshot table entry, bytes 0-39 (entries are 8-byte aligned).
SNAPSHOT_FIELDS: tuple[tuple[str, str], ...] = (
    ("Q", "l1_table_offset"),  # 0-7   cluster aligned
    ("I", "l1_size"),  # 8-11
    ("H", "id_str_size"),  # 12-13
    ("H", "name_size"),  # 14-15
    ("I", "date_sec"),  # 16-19
    ("I", "date_nsec"),  # 20-23
    ("Q", "vm_clock_nsec"),  # 24-31
    ("I", "vm_state_size"),  # 32-35 ignored when the 64-bit field is present
    ("I", "extra_data_size"),  # 36-39
)
SNAPSHOT_HEADER = struct.Struct(">" + "".join(f for f, _ in SNAPSHOT_FIELDS))
assert SNAPSHOT_HEADER.size == 40
# Extra data (offsets relative to the entry): present when extra_data_size reaches them.
SNAPSHOT_EXTRA_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("Q", "vm_state_size_large", 8),  # 40-47
    ("Q", "disk_size", 16),  # 48-55 (v3 must have at least up to here)
    ("q", "icount", 24),  # 56-63 -1 when not recorded
)
ICOUNT_NONE = -1

ReadFn = Callable[[int, int, str], bytes]
"""read(offset, length, structure) -> exactly LENGTH bytes, or CorruptImage naming STRUCTURE."""


# ------------------------------------------------------------------ parsed values

class Header(NamedTuple):
    """The image header and its extensions, validated as QEMU validates them on open."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: tuple[tuple[int, int, str], ...] = ()
    bitmaps: tuple[int, int, int] | None = None  # (nb_bitmaps, dir_size, dir_offset)
    crypto_header: tuple[int, int] | None = None  # (offset, length)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def virtual_size(self) -> int:
        """What QEMU exposes: bs->total_sectors * 512 (the size rounded down to sectors)."""
        return self.size // 512 * 512


class SnapshotEntry(NamedTuple):
    """One parsed entry of the snapshot table ("== Snapshots ==")."""

    position: int  # index in the table
    table_offset: int  # where the entry starts in the file
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int
    icount: int | None
    extra_data_size: int
    entry_size: int  # bytes from the entry's start to the end of its name


def _corrupt(structure: str, problem: str) -> CorruptImage:
    return CorruptImage(f"Corrupt qcow2 image: {structure}: {problem}.", hint="run 'qemu-img check'")


def _validate_table(
    structure: str, offset: int, entries: int, entry_len: int, max_bytes: int, cluster_size: int
) -> None:
    """QEMU's qcow2_validate_table: size limit, no overflow, cluster aligned offset."""
    if entries > max_bytes // entry_len:
        raise _corrupt(structure, f"{entries} entries exceed QEMU's limit of {max_bytes} bytes")
    if offset & (cluster_size - 1):
        raise _corrupt(structure, f"offset {offset:#x} is not aligned to a cluster")
    if offset + entries * entry_len > (1 << 63) - 1:
        raise _corrupt(structure, "exceeds the maximum image size")


def _decode(raw: bytes) -> str:
    # QEMU keeps these as C strings: they end at the first NUL.
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def size_to_l1(size: int, cluster_bits: int, l2_entries: int) -> int:
    """Number of L1 entries needed to map SIZE bytes of guest data."""
    span = (1 << cluster_bits) * l2_entries
    return (size + span - 1) // span


def parse_header(first: bytes, file_size: int, path: str) -> Header:
    """Parse and validate the header and extensions from the first cluster of the file.

    FIRST holds the first min(file size, 2 MiB) bytes. A file that is not qcow2 raises
    ImageError; a qcow2 file whose header is broken raises CorruptImage.
    """
    if len(first) < 4 or first[:4] != MAGIC:
        raise ImageError(f"{path} is not a qcow2 image (no qcow2 magic at the start of the file).")
    if len(first) < HEADER_V2.size:
        raise _corrupt("header", f"the file is only {file_size} bytes long")
    v2 = dict(zip((n for _, n in HEADER_V2_FIELDS), HEADER_V2.unpack_from(first), strict=True))
    version = v2["version"]
    if version not in (2, 3):
        raise ImageError(f"{path}: unsupported qcow2 version {version} (QEMU knows 2 and 3).")
    fields = dict(v2)
    fields.pop("magic")
    cluster_bits = fields["cluster_bits"]
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _corrupt("header", f"unsupported cluster size 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    compression_type = 0
    if version == 3:
        if len(first) < HEADER_V3.size:
            raise _corrupt("header", "version 3 header is truncated")
        v3 = HEADER_V3.unpack_from(first)[len(HEADER_V2_FIELDS) :]
        fields.update(zip((n for _, n in HEADER_V3_FIELDS), v3, strict=True))
        header_length = fields["header_length"]
        if header_length < HEADER_V3.size:
            raise _corrupt("header", f"header_length {header_length} is below 104")
        if header_length > cluster_size:
            raise _corrupt("header", f"header_length {header_length} exceeds the cluster size")
        if header_length > len(first):
            raise _corrupt("header", "the header runs past the end of the file")
        if header_length > COMPRESSION_TYPE_OFFSET:
            compression_type = first[COMPRESSION_TYPE_OFFSET]
    else:
        fields.update(refcount_order=4, header_length=HEADER_V2.size)
    incompat = fields.get("incompatible_features", 0)

    # header extensions (read before refusing unknown features: their names live there)
    ext_end = fields["backing_file_offset"] or cluster_size
    if fields["backing_file_offset"] > cluster_size:
        raise _corrupt("header", f"backing file offset {fields['backing_file_offset']:#x} is invalid")
    ext_end = min(ext_end, len(first))
    ext = _parse_extensions(first, fields["header_length"], ext_end, cluster_size)

    unknown = incompat & ~INCOMPAT_KNOWN
    if unknown:
        names = [n for t, b, n in ext.feature_names if t == 0 and unknown & (1 << b)]
        bits = [b for b in range(64) if unknown & (1 << b)]
        raise ImageError(
            f"{path} uses qcow2 features this reader does not know: "
            f"{', '.join(names) or 'bits ' + ', '.join(map(str, bits))}."
        )
    if bool(incompat & INCOMPAT_COMPRESSION) != (compression_type != 0):
        raise _corrupt("header", "compression type field and compression type bit disagree")
    if compression_type not in COMPRESSION_TYPES:
        raise _corrupt("header", f"unknown compression type {compression_type}")
    if fields.get("autoclear_features", 0) & AUTOCLEAR_DATA_FILE_RAW and not incompat & INCOMPAT_DATA_FILE:
        raise _corrupt("header", "the raw external data bit is set without an external data file")
    if incompat & INCOMPAT_EXTL2 and cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise _corrupt("header", "extended L2 entries need clusters of at least 16 KiB")
    if fields["refcount_order"] > 6:
        raise _corrupt("header", f"refcount order {fields['refcount_order']} is above 6")
    if fields["crypt_method"] not in CRYPT_METHODS:
        raise _corrupt("header", f"unknown encryption method {fields['crypt_method']}")
    if ext.crypto_header is not None and fields["crypt_method"] != 2:
        raise _corrupt("header extension", "an encryption header without LUKS encryption")

    backing_file = None
    if fields["backing_file_offset"]:
        off, length = fields["backing_file_offset"], fields["backing_file_size"]
        if length > min(MAX_BACKING_FILE_NAME, cluster_size - off):
            raise _corrupt("header", "backing file name too long")
        if off + length > len(first):
            raise _corrupt("header", "the backing file name runs past the end of the file")
        backing_file = _decode(first[off : off + length])

    l2_entries = cluster_size // (16 if incompat & INCOMPAT_EXTL2 else 8)
    l1_needed = size_to_l1(fields["size"], cluster_bits, l2_entries)
    if l1_needed > 0x7FFFFFFF:
        raise _corrupt("header", "virtual size is too big")
    if fields["l1_size"] > MAX_L1_SIZE // 8:
        raise _corrupt("active L1 table", f"{fields['l1_size']} entries exceed QEMU's limit")
    if fields["l1_size"] < l1_needed:
        raise _corrupt("active L1 table", f"{fields['l1_size']} entries cannot map {fields['size']} bytes")
    _validate_table("active L1 table", fields["l1_table_offset"], fields["l1_size"], 8, MAX_L1_SIZE, cluster_size)
    _validate_table(
        "refcount table",
        fields["refcount_table_offset"],
        fields["refcount_table_clusters"] << (cluster_bits - 3),
        8,
        MAX_REFTABLE_SIZE,
        cluster_size,
    )
    if fields["nb_snapshots"] > MAX_SNAPSHOTS:
        raise _corrupt("snapshot table", f"{fields['nb_snapshots']} snapshots exceed QEMU's limit of 65536")
    _validate_table(
        "snapshot table",
        fields["snapshots_offset"],
        fields["nb_snapshots"],
        SNAPSHOT_HEADER.size,
        SNAPSHOT_HEADER.size * MAX_SNAPSHOTS,
        cluster_size,
    )
    return Header(
        compression_type=compression_type,
        backing_file=backing_file,
        backing_format=ext.backing_format,
        data_file=ext.data_file,
        feature_names=ext.feature_names,
        bitmaps=ext.bitmaps,
        crypto_header=ext.crypto_header,
        **fields,
    )


class _Extensions:
    """What the header extensions said (filled while walking them)."""

    def __init__(self) -> None:
        self.backing_format: str | None = None
        self.data_file: str | None = None
        self.feature_names: tuple[tuple[int, int, str], ...] = ()
        self.bitmaps: tuple[int, int, int] | None = None
        self.crypto_header: tuple[int, int] | None = None


def _parse_extensions(first: bytes, start: int, end: int, cluster_size: int) -> _Extensions:
    """Walk the header extensions ("=== Header extensions ===") from START up to END."""
    out = _Extensions()
    offset = start
    names: list[tuple[int, int, str]] = []
    while offset < end:
        if offset + EXTENSION.size > end:
            raise _corrupt("header extension", f"truncated extension header at offset {offset:#x}")
        kind, length = EXTENSION.unpack_from(first, offset)
        offset += EXTENSION.size
        if length > end - offset:
            raise _corrupt("header extension", f"extension {kind:#x} is too large ({length} bytes)")
        data = first[offset : offset + length]
        if kind == EXT_END:
            break
        if kind == EXT_BACKING_FORMAT:
            if length >= 16:
                raise _corrupt("header extension", f"backing format name of {length} bytes is too long")
            out.backing_format = _decode(data)
        elif kind == EXT_DATA_FILE:
            out.data_file = _decode(data)
        elif kind == EXT_FEATURE_TABLE:
            for pos in range(0, length - FEATURE_NAME.size + 1, FEATURE_NAME.size):
                ftype, bit, name = FEATURE_NAME.unpack_from(data, pos)
                names.append((ftype, bit, _decode(name)))
        elif kind == EXT_CRYPTO_HEADER:
            if length != CRYPTO_HEADER.size:
                raise _corrupt("header extension", "encryption header pointer has the wrong length")
            out.crypto_header = CRYPTO_HEADER.unpack_from(data)
        elif kind == EXT_BITMAPS and length >= BITMAPS_EXT.size:
            nb, _reserved, dir_size, dir_offset = BITMAPS_EXT.unpack_from(data)
            out.bitmaps = (nb, dir_size, dir_offset)
        offset += (length + 7) & ~7
    out.feature_names = tuple(names)
    return out


def parse_snapshot_table(read: ReadFn, header: Header) -> tuple[SnapshotEntry, ...]:
    """Read the snapshot table the way qcow2_read_snapshots does, bounds-checked.

    READ(offset, length, structure) returns exactly LENGTH bytes or raises CorruptImage.
    """
    entries: list[SnapshotEntry] = []
    start = offset = header.snapshots_offset
    for index in range(header.nb_snapshots):
        offset = (offset + 7) & ~7
        what = f"snapshot table entry {index}"
        raw = read(offset, SNAPSHOT_HEADER.size, what)
        entry_offset = offset
        (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, clock, vm_state_small,
         extra_size) = SNAPSHOT_HEADER.unpack(raw)
        offset += SNAPSHOT_HEADER.size
        if extra_size > MAX_SNAPSHOT_EXTRA_DATA:
            raise _corrupt(what, f"{extra_size} bytes of extra data exceed QEMU's limit of 1024")
        extra = read(offset, extra_size, what) if extra_size else b""
        offset += extra_size
        values: dict[str, int] = {}
        for code, field_name, end in SNAPSHOT_EXTRA_FIELDS:
            if extra_size >= end:
                values[field_name] = struct.unpack_from(">" + code, extra, end - 8)[0]
        ident = read(offset, id_size, what) if id_size else b""
        offset += id_size
        raw_name = read(offset, name_size, what) if name_size else b""
        offset += name_size
        if offset - start > MAX_SNAPSHOTS_SIZE:
            raise _corrupt("snapshot table", "it is larger than QEMU's limit of 64 MiB")
        icount = values.get("icount", ICOUNT_NONE)
        entries.append(
            SnapshotEntry(
                position=index,
                table_offset=entry_offset,
                l1_table_offset=l1_offset,
                l1_size=l1_size,
                id=_decode(ident),
                name=_decode(raw_name),
                date_sec=date_sec,
                date_nsec=date_nsec,
                vm_clock_nsec=clock,
                vm_state_size=values.get("vm_state_size_large", vm_state_small),
                disk_size=values.get("disk_size", header.virtual_size),
                icount=None if icount == ICOUNT_NONE else icount,
                extra_data_size=extra_size,
                entry_size=offset - entry_offset,
            )
        )
    return tuple(entries)


def snapshot_table_size(header: Header, entries: tuple[SnapshotEntry, ...]) -> int:
    """Byte length of the snapshot table (what QEMU calls snapshots_size)."""
    if not entries:
        return 0
    last = entries[-1]
    return last.table_offset + last.entry_size - header.snapshots_offset
