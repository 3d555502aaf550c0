"""backup, verify, import, archive (thin shells over qsnap.service.backups / qsnap.backup)."""

from __future__ import annotations

import argparse
import fnmatch
import getpass
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qsnap.cli.invocation import Invocation


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from qsnap.cli.options import add_common

    p = sub.add_parser("backup", help="export a snapshot (or @current) into a file")
    add_common(p, json=True)
    p.add_argument("name", metavar="NAME", help="snapshot name, or @current for the current state")
    p.add_argument("output", metavar="OUTPUT", help=".qcow2, .qcow2.gz, .qcow2.zst[.age], .raw or .img; "
                   "s3://BUCKET/KEY.qcow2.zst or restic:REPOSITORY")
    p.add_argument("--id", dest="snapshot_id", metavar="N", help="select the snapshot by ID")
    p.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    p.add_argument("--incremental", action="store_true", help="only the clusters changed since the last backup")
    p.add_argument("--encrypt", action="store_true", help="encrypt (LUKS for .qcow2, age for streams)")
    p.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    p.add_argument("--level", type=int, metavar="N", help="compression level (gzip 1-9, zstd 1-19)")
    p.add_argument("--compress", action="store_true", help="qcow2 compressed clusters (.qcow2 only)")
    p.set_defaults(handler=cmd_backup)

    p = sub.add_parser("verify", help="check a backup against its manifest (and the source)")
    add_common(p, json=True)
    p.add_argument("backup", metavar="BACKUP")
    p.add_argument("--against", metavar="IMAGE", help="also compare the content with the source snapshot in IMAGE")
    p.add_argument("--passphrase-file", metavar="FILE", help="passphrase of an encrypted backup")
    p.add_argument("--snapshot", metavar="ID_OR_NAME", help="restic: targets: the restic snapshot (ID or qsnap name)")
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("import", help="restore a backup into the image (the old one is kept as .bak-*)")
    add_common(p, json=True)
    p.add_argument("backup", metavar="BACKUP")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--passphrase-file", metavar="FILE", help="passphrase of an encrypted backup")
    p.add_argument("--snapshot", metavar="ID_OR_NAME", help="restic: targets: the restic snapshot (ID or qsnap name)")
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser("archive", help="back up matching snapshots into DIR/YYYY-MM/, verify, prune")
    add_common(p, json=True)
    p.add_argument("--match", required=True, metavar="GLOB", help="snapshot names to archive (shell glob)")
    p.add_argument("--to", required=True, dest="to_dir", metavar="DIR", help="a directory or s3://BUCKET/PREFIX/")
    p.add_argument("--keep-days", type=int, metavar="N", help="delete qsnap archives older than N days")
    p.add_argument("--format", dest="fmt", default="qcow2.zst", choices=["qcow2.zst", "qcow2.gz", "qcow2"])
    p.add_argument("--level", type=int, metavar="N")
    p.add_argument("--encrypt", action="store_true")
    p.add_argument("--passphrase-file", metavar="FILE")
    p.set_defaults(handler=cmd_archive)


# ------------------------------------------------------------------ helpers

def passphrase(inv: Invocation, *, needed: bool, confirm: bool = False) -> str | None:
    """--passphrase-file, else $QSNAP_PASSPHRASE, else a TTY prompt; never argv."""
    from qsnap.core.errors import UsageError

    if not needed:
        return None
    path = getattr(inv.args, "passphrase_file", None)
    if path:
        try:
            text = Path(path).read_text().rstrip("\r\n")
        except OSError as exc:
            raise UsageError(f"Cannot read the passphrase file {path}: {exc.strerror}.") from exc
        return text
    if inv.env.environ.get("QSNAP_PASSPHRASE"):
        return inv.env.environ["QSNAP_PASSPHRASE"]
    if inv.env.interactive:
        first = getpass.getpass("Passphrase: ", stream=inv.env.stderr)
        if confirm and getpass.getpass("Again: ", stream=inv.env.stderr) != first:
            raise UsageError("The passphrases differ.")
        return first
    raise UsageError("A passphrase is needed: use --passphrase-file FILE or QSNAP_PASSPHRASE.")


