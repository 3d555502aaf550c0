"""Off-site backups: ``qsnap backups list TARGET`` and the s3:// / restic: sides of verify and
import (``backup`` and ``archive`` reach them through the service layer)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qsnap.cli.invocation import Invocation


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from qsnap.cli.options import ArgumentParser, add_common

    group = sub.add_parser("backups", help="what qsnap stored at a backup target (directory, s3://, restic:)")
    group_sub: argparse._SubParsersAction[argparse.ArgumentParser] = group.add_subparsers(
        dest="backups_command", metavar="ACTION", parser_class=ArgumentParser
    )
    p = group_sub.add_parser("list", help="list the backups (with their manifests) at TARGET")
    add_common(p, json=True)
    p.add_argument("target", metavar="TARGET", help="a directory, s3://BUCKET/PREFIX or restic:REPOSITORY")
    p.set_defaults(handler=cmd_list)


def cmd_list(inv: Invocation) -> int:
    from qsnap.backup.offsite import list_backups
    from qsnap.backup.partial import human
    from qsnap.backup.targets import parse_location

    entries = list_backups(parse_location(inv.args.target))
    if inv.json:
        inv.emit_json({"target": inv.args.target, "backups": entries})
        return 0
    if not entries:
        inv.note(f"No qsnap backups at {inv.args.target}.")
        return 0
    for entry in entries:
        size = human(entry["size"]) if entry.get("size") is not None else "?"
        state = "" if entry.get("complete") else "  INCOMPLETE (no manifest or wrong size)"
        ident = f"{entry['short_id']}  " if entry.get("short_id") else ""
        inv.out(f"{ident}{entry.get('created_at') or '-':<28} {entry.get('snapshot') or '-':<20} {size:>10}  "
                f"{entry['location'] if not ident else entry['name']}{state}")
    return 0


def _remote(text: str) -> Any:
    from qsnap.backup.targets import parse_location

    return parse_location(text)


def _against(inv: Invocation, manifest: dict[str, Any] | None) -> tuple[Path, Any]:
    from qsnap.cli.commands.backup import against_snapshot

    return against_snapshot(inv.args.against, inv.args.backup, manifest)


def cmd_verify_remote(inv: Invocation) -> int:
    from qsnap.backup.offsite import manifest_at, verify_at
    from qsnap.backup.targets import S3Location
    from qsnap.cli.commands.backup import passphrase, progress_for, report_verify

    location = _remote(inv.args.backup)
    # restic: the manifest (built from the snapshot's tags) is needed only to find --against's snapshot
    wanted = isinstance(location, S3Location) or inv.args.against
    manifest = manifest_at(location, inv.args.snapshot) if wanted else None
    against = _against(inv, manifest) if inv.args.against else None
    secret = passphrase(inv, needed=bool(manifest and manifest.get("encryption")))
    return report_verify(inv, lambda: verify_at(location, snapshot=inv.args.snapshot, against=against,
                                                passphrase=secret, progress=progress_for(inv)))


def import_remote(inv: Invocation, image: Path) -> int:
    from qsnap.backup.offsite import manifest_at
    from qsnap.backup.targets import S3Location
    from qsnap.cli.commands.backup import passphrase
    from qsnap.service.backups import import_backup

    location = _remote(inv.args.backup)
    manifest = manifest_at(location) if isinstance(location, S3Location) else None
    secret = passphrase(inv, needed=bool(manifest and manifest.get("encryption")))
    result = import_backup(inv.args.backup, image, passphrase=secret, ctx=inv.context(), snapshot=inv.args.snapshot)
    for warning in result.warnings:
        inv.note(f"warning: {warning}")
    if inv.json:
        inv.emit_json(result.to_json())
    else:
        inv.out(f"Imported {result.location or inv.args.backup} into {image}"
                + (f"; the previous image is kept as {result.previous}" if result.previous else ""))
    return 0
