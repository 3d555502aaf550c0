"""A read-only reader of ext2 (GNU/Hurd's and Linux's), ext3 and ext4 filesystems.

Follows the kernel's ext4 disk-layout documentation (``Documentation/filesystems/ext4/``; the
field tables are in :mod:`qsnap.guestfs.extformat`). What it reads: block maps (direct, indirect,
double, triple) and extent trees (depth <= 5, unwritten extents read as zeros), linear and
hashed (htree) directories (an htree's index blocks look like empty entries to a linear scan,
"Hash Tree Directories"), inline data (``i_block`` plus the ``system.data`` attribute), fast and
slow symlinks, in-inode and block extended attributes, 64bit and meta_bg group descriptors,
flex_bg, huge files, bigalloc bitmaps. GNU/Hurd: no ``filetype`` feature (16-bit name lengths,
types from the inode), ``h_i_translator`` (osd1) with the passive translator's block, and
``h_i_mode_high`` / ``h_i_uid_high`` / ``h_i_gid_high`` / ``h_i_author`` (osd2); a translator in a
``gnu.translator`` attribute is read too. With ``metadata_csum`` the superblock, group descriptors,
inodes, extent blocks and directory blocks are checked ("Checksums"): a mismatch is damage.

Hostile filesystems end in :class:`CorruptFilesystem` (exit 10) naming the structure: block
numbers past the end, rec_len or name lengths out of their block, extent trees deeper than 5 or
looping, names holding ``/`` or NUL. Nothing here writes, prints or spawns a process.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import NamedTuple

from qsnap.core.errors import CorruptFilesystem, GuestFsError
from qsnap.guestfs import extformat as ef
from qsnap.guestfs.device import CachedDevice

_U32 = struct.Struct("<I")
_EXTRA_TIMES = struct.Struct("<I4xI")  # i_mtime_extra (0x88), i_crtime (0x90)
_CRC_MASK = 0xFFFFFFFF
MAX_SYMLINK_HOPS = 40


_extend: Callable[[int, bytes], int] | None = None


def crc32c_raw(seed: int, data: bytes | bytearray | memoryview) -> int:
    """ext4's ``ext4_chksum``: CRC32C continuing from SEED, without the final inversion."""
    global _extend
    if _extend is None:  # imported on the first checksum: filesystems without metadata_csum never load it
        import google_crc32c

        _extend = google_crc32c.extend
    value: int = _extend((~seed) & _CRC_MASK, bytes(data))
    return (~value) & _CRC_MASK


class Inode:
    """One inode, decoded. ``mode`` includes GNU/Hurd's high mode bits."""

    __slots__ = (
        "atime", "author", "block", "blocks", "crtime", "ctime", "dtime", "file_acl", "flags", "generation", "gid",
        "ino", "links", "mode", "mtime", "mtime_ns", "raw", "size", "translator_block", "uid",
    )
    ino: int
    raw: bytes
    mode: int
    flags: int
    uid: int
    gid: int
    size: int
    atime: int
    ctime: int
    mtime: int
    dtime: int
    links: int
    block: bytes
    generation: int
    crtime: int
    mtime_ns: int
    translator_block: int
    author: int | None
    file_acl: int
    blocks: int

    def __init__(self, ino: int, raw: bytes, hurd: bool, huge: bool, wide_blocks: bool) -> None:
        # One unpack into locals, in INODE_FIELDS order (this runs once per file listed).
        (mode, uid, size_lo, self.atime, self.ctime, mtime, self.dtime, gid, self.links, blocks_lo, flags, osd1,
         self.block, self.generation, file_acl_lo, size_high, osd2_0, osd2_1, uid_high, gid_high,
         osd2_4) = ef.INODE_STRUCT.unpack_from(raw)
        self.ino = ino
        self.raw = raw
        self.flags = flags
        self.uid = uid | uid_high << 16
        self.gid = gid | gid_high << 16
        self.size = size_lo | size_high << 32
        self.crtime = 0
        self.mtime_ns = 0
        if hurd:
            self.translator_block = osd1
            mode |= osd2_1 << 16  # h_i_mode_high
            self.author = osd2_4
            self.file_acl = file_acl_lo
            blocks = blocks_lo
        else:
            self.translator_block = 0
            self.author = None
            self.file_acl = file_acl_lo | osd2_1 << 32  # l_i_file_acl_high
            blocks = blocks_lo | (osd2_0 << 32 if wide_blocks else 0)  # l_i_blocks_high
            if huge and flags & ef.FL_HUGE_FILE:
                blocks = -blocks  # in filesystem blocks: the caller scales it (see ExtFilesystem.inode)
        self.blocks = blocks
        self.mode = mode
        if len(raw) > ef.GOOD_OLD_INODE_SIZE and (raw[0x80] | raw[0x81] << 8) >= 0x18 and len(raw) >= 0x98:
            mtime_extra, crtime = _EXTRA_TIMES.unpack_from(raw, 0x88)
            self.mtime_ns = mtime_extra >> 2
            mtime |= (mtime_extra & 3) << 32
            self.crtime = crtime
        self.mtime = mtime

    @property
    def file_type(self) -> str:
        return ef.FILE_TYPES.get(self.mode & ef.S_IFMT, "unknown")

    @property
    def is_dir(self) -> bool:
        return self.mode & ef.S_IFMT == ef.S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.mode & ef.S_IFMT == ef.S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.mode & ef.S_IFMT == ef.S_IFLNK

    @property
    def permissions(self) -> int:
        return self.mode & 0o7777


