"""Building guest filesystems and disks with the real tools, and reading them back with the oracles.

- :func:`mkfs` (``mke2fs -d``), :func:`debugfs_w` (``debugfs -w -f``), :func:`debugfs_r`;
- :func:`make_disk`: a raw disk holding a filesystem image bare, in an MBR partition (primary or
  logical inside an extended one) or in a GPT partition (``sfdisk`` / ``sgdisk``);
- :func:`to_qcow2` / :func:`update_qcow2`: the raw disk as a qcow2 (``qemu-img convert``) with
  snapshots (``qemu-img snapshot -c``);
- oracles: :func:`debugfs_tree` (``debugfs ls -p``, level by level), :func:`rdump`
  (``debugfs rdump``) and :func:`host_tree` (a walk of a host directory: types, modes, sizes,
  symlink targets, content hashes).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECTOR = 512
MIB = 1 << 20


def sh(*argv: Any, input: bytes | None = None, check: bool = True,
       timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run a real tool (argv, no shell); fail the test with its output when it fails."""
    result = subprocess.run([str(a) for a in argv], input=input, capture_output=True, timeout=timeout,
                            stdin=None if input is not None else subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {result.returncode}: "
                             f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}")
    return result


# ------------------------------------------------------------------ filesystems

#: mke2fs options of each filesystem variant the issue names.
VARIANTS: dict[str, list[str]] = {
    "hurd-1k": ["-t", "ext2", "-o", "hurd", "-b", "1024"],
    "hurd-4k": ["-t", "ext2", "-o", "hurd", "-b", "4096"],
    "ext2-1k": ["-t", "ext2", "-b", "1024"],
    "ext3-4k": ["-t", "ext3", "-b", "4096"],
    "ext4-1k": ["-t", "ext4", "-b", "1024"],
    "ext4-4k": ["-t", "ext4", "-b", "4096"],
    "ext4-nojournal": ["-t", "ext4", "-O", "^has_journal"],
    "ext4-inline": ["-t", "ext4", "-O", "inline_data"],
    "ext4-64bit-csum": ["-t", "ext4", "-O", "64bit,metadata_csum", "-b", "4096"],
}


def mkfs(path: Path, options: Sequence[str], size: str = "24M", src: Path | None = None,
         extra: Sequence[str] = ()) -> Path:
    """``mke2fs -q -F OPTIONS [-d SRC] PATH SIZE`` (a fixed hash seed and UUID: reproducible)."""
    argv = ["mke2fs", "-q", "-F", *options, *extra, "-E", "hash_seed=8ef4c3e2-4b63-4d2a-9cbb-96a1b8fd0c54",
            "-U", "1c0e4f52-5b7f-4e1c-9e3c-25b1b7c5a0aa"]
    if src is not None:
        argv += ["-d", str(src)]
    sh(*argv, path, size)
    return path


def debugfs_w(image: Path, commands: Iterable[str]) -> str:
    """Run COMMANDS in ``debugfs -w``; fail when debugfs reports an error for any of them."""
    script = image.parent / f".{image.name}.debugfs"
    script.write_text("\n".join(commands) + "\n")
    try:
        result = sh("debugfs", "-w", "-f", script, image)
    finally:
        script.unlink()
    err = result.stderr.decode(errors="replace")
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
    if lines:
        raise AssertionError(f"debugfs -w on {image}: {err}")
    return result.stdout.decode(errors="replace")


def debugfs_r(image: Path, command: str) -> str:
    """One read-only debugfs request (``debugfs -R``); its stdout."""
    return sh("debugfs", "-R", command, image).stdout.decode("utf-8", "surrogateescape")


def e2fsck(image: Path, *flags: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "E2FSCK_CONFIG": "/dev/null", "LC_ALL": "C"}
    return subprocess.run(["e2fsck", *flags, str(image)], capture_output=True, env=env, stdin=subprocess.DEVNULL,
                          timeout=120)


def fs_block_size(image: Path) -> int:
    for line in debugfs_r(image, "stats").splitlines():
        if line.startswith("Block size:"):
            return int(line.split()[-1])
    raise AssertionError(f"no block size in debugfs stats of {image}")