def progress_for(inv: Invocation) -> Callable[[int, int], None] | None:
    """A bar on a TTY (stderr), JSON lines with --json (stderr), nothing when piped."""
    if inv.json:
        def emit(done: int, total: int) -> None:
            inv.env.stderr.write(json.dumps({"progress": {"done": done, "total": total}}) + "\n")
        return _throttled(emit)
    if not inv.env.stderr_isatty:
        return None
    return _RichBar(inv)


class _RichBar:
    """Bytes, rate and ETA on the terminal (stderr) through rich, started on the first call."""

    def __init__(self, inv: Invocation) -> None:
        self.inv = inv
        self.progress: Any = None
        self.task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.progress is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.progress = Progress(
                BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn(),
                console=Console(file=self.inv.env.stderr), transient=False,
            )
            self.progress.start()
            import atexit

            atexit.register(self.close)  # an error mid-way must not leave the terminal in live mode
            self.task = self.progress.add_task("backup", total=total or None)
        self.progress.update(self.task, completed=done, total=total or None)
        if total and done >= total:
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _throttled(fn: Callable[[int, int], None], every: float = 0.2) -> Callable[[int, int], None]:
    last = [0.0]

    def call(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every or done >= total:
            last[0] = now
            fn(done, total)
    return call


def _is_encrypted_backup(path: Path) -> bool:
    from qsnap.backup import load_manifest

    manifest = load_manifest(path)
    return bool(manifest and manifest.get("encryption"))


def _print_warnings(inv: Invocation, warnings: Any) -> None:
    for warning in warnings:
        inv.note(f"warning: {warning}")


# ------------------------------------------------------------------ handlers

def cmd_backup(inv: Invocation) -> int:
    from qsnap.backup import EncryptionSpec
    from qsnap.service.backups import backup

    args = inv.args
    secret = passphrase(inv, needed=args.encrypt, confirm=True)
    result = backup(
        inv.image(), args.name, args.output, snapshot_id=args.snapshot_id, force=args.force, ctx=inv.context(),
        level=args.level, compress=args.compress, incremental=args.incremental,
        encrypt=EncryptionSpec(secret) if secret is not None else None, progress=progress_for(inv),
    )
    _print_warnings(inv, result.warnings)
    if inv.json:
        inv.emit_json(result.to_json())
    else:
        from qsnap.backup.partial import human

        inv.out(f"Backup written to {result.location or result.output} ({human(result.size)}, {result.format}, "
                f"{result.duration_s:.1f} s); manifest {result.manifest_location or result.manifest_path.name}")
    return 0


def cmd_verify(inv: Invocation) -> int:
    from qsnap.backup import verify_backup
    from qsnap.backup.targets import is_remote

    if is_remote(inv.args.backup):
        from qsnap.cli.commands.offsite import cmd_verify_remote

        return cmd_verify_remote(inv)
    path = Path(inv.args.backup)
    against = _against(inv, path) if inv.args.against else None
    secret = passphrase(inv, needed=_is_encrypted_backup(path))
    return report_verify(inv, lambda: verify_backup(path, against=against, passphrase=secret,
                                                    progress=progress_for(inv)))


def report_verify(inv: Invocation, run: Callable[[], Any]) -> int:
    """Run a verification and print its report (also the failed one's, with --json), local or remote."""
    from qsnap.core.errors import VerificationFailed

    try:
        report = run()
    except VerificationFailed as exc:
        failed_report = getattr(exc, "report", None)
        if inv.json and failed_report is not None:
            inv.emit_json(failed_report.to_json())
        raise
    if inv.json:
        inv.emit_json(report.to_json())
    else:
        shown = getattr(report, "location", None) or report.backup
        inv.out(f"Backup {shown} is OK ({len(report.checks)} checks"
                + (f", chain of {len(report.chain)}" if len(report.chain) > 1 else "") + ")")
    return 0


def _against(inv: Invocation, backup: Path) -> tuple[Path, Any]:
    """The source snapshot a backup was made from, per its manifest, in IMAGE."""
    from qsnap.backup import load_manifest

    return against_snapshot(inv.args.against, str(backup), load_manifest(backup))


def against_snapshot(against: str, backup: str, manifest: dict[str, Any] | None) -> tuple[Path, Any]:
    """IMAGE (--against) and the snapshot in it that MANIFEST says BACKUP was made from (local or remote)."""
    from qsnap.core.errors import SnapshotNotFound, VerificationFailed
    from qsnap.engines import qemu_img

    if manifest is None:
        raise VerificationFailed(f"Backup {backup} has no qsnap manifest (an incomplete backup).")
    image = Path(against)
    wanted = (manifest.get("source") or {}).get("snapshot")
    if wanted is None:
        return image, None
    for snap in qemu_img.list_snapshots(image):
        if (snap.id, snap.name, snap.date_iso) == (wanted["id"], wanted["name"], wanted["date"]):
            return image, snap
    raise SnapshotNotFound(f"Snapshot {wanted['name']!r} (ID {wanted['id']}) of the backup is not in {image}.")


def cmd_import(inv: Invocation) -> int:
    from qsnap.backup import import_backup
    from qsnap.backup.targets import is_remote

    remote = is_remote(inv.args.backup)
    path = Path(inv.args.backup)
    explicit = getattr(inv.args, "image", None) or inv.env.environ.get("QCOW2_IMAGE")
    if explicit and not (inv.env.cwd / explicit).exists():
        # Importing into a path that does not exist yet (a lost image) is allowed when the
        # path is named exactly (-i or QCOW2_IMAGE); globs must still match an existing file.
        image = (inv.env.cwd / explicit).absolute()
        if not image.parent.is_dir():
            from qsnap.core.errors import ImageError

            raise ImageError(f"Cannot import into {image}: its directory does not exist.")
    else:
        image = inv.image()
    if image.exists() and not inv.confirm(
        f"Replace {image} with the content of {inv.args.backup if remote else path}? (the old image is kept as .bak-*)"
    ):
        inv.note("Nothing changed.")
        return 1
    if remote:
        from qsnap.cli.commands.offsite import import_remote

        return import_remote(inv, image)
    secret = passphrase(inv, needed=_is_encrypted_backup(path))
    service_import = _service("import_backup")
    if service_import is not None:
        result = service_import(path, image, passphrase=secret, ctx=inv.context())
    else:
        result = import_backup(path, image, passphrase=secret)
    _print_warnings(inv, result.warnings)
    if inv.json:
        inv.emit_json(result.to_json())
    else:
        inv.out(f"Imported {path} into {image}" + (f"; the previous image is kept as {result.previous}"
                                                    if result.previous else ""))
    return 0


def cmd_archive(inv: Invocation) -> int:
    from qsnap.backup import EncryptionSpec, archive
    from qsnap.core.errors import VerificationFailed
    from qsnap.engines import qemu_img

    args = inv.args
    image = inv.image()
    snapshots = [s for s in qemu_img.list_snapshots(image) if fnmatch.fnmatchcase(s.name, args.match)]
    secret = passphrase(inv, needed=args.encrypt, confirm=True)
    encrypt = EncryptionSpec(secret) if secret is not None else None
    service_archive = _service("archive")
    call = service_archive or archive
    from qsnap.backup.targets import is_remote

    to_dir = args.to_dir if is_remote(args.to_dir) else Path(args.to_dir)
    result = call(image, snapshots, to_dir, args.keep_days, args.fmt, level=args.level,
                  encrypt=encrypt, progress=progress_for(inv))
    _print_warnings(inv, result.warnings)
    if inv.json:
        inv.emit_json(result.to_json())
    else:
        for made in result.created:
            inv.out(f"archived {made.output}")
        for skipped in result.skipped:
            inv.out(f"already archived {skipped}")
        for gone in result.deleted:
            inv.out(f"deleted {gone}")
        if not snapshots:
            inv.note(f"No snapshot matches {args.match!r}.")
    for failure in result.failures:
        inv.note(f"error: {failure}")
    if result.failures:
        raise VerificationFailed(f"{len(result.failures)} archive(s) failed: {result.failures[0]}")
    return 0


def _service(name: str) -> Any:
    """The service layer's wrapper (locks, audit), when the lead has added it."""
    from qsnap.service import backups

    return getattr(backups, name, None)
