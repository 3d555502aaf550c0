"""The read-only qcow2 image: listing, info, guest data of any snapshot, refcounts.

Follows ``docs/interop/qcow2.txt`` ("== Cluster mapping ==", "== Extended L2 Entries ==",
"== Host cluster management ==", "== Snapshots ==") and QEMU 7.2's reading rules:

- a structure that starts inside the file but runs past its end reads zeros there (QEMU's
  file driver does the same, and fresh images end in the middle of their L1 table); a
  structure that starts at or past the end of the file is corruption;
- an L2 table or data cluster that is not cluster aligned is corruption
  (QEMU: "L2 table offset ... unaligned", "Cluster allocation offset ... unaligned");
- tables are never larger than QEMU's limits, and memory use follows the file, not what a
  (possibly hostile) header claims.

The file is opened O_RDONLY; nothing is written, printed or spawned.
"""

from __future__ import annotations

import os
import stat
import sys
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from datetime import UTC, datetime

from qsnap.core.errors import CorruptImage, ImageError, SnapshotNotFound
from qsnap.core.models import ImageInfo, Snapshot
from qsnap.qcow2 import format as fmt

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: see qsnap.core.records
if TYPE_CHECKING:
    from typing import NamedTuple, Protocol
else:
    from qsnap.core.records import NamedTuple

    Protocol = object

_LITTLE = sys.byteorder == "little"
_CACHE_BYTES = 64 << 20  # L2 tables kept in memory at most
_MAX_BACKING_DEPTH = 16

# Extent kinds
DATA = "data"  # stored in this image, uncompressed
COMPRESSED = "compressed"  # stored compressed (one guest cluster per extent)
ZERO = "zero"  # reads as zeros, whatever the backing file holds
UNALLOCATED = "unallocated"  # not in this image: backing file, else zeros


_COMPRESSED_BYTE = b"\x01"
_COMPRESSED_FLAG = bytes(1 if b & 0x40 else 0 for b in range(256))
_CLEAR_BIT0 = bytes(b & 0xFE for b in range(256))


def _flag_table(mask: int) -> bytes:
    return bytes(1 if b & mask else 0 for b in range(256))


def _alignment_bytes(cluster_bits: int) -> list[tuple[int, int]]:
    """(byte index in a big-endian entry, mask) pairs covering bits 9 .. cluster_bits-1."""
    out = []
    for byte in (6, 5):
        low = (7 - byte) * 8
        mask = 0
        for bit in range(max(9, low), min(cluster_bits, low + 8)):
            mask |= 1 << (bit - low)
        if mask:
            out.append((byte, mask))
    return out


class Extent(NamedTuple):
    """A run of guest bytes that read the same way."""

    offset: int  # guest offset
    length: int
    kind: str  # DATA, COMPRESSED, ZERO or UNALLOCATED
    host_offset: int = 0  # DATA: host offset of `offset`; COMPRESSED: start of the compressed bytes
    compressed_size: int = 0  # COMPRESSED: bytes of compressed data
    cluster_offset: int = 0  # COMPRESSED: offset of `offset` inside the decompressed cluster


