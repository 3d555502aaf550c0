"""Backup use cases: the service side (name resolution, locking, routing, audit) around
:mod:`qsnap.backup`, which knows formats, manifests and verification."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsnap.core.errors import ImageInUse, QsnapError
from qsnap.core.names import resolve_snapshot, validate_lookup_name
from qsnap.engines import qemu_img
from qsnap.service.image import check_image_file
from qsnap.service.snapshots import DEFAULT_CONTEXT, Context, open_engine

if TYPE_CHECKING:
    from qsnap.backup import BackupResult

CURRENT = "@current"
TEMP_PREFIX = "qsnap-backup-tmp-"


def backup(
    image: str | os.PathLike[str],
    name: str,
    output: str | os.PathLike[str],
    *,
    snapshot_id: str | None = None,
    force: bool = False,
    ctx: Context = DEFAULT_CONTEXT,
    **options: Any,
) -> BackupResult:
    """Export snapshot NAME (or ``@current``, the current state) of IMAGE into OUTPUT.

    The image lock is held for the whole backup, so no qsnap command deletes the snapshot
    while its clusters are being read. ``@current`` of a running VM goes through a temporary
    snapshot that is removed afterwards.
    """
    from qsnap.backup import export_snapshot
    from qsnap.backup.targets import is_remote, parse_location
    from qsnap.service import audit
    from qsnap.service.lock import image_lock

    current = name == CURRENT and snapshot_id is None
    if not current and snapshot_id is None:
        validate_lookup_name(name)
    path = check_image_file(Path(image).absolute())
    remote = parse_location(str(output)) if is_remote(output) else None
    out = Path(output).absolute()

    def export(snapshot: Any) -> BackupResult:
        if remote is not None:
            from qsnap.backup.offsite import export_to

            assert not isinstance(remote, Path)
            return export_to(path, snapshot, remote, force=force, **options)
        return export_snapshot(path, snapshot, out, force=force, **options)

    with image_lock(path, f"backup {name}", ctx.lock_timeout), \
            audit.recorded(path, "backup", name) as rec, \
            open_engine(path, ctx, write=current) as engine:
        rec.engine = engine.name
        rec.details["output"] = str(remote or out)
        if not current:
            snapshot = resolve_snapshot(engine.list_snapshots(), name, snapshot_id)
            rec.details["snapshot_id"] = snapshot.id
            return export(snapshot)
        if engine.name == qemu_img.NAME:
            # Offline: nothing may write the image while we copy its current state.
            try:
                qemu_img.check(path)
            except ImageInUse as exc:
                raise ImageInUse(
                    f"{path} is in use by a running VM, so its current state is changing.",
                    hint="let qsnap use the VM's monitor (--monitor ADDR) to back up through a "
                    "temporary snapshot, or stop the VM",
                ) from exc
            return export(None)
        temp_name = f"{TEMP_PREFIX}{datetime.now():%Y%m%d-%H%M%S-%f}"
        engine.create(temp_name)
        try:
            temp = resolve_snapshot(engine.list_snapshots(), temp_name)
            rec.details["temporary_snapshot"] = temp_name
            return export(temp)
        finally:
            remaining = [s for s in engine.list_snapshots() if s.name == temp_name]
            for snap in remaining:
                engine.delete(snap)


def import_backup(
    backup_path: str | os.PathLike[str],
    image: str | os.PathLike[str],
    *,
    passphrase: str | None = None,
    ctx: Context = DEFAULT_CONTEXT,
    snapshot: str | None = None,
) -> Any:
    """The guide's "Restoring from Backup": replace IMAGE with a verified backup (a local file,
    ``s3://BUCKET/KEY`` or ``restic:REPO`` with SNAPSHOT, a restic snapshot ID or qsnap name).

    The VM must not hold the image: when qsnap knows how to stop and start it (the VM that
    ``qsnap vm start`` launched, or ``--vm compose:SERVICE``), it does so around the import;
    otherwise a running VM makes this exit 8. The previous image is kept as ``.bak-*``.
    """
    from qsnap.backup import import_backup as library_import
    from qsnap.backup.targets import is_remote, parse_location
    from qsnap.service import audit
    from qsnap.service.lock import image_lock
    from qsnap.vm import NoController, controller_for

    path = Path(os.path.realpath(image))  # a symlinked image: replace the file it points at
    remote = parse_location(str(backup_path)) if is_remote(backup_path) else None
    source = Path(backup_path).absolute()
    with image_lock(path, f"import {remote or source.name}", ctx.lock_timeout), \
            audit.recorded(path, "import", None) as rec:
        rec.details["backup"] = str(remote or source)
        controller = controller_for(path, ctx.vm) if path.exists() else NoController()
        restart = False
        if path.exists():
            try:
                qemu_img.check(path)
            except ImageInUse as exc:
                if isinstance(controller, NoController) or not controller.is_running():
                    raise ImageInUse(
                        f"{path} is in use by a running VM; importing would pull the disk from under it.",
                        hint="stop the VM first, or tell qsnap how to with --vm compose:SERVICE[@FILE]",
                    ) from exc
                controller.stop()
                restart = True
                rec.details["vm_stopped"] = controller.name
            except QsnapError:
                pass  # a corrupt current image is exactly what an import may be fixing
        try:
            if remote is not None:
                from qsnap.backup.offsite import import_from

                assert not isinstance(remote, Path)
                return import_from(remote, path, snapshot=snapshot, passphrase=passphrase)
            return library_import(source, path, passphrase=passphrase)
        finally:
            if restart:
                controller.start()


def archive(
    image: Path,
    snapshots: Any,
    to_dir: Path | str,
    keep_days: int | None = None,
    fmt: str = "qcow2.zst",
    **options: Any,
) -> Any:
    """Workflow 4 (monthly archival) under the image lock, recorded in the audit log."""
    from qsnap.backup import archive as library_archive
    from qsnap.service import audit
    from qsnap.service.lock import image_lock

    path = Path(image).absolute()
    with image_lock(path, "archive", None), audit.recorded(path, "archive", None) as rec:
        rec.details["to"] = str(to_dir)
        rec.engine = qemu_img.NAME
        return library_archive(path, snapshots, to_dir, keep_days, fmt, **options)


def target_checks(target: str) -> list[Any]:
    """``qsnap doctor --target``: is the backup target reachable, does it hold unfinished
    uploads (interrupted S3 backups that could not be aborted) or backups without a manifest?
    Changes nothing."""
    from qsnap.backup.offsite import list_backups
    from qsnap.backup.targets import S3Location, parse_location
    from qsnap.service.doctor import FAIL, OK, WARN, Check

    location = parse_location(target)
    checks: list[Check] = []
    try:
        entries = list_backups(location)
    except QsnapError as exc:
        return [Check("target", FAIL, str(exc), exc.hint)]
    checks.append(Check("target", OK, f"{target} is reachable; {len(entries)} qsnap backup(s)"))
    incomplete = [e for e in entries if not e.get("complete")]
    if incomplete:
        names = ", ".join(str(e.get("name") or e["location"]) for e in incomplete[:5])
        checks.append(Check("target manifests", WARN, f"{len(incomplete)} backup(s) without a (matching) manifest: "
                            f"{names} (interrupted or damaged backups)",
                            "verify them, and delete those that fail (they cannot be imported)",
                            {"incomplete": incomplete}))
    else:
        checks.append(Check("target manifests", OK, "every backup has its manifest"))
    if isinstance(location, S3Location):
        from qsnap.backup.targets.s3 import S3Target

        try:
            uploads = S3Target(location.bucket).uploads(location.key)
        except QsnapError as exc:
            checks.append(Check("target uploads", FAIL, str(exc)))
            return checks
        if uploads:
            listed = ", ".join(f"{u['key']} (upload {u['upload_id'][:12]}..., started {u['initiated']})"
                               for u in uploads[:5])
            checks.append(Check(
                "target uploads", WARN, f"{len(uploads)} unfinished multipart upload(s) still stored: {listed}",
                f"abort them (aws s3api abort-multipart-upload --bucket {location.bucket} --key KEY --upload-id ID), "
                "or add a lifecycle rule AbortIncompleteMultipartUpload to the bucket",
                {"uploads": uploads}))
        else:
            checks.append(Check("target uploads", OK, "no unfinished multipart uploads"))
    return checks
