"""parts, ls, cat, extract, fsck: inside a snapshot's guest filesystem (and `diff --files`'s renderer)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from qsnap.cli.invocation import Invocation
from qsnap.cli.options import add_common

if TYPE_CHECKING:
    from qsnap.service.filediff import FileDiffReport
    from qsnap.service.guestfiles import FileInfo, GuestState

TARGET_HELP = "SNAP[:PATH]: a snapshot name (or @current) and a path inside its guest filesystem"


def _guest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id", dest="snapshot_id", metavar="N", help="select the snapshot by ID")
    p.add_argument("--partition", type=int, metavar="N",
                   help="partition number (see qsnap parts); default: the first Linux/ext one")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("parts", help="partitions of a snapshot's disk (MBR, GPT) and their filesystems")
    add_common(p, json=True)
    p.add_argument("target", metavar="SNAP", help="snapshot name, or @current")
    p.add_argument("--id", dest="snapshot_id", metavar="N", help="select the snapshot by ID")
    p.set_defaults(handler=cmd_parts)

    p = sub.add_parser("ls", help="list files inside a snapshot (no root, no mount, no copy)")
    add_common(p, json=True)
    p.add_argument("target", metavar="SNAP[:PATH]", help=TARGET_HELP)
    p.add_argument("-l", dest="long", action="store_true", help="long listing (mode, owner, size, date)")
    p.add_argument("-R", dest="recursive", action="store_true", help="list subdirectories recursively")
    _guest_options(p)
    p.set_defaults(handler=cmd_ls)

    p = sub.add_parser("cat", help="print a file from inside a snapshot")
    add_common(p)
    p.add_argument("target", metavar="SNAP:PATH", help=TARGET_HELP)
    _guest_options(p)
    p.set_defaults(handler=cmd_cat)

    p = sub.add_parser("extract", help="copy a file or directory tree out of a snapshot")
    add_common(p, json=True)
    p.add_argument("target", metavar="SNAP:PATH", help=TARGET_HELP)
    p.add_argument("dest", metavar="DEST", help="where to put it (an existing directory receives it by name)")
    p.add_argument("--force", action="store_true", help="replace DEST's existing copy")
    _guest_options(p)
    p.set_defaults(handler=cmd_extract)

    p = sub.add_parser("fsck", help="read-only check of a snapshot's guest filesystem (the real e2fsck -fn)")
    add_common(p, json=True)
    p.add_argument("target", metavar="SNAP", help="snapshot name, or @current")
    _guest_options(p)
    p.set_defaults(handler=cmd_fsck)


def _warn(inv: Invocation, warnings: list[str]) -> None:
    for warning in warnings:
        inv.note(f"warning: {warning}")


def _open(inv: Invocation, need_fs: bool = True) -> tuple[GuestState, str]:
    from qsnap.service.guestfiles import check_target_path, open_state

    check_target_path(inv.args.target)
    state, path = open_state(inv.image(), inv.args.target, snapshot_id=inv.args.snapshot_id,
                             partition=getattr(inv.args, "partition", None), need_fs=need_fs)
    _warn(inv, state.warnings)
    return state, path


def cmd_parts(inv: Invocation) -> int:
    from qsnap.cli.render import human_size, table

    state, _ = _open(inv, need_fs=False)
    with state:
        parts = state.partitions
        if inv.json:
            inv.emit_json({"image": str(state.image_path), "state": state.label, "disk_size": state.disk.size,
                           "partitions": [p.to_json() for p in parts]})
            return 0
        rows = [[str(p.number), p.scheme, str(p.start), human_size(p.size), p.type_name + (" *" if p.bootable else ""),
                 p.filesystem or "-", p.name] for p in parts]
        for line in table(rows, ["N", "SCHEME", "START", "SIZE", "TYPE", "FS", "NAME"]):
            inv.out(line)
    return 0


_MODES: dict[int, str] = {}


def _mode_string(info: FileInfo) -> str:
    text = _MODES.get(info.mode & 0xFFFF)
    if text is None:
        import stat

        text = _MODES[info.mode & 0xFFFF] = stat.filemode(info.mode & 0xFFFF)
    if info.translator:
        text += "t"  # a passive translator, as the Hurd's ls shows it with its own flag
    return text


_DATES: dict[int, str] = {}


def printable(text: str) -> str:
    """TEXT with control characters and undecodable bytes escaped (GNU ls -b style), so a guest's
    file names cannot send escape sequences to the terminal. JSON output keeps the names as they are."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
            continue
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
            code -= 0xDC00
        out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)


