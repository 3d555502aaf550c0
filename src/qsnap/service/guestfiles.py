"""Inside a snapshot: partitions, ls, cat and extract of the guest filesystem, without root.

Everything reads through the qcow2 reader and :mod:`qsnap.guestfs`: no qemu-nbd, no kernel module,
no mount, no temporary copy. ``SNAP`` is a snapshot name (or ``--id N``) or ``@current``; the
current state of an image a running VM holds is read as it is on disk, which may be mid-write
(the result says so), unless the guest synced (``qsnap create --sync``) and a snapshot is read.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from qsnap.core.errors import (
    CorruptFilesystem,
    GuestFsError,
    GuestPathNotFound,
    OutputExists,
    QsnapError,
    UsageError,
)
from qsnap.core.models import Snapshot
from qsnap.guestfs import extformat as ef
from qsnap.guestfs.device import CachedDevice, Qcow2Device, Slice
from qsnap.guestfs.ext import DirEntry, ExtFilesystem, Inode
from qsnap.guestfs.partitions import Partition, choose_partition, read_partitions
from qsnap.qcow2.image import Qcow2Image
from qsnap.service.image import check_image_file
from qsnap.service.inspection import CURRENT, _pick

RUNNING_WARNING = ("a running VM holds this image: its current state is read as it is on disk, which may be "
                   "mid-write (snapshot with 'qsnap create --sync' for a consistent view)")


@dataclass
class GuestState:
    """One state of an image opened down to its filesystem. Close it (or use ``with``)."""

    image_path: Path
    label: str  # snapshot name or @current
    snapshot: Snapshot | None
    reader: Qcow2Image
    disk: CachedDevice
    partitions: list[Partition]
    partition: Partition | None = None
    fs: ExtFilesystem | None = None
    warnings: list[str] = field(default_factory=list)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> GuestState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def filesystem(self) -> ExtFilesystem:
        assert self.fs is not None
        return self.fs


def split_target(snapshots: tuple[Snapshot, ...], target: str) -> tuple[str, str]:
    """``SNAP[:PATH]`` -> (snapshot name, path). Names may hold ':' themselves: a whole argument that
    names a snapshot is that snapshot; otherwise the first ':' whose left side names one splits it."""
    names = {s.name for s in snapshots} | {CURRENT}
    if target in names:
        return target, "/"
    for i, ch in enumerate(target):
        if ch == ":" and target[:i] in names:
            return target[:i], target[i + 1 :] or "/"
    if ":" in target:
        return target.split(":", 1)[0], target.split(":", 1)[1] or "/"
    return target, "/"


def open_state(image: str | os.PathLike[str], target: str, *, snapshot_id: str | None = None,
               partition: int | None = None, need_fs: bool = True) -> tuple[GuestState, str]:
    """Open TARGET (``SNAP[:PATH]``) of IMAGE down to its filesystem; returns the state and PATH."""
    from qsnap.qcow2 import open_image
    from qsnap.service.image import image_held

    path = check_image_file(Path(image).absolute())
    reader = open_image(path)
    try:
        snapshots = reader.snapshots()
        name, guest_path = split_target(snapshots, target)
        snap = _pick(snapshots, name, snapshot_id)
        device = CachedDevice(Qcow2Device(reader, snap))
        state = GuestState(path, snap.name if snap else CURRENT, snap, reader, device, read_partitions(device))
        if snap is None and image_held(path):
            state.warnings.append(RUNNING_WARNING)
        if need_fs:
            state.partition = choose_partition(state.partitions, partition)
            part = state.partition
            state.fs = ExtFilesystem(CachedDevice(Slice(device.device, part.start, part.size)))
            if state.fs.needs_recovery:
                state.warnings.append("the filesystem's journal needs recovery (it was not cleanly unmounted): "
                                      "the newest changes may be missing from what qsnap reads")
        return state, guest_path
    except BaseException:
        reader.close()
        raise


# ------------------------------------------------------------------ listing

class FileInfo(NamedTuple):
    """One directory entry, as `ls -l` and `--json` show it (a tuple: listings build 100,000s)."""

    path: str
    name: str
    type: str
    ino: int
    mode: int
    links: int
    uid: int
    gid: int
    size: int
    mtime: int
    mtime_ns: int
    target: str | None = None  # symlink target
    translator: str | None = None  # GNU/Hurd passive translator (argv joined by spaces)
    author: int | None = None  # GNU/Hurd author

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "name": self.name, "type": self.type, "inode": self.ino,
                               "mode": f"{self.mode & 0o7777:04o}", "links": self.links, "uid": self.uid,
                               "gid": self.gid, "size": self.size, "mtime": self.mtime}
        if self.target is not None:
            out["target"] = self.target
        if self.translator is not None:
            out["translator"] = self.translator
        if self.author is not None:
            out["author"] = self.author
        return out


def decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def file_info(fs: ExtFilesystem, inode: Inode, path: str, name: str) -> FileInfo:
    target = decode_name(fs.symlink_target(inode)) if inode.is_symlink else None
    trans = fs.translator(inode)
    translator = " ".join(decode_name(a) for a in trans.rstrip(b"\0").split(b"\0")) if trans else None
    return FileInfo(path, name, inode.file_type, inode.ino, inode.mode, inode.links, inode.uid, inode.gid,
                    inode.size, inode.mtime, inode.mtime_ns, target, translator,
                    inode.author if fs.hurd else None)


def join(parent: str, name: str) -> str:
    return ("" if parent == "/" else parent) + "/" + name


def children(fs: ExtFilesystem, inode: Inode) -> list[tuple[str, int]]:
    """(name, inode number) of a directory's entries, '.' and '..' left out, sorted by name."""
    out = [(decode_name(e.name), e.ino) for e in fs.dir_entries(inode) if e.name not in (b".", b"..")]
    out.sort()
    return out


