"""Plain-text rendering shared by the CLIs (no rich here: `qsnap list` must start fast)."""

from __future__ import annotations

from collections.abc import Sequence

from qsnap.core.models import Snapshot

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TextIO


def human_size(n: int | None) -> str:
    """Bytes in binary units, like qemu-img (``0 B``, ``70.5 MiB``)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
        value /= 1024
    return f"{n} B"


def vm_clock(ns: int) -> str:
    total_ms = ns // 1_000_000
    hours, rem = divmod(total_ms, 3_600_000)
    minutes, rem = divmod(rem, 60_000)
    seconds, ms = divmod(rem, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}.{ms:03d}"


def local_date(snapshot: Snapshot) -> str:
    return snapshot.date.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> list[str]:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *[list(r) for r in rows]]:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return lines


def write_json(stream: TextIO, payload: Any) -> None:
    import json

    stream.write(json.dumps(payload, indent=2) + "\n")


LIST_HEADERS = ("ID", "NAME", "DATE", "VM STATE", "VM CLOCK", "DESCRIPTION")


def list_lines(image: str, entries: Sequence[tuple[Snapshot, str | None]]) -> list[str]:
    """`qsnap list` as text: one row per snapshot, oldest first (shared by the fast path)."""
    if not entries:
        return [f"No snapshots in {image}."]
    rows = [
        [snap.id, snap.name, local_date(snap), human_size(snap.vm_state_size), vm_clock(snap.vm_clock_ns),
         description or ""]
        for snap, description in entries
    ]
    return table(rows, LIST_HEADERS)


def list_json(image: str, engine: str, entries: Sequence[tuple[Snapshot, str | None]]) -> dict[str, Any]:
    """`qsnap list --json` (shared by the fast path)."""
    return {
        "image": image,
        "engine": engine,
        "snapshots": [{**snap.to_json(), "description": description} for snap, description in entries],
    }
