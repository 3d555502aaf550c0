"""Block-level diff of two states of one image (snapshots, or the current state).

Method (qcow2 clusters are shared by reference, "== Snapshots ==" in docs/interop/qcow2.txt):

1. equal L1 entries: the whole range one L2 table maps is unchanged (same table);
2. otherwise compare the L2 entries: the same host cluster (or both read as zeros, or both
   fall through to the backing file) is unchanged;
3. otherwise compare the bytes (decompressing where needed), 512 bytes at a time, so a
   rewrite with the same content is no change.

The COPIED flag (bit 63) is ignored: it is only accurate in the active tables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from qsnap.core.models import Snapshot
from qsnap.qcow2 import format as fmt
from qsnap.qcow2.image import COMPRESSED, DATA, UNALLOCATED, Layer, Qcow2Image, open_image

CURRENT = "@current"
SECTOR = 512
_NOT_COPIED = ~fmt.OFLAG_COPIED & 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class DiffReport:
    """The guest ranges that differ between A and B."""

    path: str
    a: str  # snapshot name, or CURRENT
    b: str
    a_id: str | None
    b_id: str | None
    a_disk_size: int
    b_disk_size: int
    ranges: tuple[tuple[int, int], ...]  # (guest offset, length), merged, sorted
    changed_bytes: int
    tables_compared: int  # L2 tables whose entries were compared (L1 entries differed)
    clusters_compared: int  # clusters whose bytes were compared (L2 entries differed)

    @property
    def identical(self) -> bool:
        return not self.ranges

    @property
    def summary(self) -> str:
        size = max(self.a_disk_size, self.b_disk_size)
        if not self.ranges:
            return f"{self.a} and {self.b} are identical ({_human(size)} compared)."
        share = 100.0 * self.changed_bytes / size if size else 0.0
        noun = "range" if len(self.ranges) == 1 else "ranges"
        return (
            f"{_human(self.changed_bytes)} changed in {len(self.ranges)} {noun} "
            f"between {self.a} and {self.b} ({share:.2f}% of {_human(size)})."
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.path,
            "a": {"name": self.a, "id": self.a_id, "disk_size": self.a_disk_size},
            "b": {"name": self.b, "id": self.b_id, "disk_size": self.b_disk_size},
            "ranges": [{"offset": o, "length": n} for o, n in self.ranges],
            "changed_bytes": self.changed_bytes,
            "identical": self.identical,
            "summary": self.summary,
            "tables_compared": self.tables_compared,
            "clusters_compared": self.clusters_compared,
        }


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def diff(path: str | os.PathLike[str], a: Snapshot | None, b: Snapshot | None) -> DiffReport:
    """Changed guest ranges between A and B (Snapshot objects, or None for the current state)."""
    with open_image(path) as image:
        return diff_image(image, a, b)


class _Ranges:
    def __init__(self) -> None:
        self.items: list[list[int]] = []

    def add(self, offset: int, length: int) -> None:
        if self.items and self.items[-1][0] + self.items[-1][1] == offset:
            self.items[-1][1] += length
        else:
            self.items.append([offset, length])


def diff_image(image: Qcow2Image, a: Snapshot | None, b: Snapshot | None) -> DiffReport:
    la, lb = image.layer(a), image.layer(b)
    image._check_data_readable()
    cs = image.cluster_size
    n = image.l2_entries
    span = n * cs
    common = min(la.disk_size, lb.disk_size)
    ranges = _Ranges()
    tables = clusters = 0
    step = 2 if image.extended_l2 else 1
    for l1_index in range((common + span - 1) // span):
        ta, tb = la.l2_offset(l1_index), lb.l2_offset(l1_index)
        start = l1_index * span
        end = min(common, start + span)
        if ta == tb:
            continue
        tables += 1
        entries_a = image.l2_table(ta, f"L2 table of the {la.what}") if ta else None
        entries_b = image.l2_table(tb, f"L2 table of the {lb.what}") if tb else None
        count = (end - start + cs - 1) // cs
        for i in range(count):
            ea = entries_a[i * step] & _NOT_COPIED if entries_a is not None else 0
            eb = entries_b[i * step] & _NOT_COPIED if entries_b is not None else 0
            if step == 2:
                same = ea == eb and (entries_a[2 * i + 1] if entries_a is not None else 0) == (
                    entries_b[2 * i + 1] if entries_b is not None else 0
                )
            else:
                same = ea == eb
            if same:
                continue
            clusters += 1
            guest = start + i * cs
            _compare_bytes(image, la, lb, guest, min(cs, end - guest), ranges)
    if la.disk_size != lb.disk_size:
        clusters += _compare_tail(image, la, lb, common, ranges)
    items = tuple((o, length) for o, length in ranges.items)
    return DiffReport(
        path=image.path,
        a=_label(a),
        b=_label(b),
        a_id=a.id if a else None,
        b_id=b.id if b else None,
        a_disk_size=la.disk_size,
        b_disk_size=lb.disk_size,
        ranges=items,
        changed_bytes=sum(length for _, length in items),
        tables_compared=tables,
        clusters_compared=clusters,
    )


def _label(s: Snapshot | None) -> str:
    return s.name if s is not None else CURRENT


def _compare_bytes(image: Qcow2Image, la: Layer, lb: Layer, guest: int, length: int, ranges: _Ranges) -> None:
    da = bytearray(length)
    db = bytearray(length)
    image._fill(la, guest, memoryview(da))
    image._fill(lb, guest, memoryview(db))
    if da == db:
        return
    va, vb = memoryview(da), memoryview(db)
    for pos in range(0, length, SECTOR):
        stop = min(pos + SECTOR, length)
        if va[pos:stop] != vb[pos:stop]:
            ranges.add(guest + pos, stop - pos)


def _compare_tail(image: Qcow2Image, la: Layer, lb: Layer, common: int, ranges: _Ranges) -> int:
    """Past the smaller disk, the smaller side reads as zeros: compare what the larger holds."""
    bigger = la if la.disk_size > lb.disk_size else lb
    cs = image.cluster_size
    compared = 0
    has_backing = image._backing_image() is not None
    for ext in image._raw_extents(bigger, common, bigger.disk_size):
        if ext.kind in (DATA, COMPRESSED) or (ext.kind == UNALLOCATED and has_backing):
            pos = ext.offset
            while pos < ext.offset + ext.length:
                n = min(cs - (pos % cs), ext.offset + ext.length - pos)
                compared += 1
                _compare_bytes(image, la, lb, pos, n, ranges)
                pos += n
    return compared
