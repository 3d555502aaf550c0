"""Build the compacted copy of an image, predict its size, and verify it against the source.

By default the new image is a copy of the clusters some state reaches
(:mod:`qsnap.compact.remap`); ``--compress`` (and what the copy does not handle) replays the
states through QEMU's tools instead:

The replay (see :mod:`qsnap.compact.plan`):

    qemu-img create -f qcow2 -o cluster_size=..,compat=..,extended_l2=..,compression_type=..
    for each snapshot, in table order:
        qemu-io: write the ranges that differ from the previous state
        with VM state: qemu-img snapshot -c TMP; qemu-io write -b (the VM state);
                       qemu-img snapshot -c PLACEHOLDER; -a TMP; -d TMP
                       (so the VM state lives only in this snapshot, as after a savevm)
        without:       qemu-img snapshot -c PLACEHOLDER
    qemu-io: write the current state's differences
    rewrite the snapshot table's entries with the source's (qsnap.compact.table)

:func:`predict` counts what those steps allocate without writing anything; :func:`verify`
compares every snapshot's guest data and VM state, and the current state, through the reader,
reading bytes only where the L2 entries of consecutive states differ in either image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsnap.compact import remap, table
from qsnap.compact.plan import Planner, StepStats, differing
from qsnap.compact.writer import QemuWriter
from qsnap.core.errors import ImageError, VerificationFailed
from qsnap.qcow2 import format as fmt
from qsnap.qcow2.image import Layer, Qcow2Image

Checkpoint = Callable[[str], None]
Progress = Callable[[str, int, int], None]  # (what, done, total)
_VM_CHUNK = 4 << 20
_NOT_COPIED = ~fmt.OFLAG_COPIED & 0xFFFFFFFFFFFFFFFF
REPLAY_ENV = "QSNAP_COMPACT_REPLAY"  # tests and bench/: "1" takes the replay path where the copy could do


def _copy_path(image: Qcow2Image, compress: bool, sparsify: list[tuple[int, int]] | None) -> bool:
    """Whether the new image is built by qsnap.compact.remap (else by replaying the states)."""
    if os.environ.get(REPLAY_ENV) == "1":
        return False
    return remap.unsupported(image, compress=compress, sparsify=bool(sparsify)) is None


@dataclass
class Prediction:
    """The new image's size, cluster by cluster, as the build will allocate it."""

    cluster_size: int
    data_clusters: int = 0
    compressed_bytes: int = 0
    compressed_clusters: int = 0
    l2_tables: int = 0
    l1_clusters: int = 0
    vm_state_clusters: int = 0
    snapshot_table_clusters: int = 0
    refcount_clusters: int = 0
    zero_bytes: int = 0
    steps: int = 0
    method: str = "replay"  # "copy": qsnap.compact.remap; "replay": the states through QEMU's tools

    @property
    def size(self) -> int:
        cs = self.cluster_size
        return self.clusters * cs

    @property
    def clusters(self) -> int:
        cs = self.cluster_size
        compressed = -(-self.compressed_bytes // cs) if self.compressed_bytes else 0
        return 1 + self.data_clusters + compressed + self.l2_tables + self.l1_clusters + \
            self.vm_state_clusters + self.snapshot_table_clusters + self.refcount_clusters

    def to_json(self) -> dict[str, Any]:
        return {
            "predicted_size": self.size,
            "data_clusters": self.data_clusters,
            "compressed_clusters": self.compressed_clusters,
            "l2_tables": self.l2_tables,
            "l1_clusters": self.l1_clusters,
            "vm_state_clusters": self.vm_state_clusters,
            "zero_bytes": self.zero_bytes,
            "method": self.method,
        }


@dataclass
class BuildResult:
    prediction: Prediction
    processes: int = 0
    snapshots: int = 0
    verified_bytes: int = 0  # compared while building (snapshot by snapshot)
    verified_states: int = 0  # the states (table positions) compared while building


def refuse_unsupported(image: Qcow2Image) -> None:
    """Images compaction does not handle (yet), refused before anything is written."""
    h = image.header
    if h.crypt_method:
        raise ImageError(f"{image.path} is encrypted: compact does not rewrite encrypted images.",
                         hint="use qemu-img convert with the image's secret (it drops internal snapshots)")
    if h.incompatible_features & fmt.INCOMPAT_DATA_FILE:
        raise ImageError(f"{image.path} keeps its data in an external data file: compact does not handle it.")
    if h.bitmaps is not None and h.autoclear_features & fmt.AUTOCLEAR_BITMAPS and h.bitmaps[0]:
        raise ImageError(f"{image.path} has persistent dirty bitmaps, which compact would not keep.",
                         hint="remove them (qemu-img bitmap --remove) or back them up first")
    for e in image.snapshot_entries():
        if e.disk_size != image.virtual_size:
            raise ImageError(
                f"Snapshot {e.name!r} (ID {e.id}) has a disk size of {e.disk_size} bytes but the image has "
                f"{image.virtual_size}: compact does not rebuild images resized after a snapshot.")
    if h.incompatible_features & fmt.INCOMPAT_DIRTY:
        raise ImageError(f"{image.path} is marked dirty (lazy refcounts, not closed cleanly).",
                         hint="run 'qemu-img check -r all' on it first")


def create_options(image: Qcow2Image) -> list[str]:
    """The new image's qcow2 settings: those of the source."""
    h = image.header
    v3 = h.version >= 3
    options = [f"cluster_size={image.cluster_size}", f"compat={'1.1' if v3 else '0.10'}"]
    if v3:
        options += [
            f"refcount_bits={h.refcount_bits}",
            f"extended_l2={'on' if h.extended_l2 else 'off'}",
            f"compression_type={fmt.COMPRESSION_TYPES[h.compression_type]}",
            f"lazy_refcounts={'on' if h.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS else 'off'}",
        ]
    return options


def _backing(image: Qcow2Image) -> tuple[str, str] | None:
    h = image.header
    if not h.backing_file:
        return None
    fmt_name = h.backing_format
    if fmt_name is None:
        path = h.backing_file
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(os.path.abspath(image.path)), path)
        with open(path, "rb") as probe:
            fmt_name = "qcow2" if probe.read(4) == fmt.MAGIC else "raw"
    return h.backing_file, fmt_name


