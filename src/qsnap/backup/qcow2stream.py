"""Read a snapshot's clusters straight from a qcow2 file, and write a compact qcow2 as one stream.

Why: ``qemu-img`` cannot write a qcow2 into a pipe, and the guide's "convert, then gzip"
needs a full-size temporary copy. A qcow2 whose layout is fixed in advance can be written in
a single forward pass once the allocated clusters are known (docs/interop/qcow2.txt):

    cluster 0      header (version 3) + header extensions + backing file name
    L1 table       ceil(l1_size * 8 / C) clusters
    refcount table refcount_table_clusters clusters
    refcount blocks 16-bit refcounts, every cluster of the file has refcount 1
    L2 tables      one per L1 entry that maps anything, in guest order
    data clusters  in guest order

This module never spawns processes and opens source images read-only. It supports the
common case (no encryption, no external data file, no extended L2); everything else is
reported as :class:`Unsupported` so the caller can fall back to ``qemu-img``.

Reading a snapshot is safe while a VM runs: a snapshot's clusters are shared copy-on-write
(refcount >= 2) and are never rewritten while the snapshot exists.
"""

from __future__ import annotations

import os
import struct
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

MAGIC = b"QFI\xfb"
L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4

# Guest cluster kinds in a mapping.
UNALLOCATED = 0  # reads from the backing file, or zeros without one
ZERO = 1  # reads as zeros (v3 zero flag)
DATA = 2  # a host cluster holding the data
COMPRESSED_DATA = 3


class Unsupported(Exception):
    """The image uses a qcow2 feature this reader does not handle (caller falls back)."""


class Malformed(Exception):
    """The bytes are not the qcow2 they claim to be."""


class Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


@dataclass(frozen=True)
class Header:
    version: int
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

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


@dataclass(frozen=True)
class SnapshotEntry:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_ns: int
    vm_state_size: int
    disk_size: int | None


def parse_header(data: bytes) -> Header:
    """Parse the qcow2 header in DATA (at least the first cluster, or 4 KiB)."""
    if len(data) < 72 or data[:4] != MAGIC:
        raise Malformed("not a qcow2 image (bad magic)")
    (version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size, l1_off,
     rt_off, rt_clusters, nb_snap, snap_off) = struct.unpack_from(">IQIIQIIQQIIQ", data, 4)
    if version not in (2, 3):
        raise Malformed(f"unknown qcow2 version {version}")
    if not 9 <= cluster_bits <= 21:
        raise Malformed(f"bad cluster_bits {cluster_bits}")
    incompat = compat = autoclear = 0
    refcount_order, header_length, compression_type = 4, 72, 0
    if version == 3:
        if len(data) < 104:
            raise Malformed("truncated v3 header")
        incompat, compat, autoclear, refcount_order, header_length = struct.unpack_from(">QQQII", data, 72)
        if header_length > 104 and len(data) >= 105:
            compression_type = data[104]
    backing_format = None
    ext_at = header_length if version == 3 else 72
    while ext_at + 8 <= min(len(data), 1 << cluster_bits):
        ext_type, ext_len = struct.unpack_from(">II", data, ext_at)
        if ext_type == EXT_END:
            break
        if ext_type == EXT_BACKING_FORMAT:
            backing_format = data[ext_at + 8 : ext_at + 8 + ext_len].decode("utf-8", "replace")
        ext_at += 8 + ((ext_len + 7) & ~7)
    backing = None
    if backing_offset:
        if backing_offset + backing_size > len(data):
            raise Malformed("backing file name outside the header cluster")
        backing = data[backing_offset : backing_offset + backing_size].decode("utf-8", "replace")
    return Header(version, cluster_bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
                  snap_off, incompat, compat, autoclear, refcount_order, header_length,
                  compression_type, backing, backing_format)


