"""Write a compact qcow2 as one stream, and check such a stream while it goes by.

Why: ``qemu-img`` cannot write a qcow2 into a pipe, and the guide's "convert, then gzip"
needs a full-size temporary copy. A qcow2 whose layout is fixed in advance can be written in
a single forward pass once the allocated clusters are known (docs/interop/qcow2.txt):

    cluster 0      header (version 3) + header extensions + backing file name
    L1 table       ceil(l1_size * 8 / C) clusters
    refcount table refcount_table_clusters clusters
    refcount blocks 16-bit refcounts, every cluster of the file has refcount 1
    L2 tables      one per L1 entry that maps anything, in guest order
    data clusters  in guest order

Source images are read by :mod:`qsnap.qcow2` (through :mod:`qsnap.backup.source`); this
module only writes qsnap's own stream layout and checks it (its header is parsed by
:func:`qsnap.qcow2.format.parse_header`). It never spawns processes.
"""

from __future__ import annotations

import os
import struct
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from qsnap.core.errors import QsnapError
from qsnap.qcow2 import format as qfmt

MAGIC = qfmt.MAGIC
L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
EXT_END = qfmt.EXT_END
EXT_BACKING_FORMAT = qfmt.EXT_BACKING_FORMAT


class Malformed(Exception):
    """The bytes are not the qcow2 they claim to be."""


class Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


def parse_stream_header(data: bytes, length: int) -> qfmt.Header:
    """The header of a qcow2 stream from its first cluster (Malformed when it is broken)."""
    try:
        return qfmt.parse_header(data, length, "the qcow2 stream")
    except QsnapError as exc:
        raise Malformed(str(exc)) from exc


# --------------------------------------------------------------------------- the writer


@dataclass
class Layout:
    """Where everything goes in a canonical qsnap qcow2 stream."""

    cluster_size: int
    virtual_size: int
    data_indices: Sequence[int]  # guest clusters with data, ascending
    zero_indices: Sequence[int]  # guest clusters that must read as zero (incrementals), ascending
    backing_file: str | None = None
    # The geometry of a larger layout to keep (same L2 tables and refcount blocks, so the same
    # data_offset): the layout of clusters found to be zeros after their room was planned.
    reserve: Layout | None = None
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
        if self.reserve is not None:
            r = self.reserve
            if (r.cluster_size, r.virtual_size) != (c, self.virtual_size) or not used <= set(r.l2_tables):
                raise ValueError("the reserved layout does not cover this one")
            self.l2_tables = list(r.l2_tables)
            self.rb_clusters, self.rt_clusters = r.rb_clusters, r.rt_clusters
            self.total_clusters = 1 + self.l1_clusters + len(self.l2_tables) + len(self.data_indices) \
                + self.rb_clusters + self.rt_clusters
            return
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


def write_blocks(
    layout: Layout,
    blocks: Iterable[tuple[int, bytes]],
    sink: Sink,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Write LAYOUT's metadata, then its data clusters to SINK; return the byte count. The data
    comes as (cluster count, bytes) blocks in layout order (:meth:`qsnap.backup.source.SourceReader.iter_blocks`
    over ``layout.data_indices``)."""
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


def write_skipping_zeros(
    planned: Layout,
    blocks: Iterable[tuple[int, bytes]],
    fd: int,
    on_bytes: Callable[[int], None] | None = None,
) -> Layout:
    """Write PLANNED's data clusters to the seekable FD, leaving out those that hold only zeros,
    then the metadata of what was kept; return that final layout.

    Data goes first (from ``planned.data_offset``, packed in guest order), metadata last, at
    offset 0: the metadata depends on which clusters turned out to be zeros, and reading the
    source twice to learn that first would cost a full extra read. The final layout keeps the
    planned L2 tables and refcount blocks, so its data starts where the data was written and
    the file stays canonical (:class:`StreamChecker` accepts it). Blocks are (cluster count,
    bytes) in ``planned.data_indices`` order, as :meth:`SourceReader.iter_blocks` yields them.
    """
    c = planned.cluster_size
    indices = planned.data_indices
    zero = bytes(c)
    kept = array("q")
    pos = planned.data_offset
    k = 0
    for count, data in blocks:
        if len(data) != count * c:
            raise ValueError(f"a block of {count} clusters has {len(data)} bytes")
        if k + count > len(indices):
            raise ValueError("more data clusters than the layout expects")
        view = memoryview(data)
        parts: list[memoryview] = []
        run = -1  # start (in clusters) of the current run of non-zero clusters in this block
        for j in range(count):
            start = j * c
            # cheap test first: most data clusters do not start with a zero byte
            if view[start] == 0 and data[start : start + c] == zero:
                if run >= 0:
                    parts.append(view[run * c : start])
                    run = -1
                continue
            kept.append(indices[k + j])
            if run < 0:
                run = j
        if run >= 0:
            parts.append(view[run * c : count * c])
        k += count
        if parts:
            pos += _pwritev_all(fd, parts, pos)
        if on_bytes:
            on_bytes(count * c)
    if k != len(indices):
        raise ValueError("fewer data clusters than the layout expects")
    final = Layout(c, planned.virtual_size, kept, [], planned.backing_file, reserve=planned)
    assert final.data_offset == planned.data_offset and final.file_size == pos
    meta_pos = 0
    for chunk in final.metadata():
        meta_pos += _pwritev_all(fd, [memoryview(chunk)], meta_pos)
    return final


def _pwritev_all(fd: int, parts: list[memoryview], offset: int) -> int:
    """Write all of PARTS at OFFSET (pwritev may write less than asked); return the byte count."""
    total = 0
    for first in range(0, len(parts), _IOV_MAX):
        group = parts[first : first + _IOV_MAX]
        size = sum(len(p) for p in group)
        done = 0
        while done < size:
            n = os.pwritev(fd, group, offset + total + done)
            if n <= 0:
                raise OSError(f"pwritev wrote {n} bytes")
            done += n
            while group and n >= len(group[0]):
                n -= len(group[0])
                group = group[1:]
            if n:
                group = [group[0][n:], *group[1:]]
        total += size
    return total


_IOV_MAX = 512  # below Linux's 1024


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
        if len(self._buf) < 24:
            return
        if bytes(self._buf[:4]) != MAGIC:
            raise Malformed("not a qcow2 image (bad magic)")
        bits = int.from_bytes(self._buf[20:24], "big")
        if not qfmt.MIN_CLUSTER_BITS <= bits <= qfmt.MAX_CLUSTER_BITS:
            raise Malformed(f"bad cluster_bits {bits}")
        c = 1 << bits
        if len(self._buf) < c:
            return
        h = parse_stream_header(bytes(self._buf[:c]), len(self._buf))
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
