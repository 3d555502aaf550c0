"""`manage-snapshots`: the guide's `scripts/manage-snapshots.sh`, command for command.

Accepts the guide's commands, arguments and environment variables (IMAGE_PATH, QCOW2_IMAGE,
MONITOR_PORT) and prints the guide's messages, so its workflows (rotation, archival, CI) run
unchanged — with qsnap's safety underneath (name rules, no silent overwrite, safety snapshot
before restore, atomic backups).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from qsnap.cli.env import Environment
from qsnap.cli.invocation import Invocation
from qsnap.cli.main import dispatch
from qsnap.cli.options import ArgumentParser, add_common

USAGE_EPILOG = """\
commands:
  create <snapshot-name>                 create a snapshot
  list                                   list snapshots
  restore <snapshot-name>                restore a snapshot (a safety snapshot is taken first)
  delete <snapshot-name>                 delete a snapshot
  backup <snapshot-name> <output-file>   export a snapshot (.qcow2 or .qcow2.gz)

environment: IMAGE_PATH (path or glob), QCOW2_IMAGE, MONITOR_PORT
"""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="manage-snapshots",
        description="QCOW2 snapshot management (the guide's manage-snapshots.sh, backed by qsnap).",
        epilog=USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(parser)
    sub: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(
        dest="command", metavar="<command>", parser_class=ArgumentParser
    )

    p = sub.add_parser("create", help="create a snapshot")
    add_common(p)
    p.add_argument("name", metavar="snapshot-name")
    p.add_argument("-m", "--description", dest="description", help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_create)

    p = sub.add_parser("list", help="list snapshots")
    add_common(p)
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("restore", help="restore a snapshot")
    add_common(p)
    p.add_argument("name", metavar="snapshot-name")
    p.add_argument("--id", dest="snapshot_id", help=argparse.SUPPRESS)
    p.add_argument("-y", "--yes", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-safety", action="store_true", help="skip the safety snapshot")
    p.set_defaults(handler=cmd_restore)

    p = sub.add_parser("delete", help="delete a snapshot")
    add_common(p)
    p.add_argument("name", metavar="snapshot-name")
    p.add_argument("--id", dest="snapshot_id", help=argparse.SUPPRESS)
    p.add_argument("-y", "--yes", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_delete)

    p = sub.add_parser("backup", help="export a snapshot")
    add_common(p)
    p.add_argument("name", metavar="snapshot-name")
    p.add_argument("output", metavar="output-file")
    p.add_argument("--id", dest="snapshot_id", help=argparse.SUPPRESS)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(handler=cmd_backup)
    return parser


def _display(path: Path, env: Environment) -> str:
    try:
        return os.path.relpath(path, env.cwd) if path.is_relative_to(env.cwd) else str(path)
    except ValueError:
        return str(path)


def cmd_list(inv: Invocation) -> int:
    from qsnap import service
    from qsnap.cli.render import human_size, local_date, vm_clock

    image = inv.image()
    result = service.list_snapshots(image, inv.context())
    inv.out(f"Snapshots in: {_display(image, inv.env)}")
    inv.out()
    inv.out("Snapshot list:")
    inv.out(f"{'ID':<10}{'TAG':<24}{'VM SIZE':<11}{'DATE':<22}VM CLOCK")
    for entry in result.entries:
        snap = entry.snapshot
        inv.out(f"{snap.id:<9} {snap.name:<23} {human_size(snap.vm_state_size):<10} "
                f"{local_date(snap):<21} {vm_clock(snap.vm_clock_ns)}")
    return 0


def cmd_create(inv: Invocation) -> int:
    from qsnap import service
    from qsnap.core.names import validate_name

    name = inv.args.name
    inv.out(f"Creating snapshot: {name}")
    validate_name(name)
    result = service.create(inv.image(), name, description=inv.args.description, ctx=inv.context())
    for warning in result.warnings:
        inv.note(f"warning: {warning}")
    inv.out(f"Snapshot '{name}' created successfully")
    return 0


def cmd_restore(inv: Invocation) -> int:
    from qsnap import service
    from qsnap.core.names import validate_lookup_name

    name = inv.args.name
    inv.out(f"Restoring snapshot: {name}")
    if inv.args.snapshot_id is None:
        validate_lookup_name(name)
    image = inv.image()
    ctx = inv.context()
    _, target = service.resolve(image, name, inv.args.snapshot_id, ctx)
    inv.out("WARNING: This will discard all changes since snapshot was created!")
    if not inv.confirm(f"Restore '{name}' (ID {target.id})? The current state is kept as a safety snapshot."
                       if not inv.args.no_safety else f"Restore '{name}' (ID {target.id})?"):
        inv.note("Nothing was changed.")
        return 1
    result = service.restore(image, target.name, snapshot_id=target.id,
                             safety=not inv.args.no_safety, ctx=ctx)
    if result.safety_snapshot is not None:
        inv.out(f"Safety snapshot '{result.safety_snapshot.name}' saved the previous state "
                f"(undo: manage-snapshots restore {result.safety_snapshot.name})")
    inv.out(f"Snapshot '{name}' restored successfully")
    return 0


def cmd_delete(inv: Invocation) -> int:
    from qsnap import service
    from qsnap.core.names import validate_lookup_name

    name = inv.args.name
    inv.out(f"Deleting snapshot: {name}")
    if inv.args.snapshot_id is None:
        validate_lookup_name(name)
    image = inv.image()
    ctx = inv.context()
    _, target = service.resolve(image, name, inv.args.snapshot_id, ctx)
    if not inv.confirm(f"Delete snapshot '{name}' (ID {target.id})? This cannot be undone."):
        inv.note("Nothing was changed.")
        return 1
    service.delete(image, target.name, snapshot_id=target.id, ctx=ctx)
    inv.out(f"Snapshot '{name}' deleted successfully")
    return 0


def cmd_backup(inv: Invocation) -> int:
    from qsnap import service
    from qsnap.core.names import validate_lookup_name

    name = inv.args.name
    inv.out(f"Backing up snapshot: {name} -> {inv.args.output}")
    if inv.args.snapshot_id is None:
        validate_lookup_name(name)
    output = Path(inv.args.output)
    if not output.is_absolute():
        output = inv.env.cwd / output
    result = service.backup(inv.image(), name, output, snapshot_id=inv.args.snapshot_id,
                            force=inv.args.force, ctx=inv.context())
    inv.out(f"Snapshot '{name}' backed up to {inv.args.output} ({result.size} bytes, "
            f"sha256 {result.sha256[:16]}...)")
    return 0


def main(argv: Sequence[str] | None = None, env: Environment | None = None) -> int:
    env = env or Environment()
    argv = sys.argv[1:] if argv is None else argv
    return dispatch(build_parser(), argv, env, "manage-snapshots")


def run() -> None:
    code = main()
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    sys.exit(code)