def read_snapshot_table(fd: int, header: Header) -> list[SnapshotEntry]:
    entries = []
    at = header.snapshots_offset
    for _ in range(header.nb_snapshots):
        fixed = os.pread(fd, 40, at)
        if len(fixed) < 40:
            raise Malformed("truncated snapshot table")
        l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vm_state, extra_len = struct.unpack(
            ">QIHHIIQII", fixed
        )
        extra = os.pread(fd, extra_len, at + 40)
        disk_size = None
        if extra_len >= 8:
            vm_state = max(vm_state, struct.unpack_from(">Q", extra, 0)[0])
        if extra_len >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        names = os.pread(fd, id_len + name_len, at + 40 + extra_len)
        entries.append(SnapshotEntry(
            names[:id_len].decode("utf-8", "replace"), names[id_len:].decode("utf-8", "replace"),
            l1_off, l1_size, dsec, dnsec, clock, vm_state, disk_size,
        ))
        at += 40 + extra_len + id_len + name_len
        at = (at + 7) & ~7
    return entries


@dataclass
class Mapping:
    """Which guest clusters of one image state hold what.

    ``kinds[i]`` is UNALLOCATED/ZERO/DATA/COMPRESSED_DATA for guest cluster i; ``entries[i]``
    is the raw L2 entry (flags masked to what matters). Arrays keep memory at 9 bytes a cluster.
    """

    cluster_size: int
    virtual_size: int
    kinds: bytearray
    entries: array  # type: ignore[type-arg]

    @property
    def cluster_count(self) -> int:
        return len(self.kinds)

    def count(self, *kinds: int) -> int:
        return sum(self.kinds.count(k) for k in kinds)

    def data_indices(self) -> Iterator[int]:
        for i, kind in enumerate(self.kinds):
            if kind >= DATA:
                yield i


