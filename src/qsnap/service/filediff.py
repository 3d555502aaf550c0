"""Which guest files changed between two states of an image (``qsnap diff --files``).

The block diff (:mod:`qsnap.service.diff`: equal L1/L2 entries are unchanged without reading
data) says which filesystem blocks changed; only those are looked at twice:

1. inodes: only inode-table blocks that changed are read in both states and compared slot by slot;
2. directories: both trees are walked from PATH, but a directory whose inode and blocks did not
   change is decoded once (its entries are the same on both sides);
3. content: a file whose inode changed is compared by its block map first, then by its bytes
   where blocks changed. Changed blocks that neither metadata nor a changed inode explains
   (a raw write under the filesystem) make qsnap check every file's blocks against them;
4. renames: a path gone from A and a path new in B holding the same inode (and generation).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsnap.core.errors import CorruptImage, GuestFsError
from qsnap.core.models import Snapshot
from qsnap.guestfs import extformat as ef
from qsnap.guestfs.device import CachedDevice, Qcow2Device, Slice
from qsnap.guestfs.ext import BlockCache, DirEntry, ExtFilesystem, Inode
from qsnap.guestfs.partitions import choose_partition, read_partitions
from qsnap.service.guestfiles import RUNNING_WARNING, decode_name, join, normalize
from qsnap.service.image import check_image_file
from qsnap.service.inspection import CURRENT, _pick


@dataclass
class Change:
    path: str
    kind: str  # added, removed, modified, renamed
    type: str
    changes: tuple[str, ...] = ()  # modified: content, size, mode, owner, mtime, type, target, translator
    renamed_from: str | None = None
    ino: int = 0  # the inode on its side (B for added, A for removed): renames pair them without a lookup

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "kind": self.kind, "type": self.type}
        if self.changes:
            out["changes"] = list(self.changes)
        if self.renamed_from is not None:
            out["from"] = self.renamed_from
        return out


@dataclass
class FileDiffReport:
    image: str
    a: str
    b: str
    path: str
    partition: int
    changes: list[Change] = field(default_factory=list)
    changed_blocks: int = 0
    inodes_compared: int = 0
    directories_decoded: int = 0
    full_scan: bool = False
    warnings: list[str] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for c in self.changes if c.kind == kind)

    @property
    def summary(self) -> str:
        if not self.changes:
            return f"No file under {self.path} differs between {self.a} and {self.b}."
        return (f"{self.count('added')} added, {self.count('removed')} removed, {self.count('modified')} modified, "
                f"{self.count('renamed')} renamed under {self.path} between {self.a} and {self.b}.")

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "a": self.a, "b": self.b, "path": self.path, "partition": self.partition,
                "changes": [c.to_json() for c in self.changes],
                "added": self.count("added"), "removed": self.count("removed"),
                "modified": self.count("modified"), "renamed": self.count("renamed"),
                "identical": not self.changes, "summary": self.summary, "changed_blocks": self.changed_blocks,
                "inodes_compared": self.inodes_compared, "directories_decoded": self.directories_decoded,
                "full_scan": self.full_scan, "warnings": self.warnings}


class BlockSet:
    """Sorted, merged block intervals with a fast overlap test."""

    def __init__(self, intervals: list[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for start, end in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [m[0] for m in merged]
        self.ends = [m[1] for m in merged]

    def __bool__(self) -> bool:
        return bool(self.starts)

    def count(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends, strict=True))

    def touches(self, start: int, length: int) -> bool:
        i = bisect.bisect_right(self.starts, start + length - 1) - 1
        return i >= 0 and self.ends[i] > start

    def blocks(self) -> Iterator[int]:
        for s, e in zip(self.starts, self.ends, strict=True):
            yield from range(s, e)


@dataclass
class _Side:
    fs: ExtFilesystem
    inodes: dict[int, Inode] = field(default_factory=dict)

    def inode(self, ino: int) -> Inode:
        found = self.inodes.get(ino)
        if found is None:
            found = self.inodes[ino] = self.fs.inode(ino)
        return found


def diff_files(image: str | os.PathLike[str], a: str, b: str, path: str = "/", *, a_id: str | None = None,
               b_id: str | None = None, partition: int | None = None) -> FileDiffReport:
    """Files added, removed, modified and renamed under PATH between states A and B."""
    from qsnap.qcow2 import open_image
    from qsnap.service.diff import diff_image
    from qsnap.service.image import image_held

    image_path = check_image_file(Path(image).absolute())
    with open_image(image_path) as reader:
        snapshots = reader.snapshots()
        sa, sb = _pick(snapshots, a, a_id), _pick(snapshots, b, b_id)
        fa, part = _open_fs(reader, sa, partition)
        fb, part_b = _open_fs(reader, sb, partition)
        if (part.start, part.size) != (part_b.start, part_b.size):
            raise GuestFsError(f"Partition {part.number} moved or changed size between {a} and {b}.")
        report = FileDiffReport(str(image_path), _label(sa), _label(sb), normalize(path), part.number)
        if (sa is None or sb is None) and image_held(image_path):
            report.warnings.append(RUNNING_WARNING)
        blocks = diff_image(reader, sa, sb)
        bs = fb.block_size
        intervals = []
        for offset, length in blocks.ranges:
            lo, hi = max(offset, part.start), min(offset + length, part.start + part.size)
            if lo < hi:
                intervals.append(((lo - part.start) // bs, (hi - part.start + bs - 1) // bs))
        changed = BlockSet(intervals)
        report.changed_blocks = changed.count()
        if not changed:
            return report
        _FileDiff(_Side(fa), _Side(fb), changed, report).run()
        return report


def _label(s: Snapshot | None) -> str:
    return s.name if s is not None else CURRENT


def _open_fs(reader: Any, snap: Snapshot | None, number: int | None) -> tuple[ExtFilesystem, Any]:
    device = CachedDevice(Qcow2Device(reader, snap))
    part = choose_partition(read_partitions(device), number)
    return ExtFilesystem(CachedDevice(Slice(device.device, part.start, part.size))), part


class _FileDiff:
    def __init__(self, a: _Side, b: _Side, changed: BlockSet, report: FileDiffReport) -> None:
        self.a, self.b, self.changed, self.report = a, b, changed, report
        self.changed_inodes: set[int] = set()
        self.shared = BlockCache(lambda block: not changed.touches(block, 1))
        self.explained: list[tuple[int, int]] = []

    # -- 1. inodes whose table slots changed
    def find_changed_inodes(self) -> None:
        fs = self.b.fs
        per_block = fs.block_size // fs.inode_size
        table_blocks = (fs.inodes_per_group * fs.inode_size + fs.block_size - 1) // fs.block_size
        for group, desc in enumerate(fs.groups):
            start = desc.inode_table
            self.explained.append((start, start + table_blocks))
            if not self.changed.touches(start, table_blocks):
                continue
            desc_a = self.a.fs.groups[group]
            for k in range(table_blocks):
                if not self.changed.touches(start + k, 1):
                    continue
                raw_b = fs.read_blocks(start + k, 1, "inode table block")
                raw_a = self.a.fs.read_blocks(desc_a.inode_table + k, 1, "inode table block")
                for slot in range(per_block):
                    lo, hi = slot * fs.inode_size, (slot + 1) * fs.inode_size
                    if raw_a[lo:hi] != raw_b[lo:hi]:
                        ino = group * fs.inodes_per_group + k * per_block + slot + 1
                        if ino <= fs.inodes_count:
                            self.changed_inodes.add(ino)
        self.report.inodes_compared = len(self.changed_inodes)

    def run(self) -> None:
        self.find_changed_inodes()
        self.explain_metadata()
        root = self.report.path
        ia = self._lookup(self.a, root)
        ib = self._lookup(self.b, root)
        if ia is None and ib is None:
            from qsnap.core.errors import GuestPathNotFound

            raise GuestPathNotFound(f"No such file or directory in either state: {root}")
        self.compare(root, ia, ib)
        self.find_renames()
        if self.unexplained():
            self.report.full_scan = True
            self.full_scan()
        self.report.changes.sort(key=lambda c: (c.path, c.kind))

    def _lookup(self, side: _Side, path: str) -> int | None:
        from qsnap.core.errors import GuestPathNotFound

        try:
            return side.fs.lookup(path, follow=False).ino
        except GuestPathNotFound:
            return None

    def explain_metadata(self) -> None:
        for fs in (self.a.fs, self.b.fs):
            for group, desc in enumerate(fs.groups):
                self.explained.append((desc.block_bitmap, desc.block_bitmap + 1))
                self.explained.append((desc.inode_bitmap, desc.inode_bitmap + 1))
                for start, n in fs.group_metadata_blocks(group):
                    self.explained.append((start, start + n))
            self.explained.append((0, fs.first_data_block + 1))
        for ino in range(1, self.b.fs.first_ino):  # reserved inodes: the journal, resize inode...
            for side in (self.a, self.b):
                try:
                    self._explain_inode(side, side.inode(ino))
                except (GuestFsError, CorruptImage, ValueError):
                    continue
        for ino in self.changed_inodes:
            for side in (self.a, self.b):
                try:
                    self._explain_inode(side, side.inode(ino))
                except (GuestFsError, CorruptImage, ValueError):
                    continue

    def _explain_inode(self, side: _Side, inode: Inode) -> None:
        fs = side.fs
        if not inode.mode and not inode.links:
            return
        for run in fs.runs(inode):
            self.explained.append((run.physical, run.physical + run.length))
        for block in fs.metadata_map_blocks(inode):
            self.explained.append((block, block + 1))
        if inode.file_acl:
            self.explained.append((inode.file_acl, inode.file_acl + 1))
        if inode.translator_block:
            self.explained.append((inode.translator_block, inode.translator_block + 1))

    # -- 2. the trees
    def entries(self, side: _Side, inode: Inode) -> dict[bytes, DirEntry]:
        self.report.directories_decoded += 1
        self._explain_inode(side, inode)  # its blocks are compared here, whatever its inode says
        return {e.name: e for e in side.fs.dir_entries(inode, self.shared) if e.name not in (b".", b"..")}

    def dir_unchanged(self, ino: int, inode: Inode) -> bool:
        if ino in self.changed_inodes:
            return False
        if inode.flags & ef.FL_INLINE_DATA:
            return True
        fs = self.b.fs
        for run in fs.runs(inode):
            if self.changed.touches(run.physical, run.length):
                return False
        return all(not self.changed.touches(b, 1) for b in fs.metadata_map_blocks(inode))

    def compare(self, root: str, root_a: int | None, root_b: int | None) -> None:
        # (path, inode in A, inode in B, type from the directory entry when the filesystem records it)
        stack: list[tuple[str, int | None, int | None, str | None]] = [(root, root_a, root_b, None)]
        seen_a: set[int] = set()
        seen_b: set[int] = set()
        while stack:
            path, ia, ib, hint = stack.pop()
            if ia is None:
                assert ib is not None
                self.added_tree(path, ib)
                continue
            if ib is None:
                self.removed_tree(path, ia)
                continue
            if ia == ib and ia not in self.changed_inodes and hint is not None and hint != "dir":
                continue  # the same, unchanged inode: nothing to read (a raw write is the full scan's job)
            node_b = self.b.inode(ib)
            node_a = node_b if ia == ib and ia not in self.changed_inodes else self.a.inode(ia)
            self.compare_nodes(path, node_a, node_b)
            if not (node_a.is_dir and node_b.is_dir):
                continue
            if ia in seen_a or ib in seen_b:
                from qsnap.core.errors import CorruptFilesystem

                raise CorruptFilesystem(f"Directory {path} appears twice while walking the tree: a loop.")
            seen_a.add(ia)
            seen_b.add(ib)
            entries_b = self.entries(self.b, node_b)
            same = ia == ib and self.dir_unchanged(ib, node_b)
            if same:  # one decoded directory serves both sides; unchanged files need no visit at all
                changed = self.changed_inodes
                for name, entry in sorted(entries_b.items(), reverse=True):
                    if entry.file_type not in (None, "dir") and entry.ino not in changed:
                        continue
                    stack.append((join(path, decode_name(name)), entry.ino, entry.ino, entry.file_type))
                continue
            entries_a = self.entries(self.a, node_a)
            changed = self.changed_inodes
            for name in sorted(set(entries_a) | set(entries_b), reverse=True):
                ea, eb = entries_a.get(name), entries_b.get(name)
                kind = eb.file_type if eb is not None and ea is not None and ea.file_type == eb.file_type else None
                if kind not in (None, "dir") and ea.ino == eb.ino and eb.ino not in changed:  # type: ignore[union-attr]
                    continue  # the same unchanged file on both sides
                stack.append((join(path, decode_name(name)), ea.ino if ea else None, eb.ino if eb else None, kind))

    def compare_nodes(self, path: str, na: Inode, nb: Inode) -> None:
        if na.ino == nb.ino and na.ino not in self.changed_inodes:
            return
        changes = []
        if na.file_type != nb.file_type:
            changes.append("type")
        else:
            if na.is_reg and self.content_differs(na, nb):
                changes.append("content")
            if na.size != nb.size and not na.is_dir:
                changes.append("size")
            if na.is_symlink and self.a.fs.symlink_target(na) != self.b.fs.symlink_target(nb):
                changes.append("target")
        if na.permissions != nb.permissions or (na.mode >> 16) != (nb.mode >> 16):
            changes.append("mode")
        if (na.uid, na.gid) != (nb.uid, nb.gid):
            changes.append("owner")
        if (na.mtime, na.mtime_ns) != (nb.mtime, nb.mtime_ns) and not na.is_dir:
            changes.append("mtime")
        if self.a.fs.translator(na) != self.b.fs.translator(nb):
            changes.append("translator")
        if na.ino != nb.ino and not changes:
            changes.append("inode")
        if changes:
            self.report.changes.append(Change(path, "modified", nb.file_type, tuple(changes)))

    def content_differs(self, na: Inode, nb: Inode) -> bool:
        if na.size != nb.size:
            return True
        fa, fb = self.a.fs, self.b.fs
        if not (na.flags | nb.flags) & ef.FL_INLINE_DATA:
            runs_a, runs_b = list(fa.runs(na)), list(fb.runs(nb))
            if runs_a == runs_b and not any(self.changed.touches(r.physical, r.length) for r in runs_b
                                            if not r.unwritten):
                return False
        return _stream_differs(fa.iter_data(na), fb.iter_data(nb))

    def added_tree(self, path: str, ino: int) -> None:
        for sub, inode in self._subtree(self.b, path, ino):
            self.report.changes.append(Change(sub, "added", inode.file_type, ino=inode.ino))

    def removed_tree(self, path: str, ino: int) -> None:
        for sub, inode in self._subtree(self.a, path, ino):
            self.report.changes.append(Change(sub, "removed", inode.file_type, ino=inode.ino))

    def _subtree(self, side: _Side, path: str, ino: int) -> Iterator[tuple[str, Inode]]:
        stack = [(path, ino)]
        seen: set[int] = set()
        while stack:
            p, i = stack.pop()
            inode = side.inode(i)
            yield p, inode
            if inode.is_dir:
                if i in seen:
                    from qsnap.core.errors import CorruptFilesystem

                    raise CorruptFilesystem(f"Directory {p} appears twice while walking the tree: a loop.")
                seen.add(i)
                for name, entry in sorted(self.entries(side, inode).items(), reverse=True):
                    stack.append((join(p, decode_name(name)), entry.ino))

    # -- 4. renames
    def find_renames(self) -> None:
        removed: dict[int, Change] = {}
        for c in self.report.changes:
            if c.kind == "removed":
                removed.setdefault(c.ino, c)
        if not removed:
            return
        kept: list[Change] = []
        renamed_from: dict[str, Change] = {}
        for c in self.report.changes:
            if c.kind != "added":
                continue
            ino = c.ino
            old = removed.get(ino)
            if old is not None and old.path not in renamed_from and \
                    _same_file(self.a.inode(ino), self.b.inode(ino)):
                renamed_from[old.path] = c
        old_of = {id(new): old_path for old_path, new in renamed_from.items()}
        for c in self.report.changes:
            if c.kind == "removed" and c.path in renamed_from:
                continue
            if c.kind == "added" and id(c) in old_of:
                kept.append(Change(c.path, "renamed", c.type, (), old_of[id(c)], c.ino))
                continue
            kept.append(c)
        self.report.changes = kept

    # -- 3. changed blocks nothing explains: check every file's blocks
    def unexplained(self) -> bool:
        explained = BlockSet(self.explained)
        fa, fb = self.a.fs, self.b.fs
        for start, end in zip(self.changed.starts, self.changed.ends, strict=True):
            for block in range(start, end):
                if explained.touches(block, 1):
                    continue
                if _in_use(fa, block) or _in_use(fb, block):
                    return True
        return False

    def full_scan(self) -> None:
        reported = {c.path for c in self.report.changes}
        root = self._lookup(self.b, self.report.path)
        if root is None:
            return
        files = {p: inode.ino for p, inode in self._subtree(self.b, self.report.path, root) if inode.is_reg}
        for path, ino in sorted(files.items()):
            if path in reported:
                continue
            nb = self.b.inode(ino)
            if not nb.is_reg:
                continue
            try:
                na = self.a.inode(ino)
            except GuestFsError:
                continue
            if na.is_reg and self.content_differs(na, nb):
                self.report.changes.append(Change(path, "modified", nb.file_type, ("content",)))


def _same_file(na: Inode, nb: Inode) -> bool:
    """The same inode number holds the same file (not a freed and reused inode): the kernel gives a
    reused inode a new generation; the creation time, where the inode has one, must match too."""
    return na.generation == nb.generation and na.file_type == nb.file_type and na.crtime == nb.crtime


def _in_use(fs: ExtFilesystem, block: int) -> bool:
    if block < fs.first_data_block or block >= fs.blocks_count:
        return False
    group = (block - fs.first_data_block) // fs.blocks_per_group
    bits = fs.used_blocks_bitmap(group)
    c = (block - fs.group_range(group)[0]) // fs.cluster_ratio
    return bool(bits[c >> 3] >> (c & 7) & 1)


def _stream_differs(xs: Iterator[bytes], ys: Iterator[bytes]) -> bool:
    buf_a = b""
    buf_b = b""
    for chunk in xs:
        buf_a += chunk
        while len(buf_b) < len(buf_a):
            nxt = next(ys, None)
            if nxt is None:
                return True
            buf_b += nxt
        n = min(len(buf_a), len(buf_b))
        if buf_a[:n] != buf_b[:n]:
            return True
        buf_a, buf_b = buf_a[n:], buf_b[n:]
    rest = buf_b + b"".join(ys)
    return bool(buf_a) or bool(rest)


def content_diff(image: str | os.PathLike[str], a: str, b: str, path: str, *, a_id: str | None = None,
                 b_id: str | None = None, partition: int | None = None, limit: int = 16 << 20) -> list[str]:
    """A unified diff of text file PATH between A and B (lines, without trailing newlines)."""
    import difflib

    from qsnap.core.errors import GuestPathNotFound
    from qsnap.qcow2 import open_image

    image_path = check_image_file(Path(image).absolute())
    with open_image(image_path) as reader:
        snapshots = reader.snapshots()
        texts: list[str | None] = []
        for name, sid in ((a, a_id), (b, b_id)):
            snap = _pick(snapshots, name, sid)
            fs, _ = _open_fs(reader, snap, partition)
            try:
                inode = fs.lookup(normalize(path), follow=True)
            except GuestPathNotFound:
                texts.append(None)
                continue
            if not inode.is_reg:
                raise GuestFsError(f"{path} is a {inode.file_type} in {_label(snap)}, not a regular file.")
            data = fs.read_file(inode, limit=limit)
            if b"\0" in data:
                raise GuestFsError(f"{path} is a binary file; --content shows text files only.")
            texts.append(data.decode("utf-8", "replace"))
        if texts[0] is None and texts[1] is None:
            raise GuestPathNotFound(f"No such file in either state: {path}")
        la = (texts[0] or "").splitlines()
        lb = (texts[1] or "").splitlines()
        return list(difflib.unified_diff(la, lb, fromfile=f"{a}:{normalize(path)}", tofile=f"{b}:{normalize(path)}",
                                         lineterm=""))