def first_block(image: Path, guest_path: str) -> int:
    """The physical block holding logical block 0 of GUEST_PATH (debugfs ``bmap``)."""
    return int(debugfs_r(image, f'bmap "{guest_path}" 0').split()[-1])


def inode_number(image: Path, guest_path: str) -> int:
    out = debugfs_r(image, f"stat {guest_path}")
    return int(out.split("Inode:", 1)[1].split()[0])


# ------------------------------------------------------------------ content trees

def fill_tree(root: Path, *, htree_entries: int = 0, deep: int = 25) -> Path:
    """The source tree for ``mke2fs -d``: files of many sizes, a deep tree, hard links, a sparse
    file, short and long symlinks, a fifo, names with spaces and UTF-8, optionally a directory
    with HTREE_ENTRIES empty files (an htree once ``e2fsck -fD`` indexes it)."""
    root.mkdir(parents=True)
    rnd = _Random(7)
    (root / "empty").write_bytes(b"")
    (root / "one").write_bytes(b"1")
    (root / "small.txt").write_bytes(b"a small text file\n")
    (root / "fifty.bin").write_bytes(rnd.bytes(50))
    (root / "page.bin").write_bytes(rnd.bytes(5000))
    (root / "big.bin").write_bytes(rnd.bytes(300 * 1024 + 17))  # past ext2's double-indirect start at 1 KiB
    (root / "with space.txt").write_bytes(b"spaces\n")
    (root / "ünïcødé.txt").write_bytes("ünïcødé\n".encode())
    (root / "mode0600").write_bytes(b"secret\n")
    os.chmod(root / "mode0600", 0o600)
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    (root / "owned").write_bytes(b"owned by 1000:100\n")
    if os.geteuid() == 0:  # otherwise it stays the user's: the tests compare with debugfs either way
        os.chown(root / "owned", 1000, 100)
    with open(root / "sparse.img", "wb") as f:  # 3 MiB with two written bytes: holes everywhere else
        f.truncate(3 * MIB)
        f.seek(MIB)
        f.write(b"x")
        f.seek(3 * MIB - 1)
        f.write(b"y")
    links = root / "links"
    links.mkdir()
    (links / "target.txt").write_bytes(b"target\n")
    os.symlink("target.txt", links / "short")
    os.symlink("/" + "/".join(["long-component-name"] * 6) + "/end", links / "long")  # > 60 bytes: a block
    os.symlink("../small.txt", links / "up")
    os.symlink("dangling-nowhere", links / "dangling")
    os.link(root / "page.bin", links / "page-hardlink")
    os.link(root / "page.bin", root / "page-again.bin")
    os.mkfifo(root / "fifo")
    d = root / "deep"
    for level in range(deep):
        d = d / f"level{level:02d}"
    d.mkdir(parents=True)
    (d / "bottom.txt").write_bytes(b"at the bottom\n")
    (root / "emptydir").mkdir()
    os.chmod(root / "emptydir", 0o750)
    if htree_entries:
        big = root / "htree"
        big.mkdir()
        for i in range(htree_entries):
            (big / f"entry-{i:05d}-{'x' * (i % 23)}").touch()
    return root