class _L1Sim:
    """The active L1 size as QEMU grows it (qcow2_grow_l1_table: by 3/2 steps, not exactly)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def need(self, entries: int) -> None:
        new = max(1, self.size)
        while entries > new:
            new = (new * 3 + 1) // 2
        self.size = max(self.size, new)


def _vm_state_runs(image: Qcow2Image, entry: fmt.SnapshotEntry) -> Iterator[tuple[int, bytes]]:
    """The VM state of ENTRY as (offset, bytes) runs, all-zero clusters left out (they read as
    zeros from the new image too), the last run padded to 512 bytes with the source's bytes."""
    cs = image.cluster_size
    size = entry.vm_state_size
    padded = -(-size // 512) * 512
    for pos in range(0, padded, _VM_CHUNK):
        n = min(_VM_CHUNK, padded - pos)
        buf = image.read_vm_state(entry, pos, n)
        view = memoryview(buf)
        run = -1
        zeros = bytes(cs)
        for c in range(0, n, cs):
            piece = view[c : c + cs].tobytes()  # bytes == bytes is a memcmp; a memoryview compares
            if piece == zeros[: len(piece)]:     # item by item, 50 times slower
                if run >= 0:
                    yield pos + run, bytes(view[run:c])
                    run = -1
            elif run < 0:
                run = c
        if run >= 0:
            yield pos + run, bytes(view[run:n])


def _run_steps(
    image: Qcow2Image,
    planner: Planner,
    writer: QemuWriter | None,
    checkpoint: Checkpoint,
    progress: Progress | None,
    sparsify: list[tuple[int, int]] | None,
    verify_state: Callable[[int], None] | None = None,
) -> Prediction:
    """The build (WRITER given) or its dry run (None): both count the same allocations.
    VERIFY_STATE(k) is called once snapshot k exists in the new image (its data still cached)."""
    cs = image.cluster_size
    span = image.l2_entries * cs
    entries = image.snapshot_entries()
    pred = Prediction(cs)
    l1 = _L1Sim(fmt.size_to_l1(image.virtual_size, image.cluster_bits, image.l2_entries))
    ids: list[str] = []
    raws: list[bytes] = []
    prev: Layer | None = None
    total = len(entries) + 1
    for k, entry in enumerate([*entries, None]):
        layer = image.layer(entry) if entry is not None else image.active
        stats = StepStats()
        extra = sparsify if entry is None and sparsify else ()
        ops = planner.materialize(planner.ranges(prev, layer, extra), entry, stats, estimate=writer is None)
        if writer is not None:
            writer.write(ops)
        else:
            for _ in ops:
                pass
        pred.data_clusters += len(stats.touched_clusters)
        pred.l2_tables += len(stats.touched_l2)
        pred.compressed_clusters += stats.compressed_clusters
        pred.compressed_bytes += stats.compressed_bytes
        pred.zero_bytes += stats.zero_bytes
        if entry is None:
            if progress is not None:
                progress("states", total, total)
            break
        raw = table.source_entry_bytes(image, entry)
        raws.append(raw)
        if entry.vm_state_size:
            vso = image.vm_state_offset(entry)
            tables: set[int] = set()
            temp_id = table.next_id(ids)
            temp_name = f"{table.PLACEHOLDER}tmp-{k}"
            if writer is not None:
                writer.snapshot_create(temp_name)
            ids.append(temp_id)
            checkpoint(f"vm-state-{k + 1}")
            for offset, data in _vm_state_runs(image, entry):
                pred.vm_state_clusters += -(-len(data) // cs)
                tables.update(range((vso + offset) // span, (vso + offset + len(data) - 1) // span + 1))
                if writer is not None:
                    writer.write_vm_state(offset, data)
            pred.l2_tables += len(tables)
            l1.need((vso + entry.vm_state_size + span - 1) // span)
            new_id = table.next_id(ids)
            if writer is not None:
                writer.snapshot_create(table.placeholder_name(len(raw), new_id))
                writer.snapshot_apply(temp_id)
                writer.snapshot_delete(temp_name)
            ids.remove(temp_id)
            ids.append(new_id)
        else:
            new_id = table.next_id(ids)
            if writer is not None:
                writer.snapshot_create(table.placeholder_name(len(raw), new_id))
            ids.append(new_id)
        pred.l1_clusters += -(-l1.size * 8 // cs)
        if verify_state is not None:
            verify_state(k)
        checkpoint(f"snapshot-{k + 1}")
        if progress is not None:
            progress("states", k + 1, total)
        prev = layer
    pred.l1_clusters += -(-l1.size * 8 // cs)  # the active table
    pred.steps = total
    if raws:
        pred.snapshot_table_clusters = -(-len(table.table_bytes(raws)) // cs)
    # refcount blocks and table (qemu-img create starts with one of each)
    bits = image.header.refcount_bits
    per_block = cs * 8 // bits
    rb = rt = 1
    while True:
        base = pred.clusters - pred.refcount_clusters
        new_rb = max(1, -(-(base + rb + rt) // per_block))
        new_rt = max(1, -(-new_rb * 8 // cs))
        if (new_rb, new_rt) == (rb, rt):
            break
        rb, rt = new_rb, new_rt
    pred.refcount_clusters = rb + rt
    if writer is not None:
        writer.drain()
        checkpoint("written")
        table.rewrite(writer.path, raws)
        checkpoint("table")
    return pred


def _cut_free_tail(path: Path) -> None:
    """Cut the clusters at the end of the file whose refcount is 0 (snapshot tables and L1
    copies QEMU freed after the last allocation): nothing references them, and a refcount of 0
    is what clusters past the end of the file have anyway ("== Host cluster management ==")."""
    with Qcow2Image(path) as new:
        counts = new.refcounts()
        last = len(counts)
        while last > 1 and counts[last - 1] == 0:
            last -= 1
        end = last * new.cluster_size
        size = new.file_size
    if end < size:
        os.truncate(path, end)


def _from_plan(plan: remap.Plan, steps: int) -> Prediction:
    cs = plan.cluster_size
    return Prediction(
        cs, data_clusters=plan.data_clusters - plan.compressed_clusters,
        compressed_bytes=plan.compressed_clusters * cs, compressed_clusters=plan.compressed_clusters,
        l2_tables=len(plan.l2_offsets), l1_clusters=plan.l1_clusters,
        snapshot_table_clusters=plan.snapshot_table_clusters,
        refcount_clusters=plan.refcount_block_clusters + plan.refcount_table_clusters,
        zero_bytes=plan.zero_clusters * cs, steps=steps, method="copy")


def predict(image: Qcow2Image, *, compress: bool = False, sparsify: list[tuple[int, int]] | None = None) -> Prediction:
    """The size the new image will have (reads the source's data to find zero clusters)."""
    refuse_unsupported(image)
    if _copy_path(image, compress, sparsify):
        return _from_plan(remap.predict(image, sparsify), len(image.snapshot_entries()) + 1)
    return _run_steps(image, Planner(image, compress=compress), None, lambda _: None, None, sparsify)


def build(
    image: Qcow2Image,
    output: Path,
    workdir: Path,
    *,
    compress: bool = False,
    sparsify: list[tuple[int, int]] | None = None,
    checkpoint: Checkpoint = lambda _: None,
    progress: Progress | None = None,
) -> BuildResult:
    """Write the compacted copy of IMAGE into OUTPUT (which must not exist): by copying the
    reachable clusters (qsnap.compact.remap) where it can, else by replaying the states."""
    refuse_unsupported(image)
    if _copy_path(image, compress, sparsify):
        plan = remap.build(image, output, checkpoint=checkpoint, progress=progress, zeroed=sparsify)
        return BuildResult(_from_plan(plan, len(image.snapshot_entries()) + 1), 0,
                           len(image.snapshot_entries()), 0, 0)
    writer = QemuWriter(output, workdir, v3=image.header.version >= 3)
    source_entries = image.snapshot_entries()
    verified = 0
    buf_s, buf_n = bytearray(_VM_CHUNK), bytearray(_VM_CHUNK)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qsnap-verify")

    def verify_state(k: int) -> None:
        """Snapshot k of the new image against the source's, right after QEMU made it: its
        data is still in the page cache, and a snapshot's clusters never change afterwards
        (the final verify() checks the metadata, after the table is rewritten)."""
        nonlocal verified
        with Qcow2Image(output) as new:
            verified += verify_data(image, new, source_entries[: k + 1], new.snapshot_entries(), buf_s, buf_n,
                                    pool, None, start=k, stop=k + 1)

    try:
        writer.create(image.virtual_size, create_options(image), _backing(image))
        checkpoint("created")
        pred = _run_steps(image, Planner(image, compress=compress), writer, checkpoint, progress, sparsify,
                          verify_state)
    finally:
        writer.cleanup()
        pool.shutdown(wait=True)
    _cut_free_tail(output)
    fd = os.open(output, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return BuildResult(pred, writer.processes, len(image.snapshot_entries()), verified,
                       len(image.snapshot_entries()))


# ------------------------------------------------------------------ verification


def _changed_in(image: Qcow2Image, prev: Layer | None, layer: Layer, l1_index: int, count: int) -> set[int]:
    """Cluster indices (within L1 entry L1_INDEX) whose L2 entries differ between PREV and LAYER."""
    tp = prev.l2_offset(l1_index) if prev is not None else 0
    tt = layer.l2_offset(l1_index)
    if tp == tt:
        return set()
    step = 2 if image.extended_l2 else 1
    ep = image.l2_table(tp) if tp else None
    et = image.l2_table(tt) if tt else None
    out = set()
    for i in differing(ep, et, count, step):
        a = ep[i * step] & _NOT_COPIED if ep is not None else 0
        b = et[i * step] & _NOT_COPIED if et is not None else 0
        if a != b or step == 2:
            out.add(i)
    return out


def _runs(indices: list[int], limit: int) -> Iterator[tuple[int, int]]:
    """Sorted indices as (first, count) runs of consecutive ones, at most LIMIT long."""
    first = prev = -2
    for i in indices:
        if i == prev + 1 and i - first < limit:
            prev = i
            continue
        if first >= 0:
            yield first, prev - first + 1
        first = prev = i
    if first >= 0:
        yield first, prev - first + 1


def _same(source: Qcow2Image, new: Qcow2Image, a: fmt.SnapshotEntry | None, b: fmt.SnapshotEntry | None,
          guest: int, n: int, buf_s: bytearray, buf_n: bytearray, pool: ThreadPoolExecutor,
          zeroed: _Zeroed | None = None) -> bool:
    """Whether N guest bytes at GUEST read the same in both: the two images are read at once
    (the source on POOL's thread: each image object is used by one thread at a time), into
    reused buffers compared by memcmp. ZEROED: ranges the new image must read as zeros instead
    (--sparsify's free guest blocks, current state only)."""
    reading = pool.submit(source.readinto, guest, memoryview(buf_s)[:n], a, zeroed=False)
    new.readinto(guest, memoryview(buf_n)[:n], b, zeroed=False)
    reading.result()
    if zeroed is not None:
        for lo, hi in zeroed.overlapping(guest, guest + n):
            buf_s[lo - guest : hi - guest] = bytes(hi - lo)
    if n == len(buf_s):
        return buf_s == buf_n
    # a memcmp of the first N bytes without copying them (slicing a bytearray copies; comparing
    # memoryviews goes item by item)
    return buf_s.startswith(memoryview(buf_n)[:n])


class _Zeroed:
    """Sorted, disjoint (offset, length) ranges with an overlap query."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.starts = [o for o, _ in ranges]
        self.ranges = ranges

    def overlapping(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        import bisect

        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        while i < len(self.ranges) and self.ranges[i][0] < hi:
            start, length = self.ranges[i]
            if start + length > lo:
                yield max(lo, start), min(hi, start + length)
            i += 1


def verify(source: Qcow2Image, new: Qcow2Image, progress: Progress | None = None, *, start: int = 0,
           sparsified: list[tuple[int, int]] | None = None) -> int:
    """Every snapshot (metadata, guest data, VM state) and the current state of NEW equal
    SOURCE's; VerificationFailed naming the first difference. Returns the bytes compared.

    Induction over the states in table order: where neither image's L2 entries changed since
    the previous state, both still hold what was compared equal there; elsewhere the bytes are
    compared. START: the states before it (table positions) were verified already, while the
    image was built (a snapshot's clusters never change once it exists)."""
    se, ne = source.snapshot_entries(), new.snapshot_entries()
    if len(se) != len(ne):
        raise VerificationFailed(f"The compacted image has {len(ne)} snapshots instead of {len(se)}.")
    for x, y in zip(se, ne, strict=True):
        fields = ("id", "name", "date_sec", "date_nsec", "vm_clock_nsec", "vm_state_size", "disk_size", "icount")
        for f in fields:
            if getattr(x, f) != getattr(y, f):
                raise VerificationFailed(
                    f"Snapshot {x.name!r} (ID {x.id}): {f} is {getattr(y, f)!r} in the compacted image, "
                    f"{getattr(x, f)!r} in the original.")
    buf_s, buf_n = bytearray(_VM_CHUNK), bytearray(_VM_CHUNK)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qsnap-verify") as pool:
        return verify_data(source, new, se, ne, buf_s, buf_n, pool, progress, start=start,
                           zeroed=_Zeroed(sparsified) if sparsified else None)


def verify_data(
    source: Qcow2Image, new: Qcow2Image, se: tuple[fmt.SnapshotEntry, ...], ne: tuple[fmt.SnapshotEntry, ...],
    buf_s: bytearray, buf_n: bytearray, pool: ThreadPoolExecutor, progress: Progress | None,
    *, start: int = 0, stop: int | None = None, zeroed: _Zeroed | None = None,
) -> int:
    """Guest data and VM state of the states [START, STOP) (positions in SE/NE; len(SE) is the
    current state), by induction from state START-1, whose equality is taken as known."""
    cs = source.cluster_size
    span = source.l2_entries * cs
    compared = 0
    prev_s: Layer | None = None
    prev_n: Layer | None = None
    states: list[tuple[fmt.SnapshotEntry | None, fmt.SnapshotEntry | None]] = [*zip(se, ne, strict=True), (None, None)]
    stop = len(states) if stop is None else stop
    if start > 0:
        prev_s, prev_n = source.layer(se[start - 1]), new.layer(ne[start - 1])
    for k in range(start, stop):
        a, b = states[k]
        ls = source.layer(a) if a is not None else source.active
        ln = new.layer(b) if b is not None else new.active
        label = f"snapshot {a.name!r} (ID {a.id})" if a is not None else "the current state"
        disk = ls.disk_size
        if ln.disk_size != disk:
            raise VerificationFailed(f"{label}: disk size {ln.disk_size} instead of {disk}.")
        for l1_index in range((disk + span - 1) // span):
            start = l1_index * span
            count = (min(disk, start + span) - start + cs - 1) // cs
            changed = _changed_in(source, prev_s, ls, l1_index, count) | _changed_in(new, prev_n, ln, l1_index, count)
            for first, run in _runs(sorted(changed), max(1, _VM_CHUNK // cs)):
                guest = start + first * cs
                n = min(run * cs, disk - guest)
                if not _same(source, new, a, b, guest, n, buf_s, buf_n, pool, zeroed if a is None else None):
                    raise VerificationFailed(f"{label}: guest data differs in the range at {guest:#x}.")
                compared += n
        if a is not None and b is not None and a.vm_state_size:
            for pos in range(0, a.vm_state_size, _VM_CHUNK):
                n = min(_VM_CHUNK, a.vm_state_size - pos)
                if source.read_vm_state(a, pos, n) != new.read_vm_state(b, pos, n):
                    raise VerificationFailed(f"{label}: VM state differs at offset {pos:#x}.")
                compared += n
        if progress is not None:
            progress("verify", k + 1, len(states))
        prev_s, prev_n = ls, ln
    return compared
