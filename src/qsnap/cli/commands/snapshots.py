"""list, create, restore, delete, info, check."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from qsnap.cli.invocation import Invocation

if TYPE_CHECKING:
    from qsnap.service.snapshots import ListResult


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from qsnap.cli.options import add_common

    p = sub.add_parser("list", help="list the image's snapshots")
    add_common(p, json=True)
    p.add_argument("--tree", action="store_true", help="draw the snapshot history as a tree")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("create", help="take a snapshot of the current state")
    add_common(p, json=True)
    p.add_argument("name", metavar="NAME")
    p.add_argument("-m", "--message", "--description", dest="description", metavar="DESCRIPTION",
                   help="a description, kept in the sidecar <image>.qsnap.json")
    p.add_argument("--replace", action="store_true",
                   help="replace an existing snapshot of that name (the new one is taken first)")
    p.add_argument("--sync", action="store_true",
                   help="run 'sync' in the guest first (serial console of a 'qsnap vm start' VM, or "
                   "QSNAP_SSH=USER@HOST[:PORT])")
    p.set_defaults(handler=cmd_create)

    p = sub.add_parser("restore", help="revert to a snapshot (a safety snapshot is taken first)")
    add_common(p, json=True)
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--id", dest="snapshot_id", metavar="N", help="select the snapshot by ID")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--no-safety", action="store_true", help="do not take a safety snapshot first")
    p.set_defaults(handler=cmd_restore)

    p = sub.add_parser("delete", help="delete a snapshot (permanent)")
    add_common(p, json=True)
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--id", dest="snapshot_id", metavar="N", help="select the snapshot by ID")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(handler=cmd_delete)

    p = sub.add_parser("info", help="image details, snapshot count and space per snapshot")
    add_common(p, json=True)
    p.add_argument("--no-space", action="store_true", help="skip the per-snapshot space accounting")
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser("diff", help="guest ranges that differ between two snapshots (or @current)")
    add_common(p, json=True)
    p.add_argument("a", metavar="A", help="snapshot name, or @current")
    p.add_argument("b", metavar="B", help="snapshot name, or @current")
    p.add_argument("path", metavar="PATH", nargs="?", help="with --files: only under this guest path")
    p.add_argument("--a-id", metavar="N", help="select A by ID")
    p.add_argument("--b-id", metavar="N", help="select B by ID")
    p.add_argument("--files", action="store_true",
                   help="which guest files were added, removed, modified or renamed (ext2/3/4, GNU/Hurd's ext2)")
    p.add_argument("--content", metavar="GUEST_PATH", help="a unified diff of one text file between A and B")
    p.add_argument("--partition", type=int, metavar="N", help="with --files/--content: the partition (qsnap parts)")
    p.set_defaults(handler=cmd_diff)

    p = sub.add_parser("check", help="qemu-img check, with its verdict as the exit code")
    add_common(p, json=True)
    p.set_defaults(handler=cmd_check)


def _need_target(inv: Invocation) -> None:
    from qsnap.core.errors import UsageError

    if inv.args.name is None and inv.args.snapshot_id is None:
        raise UsageError("Name a snapshot (NAME) or give --id N.")


def render_list(inv: Invocation, result: ListResult) -> None:
    from qsnap.cli.render import list_json, list_lines

    entries = [(e.snapshot, e.description) for e in result.entries]
    if inv.json:
        inv.emit_json(list_json(str(result.image), result.engine, entries))
        return
    for line in list_lines(str(result.image), entries):
        inv.out(line)


def cmd_list(inv: Invocation) -> int:
    from qsnap import service

    if inv.args.tree:
        from qsnap.cli.render_tree import render_tree
        from qsnap.service.history import build_tree

        render_tree(inv, build_tree(inv.image(), inv.context()))
        return 0

    render_list(inv, service.list_snapshots(inv.image(), inv.context()))
    return 0


def cmd_create(inv: Invocation) -> int:
    from qsnap import service
    from qsnap.core.names import validate_name

    if "{" in inv.args.name:
        from datetime import datetime

        from qsnap.service.history import expand_placeholders

        inv.args.name = expand_placeholders(inv.args.name, datetime.now())
    validate_name(inv.args.name)  # before anything else, even finding the image
    result = service.create(inv.image(), inv.args.name, description=inv.args.description,
                            replace=inv.args.replace, ctx=inv.context(), sync=inv.args.sync)
    for warning in result.warnings:
        inv.note(f"warning: {warning}")
    if inv.json:
        inv.emit_json(result.to_json())
        return 0
    snap = result.snapshot
    replaced = f", replacing ID {result.replaced.id}" if result.replaced else ""
    synced = f", guest synced over the {result.synced}" if result.synced else ""
    inv.out(f"Snapshot {snap.name!r} created (ID {snap.id}{replaced}) via {result.engine}{synced}.")
    return 0


def cmd_restore(inv: Invocation) -> int:
    from qsnap import service
    from qsnap.core.names import validate_lookup_name

    _need_target(inv)
    if inv.args.name is not None and inv.args.snapshot_id is None:
        validate_lookup_name(inv.args.name)
    image = inv.image()
    ctx = inv.context()
    _, target = service.resolve(image, inv.args.name, inv.args.snapshot_id, ctx)
    safety = not inv.args.no_safety
    question = (f"Restore {image.name} to snapshot {target.name!r} (ID {target.id})? "
                + ("The current state is kept as a safety snapshot." if safety
                   else "The current state will be LOST (--no-safety)."))
    if not inv.confirm(question):
        inv.note("Nothing was changed.")
        return 1
    result = service.restore(image, target.name, snapshot_id=target.id, safety=safety, ctx=ctx)
    for warning in result.warnings:
        inv.note(f"warning: {warning}")
    if inv.json:
        inv.emit_json(result.to_json())
        return 0
    if result.safety_snapshot is not None:
        inv.out(f"Safety snapshot {result.safety_snapshot.name!r} (ID {result.safety_snapshot.id}) "
                "holds the state before this restore.")
    inv.out(f"Snapshot {result.snapshot.name!r} (ID {result.snapshot.id}) restored via {result.engine}.")
    if result.safety_snapshot is not None:
        inv.out(f"To undo: qsnap -i {image} restore {result.safety_snapshot.name}")
    return 0


def cmd_delete(inv: Invocation) -> int:
    from qsnap import service
    from qsnap.core.names import validate_lookup_name

    _need_target(inv)
    if inv.args.name is not None and inv.args.snapshot_id is None:
        validate_lookup_name(inv.args.name)
    image = inv.image()
    ctx = inv.context()
    _, target = service.resolve(image, inv.args.name, inv.args.snapshot_id, ctx)
    if not inv.confirm(f"Delete snapshot {target.name!r} (ID {target.id}, {target.date_iso}) from "
                       f"{image.name}? This cannot be undone."):
        inv.note("Nothing was changed.")
        return 1
    result = service.delete(image, target.name, snapshot_id=target.id, ctx=ctx)
    for warning in result.warnings:
        inv.note(f"warning: {warning}")
    if inv.json:
        inv.emit_json(result.to_json())
        return 0
    inv.out(f"Snapshot {result.snapshot.name!r} (ID {result.snapshot.id}) deleted via {result.engine}.")
    return 0


def cmd_info(inv: Invocation) -> int:
    from qsnap import service
    from qsnap.cli.render import human_size

    image = inv.image()
    info = service.info(image, inv.context())
    report = None
    if not inv.args.no_space:
        from qsnap.service.inspection import space

        report = space(image)
    if inv.json:
        inv.emit_json({**info.to_json(), "space": report.to_json() if report else None})
        return 0
    rows = [
        ("image", info.path),
        ("format", f"qcow2 (compat {info.compat})" if info.compat else info.format),
        ("virtual size", f"{human_size(info.virtual_size)} ({info.virtual_size} bytes)"),
        ("file size", f"{human_size(info.file_size)} ({info.file_size} bytes)"),
        ("allocated on disk", f"{human_size(info.actual_size)}"),
        ("cluster size", human_size(info.cluster_size)),
        ("snapshots", str(len(info.snapshots))),
    ]
    if info.compression_type:
        rows.append(("compression", info.compression_type))
    if info.refcount_bits:
        rows.append(("refcount bits", str(info.refcount_bits)))
    if info.extended_l2:
        rows.append(("extended L2", "yes"))
    if info.lazy_refcounts:
        rows.append(("lazy refcounts", "yes"))
    if info.encrypted:
        rows.append(("encrypted", "yes"))
    if info.backing_file:
        rows.append(("backing file", info.backing_file))
    if info.corrupt:
        rows.append(("corrupt flag", "SET (run qsnap check)"))
    if info.dirty:
        rows.append(("dirty", "yes (lazy refcounts need repair)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        inv.out(f"{key + ':':<{width + 1}} {value}")
    if report is not None:
        import shutil

        from qsnap.cli.render_space import render_space

        inv.out()
        render_space(report, inv.env.stdout, tty=bool(inv.env.stdout_isatty),
                     width=shutil.get_terminal_size((100, 24)).columns)
    return 0


def cmd_diff(inv: Invocation) -> int:
    from qsnap.cli.render_space import render_diff
    from qsnap.core.errors import UsageError
    from qsnap.service.inspection import diff

    args = inv.args
    if args.content is not None:
        from qsnap.service.filediff import content_diff

        for line in content_diff(inv.image(), args.a, args.b, args.content, a_id=args.a_id, b_id=args.b_id,
                                 partition=args.partition):
            inv.out(line)
        return 0
    if args.files:
        from qsnap.cli.commands.guest import render_file_diff
        from qsnap.service.filediff import diff_files

        files = diff_files(inv.image(), args.a, args.b, args.path or "/", a_id=args.a_id, b_id=args.b_id,
                           partition=args.partition)
        for warning in files.warnings:
            inv.note(f"warning: {warning}")
        if inv.json:
            inv.emit_json(files.to_json())
        else:
            render_file_diff(inv, files)
        return 0
    if args.path is not None or args.partition is not None:
        raise UsageError("PATH and --partition go with --files or --content.")

    report = diff(inv.image(), inv.args.a, inv.args.b, a_id=inv.args.a_id, b_id=inv.args.b_id)
    if inv.json:
        inv.emit_json(report.to_json())
    else:
        render_diff(report, inv.env.stdout)
    return 0


def cmd_check(inv: Invocation) -> int:
    from qsnap import service
    from qsnap.core.errors import CorruptImage

    result, in_use = service.check(inv.image(), inv.context())
    if inv.json:
        inv.emit_json({**result.to_json(), "in_use": in_use})
    else:
        inv.out(f"{result.path}: {result.verdict}")
        inv.out(f"  corruptions: {result.corruptions}, leaked clusters: {result.leaks}, "
                f"check errors: {result.check_errors}")
        if result.allocated_clusters is not None and result.total_clusters:
            inv.out(f"  {result.allocated_clusters}/{result.total_clusters} clusters allocated")
        if result.leaks and not (result.corruptions or result.check_errors):
            inv.out("  leaked clusters waste space but lose no data; "
                    "'qemu-img check -r leaks' reclaims them while the VM is stopped")
        if in_use:
            inv.note("warning: a running VM holds the image; the check read it with force-share "
                     "and may report false leaks or errors")
    if result.corruptions or result.check_errors:
        if not inv.json:
            inv.note(f"qsnap: error: {CorruptImage.__doc__} ({result.corruptions} corruptions)")
        return CorruptImage.exit_code
    return 0
