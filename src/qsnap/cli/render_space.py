"""Rendering of space accounting and diffs: pure functions writing to a stream.

Plain text when the stream is not a terminal (stable, greppable); on a TTY the space table
is followed by a bar chart of the bytes each snapshot alone holds.
"""

from __future__ import annotations

from typing import TextIO

from qsnap.service.diff import DiffReport
from qsnap.service.space import SpaceReport


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_space(report: SpaceReport, stream: TextIO, *, tty: bool, width: int) -> None:
    """A table of per-snapshot space, totals, and (on a TTY) a bar chart of exclusive bytes."""
    rows = [["ID", "NAME", "EXCLUSIVE", "SHARED", "VM STATE"]]
    for root in report.roots:
        rows.append(
            [
                root.id or "-",
                root.name,
                human(root.exclusive_bytes),
                human(root.shared_bytes),
                human(root.vm_state_size) if root.vm_state_size else "-",
            ]
        )
    for line in _table(rows, {2, 3, 4}):
        stream.write(line + "\n")
    stream.write("\n")
    snapshots_exclusive = sum(s.exclusive_bytes for s in report.snapshots)
    totals = [
        ("file size", report.file_size),
        ("allocated on disk", report.actual_size),
        ("held by snapshots alone", snapshots_exclusive),
        ("held by the current state alone", report.current.exclusive_bytes),
        ("shared", report.shared_bytes),
        ("image metadata", report.image_metadata_bytes),
        ("leaked", report.leaked_bytes),
        ("unused inside the file", report.unreferenced_bytes),
    ]
    label_width = max(len(label) for label, _ in totals)
    for label, value in totals:
        stream.write(f"{label.ljust(label_width)}  {human(value)}\n")
    if report.leaked_clusters:
        stream.write(
            f"{report.leaked_clusters} leaked cluster(s): 'qemu-img check -r leaks' reclaims them"
            f"{' (the image is dirty: refcounts may be stale)' if report.dirty else ''}.\n"
        )
    reclaimable = report.leaked_bytes + report.unreferenced_bytes  # = service.compact.estimate_reclaimable
    if report.file_size and reclaimable > max(0.10 * report.file_size, 8 << 20):  # 10% (and 8 MiB)
        stream.write(
            f"'qsnap compact' would reclaim at least {human(reclaimable)} "
            f"({100 * reclaimable / report.file_size:.0f}% of the file) and keep every snapshot "
            f"('qsnap compact --dry-run' shows the details).\n"
        )
    if tty and report.snapshots:
        stream.write("\n" + "\n".join(bar_chart(report, width)) + "\n")


def bar_chart(report: SpaceReport, width: int) -> list[str]:
    """One bar per snapshot: the bytes deleting it would free."""
    names = [s.name for s in report.snapshots]
    label_width = min(max(len(n) for n in names), max(8, width // 4))
    sizes = [human(s.exclusive_bytes) for s in report.snapshots]
    size_width = max(len(s) for s in sizes)
    bar_width = max(10, width - label_width - size_width - 4)
    biggest = max(s.exclusive_bytes for s in report.snapshots) or 1
    lines = ["Freed by deleting each snapshot:"]
    for snap, size in zip(report.snapshots, sizes, strict=True):
        eighths = round(snap.exclusive_bytes / biggest * bar_width * 8)
        bar = "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]
        name = snap.name if len(snap.name) <= label_width else snap.name[: label_width - 1] + "…"
        lines.append(f"{name.ljust(label_width)}  {size.rjust(size_width)}  {bar}")
    return lines


def render_diff(report: DiffReport, stream: TextIO) -> None:
    """The changed ranges (offset, end, length), then the summary line."""
    if report.ranges:
        rows = [["OFFSET", "END", "LENGTH"]]
        for offset, length in report.ranges:
            rows.append([f"{offset:#x}", f"{offset + length:#x}", human(length)])
        for line in _table(rows, {0, 1, 2}):
            stream.write(line + "\n")
    stream.write(report.summary + "\n")
