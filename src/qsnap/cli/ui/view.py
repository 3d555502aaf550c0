"""Pure text pieces of `qsnap ui` (bars, the change strip, labels): no Textual, unit-testable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qsnap.cli.render import human_size

BLOCKS = " ▏▎▍▌▋▊▉█"


def bar(value: int, maximum: int, width: int = 8) -> str:
    """A horizontal bar of WIDTH cells, VALUE/MAXIMUM full (eighths of a cell)."""
    if maximum <= 0 or value <= 0:
        return "·" * width
    eighths = max(1, round(8 * width * min(value, maximum) / maximum))
    full, part = divmod(eighths, 8)
    text = "█" * full + (BLOCKS[part] if part else "")
    return text + "·" * (width - len(text))


def strip(ranges: Sequence[tuple[int, int]], size: int, width: int) -> str:
    """The disk as WIDTH cells: '█' where a cell holds a changed byte, '·' where none changed."""
    if width <= 0:
        return ""
    cells = ["·"] * width
    if size <= 0:
        return "".join(cells)
    for offset, length in ranges:
        if length <= 0:
            continue
        first = min(width - 1, offset * width // size)
        last = min(width - 1, (offset + length - 1) * width // size)
        for i in range(first, last + 1):
            cells[i] = "█"
    return "".join(cells)


def format_range(offset: int, length: int) -> str:
    """One changed range as the UI lists it: hex offset, decimal length, human length."""
    return f"{offset:#014x} +{length} ({human_size(length)})"


def short_date(date: object) -> str:
    strftime = getattr(date, "astimezone", None)
    if strftime is None:
        return "?"
    local = date.astimezone()  # type: ignore[attr-defined]
    return str(local.strftime("%Y-%m-%d %H:%M"))


def compact_date(date: object, now: object = None) -> str:
    """Five cells: the local time for today's snapshots, else month-day (the details show the rest)."""
    from datetime import datetime

    if not isinstance(date, datetime):
        return "  ?  "
    local = date.astimezone()
    today = (now if isinstance(now, datetime) else datetime.now().astimezone()).date()
    return local.strftime("%H:%M") if local.date() == today else local.strftime("%m-%d")


FILE_MARKS = {"added": "A", "removed": "D", "modified": "M", "renamed": "R"}


def file_change_line(change: Any) -> str:
    """One change of a file diff, as `qsnap diff --files` prints it."""
    if change.kind == "renamed":
        line = f"R  {change.renamed_from} -> {change.path}"
    else:
        line = f"{FILE_MARKS.get(change.kind, '?')}  {change.path}"
        if change.changes:
            line += f"  ({', '.join(change.changes)})"
    if change.type == "dir" and change.kind != "modified":
        line += "/"
    return line
