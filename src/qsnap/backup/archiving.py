"""Workflow 4 (snapshot archival): export + verify each snapshot, prune old archives.

Archives go to ``DIR/<YYYY-MM>/<name>-<YYYYmmdd>.<format>`` using the snapshot's own date, so
running the job again finds the archive already there (same snapshot per its manifest) and
skips it. Pruning deletes only backups that have a qsnap manifest for the same source image,
older than ``keep_days`` by the manifest's ``created_at``, and never a base that a kept
incremental backup still needs. Nothing else in DIR is touched.

``DIR`` may be ``s3://BUCKET/PREFIX/``: the same layout under the prefix, the same checks
(existing archive = same snapshot per its manifest ``KEY.json``), and pruning deletes only
objects that have a qsnap manifest of the same image.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from qsnap.backup.export import export_snapshot
from qsnap.backup.model import ArchiveResult, BackupResult, EncryptionSpec, is_manifest, utc_now
from qsnap.backup.verify import verify_backup
from qsnap.core.errors import QsnapError, UsageError
from qsnap.core.models import Snapshot

FORMATS = {"qcow2.zst": ".qcow2.zst", "qcow2.gz": ".qcow2.gz", "qcow2": ".qcow2"}


def archive_path(to_dir: Path, snapshot: Snapshot, fmt: str) -> Path:
    date = snapshot.date
    return Path(to_dir) / f"{date:%Y-%m}" / f"{snapshot.name}-{date:%Y%m%d}{FORMATS[fmt]}"


def archive(
    image: Path,
    snapshots: Sequence[Snapshot],
    to_dir: Path | str,
    keep_days: int | None = None,
    fmt: str = "qcow2.zst",
    *,
    level: int | None = None,
    encrypt: EncryptionSpec | None = None,
    progress: Callable[[int, int], None] | None = None,
    now: datetime | None = None,
) -> ArchiveResult:
    fmt = fmt.lstrip(".")
    if fmt not in FORMATS:
        raise UsageError(f"Archive format must be one of {', '.join(FORMATS)}, not {fmt!r}.")
    if keep_days is not None and keep_days < 0:
        raise UsageError("--keep-days must be 0 or more.")
    image = Path(image).absolute()
    from qsnap.backup.targets import S3Location, is_remote, parse_location

    if is_remote(to_dir):
        location = parse_location(str(to_dir))
        if not isinstance(location, S3Location):
            raise UsageError("archive --to takes a directory or s3://BUCKET/PREFIX/ (restic keeps its own history).")
        return _archive_s3(image, snapshots, location, keep_days, fmt, level, encrypt, progress, now)
    to_dir = Path(to_dir).absolute()
    created: list[BackupResult] = []
    skipped: list[Path] = []
    failures: list[str] = []
    warnings: list[str] = []
    passphrase = encrypt.passphrase if encrypt else None
    for snap in snapshots:
        out = archive_path(to_dir, snap, fmt)
        if encrypt is not None and fmt != "qcow2":
            out = out.with_name(out.name + ".age")
        try:
            if out.exists():
                manifest = _manifest(out)
                same = manifest is not None and manifest.get("source", {}).get("image") == str(image.resolve()) \
                    and (manifest.get("source", {}).get("snapshot") or {}).get("date") == snap.date_iso \
                    and (manifest.get("source", {}).get("snapshot") or {}).get("name") == snap.name
                if not same:
                    failures.append(f"{out} exists and is not an archive of snapshot {snap.name!r}; left alone")
                    continue
                verify_backup(out, passphrase=passphrase)
                skipped.append(out)
                continue
            result = export_snapshot(image, snap, out, level=level, encrypt=encrypt, progress=progress)
            warnings.extend(result.warnings)
            verify_backup(out, passphrase=passphrase)
            created.append(result)
        except QsnapError as exc:
            failures.append(f"{snap.name}: {exc}")
    deleted: list[Path] = []
    if keep_days is not None:
        keep = {r.output for r in created} | set(skipped)
        deleted = prune(image, to_dir, keep_days, keep=keep, now=now)
    return ArchiveResult(tuple(created), tuple(skipped), tuple(deleted), tuple(failures), tuple(warnings))


def _manifest(backup: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(backup.with_name(backup.name + ".json").read_text())
    except (OSError, ValueError):
        return None
    return data if is_manifest(data) else None


def prune(image: Path, to_dir: Path, keep_days: int, *, keep: set[Path] | None = None,
          now: datetime | None = None) -> list[Path]:
    """Delete qsnap backups of IMAGE under TO_DIR older than KEEP_DAYS; return what was deleted."""
    cutoff = (now or utc_now()) - timedelta(days=keep_days)
    source = str(Path(image).resolve())
    entries: list[tuple[Path, dict[str, Any]]] = []
    for manifest_file in sorted(Path(to_dir).rglob("*.json")):
        try:
            data = json.loads(manifest_file.read_text())
        except (OSError, ValueError):
            continue
        if not is_manifest(data) or manifest_file.name != data["file"] + ".json":
            continue
        if data.get("source", {}).get("image") != source:
            continue
        entries.append((manifest_file.with_name(data["file"]), data))
    old: list[tuple[Path, dict[str, Any]]] = []
    young: list[tuple[Path, dict[str, Any]]] = []
    for backup, data in entries:
        try:
            created = datetime.fromisoformat(str(data["created_at"]).replace("Z", "+00:00"))
        except (KeyError, ValueError):
            continue
        (old if created < cutoff and backup not in (keep or set()) else young).append((backup, data))
    needed = {b.with_name(d["incremental"]["base"]) for b, d in young if d.get("incremental")}
    deleted = []
    for backup, _ in old:
        if backup in needed:
            continue
        for path in (backup, backup.with_name(backup.name + ".json")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        deleted.append(backup)
    return deleted


# ------------------------------------------------------------------ s3://BUCKET/PREFIX/

def _archive_s3(
    image: Path, snapshots: Sequence[Snapshot], to: Any, keep_days: int | None, fmt: str, level: int | None,
    encrypt: EncryptionSpec | None, progress: Callable[[int, int], None] | None, now: datetime | None,
) -> ArchiveResult:
    from qsnap.backup.offsite import export_to, s3_manifest, s3_manifests, verify_at
    from qsnap.backup.targets import S3Location
    from qsnap.backup.targets.s3 import S3Target

    prefix = to.key if not to.key or to.key.endswith("/") else to.key + "/"
    bucket = S3Target(to.bucket)
    bucket.check_bucket()
    created: list[BackupResult] = []
    skipped: list[Path] = []
    failures: list[str] = []
    warnings: list[str] = []
    kept: set[str] = set()
    passphrase = encrypt.passphrase if encrypt else None
    for snap in snapshots:
        relative = archive_path(Path("."), snap, fmt).as_posix()
        if encrypt is not None and fmt != "qcow2":
            relative += ".age"
        where = S3Location(to.bucket, prefix + relative)
        try:
            if bucket.head(where.key) is not None:
                manifest = s3_manifest(where)
                same = manifest is not None and manifest.get("source", {}).get("image") == str(image.resolve()) \
                    and (manifest.get("source", {}).get("snapshot") or {}).get("date") == snap.date_iso \
                    and (manifest.get("source", {}).get("snapshot") or {}).get("name") == snap.name
                if not same:
                    failures.append(f"{where} exists and is not an archive of snapshot {snap.name!r}; left alone")
                    continue
                verify_at(where, passphrase=passphrase)
                skipped.append(Path(where.key))
                kept.add(where.key)
                continue
            result = export_to(image, snap, where, level=level, encrypt=encrypt, progress=progress)
            warnings.extend(result.warnings)
            verify_at(where, passphrase=passphrase)
            created.append(result)
            kept.add(where.key)
        except QsnapError as exc:
            failures.append(f"{snap.name}: {exc}")
    deleted: list[Path] = []
    if keep_days is not None:
        cutoff = (now or utc_now()) - timedelta(days=keep_days)
        source = str(image.resolve())
        for key, data in list(s3_manifests(bucket, prefix)):
            if key in kept or data.get("source", {}).get("image") != source:
                continue
            try:
                made = datetime.fromisoformat(str(data["created_at"]).replace("Z", "+00:00"))
            except (KeyError, ValueError):
                continue
            if made < cutoff:
                bucket.delete(key)
                bucket.delete(key + ".json")
                deleted.append(Path(key))
    return ArchiveResult(tuple(created), tuple(skipped), tuple(deleted), tuple(failures), tuple(warnings))
