"""The backup code's view of a source image: a thin adapter over :mod:`qsnap.qcow2`.

qsnap has one qcow2 reader (:mod:`qsnap.qcow2`, DESIGN.md); this module only reshapes what
it reports into what the backup writers need: the kind of every guest cluster of one state
(a snapshot or the current state), and the guest data of ascending cluster lists in big
blocks (guest runs are read with :meth:`Qcow2Image.readinto`, i.e. one ``preadv`` straight
into the block per host-contiguous extent; compressed clusters are decompressed by the reader).

Images whose data the fast path does not handle (encrypted, external data file, extended L2,
marked corrupt, a backing file when not allowed) raise :class:`Unsupported` so the caller can
fall back to ``qemu-img``. Broken images raise the reader's CorruptImage/ImageError.

Reading a snapshot is safe while a VM runs: a snapshot's clusters are shared copy-on-write
(refcount >= 2) and are never rewritten while the snapshot exists.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from qsnap.qcow2 import COMPRESSED, open_image
from qsnap.qcow2 import DATA as EXTENT_DATA
from qsnap.qcow2 import ZERO as EXTENT_ZERO
from qsnap.qcow2 import format as qfmt
from qsnap.qcow2.format import SnapshotEntry
from qsnap.qcow2.image import Layer

# Guest cluster kinds in a mapping.
UNALLOCATED = 0  # reads from the backing file, or zeros without one
ZERO = 1  # reads as zeros (v3 zero flag)
DATA = 2  # a host cluster holding the data
COMPRESSED_DATA = 3

_KIND = {EXTENT_DATA: DATA, COMPRESSED: COMPRESSED_DATA, EXTENT_ZERO: ZERO}


_NOT_COPIED = ~qfmt.OFLAG_COPIED & 0xFFFFFFFFFFFFFFFF


def _holds_data(entry: int) -> bool:
    """Whether a standard L2 entry (COPIED cleared) maps data: compressed, or a host cluster
    without the zero flag."""
    return bool(entry & qfmt.OFLAG_COMPRESSED) or (
        bool(entry & qfmt.L2E_OFFSET_MASK) and not entry & qfmt.OFLAG_ZERO
    )


class Unsupported(Exception):
    """The image uses a qcow2 feature the backup fast path does not handle (caller falls back)."""


@dataclass
class Mapping:
    """Which guest clusters of one image state hold what.

    ``kinds[i]`` is UNALLOCATED/ZERO/DATA/COMPRESSED_DATA for guest cluster i; ``entries[i]``
    identifies where its bytes live (host offset of a data cluster, start of the compressed
    bytes of a compressed one, 0 otherwise): equal entries of two states of one image mean
    equal bytes. Arrays keep memory at 9 bytes a cluster.
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