def list_dir(state: GuestState, path: str, *, recursive: bool = False, details: bool = True) -> Iterator[FileInfo]:
    """The entries of PATH (or PATH itself when it is not a directory); RECURSIVE: depth first.

    Without DETAILS only path, name and type are filled where the directory entry records the type
    (the ``filetype`` feature): no inode is read for a plain name listing of files.
    """
    fs = state.filesystem
    path = normalize(path)
    top = fs.lookup(path, follow=True)
    if not top.is_dir:
        yield file_info(fs, fs.lookup(path, follow=False), path, path.rsplit("/", 1)[-1])
        return
    seen = {top.ino}
    stack: list[tuple[str, Inode]] = [(path, top)]
    while stack:
        dir_path, inode = stack.pop()
        subdirs = []
        for entry in sorted(fs.dir_entries(inode), key=_by_name):
            if entry.name in (b".", b".."):
                continue
            name = decode_name(entry.name)
            entry_path = join(dir_path, name)
            if not details and entry.file_type is not None and entry.file_type != "dir":
                yield FileInfo(entry_path, name, entry.file_type, entry.ino, 0, 0, 0, 0, 0, 0, 0)
                continue
            child = fs.inode(entry.ino)
            yield file_info(fs, child, entry_path, name) if details else \
                FileInfo(entry_path, name, child.file_type, entry.ino, child.mode, 0, 0, 0, 0, 0, 0)
            if recursive and child.is_dir:
                if entry.ino in seen:
                    raise CorruptFilesystem(f"Directory inode {entry.ino} appears twice ({entry_path}): a loop.")
                seen.add(entry.ino)
                subdirs.append((entry_path, child))
        stack.extend(reversed(subdirs))


def _by_name(entry: DirEntry) -> bytes:
    return entry.name


