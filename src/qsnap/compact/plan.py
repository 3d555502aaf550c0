"""What compaction writes, step by step, worked out from the source image's tables.

The new image is rebuilt by replaying the source's states in snapshot table order, then the
current state, into the new image's active layer, and taking a snapshot after each one. Each
step writes only the guest ranges whose L2 entries differ between the previous state and this
one ("== Snapshots ==" in docs/interop/qcow2.txt: equal entries point at the same host cluster,
so they hold the same bytes); qcow2's copy-on-write then shares every untouched cluster between
the new snapshots, as it did in the source.

One step is a stream of :class:`Op` in guest order:

- ``data``: write the target's bytes (all-zero granules become ``zero``/``unmap`` instead, so no
  zero cluster is stored as data);
- ``compressed``: the same, written as qcow2 compressed clusters (source cluster compressed, or
  ``--compress``);
- ``zero``: make the range read as zeros (qemu-io ``write -z -u``: the zero flag, version 3);
- ``unmap``: make the range unallocated (qemu-io ``discard``; version 2 has no zero flag).

Everything here reads the source through :mod:`qsnap.qcow2` and never writes.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from qsnap.qcow2 import format as fmt
from qsnap.qcow2.image import COMPRESSED, DATA, UNALLOCATED, ZERO, Extent, Layer, Qcow2Image

OP_DATA = "data"
OP_COMPRESSED = "compressed"
OP_ZERO = "zero"
OP_UNMAP = "unmap"

_NOT_COPIED = ~fmt.OFLAG_COPIED & 0xFFFFFFFFFFFFFFFF
_MAX_OP = 4 << 20  # bytes of one data write (one qemu-io command)
_MAX_ZERO_OP = 1 << 30


@dataclass(frozen=True)
class Op:
    offset: int
    length: int
    kind: str
    data: bytes | memoryview | None = None  # data/compressed ops after materialize(); a view
    # into a buffer the next op reuses: consume (or copy) it before asking for the next op


class Distinct:
    """Counts distinct indices added as ranges in non-decreasing order (a step's ops come in
    guest order), in constant memory."""

    def __init__(self) -> None:
        self.count = 0
        self.last = -1

    def update(self, indices: range) -> None:
        if not indices:
            return
        first = max(indices.start, self.last + 1)
        if indices.stop - 1 >= first:
            self.count += indices.stop - first
            self.last = indices.stop - 1

    def __len__(self) -> int:
        return self.count


@dataclass
class StepStats:
    """What one step (or a whole plan) writes, counted the way qcow2 allocates it."""

    data_clusters: int = 0  # host clusters newly allocated for guest data
    compressed_bytes: int = 0  # source compressed bytes of clusters kept compressed (estimate)
    compressed_clusters: int = 0
    l2_tables: int = 0  # L2 tables the step writes into (allocated or copied on write)
    vm_state_clusters: int = 0
    vm_state_l2_tables: int = 0
    zero_bytes: int = 0  # source data holding only zeros, written as zero/unmap instead
    touched_l2: Distinct = field(default_factory=lambda: Distinct())
    touched_clusters: Distinct = field(default_factory=lambda: Distinct())

    def add(self, other: StepStats) -> None:
        self.data_clusters += other.data_clusters
        self.compressed_bytes += other.compressed_bytes
        self.compressed_clusters += other.compressed_clusters
        self.l2_tables += other.l2_tables
        self.vm_state_clusters += other.vm_state_clusters
        self.vm_state_l2_tables += other.vm_state_l2_tables
        self.zero_bytes += other.zero_bytes


class Planner:
    """Works out the steps of one compaction of IMAGE (opened read-only)."""

    def __init__(self, image: Qcow2Image, *, compress: bool = False) -> None:
        self.image = image
        self.compress = compress
        self.cs = image.cluster_size
        self.v3 = image.header.version >= 3
        self.backing = bool(image.header.backing_file)
        self.granule = self.cs // fmt.SUBCLUSTERS if image.extended_l2 else self.cs

    # ---------------------------------------------------------------- which ranges

    def _kind(self, entry: int) -> str:
        if entry & fmt.OFLAG_COMPRESSED:
            return COMPRESSED
        if entry & fmt.OFLAG_ZERO and self.v3:
            return ZERO
        if entry & fmt.L2E_OFFSET_MASK:
            return DATA
        return UNALLOCATED

    def _zero_like(self, kind: str) -> bool:
        return kind == ZERO or (kind == UNALLOCATED and not self.backing)

    def _decide(self, prev: str, target: str) -> str | None:
        """The op that turns a range reading like PREV into one reading like TARGET."""
        if target == COMPRESSED:
            return OP_COMPRESSED
        if target == DATA:
            return OP_DATA
        if self._zero_like(prev) and self._zero_like(target):
            return None
        if prev == target == UNALLOCATED:
            return None
        if self._zero_like(target):
            return OP_ZERO if self.v3 else OP_UNMAP
        # target falls through to the backing file and prev does not
        return OP_DATA if self.v3 else OP_UNMAP  # v3 discard would set the zero flag

    def ranges(self, prev: Layer | None, target: Layer, extra_zero: Iterable[tuple[int, int]] = ()) -> Iterator[Op]:
        """The ops (without data) of the step from PREV (None: the empty new image) to TARGET,
        merged, in guest order. EXTRA_ZERO: guest ranges of TARGET to turn into zeros as well
        (--sparsify's free guest blocks; sorted, not overlapping)."""
        ops = self._raw_ranges(prev, target)
        extra = list(extra_zero)
        if extra:
            ops = _overlay_zero(ops, extra, OP_ZERO if self.v3 else OP_UNMAP)
        yield from _merge(ops, self.cs)

    def _raw_ranges(self, prev: Layer | None, target: Layer) -> Iterator[Op]:
        image = self.image
        cs, n = self.cs, image.l2_entries
        span = n * cs
        disk = target.disk_size
        ext_l2 = image.extended_l2
        step = 2 if ext_l2 else 1
        for l1_index in range((disk + span - 1) // span):
            tp = prev.l2_offset(l1_index) if prev is not None else 0
            tt = target.l2_offset(l1_index)
            if tp == tt:
                continue
            start = l1_index * span
            end = min(disk, start + span)
            ep = image.l2_table(tp, f"L2 table of the {prev.what}") if tp and prev is not None else None
            et = image.l2_table(tt, f"L2 table of the {target.what}") if tt else None
            count = (end - start + cs - 1) // cs
            for i in differing(ep, et, count, step):
                a = ep[i * step] & _NOT_COPIED if ep is not None else 0
                b = et[i * step] & _NOT_COPIED if et is not None else 0
                if ext_l2:
                    ba = ep[i * 2 + 1] if ep is not None else 0
                    bb = et[i * 2 + 1] if et is not None else 0
                    if a == b and ba == bb:
                        continue
                elif a == b:
                    continue
                guest = start + i * cs
                length = min(cs, end - guest)
                if not ext_l2:
                    op = self._decide(self._kind(a), self._kind(b))
                    if op is not None:
                        yield Op(guest, length, op)
                    continue
                yield from self._subcluster_ops(prev, target, guest, length)

    def _subcluster_ops(self, prev: Layer | None, target: Layer, guest: int, length: int) -> Iterator[Op]:
        image = self.image
        tgt = list(image._raw_extents(target, guest, guest + length))
        prv = list(image._raw_extents(prev, guest, guest + length)) if prev is not None else \
            [Extent(guest, length, UNALLOCATED)]
        for offset, size, pk, tk in _pieces(prv, tgt):
            op = self._decide(pk, tk)
            if op is not None:
                yield Op(offset, size, op)

    # ---------------------------------------------------------------- the bytes

    def materialize(
        self, ops: Iterable[Op], target: fmt.SnapshotEntry | None, stats: StepStats, *, estimate: bool = False
    ) -> Iterator[Op]:
        """Attach TARGET's bytes (None: the current state) to data ops, in pieces of at most
        4 MiB, turning granules that hold only zeros into zero/unmap ops and --compress'ing
        whole clusters. Counts what the step allocates into STATS; ESTIMATE: also compress
        the compressed clusters to estimate their size (the dry run)."""
        image = self.image
        cs = self.cs
        span = image.l2_entries * cs
        zero_op = OP_ZERO if self.v3 else (OP_UNMAP if not self.backing else None)
        buffer = bytearray(_MAX_OP)
        for op in ops:
            if op.kind in (OP_ZERO, OP_UNMAP):
                for pos in range(op.offset, op.offset + op.length, _MAX_ZERO_OP):
                    n = min(_MAX_ZERO_OP, op.offset + op.length - pos)
                    stats.touched_l2.update(range(pos // span, (pos + n - 1) // span + 1))
                    yield Op(pos, n, op.kind)
                continue
            pos, end = op.offset, op.offset + op.length
            while pos < end:
                n = min(_MAX_OP, end - pos)
                buf = memoryview(buffer)[:n]
                image.readinto(pos, buf, target, zeroed=False)
                for out in self._split_zeros(Op(pos, n, op.kind), buf, zero_op, stats):
                    stats.touched_l2.update(range(out.offset // span, (out.offset + out.length - 1) // span + 1))
                    if out.kind == OP_DATA:
                        stats.touched_clusters.update(range(out.offset // cs, (out.offset + out.length - 1) // cs + 1))
                    elif out.kind == OP_COMPRESSED:
                        stats.compressed_clusters += (out.length + cs - 1) // cs
                        if estimate and out.data is not None:
                            stats.compressed_bytes += self._compressed_size(out.data)
                    yield out
                pos += n

    def _split_zeros(self, op: Op, buf: memoryview, zero_op: str | None, stats: StepStats) -> Iterator[Op]:
        g, cs = self.granule, self.cs
        view = buf
        zeros = bytes(g)
        run_start = op.offset
        run_kind: str | None = None
        pos, end = op.offset, op.offset + op.length

        def emit(start: int, stop: int, kind: str) -> Op:
            if kind in (OP_ZERO, OP_UNMAP):
                return Op(start, stop - start, kind)
            return Op(start, stop - start, kind, view[start - op.offset : stop - op.offset])

        while pos < end:
            n = min(g - (pos % g), end - pos)
            # bytes == bytes is a memcmp; comparing a memoryview goes item by item, 50 times slower
            piece = view[pos - op.offset : pos - op.offset + n].tobytes()
            if zero_op is not None and piece == zeros[:n]:
                kind = zero_op
                stats.zero_bytes += n
            else:
                kind = op.kind
                if kind == OP_DATA and self.compress and pos % cs == 0 and (n == cs or end == pos + n) \
                        and g == cs:
                    kind = OP_COMPRESSED
            if kind == OP_COMPRESSED and run_kind == OP_COMPRESSED:
                yield emit(run_start, pos, run_kind)  # one compressed cluster per write
                run_start = pos
            elif run_kind is not None and kind != run_kind:
                yield emit(run_start, pos, run_kind)
                run_start = pos
            run_kind = kind
            pos += n
        if run_kind is not None:
            yield emit(run_start, end, run_kind)

    def _compressed_size(self, data: bytes | memoryview) -> int:
        """About what QEMU stores for one compressed cluster: the compressed bytes, in
        512-byte sectors (qcow2_co_pwritev_compressed_part; zlib raw deflate with a 4 KiB
        window or zstd, docs/interop/qcow2.txt "Compressed Clusters Descriptor")."""
        if self.image.header.compression_type == 1:
            import zstandard

            size = len(zstandard.ZstdCompressor().compress(data))
        else:
            import zlib

            comp = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
            size = len(comp.compress(data) + comp.flush())
        if size >= len(data):
            return len(data)  # QEMU writes it uncompressed
        return size


_BLOCK = 128  # L2 entries compared at once


def differing(a: array[int] | None, b: array[int] | None, count: int, step: int) -> Iterator[int]:
    """Indices (< COUNT) of the entries of two L2 tables (None: all zero) that may differ, found
    a block of entries at a time (the tables are compared in C; only differing blocks are walked
    in Python). COPIED bits are not masked here: callers compare the masked values."""
    zero = array("Q", bytes(8 * _BLOCK * step))
    for first in range(0, count, _BLOCK):
        last = min(count, first + _BLOCK)
        lo, hi = first * step, last * step
        pa = a[lo:hi] if a is not None else zero[: hi - lo]
        pb = b[lo:hi] if b is not None else zero[: hi - lo]
        if pa == pb:
            continue
        for i in range(first, last):
            if pa[(i - first) * step] != pb[(i - first) * step] or (
                step == 2 and pa[(i - first) * 2 + 1] != pb[(i - first) * 2 + 1]
            ):
                yield i


def _pieces(a: list[Extent], b: list[Extent]) -> Iterator[tuple[int, int, str, str]]:
    """Walk two extent lists covering the same range: (offset, length, kind in A, kind in B)."""
    i = j = 0
    pos = a[0].offset if a else 0
    while i < len(a) and j < len(b):
        ea, eb = a[i], b[j]
        end = min(ea.offset + ea.length, eb.offset + eb.length)
        if end > pos:
            yield pos, end - pos, ea.kind, eb.kind
            pos = end
        if ea.offset + ea.length == end:
            i += 1
        if eb.offset + eb.length == end:
            j += 1


def _merge(ops: Iterable[Op], cluster_size: int) -> Iterator[Op]:
    pending: Op | None = None
    for op in ops:
        if pending is not None and pending.kind == op.kind and pending.offset + pending.length == op.offset:
            pending = Op(pending.offset, pending.length + op.length, op.kind)
            continue
        if pending is not None:
            yield pending
        pending = op
    if pending is not None:
        yield pending


def _overlay_zero(ops: Iterator[Op], zero: list[tuple[int, int]], zero_kind: str) -> Iterator[Op]:
    """Ops with the ZERO ranges turned into zero ops (for --sparsify): data ops are cut around
    them, and the zero ranges are emitted where no op covered them."""
    events: list[Op] = []
    starts = [o for o, _ in zero]
    for op in ops:
        events.extend(_cut(op, zero, starts))
    events.extend(Op(o, n, zero_kind) for o, n in zero)
    events.sort(key=lambda op: op.offset)
    return iter(events)


def _cut(op: Op, zero: list[tuple[int, int]], starts: list[int]) -> Iterator[Op]:
    import bisect

    pos, end = op.offset, op.offset + op.length
    for i in range(max(0, bisect.bisect_right(starts, pos) - 1), len(zero)):
        zo, zn = zero[i]
        if zo >= end:
            break
        if zo + zn <= pos:
            continue
        if zo > pos:
            yield Op(pos, zo - pos, op.kind)
        pos = max(pos, zo + zn)
    if pos < end:
        yield Op(pos, end - pos, op.kind)