class _Random:
    """Reproducible bytes (no dependence on the random module's version)."""

    def __init__(self, seed: int) -> None:
        self.state = hashlib.sha256(str(seed).encode()).digest()

    def bytes(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            self.state = hashlib.sha256(self.state).digest()
            out += self.state
        return bytes(out[:n])


# ------------------------------------------------------------------ disks

@dataclass(frozen=True)
class Layout:
    """Where the filesystem sits on the disk: its partition number for ``--partition`` and offset."""

    kind: str  # bare, mbr, gpt, logical
    number: int  # qsnap's partition number (0: the whole disk)
    offset: int  # bytes


def make_disk(fs_image: Path, disk: Path, kind: str) -> Layout:
    """A raw DISK holding FS_IMAGE: 'bare' (the disk is the filesystem), 'mbr' (partition 1, type
    0x83, bootable), 'logical' (an MBR with a primary
    swap partition, an extended partition and the filesystem in logical partition 6, after
    logical 5), 'gpt' (partition 2 'data', after a small BIOS-boot partition 1)."""
    fs_size = fs_image.stat().st_size
    fs_sectors = fs_size // SECTOR
    if kind == "bare":
        shutil.copyfile(fs_image, disk)
        return Layout(kind, 0, 0)
    if kind == "mbr":
        start = 2048
        script = f"label: dos\nstart={start}, size={fs_sectors}, type=83, bootable\n"
        total, number, tool = start + fs_sectors + 2048, 1, "sfdisk"
    elif kind == "logical":
        # 1: swap (1 MiB); 2: extended; 5: a 1 MiB Linux logical; 6: the filesystem.
        start = 2048 + 2048 + 2048 + 2048 + 2048  # swap, EBR gap, logical 5, EBR gap
        script = ("label: dos\n"
                  "start=2048, size=2048, type=82\n"
                  f"start=4096, size={2048 + 4096 + fs_sectors + 2048}, type=5\n"
                  "start=6144, size=2048, type=83\n"
                  f"start={start}, size={fs_sectors}, type=83\n")
        total, number, tool = start + fs_sectors + 4096, 6, "sfdisk"
    elif kind == "gpt":
        start = 4096
        total, number, tool = start + fs_sectors + 4096, 2, "sgdisk"
        script = ""
    else:
        raise ValueError(kind)
    with open(disk, "wb") as f:
        f.truncate(total * SECTOR)
    if tool == "sfdisk":
        sh("sfdisk", "-q", "--no-reread", "--no-tell-kernel", disk, input=script.encode())
    else:
        sh("sgdisk", "-n", "1:2048:4095", "-t", "1:ef02", "-c", "1:bios",
           "-n", f"2:{start}:{start + fs_sectors - 1}", "-t", "2:8300", "-c", "2:data", disk)
    with open(fs_image, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(start * SECTOR)
        shutil.copyfileobj(src, dst, 4 * MIB)
    return Layout(kind, number, start * SECTOR)


def to_qcow2(raw: Path, qcow2: Path, snapshots: Sequence[str] = ()) -> Path:
    """``qemu-img convert -f raw -O qcow2`` then ``qemu-img snapshot -c`` each of SNAPSHOTS."""
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2)
    for name in snapshots:
        sh("qemu-img", "snapshot", "-c", name, qcow2)
    return qcow2


def update_qcow2(raw: Path, qcow2: Path, snapshot: str | None = None) -> None:
    """Write RAW over QCOW2's current state (``qemu-img convert -n``), then snapshot it."""
    sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", raw, qcow2)
    if snapshot:
        sh("qemu-img", "snapshot", "-c", snapshot, qcow2)


def put_fs(raw_disk: Path, layout: Layout, fs_image: Path) -> None:
    """Copy FS_IMAGE back into RAW_DISK at the layout's offset."""
    with open(fs_image, "rb") as src, open(raw_disk, "r+b") as dst:
        dst.seek(layout.offset)
        shutil.copyfileobj(src, dst, 4 * MIB)


# ------------------------------------------------------------------ oracles

TYPE_NAMES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
              stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFSOCK: "socket"}


@dataclass(frozen=True)
class Entry:
    ino: int
    type: str
    mode: int  # permission bits (0o7777)
    uid: int
    gid: int
    size: int | None  # None for directories (debugfs ls -p leaves it out)


