"""Guest disks as byte devices: a qcow2 snapshot (through the one qcow2 reader), a raw file, a slice.

A device answers ``readinto(offset, buffer)`` with guest bytes; reads past its end are zeros.
:class:`CachedDevice` keeps recently read 64 KiB chunks, because filesystem metadata is read in
small pieces (an inode, a directory block) that cluster together.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from qsnap.core.models import Snapshot
    from qsnap.qcow2.image import Qcow2Image


class Device(Protocol):
    """Random-access, read-only guest bytes."""

    size: int

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> None: ...

    def copy_to(self, offset: int, length: int, out_fd: int, out_offset: int) -> None:
        """Write guest bytes [OFFSET, OFFSET+LENGTH) into OUT_FD at OUT_OFFSET. Ranges that read as
        zeros may be skipped: OUT_FD must read as zeros there already (a truncated, sparse file)."""
        ...


def _copy_file_range(in_fd: int, in_offset: int, out_fd: int, out_offset: int, length: int) -> bool:
    """An in-kernel copy (no bytes through Python); False when the kernel cannot do it here."""
    import errno

    try:
        while length > 0:
            n = os.copy_file_range(in_fd, out_fd, length, in_offset, out_offset)
            if n <= 0:
                return False
            in_offset += n
            out_offset += n
            length -= n
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
            return False
        raise
    return True


def _read_write(device: Device, offset: int, length: int, out_fd: int, out_offset: int) -> None:
    step = 16 << 20
    buf = bytearray(min(step, length))
    while length > 0:
        view = memoryview(buf)[: min(step, length)]
        device.readinto(offset, view)
        while len(view):
            n = os.pwrite(out_fd, view, out_offset)
            view = view[n:]
            out_offset += n
            offset += n
            length -= n


class Qcow2Device:
    """The guest disk of one state of a qcow2 image: SNAPSHOT, or the current state when None."""

    def __init__(self, image: Qcow2Image, snapshot: Snapshot | None) -> None:
        self.image = image
        self.snapshot = snapshot
        self.layer = image.layer(snapshot)
        self.size = self.layer.disk_size

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> None:
        self.image.readinto(offset, buffer, self.snapshot, zeroed=False)

    def copy_to(self, offset: int, length: int, out_fd: int, out_offset: int) -> None:
        """Host-contiguous DATA extents go through copy_file_range; zeros are skipped; compressed
        clusters and backing-file ranges are read and written."""
        from qsnap.qcow2.image import DATA, UNALLOCATED, ZERO

        end = min(offset + length, self.size)
        backing = self.image.has_backing
        for ext in self.image.iter_extents(self.snapshot, offset, end):
            dst = out_offset + ext.offset - offset
            if ext.kind == ZERO or (ext.kind == UNALLOCATED and not backing):
                continue
            if ext.kind == DATA and _copy_file_range(self.image.fileno(), ext.host_offset, out_fd, dst, ext.length):
                continue
            _read_write(self, ext.offset, ext.length, out_fd, dst)


class FileDevice:
    """A raw disk or filesystem image file, opened read-only (tests and benchmarks use it)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> None:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                view[done:] = bytes(len(view) - done)
                return
            done += n

    def copy_to(self, offset: int, length: int, out_fd: int, out_offset: int) -> None:
        length = max(0, min(length, self.size - offset))
        if not _copy_file_range(self.fd, offset, out_fd, out_offset, length):
            _read_write(self, offset, length, out_fd, out_offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Slice:
    """SIZE bytes of DEVICE from START: a partition."""

    def __init__(self, device: Device, start: int, size: int) -> None:
        self.device = device
        self.start = start
        self.size = size

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> None:
        view = memoryview(buffer).cast("B")
        inside = max(0, min(len(view), self.size - offset))
        if inside:
            self.device.readinto(self.start + offset, view[:inside])
        if inside < len(view):
            view[inside:] = bytes(len(view) - inside)

    def copy_to(self, offset: int, length: int, out_fd: int, out_offset: int) -> None:
        length = max(0, min(length, self.size - offset))
        self.device.copy_to(self.start + offset, length, out_fd, out_offset)


CHUNK = 64 << 10


class CachedDevice:
    """DEVICE with an LRU cache of 64 KiB chunks (CAPACITY chunks); large reads bypass it."""

    def __init__(self, device: Device, capacity: int = 512) -> None:
        self.device = device
        self.size = device.size
        self.capacity = capacity
        self.chunks: OrderedDict[int, bytes] = OrderedDict()

    def _chunk(self, index: int) -> bytes:
        chunk = self.chunks.get(index)
        if chunk is not None:
            self.chunks.move_to_end(index)
            return chunk
        buf = bytearray(CHUNK)
        self.device.readinto(index * CHUNK, buf)
        chunk = bytes(buf)
        self.chunks[index] = chunk
        if len(self.chunks) > self.capacity:
            self.chunks.popitem(last=False)
        return chunk

    def read(self, offset: int, length: int) -> bytes:
        first, last = offset // CHUNK, (offset + length - 1) // CHUNK
        if first == last:
            start = offset - first * CHUNK
            return self._chunk(first)[start : start + length]
        if length >= 4 * CHUNK:
            buf = bytearray(length)
            self.device.readinto(offset, buf)
            return bytes(buf)
        parts = []
        pos = offset
        end = offset + length
        while pos < end:
            index = pos // CHUNK
            start = pos - index * CHUNK
            take = min(CHUNK - start, end - pos)
            parts.append(self._chunk(index)[start : start + take])
            pos += take
        return b"".join(parts)

    def copy_to(self, offset: int, length: int, out_fd: int, out_offset: int) -> None:
        self.device.copy_to(offset, length, out_fd, out_offset)

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> None:
        view = memoryview(buffer).cast("B")
        if len(view) >= 4 * CHUNK:
            self.device.readinto(offset, view)
        else:
            view[:] = self.read(offset, len(view))