def _be64(raw: bytes | bytearray) -> array[int]:
    table = array("Q", raw[: len(raw) // 8 * 8])
    if _LITTLE:
        table.byteswap()
    return table


class Layer:
    """One L1 table and the disk size it maps: the active state or one snapshot."""

    def __init__(self, what: str, l1_offset: int, l1_size: int, disk_size: int, l1: array[int]) -> None:
        self.what = what
        self.l1_offset = l1_offset
        self.l1_size = l1_size
        self.disk_size = disk_size
        self.l1 = l1  # the part of the table inside the file; the rest reads as zeros

    def l2_offset(self, index: int) -> int:
        if index < len(self.l1):
            return self.l1[index] & fmt.L1E_OFFSET_MASK
        return 0


class _Reader(Protocol):
    virtual_size: int

    def _fill_active(self, offset: int, view: memoryview) -> None: ...

    def close(self) -> None: ...


class _RawBacking:
    """A raw backing file: guest offset = file offset, zeros past its end."""

    def __init__(self, path: str) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"Cannot open backing file {path}: {exc.strerror}.") from exc
        self.virtual_size = os.fstat(self._fd).st_size

    def _fill_active(self, offset: int, view: memoryview) -> None:
        _pread_into(self._fd, view, offset, self.virtual_size)

    def close(self) -> None:
        os.close(self._fd)


def _pread_into(fd: int, view: memoryview, offset: int, file_size: int) -> None:
    """Fill VIEW from the file at OFFSET; bytes past the end of the file read as zeros."""
    want = min(len(view), max(0, file_size - offset))
    done = 0
    while done < want:
        got = os.preadv(fd, [view[done:want]], offset + done)
        if got <= 0:
            raise ImageError(f"Short read at offset {offset + done:#x}: the file shrank while reading.")
        done += got
    if want < len(view):  # (a truncated image): callers may reuse buffers, so write the zeros
        view[want:] = bytes(len(view) - want)


class Qcow2Image:
    """A qcow2 image opened read-only. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str], *, _depth: int = 0) -> None:
        self.path = os.fspath(path)
        self._depth = _depth
        self._fd = -1
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise ImageError(f"{self.path} does not exist.") from exc
        except OSError as exc:
            raise ImageError(f"Cannot open {self.path}: {exc.strerror}.") from exc
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        st = os.fstat(self._fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{self.path} is a directory, not a qcow2 image.")
        if stat.S_ISBLK(st.st_mode):
            self.file_size = os.lseek(self._fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            self.file_size = st.st_size
        else:
            raise ImageError(f"{self.path} is not a regular file or block device.")
        self._stat = st
        if self.file_size == 0:
            raise ImageError(f"{self.path} is empty, not a qcow2 image.")
        head = os.pread(self._fd, min(self.file_size, 1 << 16), 0)
        if len(head) >= 24 and head[:4] == fmt.MAGIC:
            bits = int.from_bytes(head[20:24], "big")
            if fmt.MIN_CLUSTER_BITS <= bits <= fmt.MAX_CLUSTER_BITS and (1 << bits) > len(head):
                head = os.pread(self._fd, min(self.file_size, 1 << bits), 0)
        self.header = fmt.parse_header(head, self.file_size, self.path)
        h = self.header
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.virtual_size = h.virtual_size
        self.l2_entries = h.l2_entries
        self.extended_l2 = h.extended_l2
        self._offset_mask, self._csize_shift, self._csize_mask = fmt.compressed_fields(h.cluster_bits)
        self._entries = fmt.parse_snapshot_table(self._read_exact, h)
        self._layers: dict[int, Layer] = {}
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._l2_cache_max = max(8, _CACHE_BYTES // self.cluster_size)
        self._last_cluster: tuple[int, bytes] | None = None
        self._backing: _Reader | None = None
        self._backing_opened = False
        self.active = self._load_layer("active L1 table", h.l1_table_offset, h.l1_size, h.virtual_size)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        backing = getattr(self, "_backing", None)
        if backing is not None:
            backing.close()
            self._backing = None

    def fileno(self) -> int:
        """The read-only descriptor of the image file (for in-kernel copies of DATA extents)."""
        return self._fd

    @property
    def has_backing(self) -> bool:
        return self._backing_image() is not None

    def __enter__(self) -> Qcow2Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ low-level reads

    def _corrupt(self, structure: str, problem: str) -> CorruptImage:
        return CorruptImage(
            f"Corrupt qcow2 image {self.path}: {structure}: {problem}.", hint="run 'qemu-img check'"
        )

    def _read_exact(self, offset: int, length: int, structure: str) -> bytes:
        """LENGTH bytes at OFFSET, all inside the file, or CorruptImage naming STRUCTURE."""
        if offset < 0 or length < 0 or offset + length > self.file_size:
            raise self._corrupt(
                structure, f"{length} bytes at offset {offset:#x} lie past the end of the file ({self.file_size} bytes)"
            )
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise ImageError(f"Short read from {self.path} at offset {offset:#x}: the file shrank.")
        return data

    def _read_table(self, offset: int, length: int, structure: str) -> bytes:
        """The part of a table that lies inside the file (the rest reads as zeros)."""
        if length and offset >= self.file_size:
            raise self._corrupt(structure, f"offset {offset:#x} is past the end of the file ({self.file_size} bytes)")
        return self._read_exact(offset, min(length, self.file_size - offset), structure)

    # ------------------------------------------------------------------ snapshots and info

    def snapshot_entries(self) -> tuple[fmt.SnapshotEntry, ...]:
        """The raw snapshot table entries, in table order."""
        return self._entries

    def snapshots(self) -> tuple[Snapshot, ...]:
        """The snapshots in table order, with the values `qemu-img info` reports."""
        out = []
        for e in self._entries:
            if e.date_nsec >= 1_000_000_000:
                raise self._corrupt(f"snapshot table entry {e.position}", f"date_nsec {e.date_nsec} is not below 10^9")
            out.append(
                Snapshot(
                    id=e.id,
                    name=e.name,
                    date=datetime.fromtimestamp(e.date_sec, tz=UTC).replace(microsecond=e.date_nsec // 1000),
                    vm_state_size=e.vm_state_size,
                    vm_clock_ns=e.vm_clock_nsec,
                    disk_size=e.disk_size,
                    icount=e.icount,
                )
            )
        return tuple(out)

    def info(self) -> ImageInfo:
        """What `qemu-img info` says about the image (same fields as engines.qemu_img.parse_info)."""
        h = self.header
        v3 = h.version == 3
        return ImageInfo(
            path=self.path,
            format="qcow2",
            virtual_size=h.virtual_size,
            actual_size=self._stat.st_blocks * 512,
            file_size=self.file_size,
            cluster_size=h.cluster_size,
            snapshots=self.snapshots(),
            compat="1.1" if v3 else "0.10",
            compression_type=fmt.COMPRESSION_TYPES[h.compression_type],
            refcount_bits=h.refcount_bits,
            lazy_refcounts=bool(h.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS) if v3 else None,
            extended_l2=h.extended_l2 if v3 else None,
            corrupt=bool(h.incompatible_features & fmt.INCOMPAT_CORRUPT) if v3 else None,
            encrypted=h.crypt_method != 0,
            backing_file=h.backing_file,
            dirty=bool(h.incompatible_features & fmt.INCOMPAT_DIRTY),
        )

    # ------------------------------------------------------------------ layers and tables

    def _entry(self, snapshot: Snapshot | fmt.SnapshotEntry | str) -> fmt.SnapshotEntry:
        if isinstance(snapshot, fmt.SnapshotEntry):
            return snapshot
        if isinstance(snapshot, Snapshot):
            matches = [e for e in self._entries if e.id == snapshot.id]
            exact = [e for e in matches if e.name == snapshot.name]
            if exact or matches:
                return (exact or matches)[0]
            raise SnapshotNotFound(f"Snapshot {snapshot.name!r} (ID {snapshot.id}) is not in {self.path}.")
        for e in self._entries:
            if e.id == snapshot:
                return e
        raise SnapshotNotFound(f"No snapshot with ID {snapshot!r} in {self.path}.")

    def layer(self, snapshot: Snapshot | fmt.SnapshotEntry | str | None = None) -> Layer:
        """The L1 table (and disk size) of SNAPSHOT, or of the current state when None."""
        if snapshot is None:
            return self.active
        e = self._entry(snapshot)
        cached = self._layers.get(e.position)
        if cached is None:
            what = f"L1 table of snapshot {e.id} ({e.name!r})"
            if e.l1_size > fmt.MAX_L1_SIZE // 8:
                raise self._corrupt(what, f"{e.l1_size} entries exceed QEMU's limit")
            cached = self._load_layer(what, e.l1_table_offset, e.l1_size, e.disk_size)
            self._layers[e.position] = cached
        return cached

    def _load_layer(self, what: str, offset: int, size: int, disk_size: int) -> Layer:
        if offset & (self.cluster_size - 1):
            raise self._corrupt(what, f"offset {offset:#x} is not aligned to a cluster")
        raw = self._read_table(offset, size * 8, what) if size else b""
        return Layer(what, offset, size, disk_size, _be64(raw))

    def l2_table(self, l2_offset: int, what: str = "L2 table") -> array[int]:
        """The L2 table at L2_OFFSET as native integers (two per entry with extended L2)."""
        table = self._l2_cache.get(l2_offset)
        if table is not None:
            self._l2_cache.move_to_end(l2_offset)
            return table
        if l2_offset & (self.cluster_size - 1):
            raise self._corrupt(what, f"L2 table offset {l2_offset:#x} is not aligned to a cluster")
        raw = self._read_table(l2_offset, self.cluster_size, f"{what} at {l2_offset:#x}")
        if len(raw) < self.cluster_size:
            raw = raw + bytes(self.cluster_size - len(raw))
        table = _be64(raw)
        self._l2_cache[l2_offset] = table
        if len(self._l2_cache) > self._l2_cache_max:
            self._l2_cache.popitem(last=False)
        return table

    # ------------------------------------------------------------------ guest mapping

    def _check_data_readable(self) -> None:
        h = self.header
        if h.crypt_method:
            raise ImageError(
                f"{self.path} is encrypted ({fmt.CRYPT_METHODS[h.crypt_method]}): the qcow2 reader shows its "
                "metadata but does not decrypt guest data.",
                hint="use qemu-img with the image's secret",
            )
        if h.incompatible_features & fmt.INCOMPAT_DATA_FILE:
            raise ImageError(
                f"{self.path} keeps its guest data in an external data file "
                f"({h.data_file or 'name not recorded'}), which the qcow2 reader does not read.",
                hint="use qemu-img",
            )

    def iter_extents(
        self,
        snapshot: Snapshot | fmt.SnapshotEntry | str | None = None,
        start: int = 0,
        end: int | None = None,
    ) -> Iterator[Extent]:
        """The guest range [START, END) of SNAPSHOT (None: current state) as merged extents."""
        layer = self.layer(snapshot)
        stop = layer.disk_size if end is None else min(end, layer.disk_size)
        pending: Extent | None = None
        for ext in self._raw_extents(layer, start, stop):
            if pending is None:
                pending = ext
            elif (
                ext.kind == pending.kind
                and ext.kind != COMPRESSED
                and (ext.kind != DATA or pending.host_offset + pending.length == ext.host_offset)
            ):
                pending = pending._replace(length=pending.length + ext.length)
            else:
                yield pending
                pending = ext
        if pending is not None:
            yield pending

    def _raw_extents(self, layer: Layer, start: int, stop: int) -> Iterator[Extent]:
        cb = self.cluster_bits
        cs = self.cluster_size
        n = self.l2_entries
        span = n << cb
        guest = max(0, start)
        ext_l2 = self.extended_l2
        offset_mask = fmt.L2E_OFFSET_MASK
        while guest < stop:
            l1_index = guest // span
            table_end = min(stop, (l1_index + 1) * span)
            l2_offset = layer.l2_offset(l1_index)
            if not l2_offset:
                yield Extent(guest, table_end - guest, UNALLOCATED)
                guest = table_end
                continue
            table = self.l2_table(l2_offset, f"L2 table {l1_index} of the {layer.what}")
            index = (guest >> cb) % n
            while guest < table_end:
                in_cluster = guest & (cs - 1)
                length = min(cs - in_cluster, table_end - guest)
                if ext_l2:
                    entry = table[2 * index]
                    bitmap = table[2 * index + 1]
                else:
                    entry = table[index]
                    bitmap = 0
                if entry & fmt.OFLAG_COMPRESSED:
                    if bitmap:
                        raise self._corrupt(
                            layer.what, f"compressed cluster at guest {guest:#x} has a subcluster bitmap"
                        )
                    coffset = entry & self._offset_mask
                    sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
                    csize = sectors * fmt.COMPRESSED_SECTOR - (coffset & (fmt.COMPRESSED_SECTOR - 1))
                    yield Extent(guest, length, COMPRESSED, coffset, csize, in_cluster)
                else:
                    host = entry & offset_mask
                    if host & (cs - 1):
                        raise self._corrupt(
                            layer.what, f"cluster offset {host:#x} for guest {guest:#x} is not aligned to a cluster"
                        )
                    if not ext_l2:
                        if entry & fmt.OFLAG_ZERO:
                            yield Extent(guest, length, ZERO)
                        elif host:
                            yield self._data_extent(layer, guest, length, host + in_cluster)
                        else:
                            yield Extent(guest, length, UNALLOCATED)
                    else:
                        yield from self._subcluster_extents(layer, guest, length, host, bitmap)
                guest += length
                index += 1

    def _data_extent(self, layer: Layer, guest: int, length: int, host: int) -> Extent:
        if host >= self.file_size:
            raise self._corrupt(
                layer.what, f"data cluster for guest {guest:#x} at {host:#x} is past the end of the file"
            )
        return Extent(guest, length, DATA, host)

    def _subcluster_extents(self, layer: Layer, guest: int, length: int, host: int, bitmap: int) -> Iterator[Extent]:
        """Extended L2 ("== Extended L2 Entries =="): one extent per run of subclusters."""
        if (bitmap >> 32) & bitmap & fmt.L2_BITMAP_ALL_ALLOC:
            raise self._corrupt(layer.what, f"subclusters at guest {guest:#x} are both allocated and zero")
        if not host and bitmap & fmt.L2_BITMAP_ALL_ALLOC:
            raise self._corrupt(layer.what, f"unallocated cluster at guest {guest:#x} has allocated subclusters")
        sc = self.cluster_size // fmt.SUBCLUSTERS
        cluster_start = guest & ~(self.cluster_size - 1)
        pos, end = guest, guest + length
        while pos < end:
            i = (pos - cluster_start) // sc
            run_end = min(end, cluster_start + (i + 1) * sc)
            if bitmap & (1 << (32 + i)):
                yield Extent(pos, run_end - pos, ZERO)
            elif bitmap & (1 << i):
                yield self._data_extent(layer, pos, run_end - pos, host + (pos - cluster_start))
            else:
                yield Extent(pos, run_end - pos, UNALLOCATED)
            pos = run_end

    # ------------------------------------------------------------------ guest data

    def read(self, offset: int, length: int, snapshot: Snapshot | fmt.SnapshotEntry | str | None = None) -> bytes:
        """LENGTH guest bytes at OFFSET of SNAPSHOT (None: current state); zeros past the disk's end."""
        buf = bytearray(length)
        self._fill(self.layer(snapshot), offset, memoryview(buf))
        return bytes(buf)

    def readinto(
        self, offset: int, buffer: bytearray | memoryview, snapshot: Snapshot | fmt.SnapshotEntry | str | None = None,
        *, zeroed: bool = True,
    ) -> None:
        """Fill BUFFER with guest bytes at OFFSET. ZEROED: BUFFER already holds zeros (a fresh
        buffer), so ranges that read as zeros are skipped; pass False for a reused buffer."""
        self._fill(self.layer(snapshot), offset, memoryview(buffer).cast("B"), zeroed)

    def iter_data(
        self, snapshot: Snapshot | fmt.SnapshotEntry | str | None = None, chunk_size: int = 8 << 20
    ) -> Iterator[tuple[int, memoryview]]:
        """The whole disk of SNAPSHOT, in order, as (guest offset, bytes) chunks.

        The chunk's memory is reused by the next chunk: copy it if you keep it.
        """
        layer = self.layer(snapshot)
        buf = bytearray(chunk_size)
        view = memoryview(buf)
        offset = 0
        while offset < layer.disk_size:
            n = min(chunk_size, layer.disk_size - offset)
            chunk = view[:n]
            self._fill(layer, offset, chunk, zeroed=not offset)  # the first chunk is fresh zeros
            yield offset, chunk
            offset += n

    def _fill(self, layer: Layer, offset: int, view: memoryview, zeroed: bool = True) -> None:
        """Write the guest bytes at OFFSET into VIEW; ZEROED: VIEW holds zeros already, so the
        ranges that read as zeros (zero, unallocated, past the disk's end) are left alone."""
        end = offset + len(view)
        if not zeroed and end > layer.disk_size:
            view[max(0, layer.disk_size - offset) :] = bytes(end - max(offset, layer.disk_size))
        if offset >= layer.disk_size or not len(view):
            return
        self._check_data_readable()
        # Guest runs whose clusters are also host-contiguous are read by one preadv each.
        run_guest = run_host = run_len = 0
        for ext in self._raw_extents(layer, offset, min(end, layer.disk_size)):
            if ext.kind == DATA:
                if run_len and run_host + run_len == ext.host_offset and run_guest + run_len == ext.offset:
                    run_len += ext.length
                    continue
                if run_len:
                    _pread_into(self._fd, view[run_guest - offset : run_guest - offset + run_len], run_host,
                                self.file_size)
                run_guest, run_host, run_len = ext.offset, ext.host_offset, ext.length
                continue
            dst = view[ext.offset - offset : ext.offset - offset + ext.length]
            if ext.kind == COMPRESSED:
                cluster = self._decompress(ext.host_offset, ext.compressed_size)
                dst[:] = cluster[ext.cluster_offset : ext.cluster_offset + ext.length]
                continue
            if not zeroed:  # zero or unallocated: zeros, or the backing file's bytes over zeros
                dst[:] = bytes(len(dst))
            if ext.kind == UNALLOCATED:
                backing = self._backing_image()
                if backing is not None and ext.offset < backing.virtual_size:
                    n = min(ext.length, backing.virtual_size - ext.offset)
                    backing._fill_active(ext.offset, dst[:n])
        if run_len:
            _pread_into(self._fd, view[run_guest - offset : run_guest - offset + run_len], run_host, self.file_size)

    def vm_state_offset(self, snapshot: Snapshot | fmt.SnapshotEntry | str) -> int:
        """Where SNAPSHOT's VM state starts in its L1 range: right after the guest disk,
        at the first L1 entry past it (QEMU's qcow2_vm_state_offset: l1_vm_state_index <<
        (cluster_bits + l2_bits), l1_vm_state_index = size_to_l1(disk size))."""
        layer = self.layer(snapshot)
        l1_index = fmt.size_to_l1(layer.disk_size, self.cluster_bits, self.l2_entries)
        return l1_index * self.l2_entries << self.cluster_bits

    def read_vm_state(self, snapshot: Snapshot | fmt.SnapshotEntry | str, offset: int, length: int) -> bytes:
        """LENGTH bytes of SNAPSHOT's saved VM state (RAM and devices) from OFFSET in it.
        Bytes of the VM-state area nothing was written to read as zeros."""
        layer = self.layer(snapshot)
        base = self.vm_state_offset(snapshot)
        span = Layer(layer.what, layer.l1_offset, layer.l1_size, base + offset + length, layer.l1)
        buf = bytearray(length)
        self._fill(span, base + offset, memoryview(buf))
        return bytes(buf)

    def _fill_active(self, offset: int, view: memoryview) -> None:
        self._fill(self.active, offset, view)

    def cluster_data(self, layer: Layer, guest: int) -> bytes:
        """The guest cluster at GUEST (cluster aligned) of LAYER, decompressed."""
        buf = bytearray(min(self.cluster_size, max(0, layer.disk_size - guest)))
        self._fill(layer, guest, memoryview(buf))
        return bytes(buf)

    def _decompress(self, coffset: int, csize: int) -> bytes:
        """One compressed cluster ("Compressed Clusters Descriptor"), zlib or zstd."""
        if self._last_cluster is not None and self._last_cluster[0] == coffset:
            return self._last_cluster[1]
        what = f"compressed cluster at {coffset:#x}"
        raw = self._read_table(coffset, csize, what)
        cs = self.cluster_size
        try:
            if self.header.compression_type == 0:
                # QEMU: inflateInit2(-12), raw deflate with a 4 KiB window.
                data = zlib.decompressobj(-12).decompress(raw, cs)
            else:
                data = _zstd_decompress(raw, cs)
        except (zlib.error, ValueError) as exc:
            raise self._corrupt(what, f"cannot be decompressed ({exc})") from exc
        if len(data) != cs:
            raise self._corrupt(what, f"decompresses to {len(data)} bytes instead of {cs}")
        self._last_cluster = (coffset, data)
        return data

    # ------------------------------------------------------------------ backing file

    def _backing_image(self) -> _Reader | None:
        if self._backing_opened:
            return self._backing
        self._backing_opened = True
        h = self.header
        if not h.backing_file:
            return None
        if self._depth >= _MAX_BACKING_DEPTH:
            raise ImageError(f"{self.path}: the backing chain is deeper than {_MAX_BACKING_DEPTH} images.")
        path = h.backing_file
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(os.path.abspath(self.path)), path)
        backing_format = h.backing_format
        if backing_format is None:
            try:
                with open(path, "rb") as probe:
                    backing_format = "qcow2" if probe.read(4) == fmt.MAGIC else "raw"
            except OSError as exc:
                raise ImageError(f"Cannot open backing file {path}: {exc.strerror}.") from exc
        if backing_format == "qcow2":
            self._backing = Qcow2Image(path, _depth=self._depth + 1)
        elif backing_format in ("raw", "file"):
            self._backing = _RawBacking(path)
        else:
            raise ImageError(f"{self.path}: backing file format {backing_format!r} is not supported by the reader.")
        return self._backing

    def l2_host_clusters(self, l2_offset: int, what: str = "L2 table") -> set[int]:
        """Offsets of the host clusters the L2 table at L2_OFFSET holds a reference to.

        That is every cluster QEMU counts a reference for ("== Snapshots ==": creating a
        snapshot increases the refcount of all L2 tables and clusters reachable from its L1):
        allocated data clusters (zero-flagged ones included) and every host cluster a
        compressed cluster's bytes touch. Tables without compressed entries are decoded
        with byte-level operations, not per entry.
        """
        cs = self.cluster_size
        if l2_offset & (cs - 1):
            raise self._corrupt(what, f"L2 table offset {l2_offset:#x} is not aligned to a cluster")
        raw = bytearray(self._read_table(l2_offset, cs, f"{what} at {l2_offset:#x}"))
        raw.extend(bytes(cs - len(raw)))
        step = self.header.l2_entry_size
        if _COMPRESSED_BYTE in bytes(raw[0::step]).translate(_COMPRESSED_FLAG):
            return self._l2_host_clusters_slow(l2_offset, what)
        count = cs // step
        # keep bits 9-55 (L2E_OFFSET_MASK): clear byte 0 (bits 56-63), byte 7, bit 8
        raw[0::step] = bytes(count)
        raw[7::step] = bytes(count)
        raw[6::step] = bytes(raw[6::step]).translate(_CLEAR_BIT0)
        # alignment: bits 9 .. cluster_bits-1 must be clear
        for byte, mask in _alignment_bytes(self.cluster_bits):
            if _COMPRESSED_BYTE in bytes(raw[byte::step]).translate(_flag_table(mask)):
                return self._l2_host_clusters_slow(l2_offset, what)
        values = _be64(raw)
        found = set(values[0::2] if step == 16 else values)
        found.discard(0)
        return found

    def _l2_host_clusters_slow(self, l2_offset: int, what: str) -> set[int]:
        cs = self.cluster_size
        table = self.l2_table(l2_offset, what)
        found: set[int] = set()
        step = 2 if self.extended_l2 else 1
        for entry in table[0::step]:
            if entry & fmt.OFLAG_COMPRESSED:
                coffset = entry & self._offset_mask
                sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
                csize = sectors * fmt.COMPRESSED_SECTOR - (coffset & (fmt.COMPRESSED_SECTOR - 1))
                first = coffset & ~(cs - 1)
                found.update(range(first, coffset + csize, cs))
            else:
                host = entry & fmt.L2E_OFFSET_MASK
                if host & (cs - 1):
                    raise self._corrupt(f"{what} at {l2_offset:#x}", f"cluster offset {host:#x} is not aligned")
                if host:
                    found.add(host)
        return found

    # ------------------------------------------------------------------ refcounts

    def refcounts(self) -> array[int]:
        """Refcount of every host cluster inside the file ("== Host cluster management ==").

        Index i is the cluster at offset i * cluster_size. Clusters past the end of the
        file are not included (they cannot hold anything).
        """
        h = self.header
        cs = self.cluster_size
        nclusters = (self.file_size + cs - 1) // cs
        out = array("Q", bytes(8 * nclusters))
        table = _be64(
            self._read_table(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
        )
        bits = h.refcount_bits
        per_block = cs * 8 // bits
        for t, entry in enumerate(table):
            block = entry & fmt.REFT_OFFSET_MASK
            first = t * per_block
            if not block or first >= nclusters:
                continue
            what = f"refcount block {t}"
            if block & (cs - 1):
                raise self._corrupt(what, f"offset {block:#x} is not aligned to a cluster")
            raw = self._read_table(block, cs, what)
            raw = raw + bytes(cs - len(raw))
            count = min(per_block, nclusters - first)
            out[first : first + count] = _refcount_block(raw, bits)[:count]
        return out


def _refcount_block(raw: bytes, bits: int) -> array[int]:
    """Decode one refcount block: big-endian for >= 8 bits, LSB-first within a byte below."""
    if bits == 8:
        return array("Q", raw)
    if bits in (16, 32, 64):
        values = array({16: "H", 32: "I", 64: "Q"}[bits], raw)
        if _LITTLE:
            values.byteswap()
        return array("Q", values)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return array("Q", ((byte >> (bits * k)) & mask for byte in raw for k in range(per_byte)))


def _zstd_decompress(raw: bytes, size: int) -> bytes:
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - zstandard is a dependency
        raise ImageError("Reading zstd-compressed clusters needs the 'zstandard' package.") from exc
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        parts = []
        got = 0
        while got < size:
            part = reader.read(size - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)
    except zstandard.ZstdError as exc:
        raise ValueError(str(exc)) from exc


def open_image(path: str | os.PathLike[str]) -> Qcow2Image:
    """Open PATH read-only as qcow2; ImageError when it is missing or not qcow2,
    CorruptImage when its header or snapshot table is broken."""
    return Qcow2Image(path)
