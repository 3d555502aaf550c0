"""Space accounting: which snapshot eats the disk, and what deleting it would free.

Computed from qcow2 metadata alone (no guest data is read). A host cluster belongs to a
*root* (a snapshot, or the current state) when the root's L1 table reaches it: the L1
table's own clusters, the L2 tables it points to, and every cluster those L2 tables hold a
reference to. QEMU keeps one reference per such path ("== Snapshots ==" in
docs/interop/qcow2.txt; block/qcow2-refcount.c qcow2_update_snapshot_refcount), so
deleting snapshot X frees exactly the clusters no other root reaches: X's *exclusive*
clusters. An L2 table shared by two roots shares all its data clusters, which is why this
is computed by reachability and not from refcounts alone.

Deleting a snapshot also rewrites the snapshot table (QEMU writes a new one and frees the
old): that can change the file by a cluster either way and is not part of a snapshot's
exclusive bytes.
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Any

from qsnap.core.errors import ImageError
from qsnap.qcow2 import format as fmt
from qsnap.qcow2.image import Layer, Qcow2Image, open_image

CURRENT = "@current"


@dataclass(frozen=True)
class RootSpace:
    """The space one snapshot (or the current state) holds."""

    id: str | None  # None for the current state
    name: str  # CURRENT for the current state
    exclusive_bytes: int  # only this root reaches them: what deleting it frees
    shared_bytes: int  # reached by this root and at least one other
    referenced_bytes: int  # exclusive + shared
    metadata_bytes: int  # its L1 table and L2 tables (exclusive or not)
    vm_state_size: int
    disk_size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "exclusive_bytes": self.exclusive_bytes,
            "shared_bytes": self.shared_bytes,
            "referenced_bytes": self.referenced_bytes,
            "metadata_bytes": self.metadata_bytes,
            "vm_state_size": self.vm_state_size,
            "disk_size": self.disk_size,
        }


@dataclass(frozen=True)
class SpaceReport:
    """Where the bytes of a qcow2 file go."""

    path: str
    cluster_size: int
    virtual_size: int
    file_size: int  # apparent length
    actual_size: int  # allocated on the host filesystem (st_blocks * 512)
    snapshots: tuple[RootSpace, ...]  # table order
    current: RootSpace
    allocated_bytes: int  # clusters inside the file with a refcount > 0
    shared_bytes: int  # clusters reached by two roots or more
    image_metadata_bytes: int  # header, refcount structures, snapshot table, bitmaps, crypto header
    leaked_bytes: int  # refcount > 0 but nothing reaches them
    leaked_clusters: int
    unreferenced_bytes: int  # clusters inside the file with refcount 0
    dirty: bool  # refcounts may be stale (lazy refcounts): leaks are then approximate

    @property
    def roots(self) -> tuple[RootSpace, ...]:
        return (*self.snapshots, self.current)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.path,
            "cluster_size": self.cluster_size,
            "virtual_size": self.virtual_size,
            "file_size": self.file_size,
            "actual_size": self.actual_size,
            "allocated_bytes": self.allocated_bytes,
            "shared_bytes": self.shared_bytes,
            "image_metadata_bytes": self.image_metadata_bytes,
            "leaked_bytes": self.leaked_bytes,
            "leaked_clusters": self.leaked_clusters,
            "unreferenced_bytes": self.unreferenced_bytes,
            "dirty": self.dirty,
            "snapshots": [s.to_json() for s in self.snapshots],
            "current": self.current.to_json(),
        }


def account(path: str | os.PathLike[str]) -> SpaceReport:
    """Account for every cluster of the image at PATH (read-only, metadata only)."""
    with open_image(path) as image:
        return account_image(image)


def _span(offset: int, length: int, cluster_size: int) -> range:
    if length <= 0:
        return range(0)
    first = offset & ~(cluster_size - 1)
    return range(first, offset + length, cluster_size)


def account_image(image: Qcow2Image) -> SpaceReport:
    h = image.header
    if h.incompatible_features & fmt.INCOMPAT_DATA_FILE:
        raise ImageError(f"{image.path} keeps its data in an external data file: its space is not in this file.")
    cs = image.cluster_size
    entries = image.snapshot_entries()
    layers: list[Layer] = [image.layer(e) for e in entries] + [image.active]

    # Who reaches each host cluster, as a bit set of roots (bit r: layers[r]). The pass goes
    # over each L2 table once, whatever number of roots share it, so the work grows with the
    # number of distinct L2 tables, not with snapshots x clusters. Clusters are grouped by
    # their set of roots: a group per distinct set, one small int per host cluster.
    n_roots = len(layers)
    owners: dict[int, int] = {}  # L2 table offset -> bit set of the roots reaching it
    root_l1: list[range] = []
    root_tables: list[int] = []
    for r, layer in enumerate(layers):
        bit = 1 << r
        tables = {o for o in (x & fmt.L1E_OFFSET_MASK for x in layer.l1) if o}
        root_tables.append(len(tables))
        root_l1.append(_span(layer.l1_offset, layer.l1_size * 8, cs))
        for t in tables:
            owners[t] = owners.get(t, 0) | bit
    reach = _Reach(image.file_size // cs + 1)
    for r, span in enumerate(root_l1):
        for c in span:
            reach.add(c // cs, 1 << r)
    for t, roots in owners.items():
        what = f"L2 table of the {layers[(roots & -roots).bit_length() - 1].what}"
        reach.add(t // cs, roots)
        reach.add_all([c // cs for c in image.l2_host_clusters(t, what)], roots)

    exclusive = [0] * n_roots
    referenced = [0] * n_roots
    shared_count = 0
    for group, count in reach.counts().items():
        roots = reach.sets[group]
        if not roots:
            continue
        if roots & (roots - 1):
            shared_count += count
        else:
            exclusive[roots.bit_length() - 1] += count
        while roots:
            low = roots & -roots
            referenced[low.bit_length() - 1] += count
            roots ^= low

    results: list[RootSpace] = []
    for r, layer in enumerate(layers):
        e = entries[r] if r < len(entries) else None
        results.append(
            RootSpace(
                id=e.id if e else None,
                name=e.name if e else CURRENT,
                exclusive_bytes=exclusive[r] * cs,
                shared_bytes=(referenced[r] - exclusive[r]) * cs,
                referenced_bytes=referenced[r] * cs,
                metadata_bytes=(len(root_l1[r]) + root_tables[r]) * cs,
                vm_state_size=e.vm_state_size if e else 0,
                disk_size=layer.disk_size,
            )
        )

    # 4. image-wide metadata, refcounts, leaks
    metadata = _image_metadata(image)
    refcounts = image.refcounts()
    allocated = [i for i, rc in enumerate(refcounts) if rc]
    leaked = [i for i in allocated if not reach.reaches(i) and i * cs not in metadata]
    in_file = len(refcounts)
    return SpaceReport(
        path=image.path,
        cluster_size=cs,
        virtual_size=image.virtual_size,
        file_size=image.file_size,
        actual_size=image.info().actual_size,
        snapshots=tuple(results[:-1]),
        current=results[-1],
        allocated_bytes=len(allocated) * cs,
        shared_bytes=shared_count * cs,
        image_metadata_bytes=len(metadata) * cs,
        leaked_bytes=len(leaked) * cs,
        leaked_clusters=len(leaked),
        unreferenced_bytes=(in_file - len(allocated)) * cs,
        dirty=bool(h.incompatible_features & fmt.INCOMPAT_DIRTY),
    )


class _Reach:
    """For each host cluster index, the set of roots reaching it, interned: ``group[i]``
    indexes ``sets`` (bit sets of roots; group 0 is the empty set). Indices past the file's
    end (only in damaged images) are kept in a dict."""

    def __init__(self, clusters: int) -> None:
        self.group = array("l", bytes(8 * clusters)) if array("l").itemsize == 8 else array("q", bytes(8 * clusters))
        self.beyond: dict[int, int] = {}
        self.sets: list[int] = [0]
        self._index: dict[int, int] = {0: 0}

    def _intern(self, roots: int) -> int:
        g = self._index.get(roots)
        if g is None:
            g = self._index[roots] = len(self.sets)
            self.sets.append(roots)
        return g

    def add(self, i: int, roots: int) -> None:
        self.add_all([i], roots)

    def add_all(self, indices: list[int], roots: int) -> None:
        mine = self._intern(roots)
        group, n, sets = self.group, len(self.group), self.sets
        merged: dict[int, int] = {mine: mine, 0: mine}  # old group -> group after adding ROOTS
        for i in indices:
            if i >= n:
                self.beyond[i] = self._intern(sets[self.beyond.get(i, 0)] | roots)
                continue
            old = group[i]
            new = merged.get(old)
            if new is None:
                new = merged[old] = self._intern(sets[old] | roots)
            group[i] = new

    def counts(self) -> Counter[int]:
        found = Counter(self.group)
        found.update(self.beyond.values())
        return found

    def reaches(self, i: int) -> bool:
        """Whether some root reaches host cluster index I."""
        return bool(self.group[i] if i < len(self.group) else self.beyond.get(i, 0))


def _image_metadata(image: Qcow2Image) -> set[int]:
    """Clusters of structures that belong to the image, not to a snapshot."""
    h = image.header
    cs = image.cluster_size
    out: set[int] = {0}  # header, extensions and backing file name live in cluster 0
    out.update(_span(h.refcount_table_offset, h.refcount_table_clusters * cs, cs))
    reftable = image._read_table(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
    for i in range(0, len(reftable) // 8 * 8, 8):
        block = int.from_bytes(reftable[i : i + 8], "big") & fmt.REFT_OFFSET_MASK
        if block:
            out.add(block)
    out.update(_span(h.snapshots_offset, fmt.snapshot_table_size(h, image.snapshot_entries()), cs))
    if h.crypto_header is not None:
        out.update(_span(h.crypto_header[0], h.crypto_header[1], cs))
    if h.bitmaps is not None and h.autoclear_features & fmt.AUTOCLEAR_BITMAPS:
        out.update(_bitmap_clusters(image, *h.bitmaps))
    return out


def _bitmap_clusters(image: Qcow2Image, nb: int, dir_size: int, dir_offset: int) -> set[int]:
    """Clusters of persistent dirty bitmaps ("== Bitmaps =="): directory, tables, data."""
    cs = image.cluster_size
    out = set(_span(dir_offset, dir_size, cs))
    raw = image._read_exact(dir_offset, dir_size, "bitmap directory")
    pos = 0
    entry = fmt.BITMAP_DIR_ENTRY
    for _ in range(nb):
        if pos + entry.size > len(raw):
            break
        table_offset, table_size, _flags, _type, _gran, name_size, extra = entry.unpack_from(raw, pos)
        pos = (pos + entry.size + extra + name_size + 7) & ~7
        out.update(_span(table_offset, table_size * 8, cs))
        table = image._read_table(table_offset, table_size * 8, "bitmap table")
        for i in range(0, len(table), 8):
            data = int.from_bytes(table[i : i + 8], "big") & fmt.L2E_OFFSET_MASK
            if data:
                out.add(data)
    return out