def _date(mtime: int) -> str:
    text = _DATES.get(mtime)
    if text is None:
        from datetime import datetime

        text = _DATES[mtime] = datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")
    return text


def _format_entry(info: FileInfo, long: bool, show_path: bool) -> str:
    name = printable(info.path if show_path else info.name)
    if not long:
        return name
    when = _date(info.mtime)
    line = f"{_mode_string(info)} {info.links:>3} {info.uid:>5} {info.gid:>5} {info.size:>10} {when} {name}"
    if info.target is not None:
        line += f" -> {printable(info.target)}"
    if info.translator is not None:
        line += f"  [translator: {printable(info.translator)}]"
    return line


def cmd_ls(inv: Invocation) -> int:
    from qsnap.service.guestfiles import list_dir

    state, path = _open(inv)
    with state:
        entries = list_dir(state, path, recursive=inv.args.recursive, details=inv.json or inv.args.long)
        if inv.json:
            fs = state.filesystem
            inv.emit_json({"image": str(state.image_path), "state": state.label, "path": path,
                           "partition": state.partition.number if state.partition else None,
                           "filesystem": fs.describe(), "entries": [e.to_json() for e in entries],
                           "warnings": state.warnings})
            return 0
        lines: list[str] = []
        for info in entries:  # written in batches: one write per line costs as much as the listing
            lines.append(_format_entry(info, inv.args.long, inv.args.recursive))
            if len(lines) >= 4096:
                inv.out("\n".join(lines))
                lines.clear()
        if lines:
            inv.out("\n".join(lines))
    return 0


def cmd_cat(inv: Invocation) -> int:
    from qsnap.service.guestfiles import cat

    state, path = _open(inv)
    with state:
        stream = inv.env.stdout
        out = getattr(stream, "buffer", None)
        for chunk in cat(state, path):
            if out is not None:
                out.write(chunk)
            else:
                stream.write(chunk.decode("utf-8", "replace"))
        if out is not None:
            out.flush()
    return 0


def cmd_extract(inv: Invocation) -> int:
    from qsnap.service.guestfiles import extract

    state, path = _open(inv)
    with state:
        result = extract(state, path, inv.args.dest, force=inv.args.force)
    if inv.json:
        inv.emit_json(result.to_json())
        return 0
    parts = [f"{result.files} files", f"{result.directories} directories", f"{result.symlinks} symlinks"]
    if result.hardlinks:
        parts.append(f"{result.hardlinks} hard links")
    if result.special:
        parts.append(f"{result.special} fifos")
    inv.out(f"Extracted {state.label}:{result.source} to {result.destination} ({', '.join(parts)}, "
            f"{result.bytes} bytes).")
    for skipped in result.skipped:
        inv.note(f"skipped {printable(skipped)}: device nodes and sockets are never created")
    if not result.owners:
        inv.note("note: owners were not kept (only root can set them); modes and times were")
    return 0


def cmd_fsck(inv: Invocation) -> int:
    from qsnap.core.errors import CorruptFilesystem
    from qsnap.service.fsck import fsck
    from qsnap.service.guestfiles import check_target_path

    check_target_path(inv.args.target)
    result = fsck(inv.image(), inv.args.target, snapshot_id=inv.args.snapshot_id, partition=inv.args.partition)
    _warn(inv, result.warnings)
    if inv.json:
        inv.emit_json(result.to_json())
    elif result.clean:
        inv.out(f"{result.state}: {result.kind} filesystem on partition {result.partition} is clean "
                f"(e2fsck -fn, {result.seconds:.1f} s, {result.metadata_bytes} bytes of metadata read).")
    else:
        inv.out(f"{result.state}: {result.kind} filesystem on partition {result.partition} is DAMAGED "
                f"(e2fsck -fn exit {result.exit_code}):")
        for line in result.findings:
            inv.out(f"  {printable(line)}")
    if not result.clean:
        if not inv.json:
            first = result.findings[0] if result.findings else "e2fsck reported errors"
            inv.note(f"qsnap: error: {CorruptFilesystem.__doc__} ({first})")
        return CorruptFilesystem.exit_code
    return 0


def render_file_diff(inv: Invocation, report: FileDiffReport) -> None:
    marks = {"added": "A", "removed": "D", "modified": "M", "renamed": "R"}
    for change in report.changes:
        line = f"{marks[change.kind]}  {printable(change.path)}"
        if change.kind == "renamed":
            line = f"R  {printable(change.renamed_from or '')} -> {printable(change.path)}"
        elif change.changes:
            line += f"  ({', '.join(change.changes)})"
        if change.type == "dir" and change.kind != "modified":
            line += "/"
        inv.out(line)
    inv.out(report.summary)