class SourceReader:
    """Read-only access to one state (a snapshot or the current state) of a qcow2 file."""

    def __init__(self, path: Path, snapshot_id: str | None = None, *, allow_backing: bool = False) -> None:
        self.path = Path(path)
        self.image = open_image(self.path)
        try:
            self._setup(snapshot_id, allow_backing)
        except BaseException:
            self.image.close()
            raise

    def _setup(self, snapshot_id: str | None, allow_backing: bool) -> None:
        h = self.image.header
        if h.crypt_method:
            raise Unsupported("encrypted image")
        if h.incompatible_features & (qfmt.INCOMPAT_DATA_FILE | qfmt.INCOMPAT_EXTL2):
            raise Unsupported("external data file or extended L2 entries")
        if h.incompatible_features & qfmt.INCOMPAT_CORRUPT:
            raise Unsupported("image is marked corrupt")
        if h.backing_file:
            if not allow_backing:
                raise Unsupported("image has a backing file")
            if h.backing_format not in (None, "qcow2"):
                raise Unsupported(f"backing file format {h.backing_format}")
            base = Path(h.backing_file)
            if not base.is_absolute():
                base = self.path.absolute().parent / base
            if not base.exists():  # qsnap.qcow2 opens backing files lazily: say it now
                raise FileNotFoundError(f"backing file {base} of {self.path} is missing")
        self.has_backing = bool(h.backing_file)
        self.cluster_size = h.cluster_size
        self.snapshot_id = snapshot_id
        self.state: SnapshotEntry | None = None
        if snapshot_id is not None:
            self.state = next((e for e in self.image.snapshot_entries() if e.id == snapshot_id), None)
            if self.state is None:
                self.image.layer(snapshot_id)  # raises SnapshotNotFound
        self.layer: Layer = self.image.layer(self.state)
        self.virtual_size = self.layer.disk_size
        self._mapping: Mapping | None = None

    @property
    def mapping(self) -> Mapping:
        """The mapping of this reader's state (built on first use)."""
        if self._mapping is None:
            self._mapping = self.map_state(self.state)
        return self._mapping

    def close(self) -> None:
        self.image.close()

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def snapshot_entries(self) -> tuple[SnapshotEntry, ...]:
        return self.image.snapshot_entries()

    def map_state(self, state: SnapshotEntry | None, ranges: Iterable[tuple[int, int]] | None = None) -> Mapping:
        """The mapping of STATE (a snapshot of this image, None: current) over this reader's disk size.

        With RANGES (guest byte ranges), only those are mapped; the rest reads as unallocated.
        """
        c = self.cluster_size
        vsize = self.virtual_size
        n = (vsize + c - 1) // c
        kinds = bytearray(n)
        entries = array("Q", bytes(8 * n))
        extents = (
            self.image.iter_extents(state, 0, vsize)
            if ranges is None
            else (ext for start, end in ranges for ext in self.image.iter_extents(state, start, min(end, vsize)))
        )
        for ext in extents:
            kind = _KIND.get(ext.kind)
            if kind is None:
                continue
            first = ext.offset // c
            last = min(n, (ext.offset + ext.length + c - 1) // c)
            if last <= first:
                continue
            kinds[first:last] = bytes((kind,)) * (last - first)
            if kind == DATA:
                start = ext.host_offset - (ext.offset - first * c)
                entries[first:last] = array("Q", range(start, start + (last - first) * c, c))
            elif kind == COMPRESSED_DATA:
                entries[first] = ext.host_offset
        return Mapping(c, vsize, kinds, entries)

    def diff_state(self, old: SnapshotEntry) -> tuple[list[int], list[int]]:
        """Guest clusters that differ between OLD (a snapshot of this image) and this state:
        (clusters with data here, clusters that read as zeros here but hold data in OLD).

        Same host cluster in both states => same bytes (both are immutable while both exist);
        L2 tables both states share are skipped without being mapped.
        """
        image = self.image
        span = image.l2_entries * self.cluster_size
        mine, theirs = image.layer(self.state), image.layer(old)
        vsize = self.virtual_size
        if mine.disk_size == theirs.disk_size and not image.extended_l2:
            return self._diff_l2_entries(mine, theirs)
        ranges = [
            (k * span, (k + 1) * span)
            for k in range((vsize + span - 1) // span)
            if mine.l2_offset(k) != theirs.l2_offset(k) or min(vsize, (k + 1) * span) > theirs.disk_size
        ]
        cur, before = self.map_state(self.state, ranges), self.map_state(old, ranges)
        changed: list[int] = []
        zeros: list[int] = []
        per_range = span // self.cluster_size
        for start, _ in ranges:
            first = start // self.cluster_size
            for i in range(first, min(first + per_range, cur.cluster_count)):
                kind, old_kind = cur.kinds[i], before.kinds[i]
                if kind == old_kind and cur.entries[i] == before.entries[i]:
                    continue
                if kind >= DATA:
                    changed.append(i)
                elif old_kind >= DATA:  # now reads as zeros, the base has data there
                    zeros.append(i)
        return changed, zeros

    def _diff_l2_entries(self, mine: Layer, theirs: Layer) -> tuple[list[int], list[int]]:
        """:meth:`diff_state` for two states of one disk size: the L2 entries of the tables the
        states do not share are compared directly (no per-cluster extents): equal entries
        (COPIED aside) mean equal bytes."""
        image = self.image
        n = image.l2_entries
        total = (self.virtual_size + self.cluster_size - 1) // self.cluster_size
        empty = array("Q", bytes(8 * n))
        changed: list[int] = []
        zeros: list[int] = []
        for k in range((total + n - 1) // n):
            a_off, b_off = mine.l2_offset(k), theirs.l2_offset(k)
            if a_off == b_off:
                continue
            new = image.l2_table(a_off, f"L2 table {k} of the {mine.what}") if a_off else empty
            before = image.l2_table(b_off, f"L2 table {k} of the {theirs.what}") if b_off else empty
            base = k * n
            for j in range(min(n, total - base)):
                x, y = new[j] & _NOT_COPIED, before[j] & _NOT_COPIED
                if x == y:
                    continue
                if _holds_data(x):
                    changed.append(base + j)
                elif _holds_data(y):  # reads as zeros now, the base has data there
                    zeros.append(base + j)
        return changed, zeros

    def read_cluster(self, index: int) -> bytes | None:
        """Guest cluster INDEX (always a full cluster), or None when it reads as zeros."""
        kind = self.mapping.kinds[index]
        if kind == ZERO or (kind == UNALLOCATED and not self.has_backing):
            return None
        buf = bytearray(self.cluster_size)
        self.image.readinto(index * self.cluster_size, buf, self.state)
        return bytes(buf)

    def iter_blocks(self, indices: Iterable[int], block: int = 4 << 20) -> Iterator[tuple[int, bytes]]:
        """Yield (cluster count, data) for INDICES (ascending), about BLOCK bytes at a time.

        Each block is one fresh buffer (the consumers keep references to it); every run of
        guest-consecutive clusters in it is filled by one :meth:`Qcow2Image.readinto`.
        """
        c = self.cluster_size
        per_block = max(1, block // c)
        image, state = self.image, self.state
        pending: list[int] = []

        def fill() -> bytes:
            buf = bytearray(len(pending) * c)
            view = memoryview(buf)
            k = 0
            while k < len(pending):
                j = k + 1
                while j < len(pending) and pending[j] == pending[j - 1] + 1:
                    j += 1
                image.readinto(pending[k] * c, view[k * c : j * c], state)
                k = j
            # the consumers (hashes, compressors, os.write) only use the buffer protocol
            return cast(bytes, buf)

        for idx in indices:
            pending.append(idx)
            if len(pending) >= per_block:
                yield len(pending), fill()
                pending = []
        if pending:
            yield len(pending), fill()

    def iter_clusters(self, indices: Iterable[int], run: int = 32) -> Iterator[tuple[int, bytes]]:
        """Yield (index, data) for INDICES (ascending), RUN clusters per read at most."""
        c = self.cluster_size
        wanted = list(indices)
        for start in range(0, len(wanted), max(1, run)):
            part = wanted[start : start + max(1, run)]
            for _, data in self.iter_blocks(part, len(part) * c):
                for k, idx in enumerate(part):
                    yield idx, bytes(data[k * c : (k + 1) * c])