def debugfs_tree(image: Path, top: str = "/") -> dict[str, Entry]:
    """Every entry under TOP as debugfs sees it (``ls -p``, one debugfs run per tree level)."""
    tree: dict[str, Entry] = {}
    level = [top]
    while level:
        script = image.parent / f".{image.name}.ls"
        script.write_text("".join(f'ls -p "{d}"\n' for d in level))
        try:
            out = sh("debugfs", "-f", script, image).stdout.decode("utf-8", "surrogateescape")
        finally:
            script.unlink()
        current = None
        next_level = []
        for line in out.splitlines():
            if line.startswith("debugfs: ls -p "):
                current = line[len('debugfs: ls -p "'):-1]
                continue
            if not line.startswith("/") or current is None:
                continue
            fields = line.split("/")
            # /ino/mode/uid/gid/name/size/  (names cannot hold '/')
            ino, mode, uid, gid, name, size = fields[1:7]
            if name in (".", "..") or ino == "0":  # ino 0: an empty slot (lost+found's spare blocks)
                continue
            m = int(mode, 8)
            path = ("" if current == "/" else current) + "/" + name
            kind = TYPE_NAMES[stat.S_IFMT(m)]
            tree[path] = Entry(int(ino), kind, m & 0o7777, int(uid), int(gid), int(size) if size else None)
            if kind == "dir":
                next_level.append(path)
        level = next_level
    return tree


def rdump(image: Path, out: Path, guest_path: str = "/") -> Path:
    """``debugfs -R 'rdump GUEST_PATH OUT'`` (OUT made first; regular files, dirs, symlinks only)."""
    out.mkdir(parents=True, exist_ok=True)
    sh("debugfs", "-R", f'rdump "{guest_path}" "{out}"', image)
    return out


@dataclass(frozen=True)
class HostEntry:
    type: str
    mode: int
    size: int | None
    sha256: str | None
    target: str | None
    ino: int
    blocks: int


def host_tree(root: Path) -> dict[str, HostEntry]:
    """Every entry under ROOT (a host directory), keyed by '/relative/path'."""
    tree: dict[str, HostEntry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            full = Path(dirpath) / name
            st = full.lstat()
            kind = TYPE_NAMES[stat.S_IFMT(st.st_mode)]
            digest = hashlib.sha256(full.read_bytes()).hexdigest() if kind == "file" else None
            target = os.readlink(full) if kind == "symlink" else None
            rel = "/" + str(full.relative_to(root))
            tree[rel] = HostEntry(kind, stat.S_IMODE(st.st_mode), st.st_size if kind != "dir" else None, digest,
                                  target, st.st_ino, st.st_blocks)
    return tree


def dir_blocks(image: Path, guest_dir: str) -> list[int]:
    """The physical blocks of a (small, linear) directory, from debugfs ``blocks``."""
    return [int(b) for b in debugfs_r(image, f'blocks "{guest_dir}"').split()]


def patch_dirent_name(image: Path, guest_dir: str, old: bytes, new: bytes) -> None:
    """Rename the entry OLD of GUEST_DIR to NEW (same length) by rewriting the name bytes in the
    directory block: what no tool would write ('/', NUL, a duplicate name...). Only for
    filesystems without metadata checksums (the block's checksum is not updated)."""
    assert len(old) == len(new)
    bs = fs_block_size(image)
    with open(image, "r+b") as f:
        for block in dir_blocks(image, guest_dir):
            f.seek(block * bs)
            data = f.read(bs)
            pos = 0
            while pos + 8 <= bs:  # walk the entries: inode(4) rec_len(2) name_len(1) type(1) name
                rec_len = int.from_bytes(data[pos + 4:pos + 6], "little")
                name_len = data[pos + 6]
                if data[pos + 8:pos + 8 + name_len] == old and name_len == len(old):
                    f.seek(block * bs + pos + 8)
                    f.write(new)
                    return
                if rec_len < 8:
                    break
                pos += rec_len
    raise AssertionError(f"no entry {old!r} in {guest_dir}")


def _free_block(fs: Path) -> int:
    out = debugfs_r(fs, "ffb 1 2000")
    return int(out.split("Free blocks found:")[1].split()[0])


def set_translator(fs: Path, guest_path: str, argz: bytes) -> None:
    """A GNU/Hurd passive translator on GUEST_PATH: its block holds a 2-byte little-endian length
    then the argz vector (NUL-separated arguments), as the Hurd's ext2fs writes it."""
    block = _free_block(fs)
    debugfs_w(fs, [f"sif {guest_path} translator {block}", f"setb {block}"])
    bs = fs_block_size(fs)
    with open(fs, "r+b") as f:
        f.seek(block * bs)
        f.write((struct.pack("<H", len(argz)) + argz).ljust(bs, b"\0"))
