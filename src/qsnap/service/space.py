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

    # 1. which roots reach which L2 table
    owners: dict[int, list[int]] = {}
    root_tables: list[set[int]] = []
    root_l1: list[set[int]] = []
    for r, layer in enumerate(layers):
        tables = {o for o in (x & fmt.L1E_OFFSET_MASK for x in layer.l1) if o}
        root_tables.append(tables)
        root_l1.append(set(_span(layer.l1_offset, layer.l1_size * 8, cs)))
        for t in tables:
            owners.setdefault(t, []).append(r)

    # 2. the clusters each L2 table references
    table_clusters: dict[int, frozenset[int]] = {}
    for t, roots in owners.items():
        table_clusters[t] = frozenset(image.l2_host_clusters(t, f"L2 table of the {layers[roots[0]].what}"))

    # 3. clusters in a shared table are shared; exclusivity is decided among private ones
    shared_universe: set[int] = set()
    private: list[set[int]] = [set(root_l1[r]) for r in range(len(layers))]
    for t, roots in owners.items():
        if len(roots) > 1:
            shared_universe.add(t)
            shared_universe.update(table_clusters[t])
        else:
            private[roots[0]].add(t)
            private[roots[0]].update(table_clusters[t])
    counts: Counter[int] = Counter()
    for p in private:
        counts.update(p)

    results: list[RootSpace] = []
    everything: set[int] = set(shared_universe)
    shared_total: set[int] = set(shared_universe)
    for r, layer in enumerate(layers):
        candidates = private[r] - shared_universe
        exclusive = sum(1 for c in candidates if counts[c] == 1)
        referenced: set[int] = set(root_l1[r])
        referenced.update(root_tables[r])
        for t in root_tables[r]:
            referenced.update(table_clusters[t])
        everything.update(private[r])
        shared_total.update(c for c in candidates if counts[c] > 1)
        e = entries[r] if r < len(entries) else None
        results.append(
            RootSpace(
                id=e.id if e else None,
                name=e.name if e else CURRENT,
                exclusive_bytes=exclusive * cs,
                shared_bytes=(len(referenced) - exclusive) * cs,
                referenced_bytes=len(referenced) * cs,
                metadata_bytes=(len(root_l1[r]) + len(root_tables[r])) * cs,
                vm_state_size=e.vm_state_size if e else 0,
                disk_size=layer.disk_size,
            )
        )

    # 4. image-wide metadata, refcounts, leaks
    metadata = _image_metadata(image)
    refcounts = image.refcounts()
    allocated = {i * cs for i, rc in enumerate(refcounts) if rc}
    leaked = allocated - everything - metadata
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
        shared_bytes=len(shared_total) * cs,
        image_metadata_bytes=len(metadata) * cs,
        leaked_bytes=len(leaked) * cs,
        leaked_clusters=len(leaked),
        unreferenced_bytes=(in_file - len(allocated)) * cs,
        dirty=bool(h.incompatible_features & fmt.INCOMPAT_DIRTY),
    )


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
