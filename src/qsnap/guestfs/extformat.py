"""On-disk structures of ext2/ext3/ext4 (and GNU/Hurd's ext2), as field tables that cite the spec.

Every table follows the kernel's "ext4 Data Structures and Algorithms"
(``Documentation/filesystems/ext4/``: super.rst, group_descr.rst, inodes.rst, ifork.rst,
directory.rst, attributes.rst, checksums.rst); the section is named next to each table. GNU/Hurd's
fields (``osd1``/``osd2`` when ``s_creator_os`` is 1) follow the same documents' "Hurd" columns and
e2fsprogs' ``lib/ext2fs/ext2_fs.h`` (``hurd1``/``hurd2``). Little-endian throughout. Parsing here is
pure: bytes in, values out; no I/O.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# ------------------------------------------------------------------ super.rst "Super Block"

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
MAGIC = 0xEF53

SUPERBLOCK_FIELDS: tuple[tuple[int, str, str], ...] = (
    (0x00, "I", "inodes_count"),
    (0x04, "I", "blocks_count_lo"),
    (0x0C, "I", "free_blocks_count_lo"),
    (0x10, "I", "free_inodes_count"),
    (0x14, "I", "first_data_block"),  # 1 for 1 KiB blocks, else 0
    (0x18, "I", "log_block_size"),  # block size = 2 ** (10 + log_block_size)
    (0x1C, "I", "log_cluster_size"),  # bigalloc: cluster = 2 ** log_cluster_size blocks
    (0x20, "I", "blocks_per_group"),
    (0x24, "I", "clusters_per_group"),
    (0x28, "I", "inodes_per_group"),
    (0x2C, "I", "mtime"),
    (0x30, "I", "wtime"),
    (0x38, "H", "magic"),  # 0xEF53
    (0x3A, "H", "state"),  # 1 cleanly unmounted, 2 errors detected, 4 orphans being recovered
    (0x48, "I", "creator_os"),  # 0 Linux, 1 Hurd, 2 Masix, 3 FreeBSD, 4 Lites
    (0x4C, "I", "rev_level"),  # 0 original (128-byte inodes, first inode 11), 1 dynamic
    (0x54, "I", "first_ino"),  # rev >= 1
    (0x58, "H", "inode_size"),  # rev >= 1
    (0x5C, "I", "feature_compat"),
    (0x60, "I", "feature_incompat"),
    (0x64, "I", "feature_ro_compat"),
    (0x68, "16s", "uuid"),
    (0x78, "16s", "volume_name"),
    (0xCE, "H", "reserved_gdt_blocks"),
    (0xE0, "I", "journal_inum"),
    (0xE8, "I", "last_orphan"),
    (0xFE, "H", "desc_size"),  # 64bit: group descriptor size (>= 64)
    (0x104, "I", "first_meta_bg"),
    (0x150, "I", "blocks_count_hi"),  # 64bit
    (0x158, "I", "free_blocks_count_hi"),  # 64bit
    (0x174, "B", "log_groups_per_flex"),
    (0x175, "B", "checksum_type"),  # 1 = crc32c
    (0x270, "I", "checksum_seed"),  # csum_seed feature: crc32c(~0, original uuid)
    (0x3FC, "I", "checksum"),  # metadata_csum: crc32c(~0, superblock[0:0x3FC])
)

CREATOR_OS = {0: "Linux", 1: "Hurd", 2: "Masix", 3: "FreeBSD", 4: "Lites"}
OS_HURD = 1

# s_feature_compat
COMPAT_HAS_JOURNAL = 0x4
COMPAT_EXT_ATTR = 0x8
COMPAT_RESIZE_INODE = 0x10
COMPAT_DIR_INDEX = 0x20
COMPAT_SPARSE_SUPER2 = 0x200
# s_feature_incompat
INCOMPAT_COMPRESSION = 0x1
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_EA_INODE = 0x400
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000
#: What this reader understands; anything else is refused with the feature's name.
INCOMPAT_SUPPORTED = (
    INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG | INCOMPAT_CSUM_SEED | INCOMPAT_LARGEDIR | INCOMPAT_INLINE_DATA | INCOMPAT_CASEFOLD
    | INCOMPAT_EA_INODE
)
INCOMPAT_NAMES = {
    INCOMPAT_COMPRESSION: "compression", INCOMPAT_JOURNAL_DEV: "journal_dev (an external journal device)",
    INCOMPAT_DIRDATA: "dirdata", INCOMPAT_ENCRYPT: "encrypt",
}
# s_feature_ro_compat
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_LARGE_FILE = 0x2
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400

# ------------------------------------------------------------------ group_descr.rst "Block Group Descriptors"

GROUP_DESC_FIELDS: tuple[tuple[int, str, str], ...] = (
    (0x00, "I", "block_bitmap_lo"),
    (0x04, "I", "inode_bitmap_lo"),
    (0x08, "I", "inode_table_lo"),
    (0x0C, "H", "free_blocks_count_lo"),
    (0x0E, "H", "free_inodes_count_lo"),
    (0x10, "H", "used_dirs_count_lo"),
    (0x12, "H", "flags"),  # 1 INODE_UNINIT, 2 BLOCK_UNINIT, 4 INODE_ZEROED
    (0x1C, "H", "itable_unused_lo"),
    (0x1E, "H", "checksum"),  # metadata_csum: crc32c(seed, group, desc) & 0xFFFF
    # 64bit (s_desc_size >= 64):
    (0x20, "I", "block_bitmap_hi"),
    (0x24, "I", "inode_bitmap_hi"),
    (0x28, "I", "inode_table_hi"),
)
GROUP_DESC_MIN = 32
GROUP_DESC_CHECKSUM_OFFSET = 0x1E
BG_INODE_UNINIT = 0x1
BG_BLOCK_UNINIT = 0x2

# ------------------------------------------------------------------ inodes.rst "Inode Table"

GOOD_OLD_INODE_SIZE = 128
INODE_FIELDS: tuple[tuple[int, str, str], ...] = (
    (0x00, "H", "mode"),
    (0x02, "H", "uid"),  # low 16 bits
    (0x04, "I", "size_lo"),
    (0x08, "I", "atime"),
    (0x0C, "I", "ctime"),
    (0x10, "I", "mtime"),
    (0x14, "I", "dtime"),
    (0x18, "H", "gid"),  # low 16 bits
    (0x1A, "H", "links_count"),
    (0x1C, "I", "blocks_lo"),  # 512-byte units (fs blocks with HUGE_FILE_FL)
    (0x20, "I", "flags"),
    (0x24, "I", "osd1"),  # Linux: l_i_version; Hurd: h_i_translator (block of the passive translator)
    (0x28, "60s", "block"),  # i_block[15]: block map, extent tree, inline data or fast symlink
    (0x64, "I", "generation"),
    (0x68, "I", "file_acl_lo"),  # extended attribute block
    (0x6C, "I", "size_high"),
    # osd2, Linux: l_i_blocks_high (0x74), l_i_file_acl_high (0x76), l_i_uid_high (0x78),
    #   l_i_gid_high (0x7A), l_i_checksum_lo (0x7C); Hurd: h_i_frag (0x74), h_i_fsize (0x75),
    #   h_i_mode_high (0x76), h_i_uid_high (0x78), h_i_gid_high (0x7A), h_i_author (0x7C).
    (0x74, "H", "osd2_0"),
    (0x76, "H", "osd2_1"),
    (0x78, "H", "uid_high"),
    (0x7A, "H", "gid_high"),
    (0x7C, "I", "osd2_4"),
)
INODE_EXTRA_FIELDS: tuple[tuple[int, str, str], ...] = (
    (0x80, "H", "extra_isize"),
    (0x82, "H", "checksum_hi"),
    (0x84, "I", "ctime_extra"),
    (0x88, "I", "mtime_extra"),
    (0x8C, "I", "atime_extra"),
    (0x90, "I", "crtime"),
    (0x94, "I", "crtime_extra"),
)
INODE_CHECKSUM_LO = 0x7C
INODE_CHECKSUM_HI = 0x82

# i_mode file types
S_IFMT = 0xF000
S_IFIFO = 0x1000
S_IFCHR = 0x2000
S_IFDIR = 0x4000
S_IFBLK = 0x6000
S_IFREG = 0x8000
S_IFLNK = 0xA000
S_IFSOCK = 0xC000
FILE_TYPES = {
    S_IFIFO: "fifo", S_IFCHR: "char", S_IFDIR: "dir", S_IFBLK: "block", S_IFREG: "file", S_IFLNK: "symlink",
    S_IFSOCK: "socket",
}
# i_flags
FL_INDEX = 0x1000  # hashed directory (htree)
FL_HUGE_FILE = 0x40000
FL_EXTENTS = 0x80000
FL_EA_INODE = 0x200000
FL_INLINE_DATA = 0x10000000
FL_ENCRYPT = 0x800

# Special inodes (inodes.rst "Finding an Inode")
ROOT_INO = 2
RESIZE_INO = 7
JOURNAL_INO = 8

# ------------------------------------------------------------------ ifork.rst "Extent Tree"

EXTENT_MAGIC = 0xF30A
EXTENT_HEADER = struct.Struct("<HHHHI")  # eh_magic, eh_entries, eh_max, eh_depth, eh_generation
EXTENT_INDEX = struct.Struct("<IIHH")  # ei_block, ei_leaf_lo, ei_leaf_hi, ei_unused
EXTENT_LEAF = struct.Struct("<IHHI")  # ee_block, ee_len, ee_start_hi, ee_start_lo
EXTENT_INIT_MAX_LEN = 32768  # ee_len > 32768: an unwritten extent of ee_len - 32768 blocks
EXTENT_MAX_DEPTH = 5

# ------------------------------------------------------------------ directory.rst "Directory Entries"

DIRENT = struct.Struct("<IHH")  # inode, rec_len, name_len (16 bits without the filetype feature)
DIRENT_FT = struct.Struct("<IHBB")  # inode, rec_len, name_len, file_type (filetype feature)
DIRENT_TAIL_FT = 0xDE  # "struct ext4_dir_entry_tail": inode 0, rec_len 12, name_len 0, type 0xDE
DIR_FILE_TYPES = {1: "file", 2: "dir", 3: "char", 4: "block", 5: "fifo", 6: "socket", 7: "symlink"}

# ------------------------------------------------------------------ attributes.rst "Extended Attributes"

XATTR_MAGIC = 0xEA020000
XATTR_BLOCK_HEADER = 32  # h_magic, h_refcount, h_blocks, h_hash, h_checksum, reserved
XATTR_ENTRY = struct.Struct("<BBHIII")  # e_name_len, e_name_index, e_value_offs, e_value_inum, e_value_size, e_hash
XATTR_PREFIXES = {
    1: "user.", 2: "system.posix_acl_access", 3: "system.posix_acl_default", 4: "trusted.", 6: "security.",
    7: "system.", 8: "system.richacl", 10: "gnu.",
}


def struct_of(fields: tuple[tuple[int, str, str], ...]) -> tuple[struct.Struct, tuple[str, ...]]:
    """One ``struct.Struct`` reading every field of a table at its offset (gaps as padding)."""
    fmt = "<"
    pos = 0
    names = []
    for offset, code, name in fields:
        assert offset >= pos, name
        if offset > pos:
            fmt += f"{offset - pos}x"
        fmt += code
        pos = offset + struct.calcsize("<" + code)
        names.append(name)
    return struct.Struct(fmt), tuple(names)


SUPERBLOCK_STRUCT, SUPERBLOCK_NAMES = struct_of(SUPERBLOCK_FIELDS)
GROUP_DESC32_STRUCT, GROUP_DESC32_NAMES = struct_of(GROUP_DESC_FIELDS[:-3])
GROUP_DESC64_STRUCT, GROUP_DESC64_NAMES = struct_of(GROUP_DESC_FIELDS)
INODE_STRUCT, INODE_NAMES = struct_of(INODE_FIELDS)
INODE_EXTRA_STRUCT, INODE_EXTRA_NAMES = struct_of(INODE_EXTRA_FIELDS)


class GroupDesc(NamedTuple):
    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    flags: int
    free_blocks: int
    free_inodes: int
    itable_unused: int
    checksum: int


def parse_group_desc(raw: bytes | memoryview, wide: bool) -> GroupDesc:
    if wide:
        v = dict(zip(GROUP_DESC64_NAMES, GROUP_DESC64_STRUCT.unpack_from(raw), strict=True))
        hi = (v["block_bitmap_hi"], v["inode_bitmap_hi"], v["inode_table_hi"])
    else:
        v = dict(zip(GROUP_DESC32_NAMES, GROUP_DESC32_STRUCT.unpack_from(raw), strict=True))
        hi = (0, 0, 0)
    return GroupDesc(
        v["block_bitmap_lo"] | hi[0] << 32, v["inode_bitmap_lo"] | hi[1] << 32, v["inode_table_lo"] | hi[2] << 32,
        v["flags"], v["free_blocks_count_lo"], v["free_inodes_count_lo"], v["itable_unused_lo"], v["checksum"],
    )