class DirEntry(NamedTuple):
    name: bytes
    ino: int
    file_type: str | None  # from the entry (filetype feature), else None: ask the inode


class BlockCache:
    """Decoded directory blocks shared between two states: UNCHANGED(block) says a block reads the
    same in both, so its entries (keyed by directory inode and block) are decoded once."""

    def __init__(self, unchanged: Callable[[int], bool]) -> None:
        self.unchanged = unchanged
        self.entries: dict[tuple[int, int], list[DirEntry]] = {}


class Run(NamedTuple):
    """LENGTH blocks of a file from logical block LOGICAL at physical block PHYSICAL (0: a hole,
    or an unwritten extent when UNWRITTEN, both reading as zeros)."""

    logical: int
    physical: int
    length: int
    unwritten: bool = False


class ExtFilesystem:
    """An ext2/3/4 filesystem on DEVICE (a partition or a whole disk), read-only."""

    def __init__(self, device: CachedDevice, *, verify_checksums: bool = True) -> None:
        self.device = device
        self.verify_checksums = verify_checksums
        raw = device.read(ef.SUPERBLOCK_OFFSET, ef.SUPERBLOCK_SIZE)
        self.superblock_raw = raw
        sb = dict(zip(ef.SUPERBLOCK_NAMES, ef.SUPERBLOCK_STRUCT.unpack_from(raw), strict=True))
        self.sb = sb
        if sb["magic"] != ef.MAGIC:
            raise GuestFsError(
                f"No ext2/ext3/ext4 filesystem here (superblock magic {sb['magic']:#06x}, expected 0xef53).",
                hint="choose another partition with --partition N (see qsnap parts)",
            )
        self.compat: int = sb["feature_compat"]
        self.incompat: int = sb["feature_incompat"]
        self.ro_compat: int = sb["feature_ro_compat"]
        unknown = self.incompat & ~ef.INCOMPAT_SUPPORTED
        if unknown:
            names = [ef.INCOMPAT_NAMES.get(1 << b, f"bit {b}") for b in range(32) if unknown >> b & 1]
            raise GuestFsError(f"This ext filesystem uses features qsnap cannot read: {', '.join(names)}.")
        if sb["log_block_size"] > 6:
            raise CorruptFilesystem(f"The superblock's block size 2^{10 + sb['log_block_size']} is out of range.")
        self.block_size = 1024 << sb["log_block_size"]
        self.hurd = sb["creator_os"] == ef.OS_HURD
        self.csum = bool(self.ro_compat & ef.RO_COMPAT_METADATA_CSUM)
        if self.csum and verify_checksums:
            if sb["checksum_type"] != 1:
                raise GuestFsError(f"Unknown metadata checksum type {sb['checksum_type']}.")
            if crc32c_raw(_CRC_MASK, raw[:0x3FC]) != sb["checksum"]:
                raise CorruptFilesystem("The superblock fails its metadata_csum checksum.")
        if self.csum:
            seed = sb["checksum_seed"] if self.incompat & ef.INCOMPAT_CSUM_SEED else crc32c_raw(_CRC_MASK, sb["uuid"])
            self.csum_seed = seed
            self._inverted_seed = ~seed & _CRC_MASK
        self.wide = bool(self.incompat & ef.INCOMPAT_64BIT)
        self.blocks_count = sb["blocks_count_lo"] | (sb["blocks_count_hi"] << 32 if self.wide else 0)
        self.free_blocks_count = sb["free_blocks_count_lo"] | (sb["free_blocks_count_hi"] << 32 if self.wide else 0)
        self.first_data_block: int = sb["first_data_block"]
        self.blocks_per_group: int = sb["blocks_per_group"]
        self.inodes_per_group: int = sb["inodes_per_group"]
        self.inodes_count: int = sb["inodes_count"]
        if sb["rev_level"] == 0:
            self.inode_size, self.first_ino = ef.GOOD_OLD_INODE_SIZE, 11
        else:
            self.inode_size, self.first_ino = sb["inode_size"], sb["first_ino"]
        self.bigalloc = bool(self.ro_compat & ef.RO_COMPAT_BIGALLOC)
        self.cluster_ratio = 1 << sb["log_cluster_size"] if self.bigalloc else 1
        problems = []
        if not self.blocks_per_group or not self.inodes_per_group:
            problems.append("zero blocks or inodes per group")
        elif self.inode_size < ef.GOOD_OLD_INODE_SIZE or self.inode_size > self.block_size or \
                self.inode_size & (self.inode_size - 1):
            problems.append(f"inode size {self.inode_size}")
        elif self.blocks_count * self.block_size > device.size:
            problems.append(f"{self.blocks_count} blocks of {self.block_size} bytes do not fit in {device.size} bytes")
        elif self.first_data_block >= self.blocks_count or self.first_data_block > 1:
            problems.append(f"first data block {self.first_data_block}")
        if problems:
            raise CorruptFilesystem(f"The superblock is damaged: {problems[0]}.")
        self.group_count = (self.blocks_count - self.first_data_block + self.blocks_per_group - 1) \
            // self.blocks_per_group
        if self.group_count * self.inodes_per_group < self.inodes_count or self.group_count > 1 << 32:
            raise CorruptFilesystem("The superblock is damaged: its group and inode counts disagree.")
        self.desc_size = sb["desc_size"] if self.wide else ef.GROUP_DESC_MIN
        if self.wide and (self.desc_size < 64 or self.desc_size > self.block_size or self.desc_size & 7):
            raise CorruptFilesystem(f"The superblock's group descriptor size {self.desc_size} is out of range.")
        self.huge = bool(self.ro_compat & ef.RO_COMPAT_HUGE_FILE)
        self._groups: list[ef.GroupDesc] | None = None
        self.kind = "ext4" if self.incompat & (ef.INCOMPAT_EXTENTS | ef.INCOMPAT_FLEX_BG | ef.INCOMPAT_64BIT
                                               | ef.INCOMPAT_INLINE_DATA) or self.ro_compat & (
            ef.RO_COMPAT_HUGE_FILE | ef.RO_COMPAT_METADATA_CSUM | ef.RO_COMPAT_GDT_CSUM) \
            else "ext3" if self.compat & ef.COMPAT_HAS_JOURNAL else "ext2"
        self.needs_recovery = bool(self.incompat & ef.INCOMPAT_RECOVER)
        self.filetype = bool(self.incompat & ef.INCOMPAT_FILETYPE)

    # ------------------------------------------------------------------ description

    @property
    def creator_os(self) -> str:
        return ef.CREATOR_OS.get(self.sb["creator_os"], f"unknown ({self.sb['creator_os']})")

    @property
    def label(self) -> str:
        return bytes(self.sb["volume_name"]).split(b"\0", 1)[0].decode("utf-8", "replace")

    @property
    def uuid(self) -> str:
        import uuid

        return str(uuid.UUID(bytes=bytes(self.sb["uuid"])))

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind, "creator_os": self.creator_os, "label": self.label, "uuid": self.uuid,
            "block_size": self.block_size, "blocks": self.blocks_count, "free_blocks": self.free_blocks_count,
            "inodes": self.inodes_count, "free_inodes": self.sb["free_inodes_count"], "inode_size": self.inode_size,
            "groups": self.group_count, "needs_recovery": self.needs_recovery, "metadata_csum": self.csum,
        }

    # ------------------------------------------------------------------ blocks

    def read_blocks(self, block: int, count: int = 1, what: str = "block") -> bytes:
        if block < 0 or block + count > self.blocks_count:
            raise CorruptFilesystem(
                f"The filesystem points at {what} {block}, past its end ({self.blocks_count} blocks).")
        return self.device.read(block * self.block_size, count * self.block_size)

    def readinto_blocks(self, block: int, view: memoryview, what: str = "block") -> None:
        """Fill VIEW (a whole number of blocks) from BLOCK on, without an intermediate copy."""
        count = len(view) // self.block_size
        if block < 0 or block + count > self.blocks_count:
            raise CorruptFilesystem(
                f"The filesystem points at {what} {block}, past its end ({self.blocks_count} blocks).")
        self.device.readinto(block * self.block_size, view)

    def copy_blocks_to(self, block: int, count: int, limit: int, out_fd: int, out_offset: int) -> None:
        """Copy COUNT blocks from BLOCK (at most LIMIT bytes) into OUT_FD at OUT_OFFSET (zeros may be skipped)."""
        if block < 0 or block + count > self.blocks_count:
            raise CorruptFilesystem(
                f"The filesystem points at data block {block}, past its end ({self.blocks_count} blocks).")
        self.device.copy_to(block * self.block_size, min(count * self.block_size, limit), out_fd, out_offset)

    # ------------------------------------------------------------------ group descriptors ("Block Groups")

    @property
    def groups(self) -> list[ef.GroupDesc]:
        if self._groups is None:
            self._groups = self._read_groups()
        return self._groups

    def _desc_block(self, index: int) -> int:
        """The block holding group descriptor block INDEX (meta_bg: "Meta Block Groups")."""
        per_block = self.block_size // self.desc_size
        first = self.first_data_block + 1
        if not self.incompat & ef.INCOMPAT_META_BG or index < self.sb["first_meta_bg"]:
            return int(first + index)
        group = index * per_block
        base = self.first_data_block + group * self.blocks_per_group
        return int(base + (1 if self.group_has_super(group) else 0))

    def _read_groups(self) -> list[ef.GroupDesc]:
        per_block = self.block_size // self.desc_size
        count_blocks = (self.group_count + per_block - 1) // per_block
        groups: list[ef.GroupDesc] = []
        for index in range(count_blocks):
            raw = self.read_blocks(self._desc_block(index), 1, "group descriptor block")
            for i in range(min(per_block, self.group_count - index * per_block)):
                g = index * per_block + i
                chunk = raw[i * self.desc_size : (i + 1) * self.desc_size]
                desc = ef.parse_group_desc(chunk, self.wide)
                if self.csum and self.verify_checksums:
                    want = crc32c_raw(self.csum_seed, _U32.pack(g))
                    want = crc32c_raw(want, chunk[: ef.GROUP_DESC_CHECKSUM_OFFSET] + b"\0\0"
                                      + chunk[ef.GROUP_DESC_CHECKSUM_OFFSET + 2 :]) & 0xFFFF
                    if want != desc.checksum:
                        raise CorruptFilesystem(f"The descriptor of block group {g} fails its checksum.")
                for what, block in (("block bitmap", desc.block_bitmap), ("inode bitmap", desc.inode_bitmap),
                                    ("inode table", desc.inode_table)):
                    if not self.first_data_block <= block < self.blocks_count:
                        raise CorruptFilesystem(
                            f"Block group {g}'s {what} is at block {block}, outside the filesystem.")
                groups.append(desc)
        return groups

    def group_has_super(self, group: int) -> bool:
        """Whether GROUP holds a superblock backup (sparse_super: groups 0, 1 and powers of 3, 5, 7)."""
        if group == 0:
            return True
        if self.compat & ef.COMPAT_SPARSE_SUPER2:
            return group in (self.sb_backup_groups())
        if not self.ro_compat & ef.RO_COMPAT_SPARSE_SUPER or group == 1:
            return True
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False

    def sb_backup_groups(self) -> tuple[int, int]:
        raw = self.superblock_raw
        return struct.unpack_from("<II", raw, 0x24C)

    # ------------------------------------------------------------------ inodes ("Inode Table")

    def inode(self, ino: int) -> Inode:
        if not 1 <= ino <= self.inodes_count:
            raise CorruptFilesystem(f"Inode number {ino} is out of range (1..{self.inodes_count}).")
        group, index = divmod(ino - 1, self.inodes_per_group)
        groups = self._groups if self._groups is not None else self.groups
        size = self.inode_size
        offset = groups[group].inode_table * self.block_size + index * size
        if offset + size > self.blocks_count * self.block_size:
            raise CorruptFilesystem(f"Inode {ino} lies past the end of the filesystem.")
        raw = self.device.read(offset, size)
        if self.csum and self.verify_checksums:
            self._check_inode_csum(ino, raw)
        inode = Inode(ino, raw, self.hurd, self.huge, self.wide or self.huge)
        if inode.blocks < 0:
            inode.blocks = -inode.blocks * (self.block_size // 512)
        return inode

    def _inode_seed(self, ino: int, generation: int) -> int:
        return crc32c_raw(self.csum_seed, _U32.pack(ino) + _U32.pack(generation))

    def _check_inode_csum(self, ino: int, raw: bytes) -> None:
        """crc32c(seed, inode number, generation, the inode with both checksum fields zeroed).

        One C call per inode (listings check 100,000s): the pieces are joined, the seed inverted once."""
        lo, hi = ef.INODE_CHECKSUM_LO, ef.INODE_CHECKSUM_HI
        stored = raw[lo] | raw[lo + 1] << 8
        has_hi = len(raw) > ef.GOOD_OLD_INODE_SIZE and (raw[0x80] | raw[0x81] << 8) >= 4
        if has_hi:
            stored |= (raw[hi] | raw[hi + 1] << 8) << 16
            data = b"".join((_U32.pack(ino), raw[0x64:0x68], raw[:lo], b"\0\0", raw[lo + 2 : hi], b"\0\0",
                             raw[hi + 2 :]))
        else:
            data = b"".join((_U32.pack(ino), raw[0x64:0x68], raw[:lo], b"\0\0", raw[lo + 2 :]))
        if _extend is None:
            crc32c_raw(0, b"")  # loads the CRC32C implementation
        assert _extend is not None
        want = ~_extend(self._inverted_seed, data) & _CRC_MASK
        if not has_hi:
            want &= 0xFFFF
        if want != stored and raw.count(0) != len(raw):  # a never-used inode is all zeros, unchecksummed
            raise CorruptFilesystem(f"Inode {ino} fails its checksum.")

    # ------------------------------------------------------------------ file block maps

    def runs(self, inode: Inode) -> Iterator[Run]:
        """The mapped block runs of INODE, in logical order (holes left out)."""
        if inode.flags & ef.FL_INLINE_DATA or (inode.is_symlink and self.is_fast_symlink(inode)):
            return
        if inode.is_reg or inode.is_dir or inode.is_symlink or inode.ino < self.first_ino:
            runs = self._extent_runs(inode) if inode.flags & ef.FL_EXTENTS else self._map_runs(inode)
            total = 0
            for run in runs:
                total += run.length
                if total > self.blocks_count:  # a hostile map repeating blocks: bounded time, clear error
                    raise CorruptFilesystem(f"Inode {inode.ino} maps more blocks than the filesystem has.")
                yield run

    def _extent_runs(self, inode: Inode) -> Iterator[Run]:
        stack: list[tuple[bytes, int, str]] = [(inode.block, -1, f"the extent tree of inode {inode.ino}")]
        visited: set[int] = set()
        while stack:
            node, expect_depth, what = stack.pop()
            magic, entries, max_entries, depth, _ = ef.EXTENT_HEADER.unpack_from(node)
            bad_depth = depth > ef.EXTENT_MAX_DEPTH or (expect_depth >= 0 and depth != expect_depth)
            if magic != ef.EXTENT_MAGIC or bad_depth or entries > max_entries or 12 + 12 * max_entries > len(node):
                raise CorruptFilesystem(f"Inode {inode.ino} has a damaged extent tree ({what}).")
            if depth == 0:
                for i in range(entries):
                    lblock, length, hi, lo = ef.EXTENT_LEAF.unpack_from(node, 12 + 12 * i)
                    unwritten = length > ef.EXTENT_INIT_MAX_LEN
                    if unwritten:
                        length -= ef.EXTENT_INIT_MAX_LEN
                    start = lo | hi << 32
                    if start + length > self.blocks_count or (start < self.first_data_block and length):
                        raise CorruptFilesystem(
                            f"Inode {inode.ino}'s extent at logical block {lblock} points past the filesystem "
                            f"(block {start}, {length} blocks)."
                        )
                    yield Run(lblock, start, length, unwritten)
                continue
            children = []
            for i in range(entries):
                _, lo, hi, _ = ef.EXTENT_INDEX.unpack_from(node, 12 + 12 * i)
                child = lo | hi << 32
                if child in visited:
                    raise CorruptFilesystem(f"Inode {inode.ino}'s extent tree loops (block {child}).")
                visited.add(child)
                raw = self.read_blocks(child, 1, f"extent block of inode {inode.ino}")
                if self.csum and self.verify_checksums:
                    tail = 12 + 12 * struct.unpack_from("<H", raw, 4)[0]
                    if tail + 4 <= len(raw) and crc32c_raw(self._inode_seed(inode.ino, inode.generation),
                                                           raw[:tail]) != _U32.unpack_from(raw, tail)[0]:
                        raise CorruptFilesystem(f"Extent block {child} of inode {inode.ino} fails its checksum.")
                children.append((raw, depth - 1, f"block {child}"))
            stack.extend(reversed(children))

    def _map_runs(self, inode: Inode) -> Iterator[Run]:
        """ext2/3 block maps: 12 direct pointers, then indirect, double and triple indirect blocks."""
        ptrs = struct.unpack_from("<15I", inode.block)
        per = self.block_size // 4
        run: list[int] = []  # [logical, physical, length]
        seen: set[int] = set()
        limit = (inode.size + self.block_size - 1) // self.block_size if not inode.ino < self.first_ino else None

        def emit(logical: int, physical: int) -> Iterator[Run]:
            if run and run[1] + run[2] == physical and run[0] + run[2] == logical:
                run[2] += 1
                return
            if run:
                yield Run(run[0], run[1], run[2])
            run[:] = [logical, physical, 1]

        def check(block: int, what: str) -> int:
            if not self.first_data_block <= block < self.blocks_count:
                raise CorruptFilesystem(f"Inode {inode.ino} points at block {block} ({what}), outside the filesystem.")
            return block

        for i in range(12):
            if ptrs[i]:
                yield from emit(i, check(ptrs[i], "data"))
        base = 12
        for level, top in ((1, ptrs[12]), (2, ptrs[13]), (3, ptrs[14])):
            span = per**level
            if top and (limit is None or base < limit):
                stack = [(top, level, base)]
                while stack:
                    block, lvl, first = stack.pop()
                    check(block, "indirect")
                    if block in seen:
                        raise CorruptFilesystem(f"Inode {inode.ino} uses indirect block {block} twice.")
                    seen.add(block)
                    table = struct.unpack(f"<{per}I", self.read_blocks(block, 1, "indirect block"))
                    if lvl == 1:
                        for j, b in enumerate(table):
                            if b:
                                yield from emit(first + j, check(b, "data"))
                    else:
                        sub = per ** (lvl - 1)
                        for j in range(per - 1, -1, -1):
                            if table[j] and (limit is None or first + j * sub < limit):
                                stack.append((table[j], lvl - 1, first + j * sub))
            base += span
        if run:
            yield Run(run[0], run[1], run[2])

    def metadata_map_blocks(self, inode: Inode) -> Iterator[int]:
        """The blocks that map INODE's data (indirect and extent tree blocks), not the data itself."""
        if inode.flags & ef.FL_INLINE_DATA or (inode.is_symlink and self.is_fast_symlink(inode)):
            return
        if inode.flags & ef.FL_EXTENTS:
            stack = [inode.block]
            seen: set[int] = set()
            while stack:
                node = stack.pop()
                magic, entries, _, depth, _ = ef.EXTENT_HEADER.unpack_from(node)
                if magic != ef.EXTENT_MAGIC or depth == 0 or depth > ef.EXTENT_MAX_DEPTH:
                    continue
                for i in range(min(entries, (len(node) - 12) // 12)):
                    _, lo, hi, _ = ef.EXTENT_INDEX.unpack_from(node, 12 + 12 * i)
                    child = lo | hi << 32
                    if child in seen or not 0 < child < self.blocks_count:
                        continue
                    seen.add(child)
                    yield child
                    stack.append(self.read_blocks(child))
            return
        ptrs = struct.unpack_from("<15I", inode.block)
        per = self.block_size // 4
        stack2 = [(b, lvl) for b, lvl in ((ptrs[12], 1), (ptrs[13], 2), (ptrs[14], 3)) if b]
        while stack2:
            block, lvl = stack2.pop()
            if not 0 < block < self.blocks_count:
                continue
            yield block
            if lvl > 1:
                table = struct.unpack(f"<{per}I", self.read_blocks(block))
                stack2.extend((b, lvl - 1) for b in table if b)

    # ------------------------------------------------------------------ file data

    def iter_data(self, inode: Inode, chunk_blocks: int = 2048) -> Iterator[bytes]:
        """INODE's content in order (holes as zeros), in chunks of up to CHUNK_BLOCKS blocks."""
        size = inode.size
        if inode.flags & ef.FL_INLINE_DATA:
            yield self.inline_data(inode)[:size]
            return
        bs = self.block_size
        pos = 0  # bytes produced
        for run in self.runs(inode):
            start = run.logical * bs
            if start >= size:
                break
            if start > pos:
                yield from _zeros(start - pos)
                pos = start
            done = 0
            while done < run.length and pos < size:
                n = min(chunk_blocks, run.length - done)
                want = min(n * bs, size - pos)
                if run.unwritten:
                    yield from _zeros(want)
                else:
                    yield self.read_blocks(run.physical + done, n, f"data block of inode {inode.ino}")[:want]
                pos += want
                done += n
        if pos < size:
            yield from _zeros(size - pos)

    def read_file(self, inode: Inode, limit: int = 1 << 30) -> bytes:
        if inode.size > limit:
            raise GuestFsError(f"Inode {inode.ino} holds {inode.size} bytes, more than this read allows ({limit}).")
        return b"".join(self.iter_data(inode))

    def data_extents(self, inode: Inode) -> list[tuple[int, int]]:
        """(byte offset, length) of INODE's written data, merged (holes and unwritten extents left out)."""
        out: list[tuple[int, int]] = []
        bs = self.block_size
        for run in self.runs(inode):
            if run.unwritten:
                continue
            start = run.logical * bs
            end = min((run.logical + run.length) * bs, max(inode.size, 0))
            if end <= start:
                continue
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], end - out[-1][0])
            else:
                out.append((start, end - start))
        return out

    def inline_data(self, inode: Inode) -> bytes:
        """Inline data: the 60 bytes of i_block, then the value of ``system.data`` ("Inline Data")."""
        return inode.block + self.xattrs(inode).get("system.data", b"")

    # ------------------------------------------------------------------ symlinks

    def is_fast_symlink(self, inode: Inode) -> bool:
        """Target stored in i_block (e2fsprogs' ext2fs_is_fast_symlink; inline-data links apart)."""
        if inode.flags & (ef.FL_EXTENTS | ef.FL_INLINE_DATA):
            return False
        return 0 < inode.size < 60

    def symlink_target(self, inode: Inode) -> bytes:
        if inode.flags & ef.FL_INLINE_DATA:
            return self.inline_data(inode)[: inode.size]
        if self.is_fast_symlink(inode):
            return inode.block[: inode.size]
        if inode.size > 65536:
            raise CorruptFilesystem(f"Symlink inode {inode.ino} claims a {inode.size}-byte target.")
        return self.read_file(inode)

    # ------------------------------------------------------------------ extended attributes ("Extended Attributes")

    def xattrs(self, inode: Inode) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        raw = inode.raw
        if len(raw) > ef.GOOD_OLD_INODE_SIZE:
            extra = raw[0x80] | raw[0x81] << 8
            start = ef.GOOD_OLD_INODE_SIZE + extra
            if start + 4 <= len(raw) and _U32.unpack_from(raw, start)[0] == ef.XATTR_MAGIC:
                self._parse_xattrs(raw, start + 4, start + 4, len(raw), out, inode.ino)
        if inode.file_acl:
            block = self.read_blocks(inode.file_acl, 1, f"extended attribute block of inode {inode.ino}")
            if _U32.unpack_from(block, 0)[0] != ef.XATTR_MAGIC:
                raise CorruptFilesystem(f"Inode {inode.ino}'s extended attribute block {inode.file_acl} is damaged.")
            self._parse_xattrs(block, ef.XATTR_BLOCK_HEADER, 0, len(block), out, inode.ino)
        return out

    def _parse_xattrs(self, raw: bytes, pos: int, base: int, end: int, out: dict[str, bytes], ino: int) -> None:
        while pos + ef.XATTR_ENTRY.size <= end:
            if _U32.unpack_from(raw, pos)[0] == 0:
                return
            name_len, index, value_offs, value_inum, value_size, _ = ef.XATTR_ENTRY.unpack_from(raw, pos)
            name_end = pos + ef.XATTR_ENTRY.size + name_len
            if name_end > end:
                raise CorruptFilesystem(f"Inode {ino}'s extended attributes are damaged.")
            name = ef.XATTR_PREFIXES.get(index, f"index{index}.") + raw[pos + ef.XATTR_ENTRY.size : name_end].decode(
                "utf-8", "replace")
            if value_inum:
                try:
                    value = self.read_file(self.inode(value_inum), limit=64 << 20)[:value_size]
                except CorruptFilesystem:
                    value = b""
            else:
                vstart = base + value_offs
                if vstart + value_size > end:
                    raise CorruptFilesystem(f"Inode {ino}'s extended attribute {name!r} points outside its area.")
                value = raw[vstart : vstart + value_size]
            out[name] = value
            pos = (name_end + 3) & ~3

    # ------------------------------------------------------------------ GNU/Hurd passive translators

    def translator(self, inode: Inode) -> bytes | None:
        """The passive translator's argz (NUL-separated argv) or None.

        Hurd's ext2fs stores it in the block ``h_i_translator`` names: a 2-byte little-endian length,
        then the bytes (``ext2fs/inode.c``, diskfs_set_translator); newer ones use ``gnu.translator``.
        """
        if self.hurd and inode.translator_block:
            raw = self.read_blocks(inode.translator_block, 1, f"translator block of inode {inode.ino}")
            length = raw[0] | raw[1] << 8
            if length > self.block_size - 2:
                raise CorruptFilesystem(f"Inode {inode.ino}'s translator record is longer than its block.")
            return raw[2 : 2 + length]
        has_xattrs = inode.file_acl or len(inode.raw) > ef.GOOD_OLD_INODE_SIZE
        if self.hurd and self.compat & ef.COMPAT_EXT_ATTR and has_xattrs:
            value = self.xattrs(inode).get("gnu.translator")
            if value is not None:
                return value
        return None

    # ------------------------------------------------------------------ directories ("Directory Entries")

    def dir_entries(self, inode: Inode, shared: BlockCache | None = None) -> list[DirEntry]:
        """The entries of directory INODE, '.' and '..' included, in on-disk order.

        SHARED: entries of blocks known to be the same in another state of this filesystem (a
        diff decodes an unchanged block of a changed directory once for both sides)."""
        if not inode.is_dir:
            raise GuestFsError(f"Inode {inode.ino} is not a directory.")
        out: list[DirEntry] = []
        if inode.flags & ef.FL_INLINE_DATA:
            data = self.inline_data(inode)
            parent = _U32.unpack_from(data, 0)[0]
            out.append(DirEntry(b".", inode.ino, "dir"))
            out.append(DirEntry(b"..", parent, "dir"))
            self._parse_dir_block(data[4:60], inode, out, check_tail=False)
            if len(data) > 60:
                self._parse_dir_block(data[60:], inode, out, check_tail=False)
            return out
        if inode.size > 1 << 32:
            raise CorruptFilesystem(f"Directory inode {inode.ino} claims {inode.size} bytes.")
        bs = self.block_size
        nblocks = (inode.size + bs - 1) // bs
        for run in self.runs(inode):
            for k in range(run.length):
                if run.logical + k >= nblocks:
                    break
                block = run.physical + k
                if shared is not None:
                    known = shared.entries.get((inode.ino, block))
                    if known is not None:
                        out.extend(known)
                        continue
                    start = len(out)
                raw = self.read_blocks(block, 1, f"directory block of inode {inode.ino}")
                self._parse_dir_block(raw, inode, out, check_tail=True, block=block)
                if shared is not None and shared.unchanged(block):
                    shared.entries[(inode.ino, block)] = out[start:]
        dots = [e.name for e in out if e.name in (b".", b"..")]
        if len(dots) > 2 or len(set(dots)) != len(dots):
            raise CorruptFilesystem(f"Directory inode {inode.ino} holds a second '.' or '..' entry.")
        return out

    def _parse_dir_block(self, raw: bytes, inode: Inode, out: list[DirEntry], *, check_tail: bool,
                         block: int = 0) -> None:
        end = len(raw)
        if check_tail and self.csum and self.verify_checksums and end >= 12:
            t_ino, t_rec, t_nl, t_ft = ef.DIRENT_FT.unpack_from(raw, end - 12)
            if t_ino == 0 and t_rec == 12 and t_nl == 0 and t_ft == ef.DIRENT_TAIL_FT:
                want = crc32c_raw(self._inode_seed(inode.ino, inode.generation), raw[: end - 12])
                if want != _U32.unpack_from(raw, end - 4)[0]:
                    raise CorruptFilesystem(f"Directory block {block} of inode {inode.ino} fails its checksum.")
        # The hot loop of every listing: locals only, one unpack per entry, checks batched per block.
        pos = 0
        filetype = self.filetype
        unpack = ef.DIRENT_FT.unpack_from if filetype else _unpack_dirent_noft
        types = ef.DIR_FILE_TYPES
        big = self.block_size >= 65536
        names: list[bytes] = []
        max_ino = 0
        append = out.append
        while pos + 8 <= end:
            ino, rec_len, name_len, ftype = unpack(raw, pos)
            if big and rec_len in (0, 65535):
                rec_len = 65536
            if rec_len < 8 or rec_len & 3 or pos + rec_len > end or (ino and 8 + name_len > rec_len):
                raise CorruptFilesystem(
                    f"Directory inode {inode.ino} has a damaged entry at byte {pos} of block {block} "
                    f"(rec_len {rec_len}, name length {name_len})."
                )
            if ino:
                name = raw[pos + 8 : pos + 8 + name_len]
                names.append(name)
                if ino > max_ino:
                    max_ino = ino
                append(DirEntry(name, ino, types.get(ftype) if filetype else None))
            pos += rec_len
        if names:
            joined = b"/".join(names)
            if b"\0" in joined or joined.count(b"/") != len(names) - 1 or b"//" in b"/" + joined + b"/":
                bad = next(n for n in names if not n or b"/" in n or b"\0" in n)
                raise CorruptFilesystem(f"Directory inode {inode.ino} holds an entry with an invalid name {bad!r}.")
            if max_ino > self.inodes_count:
                raise CorruptFilesystem(f"Directory inode {inode.ino} names inode {max_ino}, past the inode count.")

    # ------------------------------------------------------------------ paths

    def lookup(self, path: str, *, follow: bool = True) -> Inode:
        """The inode at absolute PATH (symlinks followed inside the guest; FOLLOW: the last one too)."""
        from qsnap.core.errors import GuestPathNotFound

        parts = [p for p in path.split("/") if p and p != "."]
        root = self.inode(ef.ROOT_INO)
        if not root.is_dir:
            raise CorruptFilesystem(f"The root inode ({ef.ROOT_INO}) is not a directory.")
        stack: list[Inode] = [root]
        hops = 0
        walked: list[str] = []
        while parts:
            part = parts.pop(0)
            current = stack[-1]
            if part == "..":
                if len(stack) > 1:
                    stack.pop()
                    walked.pop()
                continue
            if not current.is_dir:
                raise GuestPathNotFound(f"/{'/'.join(walked)} is not a directory (looking up {path}).")
            found = None
            wanted = part.encode("utf-8", "surrogateescape")
            for entry in self.dir_entries(current):
                if entry.name == wanted and entry.name not in (b".", b".."):
                    found = entry.ino
                    break
            if found is None:
                raise GuestPathNotFound(f"No such file or directory: {path}")
            child = self.inode(found)
            if child.is_symlink and (parts or follow):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise GuestFsError(f"Too many levels of symbolic links resolving {path}.")
                target = self.symlink_target(child).decode("utf-8", "surrogateescape")
                if target.startswith("/"):
                    stack = stack[:1]
                    walked = []
                parts = [p for p in target.split("/") if p and p != "."] + parts
                continue
            stack.append(child)
            walked.append(part)
        return stack[-1]

    # ------------------------------------------------------------------ bitmaps and free space

    def group_range(self, group: int) -> tuple[int, int]:
        start = self.first_data_block + group * self.blocks_per_group
        return start, min(self.blocks_count, start + self.blocks_per_group)

    def group_metadata_blocks(self, group: int) -> list[tuple[int, int]]:
        """(first block, count) of the superblock backup, group descriptors and reserved GDT blocks in GROUP."""
        start, _ = self.group_range(group)
        out = []
        if self.group_has_super(group):
            per_block = self.block_size // self.desc_size
            desc_blocks = (self.group_count + per_block - 1) // per_block
            n = 1  # the superblock (block 0 also holds the boot sector on 1 KiB filesystems)
            if self.incompat & ef.INCOMPAT_META_BG:
                n += min(desc_blocks, self.sb["first_meta_bg"])
            else:
                n += desc_blocks
            n += self.sb["reserved_gdt_blocks"]
            out.append((start, n))
        if self.incompat & ef.INCOMPAT_META_BG:
            per_block = self.block_size // self.desc_size
            index = group // per_block
            if index >= self.sb["first_meta_bg"]:
                pos = group % per_block
                if pos in (0, 1) or pos == per_block - 1:
                    out.append((start + (1 if self.group_has_super(group) else 0), 1))
        return out

    def used_blocks_bitmap(self, group: int) -> bytes:
        """GROUP's block bitmap as bytes, one bit per cluster (BLOCK_UNINIT: built from the metadata)."""
        desc = self.groups[group]
        start, end = self.group_range(group)
        clusters = (end - start + self.cluster_ratio - 1) // self.cluster_ratio
        if desc.flags & ef.BG_BLOCK_UNINIT and self.ro_compat & (ef.RO_COMPAT_GDT_CSUM | ef.RO_COMPAT_METADATA_CSUM):
            bits = bytearray((clusters + 7) // 8)
            marks = list(self.group_metadata_blocks(group))
            for g in self.groups:
                for b, n in ((g.block_bitmap, 1), (g.inode_bitmap, 1),
                             (g.inode_table, (self.inodes_per_group * self.inode_size + self.block_size - 1)
                              // self.block_size)):
                    marks.append((b, n))
            for b, n in marks:
                for blk in range(max(b, start), min(b + n, end)):
                    c = (blk - start) // self.cluster_ratio
                    bits[c >> 3] |= 1 << (c & 7)
            return bytes(bits)
        raw = self.read_blocks(desc.block_bitmap, 1, f"block bitmap of group {group}")
        return raw[: (clusters + 7) // 8]

    def free_ranges(self) -> Iterator[tuple[int, int]]:
        """(byte offset, length) ranges of the filesystem that its block bitmaps mark free, merged.

        For ``compact --sparsify``: only trust it on a filesystem whose journal needs no recovery.
        """
        if self.needs_recovery:
            raise GuestFsError("The filesystem's journal needs recovery: its bitmaps may be out of date.",
                               hint="boot the guest once (or use a snapshot taken after a clean shutdown or sync)")
        bs = self.block_size
        ratio = self.cluster_ratio
        pending: list[int] = []
        for group in range(self.group_count):
            start, end = self.group_range(group)
            bits = self.used_blocks_bitmap(group)
            nclusters = (end - start + ratio - 1) // ratio
            c = 0
            while c < nclusters:
                byte = bits[c >> 3]
                if byte == 0xFF and not c & 7:
                    c += 8
                    continue
                if byte == 0 and not c & 7 and c + 8 <= nclusters:
                    run_start, run_len = c, 8
                elif not byte >> (c & 7) & 1:
                    run_start, run_len = c, 1
                else:
                    c += 1
                    continue
                c += run_len
                first = start + run_start * ratio
                last = min(end, first + run_len * ratio)
                offset, length = first * bs, (last - first) * bs
                if pending and pending[0] + pending[1] == offset:
                    pending[1] += length
                else:
                    if pending:
                        yield pending[0], pending[1]
                    pending = [offset, length]
        if pending:
            yield pending[0], pending[1]


def _unpack_dirent_noft(raw: bytes, pos: int) -> tuple[int, int, int, int]:
    """A dirent without the filetype feature (16-bit name length), as four values like DIRENT_FT's."""
    ino, rec_len, name_len = ef.DIRENT.unpack_from(raw, pos)
    return ino, rec_len, name_len, 0


def _zeros(n: int) -> Iterator[bytes]:
    step = 8 << 20
    while n > 0:
        k = min(step, n)
        yield bytes(k)
        n -= k
