"""A read-only check of a snapshot's guest filesystem by the real ``e2fsck -fn``, without root.

e2fsck needs a file or a block device. Instead of exporting the whole partition (the guide's
qemu-nbd and a kernel module, as root) qsnap writes a sparse temporary file of the partition's
size holding only what e2fsck reads: superblocks and group descriptors, bitmaps, inode tables,
every directory, symlink, extended attribute and translator block, the block maps (indirect
and extent blocks) of every file, and all blocks of the reserved inodes (the journal). File
contents, which e2fsck never reads, stay holes. Then ``e2fsck -f -n`` checks it: its verdict
and messages are the real tool's. The tests compare it with e2fsck on a full copy.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsnap.core.errors import CorruptFilesystem, GuestFsError
from qsnap.guestfs import extformat as ef
from qsnap.guestfs.ext import ExtFilesystem
from qsnap.service.guestfiles import open_state

#: e2fsck's own progress and summary lines, not findings.
_ROUTINE = (
    "Pass 1:", "Pass 2:", "Pass 3:", "Pass 4:", "Pass 5:", "e2fsck ", "Warning: skipping journal recovery",
)


@dataclass
class FsckResult:
    image: str
    state: str
    partition: int
    kind: str
    clean: bool
    exit_code: int  # e2fsck's
    findings: list[str]
    output: str
    metadata_bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "state": self.state, "partition": self.partition, "filesystem": self.kind,
                "clean": self.clean, "e2fsck_exit_code": self.exit_code, "findings": self.findings,
                "output": self.output, "metadata_bytes": self.metadata_bytes, "seconds": round(self.seconds, 3),
                "warnings": self.warnings}


def metadata_blocks(fs: ExtFilesystem) -> list[tuple[int, int]]:
    """(first block, count) of everything e2fsck reads, merged; file contents left out."""
    spans: list[tuple[int, int]] = [(0, fs.first_data_block + 1)]
    table_blocks = (fs.inodes_per_group * fs.inode_size + fs.block_size - 1) // fs.block_size
    for group, desc in enumerate(fs.groups):
        spans.extend(fs.group_metadata_blocks(group))
        spans.append((desc.block_bitmap, 1))
        spans.append((desc.inode_bitmap, 1))
        spans.append((desc.inode_table, table_blocks))
    for group, desc in enumerate(fs.groups):
        if desc.flags & ef.BG_INODE_UNINIT and fs.ro_compat & (ef.RO_COMPAT_GDT_CSUM | ef.RO_COMPAT_METADATA_CSUM):
            continue
        first = group * fs.inodes_per_group + 1
        for ino in range(first, min(first + fs.inodes_per_group, fs.inodes_count + 1)):
            try:
                inode = fs.inode(ino)
            except (CorruptFilesystem, GuestFsError):
                continue
            if not inode.links and ino >= fs.first_ino:
                continue
            try:
                whole = inode.is_dir or inode.is_symlink or ino < fs.first_ino
                if whole:
                    spans.extend((r.physical, r.length) for r in fs.runs(inode) if r.physical)
                spans.extend((b, 1) for b in fs.metadata_map_blocks(inode))
            except (CorruptFilesystem, GuestFsError):
                pass  # e2fsck reads what it can and reports the damage itself
            for block in (inode.file_acl, inode.translator_block):
                if block and block < fs.blocks_count:
                    spans.append((block, 1))
    spans.sort()
    merged: list[list[int]] = []
    for start, n in spans:
        start, end = max(0, start), min(fs.blocks_count, start + n)
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e - s) for s, e in merged]


def write_metadata_image(fs: ExtFilesystem, size: int, out: str) -> int:
    """Write the sparse metadata image of FS (SIZE bytes) to OUT; returns the bytes written."""
    bs = fs.block_size
    written = 0
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        for start, n in metadata_blocks(fs):
            pos = 0
            while pos < n:
                k = min(2048, n - pos)
                data = fs.read_blocks(start + pos, k)
                if data.count(0) != len(data):
                    os.pwrite(fd, data, (start + pos) * bs)
                    written += len(data)
                pos += k
    finally:
        os.close(fd)
    return written


def fsck(image: str | os.PathLike[str], target: str, *, snapshot_id: str | None = None,
         partition: int | None = None, tmpdir: str | None = None) -> FsckResult:
    """Run ``e2fsck -f -n`` on the filesystem of TARGET (a snapshot or @current)."""
    from qsnap.core import proc

    started = time.monotonic()
    state, _ = open_state(image, target, snapshot_id=snapshot_id, partition=partition, need_fs=False)
    with state:
        from qsnap.guestfs.device import CachedDevice, Slice
        from qsnap.guestfs.partitions import choose_partition

        part = choose_partition(state.partitions, partition)
        try:
            fs = ExtFilesystem(CachedDevice(Slice(state.disk.device, part.start, part.size)), verify_checksums=False)
        except CorruptFilesystem as exc:
            return FsckResult(str(state.image_path), state.label, part.number, "ext", False, 4, [str(exc)], "",
                              0, time.monotonic() - started, state.warnings)
        with tempfile.TemporaryDirectory(prefix="qsnap-fsck-", dir=tmpdir) as tmp:
            out = str(Path(tmp) / "metadata.img")
            written = write_metadata_image(fs, part.size, out)
            env = {**os.environ, "E2FSCK_CONFIG": "/dev/null", "LC_ALL": "C"}
            result = proc.run([find_e2fsck(), "-f", "-n", out], check=False, env=env)
        text = (result.stdout + result.stderr).replace(out, f"{state.label}:partition{part.number}")
        findings = [line.strip() for line in text.splitlines()
                    if line.strip() and not line.startswith(_ROUTINE) and not _is_summary(line)]
        clean = result.returncode == 0
        # e2fsck's exit status is a bit mask: 4 "errors left uncorrected", 8 "operational error".
        # 12 is an abort on damage (e.g. a map past the end): damage, not a failure to check.
        if result.returncode & 8 and not result.returncode & 4:
            raise GuestFsError(f"e2fsck could not check the filesystem (exit {result.returncode}): "
                               f"{findings[0] if findings else 'no output'}")
        return FsckResult(str(state.image_path), state.label, part.number, fs.kind, clean, result.returncode,
                          findings, text, written, time.monotonic() - started, state.warnings)


def find_e2fsck() -> str:
    """e2fsck lives in /sbin, which a user's PATH often lacks."""
    import shutil

    from qsnap.core.proc import missing_program

    for candidate in (shutil.which("e2fsck"), "/usr/sbin/e2fsck", "/sbin/e2fsck"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise missing_program("e2fsck")


def _is_summary(line: str) -> bool:
    # "NAME: 11/16384 files (0.0% non-contiguous), 1234/65536 blocks"
    return " files (" in line and "non-contiguous" in line