def normalize(path: str) -> str:
    """An absolute guest path with '.', '..' and repeated slashes folded (lexically, like the guide's cd)."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


def cat(state: GuestState, path: str) -> Iterator[bytes]:
    fs = state.filesystem
    inode = fs.lookup(normalize(path), follow=True)
    if inode.is_dir:
        raise GuestFsError(f"{path} is a directory (use qsnap ls or qsnap extract).")
    if not inode.is_reg:
        raise GuestFsError(f"{path} is a {inode.file_type}, not a regular file.")
    yield from fs.iter_data(inode)


# ------------------------------------------------------------------ extract

@dataclass
class ExtractResult:
    source: str
    destination: str
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    special: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    owners: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "files": self.files,
                "directories": self.directories, "symlinks": self.symlinks, "hardlinks": self.hardlinks,
                "special": self.special, "bytes": self.bytes, "skipped": self.skipped, "owners": self.owners}


@dataclass
class _Node:
    rel: tuple[str, ...]  # path components below the extracted top
    inode: Inode
    guest_path: str


def _plan(fs: ExtFilesystem, top_path: str, top: Inode) -> list[_Node]:
    """Every node to extract, parents before children; a directory loop is damage, found before
    anything is written."""
    plan = [_Node((), top, top_path)]
    if not top.is_dir:
        if top.mode & ef.S_IFMT not in (ef.S_IFREG, ef.S_IFLNK, ef.S_IFIFO):
            raise GuestFsError(f"{top_path} is a {top.file_type}: qsnap never creates device nodes or sockets.")
        return plan
    seen = {top.ino}
    stack = [plan[0]]
    while stack:
        node = stack.pop()
        names: set[str] = set()
        for name, ino in children(fs, node.inode):
            if name in (".", "..") or "/" in name or "\0" in name:
                raise CorruptFilesystem(f"{node.guest_path} holds an entry named {name!r}.")
            if name in names:
                raise CorruptFilesystem(f"{node.guest_path} holds two entries named {name!r}.")
            names.add(name)
            child = fs.inode(ino)
            item = _Node((*node.rel, name), child, join(node.guest_path, name))
            plan.append(item)
            if child.is_dir:
                if ino in seen:
                    raise CorruptFilesystem(f"Directory inode {ino} appears twice ({item.guest_path}): a loop.")
                seen.add(ino)
                stack.append(item)
    return plan


def extract(state: GuestState, path: str, dest: str | os.PathLike[str], *, force: bool = False) -> ExtractResult:
    """Copy PATH (file, symlink or directory tree) out of the guest into DEST.

    Like ``cp -a``: an existing directory DEST receives PATH under its own name; otherwise DEST is
    the copy's name. Everything is written into a temporary sibling, then renamed into place, so a
    failure leaves nothing behind. No write ever follows a symlink or leaves DEST (each directory
    is opened with O_NOFOLLOW and entries are created relative to it); device nodes are never
    created (they are listed as skipped); owners are kept when running as root.
    """
    import tempfile

    fs = state.filesystem
    guest = normalize(path)
    top = fs.lookup(guest, follow=False)
    dest_path = Path(dest)
    if dest_path.is_dir() and not dest_path.is_symlink():
        final = dest_path / (guest.rsplit("/", 1)[-1] or "root")
    else:
        final = dest_path
    if (final.exists() or final.is_symlink()) and not force:
        raise OutputExists(f"{final} already exists.", hint="remove it, or pass --force to replace it")
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    plan = _plan(fs, guest, top)
    result = ExtractResult(guest, str(final), owners=os.geteuid() == 0)
    tmp = tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=parent)
    try:
        tmp_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            _write_plan(fs, plan, tmp_fd, result)
        finally:
            os.close(tmp_fd)
        staged = Path(tmp) / "x"
        if final.exists() or final.is_symlink():
            _remove(final)
        os.rename(staged, final)
    finally:
        _remove(Path(tmp))
    return result


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _write_plan(fs: ExtFilesystem, plan: list[_Node], root_fd: int, result: ExtractResult) -> None:
    dir_fds: dict[tuple[str, ...], int] = {}
    first_link: dict[int, tuple[tuple[str, ...], str]] = {}
    dirs_done: list[tuple[int, str, Inode]] = []
    try:
        for node in plan:
            try:
                _write_node(fs, node, root_fd, dir_fds, first_link, dirs_done, result)
            except (OSError, OverflowError) as exc:
                raise _write_error(node, exc) from exc
        for parent_fd, name, inode in reversed(dirs_done):  # children first: their writes touch mtimes
            _set_attrs(inode, parent_fd, name, result.owners)
    finally:
        for fd in dir_fds.values():
            os.close(fd)


def _write_error(node: _Node, exc: OSError | OverflowError) -> QsnapError:
    import errno

    if isinstance(exc, OverflowError) or exc.errno == errno.EFBIG:
        return QsnapError(f"Cannot extract {node.guest_path}: it claims {node.inode.size} bytes, more than a file "
                          "here can hold (nothing was left behind).")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return QsnapError(f"The disk filled up while extracting {node.guest_path} (nothing was left behind).")
    return QsnapError(f"Cannot extract {node.guest_path}: {exc.strerror or exc} (nothing was left behind).")


def _write_node(fs: ExtFilesystem, node: _Node, root_fd: int, dir_fds: dict[tuple[str, ...], int],
                first_link: dict[int, tuple[tuple[str, ...], str]], dirs_done: list[tuple[int, str, Inode]],
                result: ExtractResult) -> None:
    if node.rel:
        parent_fd, name = dir_fds[node.rel[:-1]], node.rel[-1]
    else:
        parent_fd, name = root_fd, "x"
    inode = node.inode
    if not inode.is_dir and inode.links > 1 and inode.ino in first_link:
        src_rel, src_name = first_link[inode.ino]
        src_fd = dir_fds[src_rel] if src_rel != ("",) else root_fd
        os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
        result.hardlinks += 1
        return
    kind = inode.mode & ef.S_IFMT
    if kind == ef.S_IFDIR:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        dir_fds[node.rel] = fd
        dirs_done.append((parent_fd, name, inode))
        result.directories += 1
        return
    if kind == ef.S_IFREG:
        result.bytes += _write_file(fs, inode, parent_fd, name)
        result.files += 1
    elif kind == ef.S_IFLNK:
        os.symlink(os.fsdecode(fs.symlink_target(inode)), name, dir_fd=parent_fd)
        result.symlinks += 1
    elif kind in (ef.S_IFIFO,):
        os.mkfifo(name, 0o600, dir_fd=parent_fd)
        result.special += 1
    else:  # devices and sockets: never created (a device node would reach outside DEST)
        result.skipped.append(f"{node.guest_path} ({inode.file_type})")
        return
    _set_attrs(inode, parent_fd, name, result.owners)
    if inode.links > 1:
        first_link[inode.ino] = (node.rel[:-1] if node.rel else ("",), name)


def _set_attrs(inode: Inode, parent_fd: int, name: str, owners: bool) -> None:
    is_link = inode.is_symlink
    if owners:
        with contextlib.suppress(OSError, OverflowError):
            os.chown(name, inode.uid, inode.gid, dir_fd=parent_fd, follow_symlinks=False)
    if not is_link:
        os.chmod(name, stat.S_IMODE(inode.mode & 0o7777), dir_fd=parent_fd)
    mtime_ns = inode.mtime * 1_000_000_000 + inode.mtime_ns
    with contextlib.suppress(NotImplementedError, OSError, OverflowError, ValueError):
        os.utime(name, ns=(inode.atime * 1_000_000_000, mtime_ns), dir_fd=parent_fd, follow_symlinks=False)


def _write_file(fs: ExtFilesystem, inode: Inode, parent_fd: int, name: str) -> int:
    """Write INODE's content; holes (and unwritten extents) stay holes.

    Blocks that lie in host-contiguous qcow2 data clusters are copied by the kernel
    (copy_file_range: no byte passes through Python); the rest is read and written.
    """
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent_fd)
    try:
        size = inode.size
        if inode.flags & ef.FL_INLINE_DATA:
            os.pwrite(fd, fs.inline_data(inode)[:size], 0)
            return size
        os.ftruncate(fd, size)
        bs = fs.block_size
        for run in fs.runs(inode):
            pos = run.logical * bs
            if run.unwritten or pos >= size:
                continue
            fs.copy_blocks_to(run.physical, run.length, size - pos, fd, pos)
        return size
    finally:
        os.close(fd)


# ------------------------------------------------------------------ partitions

def partitions(image: str | os.PathLike[str], target: str, *, snapshot_id: str | None = None) -> GuestState:
    state, _ = open_state(image, target, snapshot_id=snapshot_id, need_fs=False)
    return state


def check_target_path(path: str) -> None:
    if "\0" in path:
        raise UsageError("A guest path cannot contain NUL.")


def lookup_or_none(fs: ExtFilesystem, path: str) -> Inode | None:
    try:
        return fs.lookup(path, follow=False)
    except GuestPathNotFound:
        return None