class Qcow2Reader:
    """Read-only access to one state (a snapshot or the current state) of a qcow2 file."""

    def __init__(self, path: Path, snapshot_id: str | None = None, *, allow_backing: bool = False) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            self.header = parse_header(os.pread(self.fd, 1 << 16, 0))
            self._setup(snapshot_id, allow_backing)
        except BaseException:
            os.close(self.fd)
            raise

    def _setup(self, snapshot_id: str | None, allow_backing: bool) -> None:
        h = self.header
        if h.crypt_method:
            raise Unsupported("encrypted image")
        if h.incompatible_features & (INCOMPAT_DATA_FILE | INCOMPAT_EXTL2):
            raise Unsupported("external data file or extended L2 entries")
        if h.incompatible_features & INCOMPAT_CORRUPT:
            raise Unsupported("image is marked corrupt")
        if h.incompatible_features & ~(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION):
            raise Unsupported(f"unknown incompatible features {h.incompatible_features:#x}")
        self.backing: Qcow2Reader | None = None
        if h.backing_file:
            if not allow_backing:
                raise Unsupported("image has a backing file")
            if h.backing_format not in (None, "qcow2"):
                raise Unsupported(f"backing file format {h.backing_format}")
            base = Path(h.backing_file)
            if not base.is_absolute():
                base = self.path.parent / base
            if not base.exists():
                raise FileNotFoundError(f"backing file {base} of {self.path} is missing")
            self.backing = Qcow2Reader(base, None, allow_backing=True)
        self.cluster_size = h.cluster_size
        if snapshot_id is None:
            l1_off, l1_size, vsize = h.l1_table_offset, h.l1_size, h.size
            self.snapshot: SnapshotEntry | None = None
        else:
            match = [s for s in read_snapshot_table(self.fd, h) if s.id == snapshot_id]
            if not match:
                raise Malformed(f"no snapshot with ID {snapshot_id} in {self.path}")
            self.snapshot = match[0]
            l1_off, l1_size = self.snapshot.l1_table_offset, self.snapshot.l1_size
            vsize = self.snapshot.disk_size if self.snapshot.disk_size is not None else h.size
        self.virtual_size = vsize
        self.mapping = self._map(l1_off, l1_size, vsize)

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()
        os.close(self.fd)

    def __enter__(self) -> Qcow2Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _map(self, l1_off: int, l1_size: int, vsize: int) -> Mapping:
        c = self.cluster_size
        per_l2 = c // 8
        n = (vsize + c - 1) // c
        kinds = bytearray(n)
        entries = array("Q", bytes(8 * n))
        need_l1 = (n + per_l2 - 1) // per_l2
        l1_raw = os.pread(self.fd, 8 * min(need_l1, l1_size), l1_off) if need_l1 else b""
        l1 = struct.unpack(f">{len(l1_raw) // 8}Q", l1_raw)
        for l1_index, l1_entry in enumerate(l1):
            l2_off = l1_entry & L1_OFFSET_MASK
            if not l2_off:
                continue
            raw = os.pread(self.fd, c, l2_off)
            if len(raw) < c:
                raise Malformed(f"L2 table at {l2_off} is past the end of the file")
            l2 = struct.unpack(f">{per_l2}Q", raw)
            base = l1_index * per_l2
            for j, entry in enumerate(l2):
                i = base + j
                if i >= n:
                    break
                if entry & COMPRESSED:
                    kinds[i] = COMPRESSED_DATA
                    entries[i] = entry & ~(COPIED | COMPRESSED)
                elif entry & ZERO_FLAG and self.header.version == 3:
                    kinds[i] = ZERO
                elif entry & L2_OFFSET_MASK:
                    kinds[i] = DATA
                    entries[i] = entry & L2_OFFSET_MASK
        return Mapping(c, vsize, kinds, entries)

    def read_compressed(self, descriptor: int) -> bytes:
        c = self.cluster_size
        x = 62 - (self.header.cluster_bits - 8)
        offset = descriptor & ((1 << x) - 1)
        sectors = ((descriptor >> x) & ((1 << (self.header.cluster_bits - 8)) - 1)) + 1
        raw = os.pread(self.fd, sectors * 512 - (offset & 511), offset)
        if self.header.compression_type == 1:
            import zstandard

            out = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        else:
            out = zlib.decompressobj(-12).decompress(raw, c)
        if len(out) < c:
            raise Malformed(f"compressed cluster at {offset} decompresses to {len(out)} bytes")
        return out[:c]

    def read_cluster(self, index: int) -> bytes | None:
        """Guest cluster INDEX, or None when it reads as zeros."""
        kind = self.mapping.kinds[index]
        c = self.cluster_size
        if kind == DATA:
            data = os.pread(self.fd, c, self.mapping.entries[index])
            if len(data) < c:
                raise Malformed(f"data cluster at {self.mapping.entries[index]} is past the end of the file")
            return data
        if kind == COMPRESSED_DATA:
            return self.read_compressed(self.mapping.entries[index])
        if kind == UNALLOCATED and self.backing is not None and index < self.backing.mapping.cluster_count:
            return self.backing.read_cluster(index)
        return None

    def _pread_exact(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            raise Malformed(f"data cluster near {offset} is past the end of the file")
        return data

    def iter_blocks(self, indices: Iterable[int], block: int = 4 << 20) -> Iterator[tuple[int, bytes]]:
        """Yield (cluster count, data) for INDICES (ascending), about BLOCK bytes at a time.

        Host-contiguous clusters are read with one pread each run; a block is one buffer, so
        the writers hash and compress big buffers, not 64 KiB slices.
        """
        c = self.cluster_size
        kinds, entries = self.mapping.kinds, self.mapping.entries
        per_block = max(1, block // c)
        pieces: list[bytes] = []
        count = 0
        run_start = run_len = 0
        for idx in indices:
            if kinds[idx] == DATA:
                host = entries[idx]
                if run_len and host == run_start + run_len * c:
                    run_len += 1
                else:
                    if run_len:
                        pieces.append(self._pread_exact(run_len * c, run_start))
                    run_start, run_len = host, 1
            else:
                if run_len:
                    pieces.append(self._pread_exact(run_len * c, run_start))
                    run_len = 0
                data = self.read_cluster(idx)
                pieces.append(data if data is not None else bytes(c))
            count += 1
            if count >= per_block:
                if run_len:
                    pieces.append(self._pread_exact(run_len * c, run_start))
                    run_len = 0
                yield count, pieces[0] if len(pieces) == 1 else b"".join(pieces)
                pieces, count = [], 0
        if run_len:
            pieces.append(self._pread_exact(run_len * c, run_start))
        if count:
            yield count, pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def iter_clusters(self, indices: Iterable[int], run: int = 32) -> Iterator[tuple[int, bytes]]:
        """Yield (index, data) for INDICES (ascending), merging host-contiguous reads."""
        c = self.cluster_size
        kinds, entries = self.mapping.kinds, self.mapping.entries
        pending: list[int] = []

        def flush() -> Iterator[tuple[int, bytes]]:
            start = entries[pending[0]]
            blob = os.pread(self.fd, c * len(pending), start)
            if len(blob) < c * len(pending):
                raise Malformed(f"data cluster near {start} is past the end of the file")
            for k, idx in enumerate(pending):
                yield idx, blob[k * c : (k + 1) * c]

        for idx in indices:
            if kinds[idx] == DATA:
                if pending and (entries[idx] != entries[pending[-1]] + c or len(pending) >= run):
                    yield from flush()
                    pending = []
                pending.append(idx)
                continue
            if pending:
                yield from flush()
                pending = []
            data = self.read_cluster(idx)
            yield idx, data if data is not None else bytes(c)
        if pending:
            yield from flush()


# --------------------------------------------------------------------------- the writer


@dataclass
class Layout:
    """Where everything goes in a canonical qsnap qcow2 stream."""

    cluster_size: int
    virtual_size: int
    data_indices: Sequence[int]  # guest clusters with data, ascending
    zero_indices: Sequence[int]  # guest clusters that must read as zero (incrementals), ascending
    backing_file: str | None = None
    l1_size: int = 0
    l1_clusters: int = 0
    rt_clusters: int = 0
    rb_clusters: int = 0
    l2_tables: list[int] = field(default_factory=list)  # L1 indices that get an L2 table
    total_clusters: int = 0

    def __post_init__(self) -> None:
        c = self.cluster_size
        per_l2 = c // 8
        self.l1_size = max(1, -(-((self.virtual_size + c - 1) // c) // per_l2))
        self.l1_clusters = -(-self.l1_size * 8 // c)
        used = {i // per_l2 for i in self.data_indices} | {i // per_l2 for i in self.zero_indices}
        self.l2_tables = sorted(used)
        fixed = 1 + self.l1_clusters + len(self.l2_tables) + len(self.data_indices)
        per_rb = c // 2  # 16-bit refcounts
        rb, rt = 1, 1
        while True:
            total = fixed + rb + rt
            new_rb = -(-total // per_rb)
            new_rt = max(1, -(-new_rb * 8 // c))
            if (new_rb, new_rt) == (rb, rt):
                break
            rb, rt = new_rb, new_rt
        self.rb_clusters, self.rt_clusters = rb, rt
        self.total_clusters = fixed + rb + rt

    @property
    def l1_offset(self) -> int:
        return self.cluster_size

    @property
    def rt_offset(self) -> int:
        return self.cluster_size * (1 + self.l1_clusters)

    @property
    def rb_offset(self) -> int:
        return self.rt_offset + self.cluster_size * self.rt_clusters

    @property
    def l2_offset(self) -> int:
        return self.rb_offset + self.cluster_size * self.rb_clusters

    @property
    def data_offset(self) -> int:
        return self.l2_offset + self.cluster_size * len(self.l2_tables)

    @property
    def file_size(self) -> int:
        return self.cluster_size * self.total_clusters

    def header_cluster(self) -> bytes:
        c = self.cluster_size
        out = bytearray(c)
        ext = bytearray()
        backing = b""
        if self.backing_file:
            fmt = b"qcow2"
            ext += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
            backing = self.backing_file.encode()
        ext += struct.pack(">II", EXT_END, 0)
        backing_offset = 104 + len(ext) if backing else 0
        if 104 + len(ext) + len(backing) > c:
            raise ValueError("backing file name too long for the header cluster")
        struct.pack_into(
            ">4sIQIIQIIQQIIQQQQII", out, 0, MAGIC, 3, backing_offset, len(backing),
            c.bit_length() - 1, self.virtual_size, 0, self.l1_size, self.l1_offset, self.rt_offset,
            self.rt_clusters, 0, 0, 0, 0, 0, 4, 104,
        )
        out[104 : 104 + len(ext)] = ext
        if backing:
            out[backing_offset : backing_offset + len(backing)] = backing
        return bytes(out)

    def metadata(self) -> Iterator[bytes]:
        """Everything before the first data cluster, cluster by cluster-group."""
        c = self.cluster_size
        per_l2 = c // 8
        yield self.header_cluster()
        l1 = array("Q", bytes(8 * self.l1_clusters * (c // 8)))
        for k, l1_index in enumerate(self.l2_tables):
            l1[l1_index] = (self.l2_offset + k * c) | COPIED
        l1.byteswap()
        yield l1.tobytes()
        rt = array("Q", bytes(self.rt_clusters * c))
        for k in range(self.rb_clusters):
            rt[k] = self.rb_offset + k * c
        rt.byteswap()
        yield rt.tobytes()
        rb = array("H", bytes(self.rb_clusters * c))
        for k in range(self.total_clusters):
            rb[k] = 1
        rb.byteswap()
        yield rb.tobytes()
        for l1_index in self.l2_tables:
            l2 = array("Q", bytes(c))
            lo, hi = l1_index * per_l2, (l1_index + 1) * per_l2
            for i in self.zero_indices[bisect_left(self.zero_indices, lo) : bisect_left(self.zero_indices, hi)]:
                l2[i - lo] = ZERO_FLAG
            first = bisect_left(self.data_indices, lo)
            last = bisect_left(self.data_indices, hi)
            for k in range(first, last):
                l2[self.data_indices[k] - lo] = (self.data_offset + k * c) | COPIED
            l2.byteswap()
            yield l2.tobytes()


def write_stream(
    layout: Layout,
    clusters: Iterator[tuple[int, bytes]],
    sink: Sink,
    on_bytes: Callable[[int], None] | None = None,
    batch: int = 16,
) -> int:
    """Write LAYOUT's metadata, then the data CLUSTERS (in layout order) to SINK; return bytes."""
    written = 0
    for chunk in layout.metadata():
        sink.write(chunk)
        written += len(chunk)
        if on_bytes:
            on_bytes(len(chunk))
    expected = iter(layout.data_indices)
    buf: list[bytes] = []
    for idx, data in clusters:
        if next(expected, None) != idx or len(data) != layout.cluster_size:
            raise ValueError(f"cluster {idx} out of layout order")
        buf.append(data)
        if len(buf) >= batch:
            blob = b"".join(buf)
            sink.write(blob)
            written += len(blob)
            buf = []
            if on_bytes:
                on_bytes(len(blob))
    if buf:
        blob = b"".join(buf)
        sink.write(blob)
        written += len(blob)
        if on_bytes:
            on_bytes(len(blob))
    if next(expected, None) is not None:
        raise ValueError("fewer data clusters than the layout expects")
    return written


def write_blocks(
    layout: Layout,
    blocks: Iterable[tuple[int, bytes]],
    sink: Sink,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Like :func:`write_stream`, with data as (cluster count, bytes) blocks in layout order
    (:meth:`Qcow2Reader.iter_blocks` over ``layout.data_indices``)."""
    written = 0
    for chunk in layout.metadata():
        sink.write(chunk)
        written += len(chunk)
        if on_bytes:
            on_bytes(len(chunk))
    c = layout.cluster_size
    clusters = 0
    for count, data in blocks:
        if len(data) != count * c:
            raise ValueError(f"a block of {count} clusters has {len(data)} bytes")
        clusters += count
        if clusters > len(layout.data_indices):
            raise ValueError("more data clusters than the layout expects")
        sink.write(data)
        written += len(data)
        if on_bytes:
            on_bytes(len(data))
    if clusters != len(layout.data_indices):
        raise ValueError("fewer data clusters than the layout expects")
    return written


# --------------------------------------------------------------------------- the checker


@dataclass
class StreamCheck:
    cluster_size: int = 0
    virtual_size: int = 0
    data_offset: int = 0
    file_size: int = 0
    data_clusters: int = 0
    backing_file: str | None = None
    metadata: bytes = b""
    guest_of_data: list[int] = field(default_factory=list)  # guest cluster of each data cluster


class StreamChecker:
    """Check a canonical qsnap qcow2 stream while it goes by (bounded memory).

    Feed bytes with :meth:`feed`; call :meth:`finish`. Raises :class:`Malformed` naming what
    is wrong. Keeps only the metadata (about 1/8000 of the data) in memory.
    """

    def __init__(self, on_data: Callable[[int, bytes], None] | None = None) -> None:
        self.result = StreamCheck()
        self._buf = bytearray()
        self._pos = 0  # bytes consumed into metadata or data
        self._meta_done = False
        self._on_data = on_data
        self._data_seen = 0

    def feed(self, data: bytes) -> None:
        if self._meta_done and not self._buf:
            self._data(data)
            return
        self._buf += data
        if not self._meta_done:
            self._try_metadata()
        if self._meta_done and self._buf:
            rest = bytes(self._buf)
            self._buf.clear()
            self._data(rest)

    def _try_metadata(self) -> None:
        if len(self._buf) < 4096:
            return
        h = parse_header(bytes(self._buf[:4096]))
        c = h.cluster_size
        if len(self._buf) < c:
            return
        h = parse_header(bytes(self._buf[:c]))
        if h.version != 3 or h.crypt_method or h.nb_snapshots or h.incompatible_features or h.refcount_order != 4:
            raise Malformed("header is not a qsnap stream header (version/crypt/snapshots/features)")
        per_l2 = c // 8
        n = (h.size + c - 1) // c
        if h.l1_size < -(-n // per_l2) or h.l1_table_offset != c:
            raise Malformed("L1 table size or position is wrong")
        l1_clusters = -(-h.l1_size * 8 // c)
        rt_off = c * (1 + l1_clusters)
        if h.refcount_table_offset != rt_off:
            raise Malformed("refcount table is not where the layout puts it")
        need = rt_off + h.refcount_table_clusters * c
        if len(self._buf) < need:
            return
        rt = struct.unpack_from(f">{h.refcount_table_clusters * c // 8}Q", self._buf, rt_off)
        rbs = [e for e in rt if e]
        rb_off = need
        if rbs != [rb_off + k * c for k in range(len(rbs))]:
            raise Malformed("refcount blocks are not contiguous after the refcount table")
        l1 = struct.unpack_from(f">{h.l1_size}Q", self._buf, c)
        l2_off = rb_off + len(rbs) * c
        l2s = [(k, e & L1_OFFSET_MASK) for k, e in enumerate(l1) if e & L1_OFFSET_MASK]
        if [off for _, off in l2s] != [l2_off + k * c for k in range(len(l2s))]:
            raise Malformed("L2 tables are not contiguous after the refcount blocks")
        data_off = l2_off + len(l2s) * c
        if len(self._buf) < data_off:
            return
        guest: list[int] = []
        expected = data_off
        for l1_index, off in l2s:
            l2 = struct.unpack_from(f">{per_l2}Q", self._buf, off)
            for j, entry in enumerate(l2):
                host = entry & L2_OFFSET_MASK
                if entry & COMPRESSED:
                    raise Malformed("compressed cluster in a qsnap stream")
                if not host:
                    continue
                if host != expected:
                    raise Malformed(f"L2 entry for guest cluster {l1_index * per_l2 + j} points at {host}, "
                                    f"expected {expected}")
                if l1_index * per_l2 + j >= n:
                    raise Malformed("L2 entry beyond the virtual size")
                guest.append(l1_index * per_l2 + j)
                expected += c
        total = expected // c
        rb_raw = self._buf[rb_off : rb_off + len(rbs) * c]
        counts = struct.unpack(f">{len(rb_raw) // 2}H", rb_raw)
        if any(v != 1 for v in counts[:total]) or any(counts[total:]):
            raise Malformed("refcounts do not match the clusters in use")
        r = self.result
        r.cluster_size, r.virtual_size, r.data_offset = c, h.size, data_off
        r.file_size, r.data_clusters, r.backing_file = expected, len(guest), h.backing_file
        r.metadata = bytes(self._buf[:data_off])
        r.guest_of_data = guest
        del self._buf[:data_off]
        self._pos = data_off
        self._meta_done = True

    def _data(self, data: bytes) -> None:
        self._pos += len(data)
        if self._pos > self.result.file_size:
            raise Malformed(f"stream is longer than its tables say ({self.result.file_size} bytes)")
        if self._on_data is not None:
            self._on_data(self._pos - len(data), data)

    def finish(self) -> StreamCheck:
        if not self._meta_done:
            raise Malformed("stream ends inside the qcow2 metadata (truncated)")
        if self._pos != self.result.file_size:
            raise Malformed(f"stream has {self._pos} bytes, its tables say {self.result.file_size} (truncated)")
        return self.result
