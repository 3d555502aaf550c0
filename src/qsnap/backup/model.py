"""Inputs and results of the backup operations (frozen dataclasses) and the manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qsnap.core.errors import UsageError

MANIFEST_VERSION = 1
MANIFEST_TOOL = "qsnap"

#: format name -> (extensions, compression of the stream, encrypted stream suffix allowed)
FORMATS: dict[str, tuple[str, ...]] = {
    "qcow2": (".qcow2",),
    "qcow2.gz": (".qcow2.gz", ".qcow2.gz.age"),
    "qcow2.zst": (".qcow2.zst", ".qcow2.zst.age"),
    "raw": (".raw", ".img"),
}


@dataclass(frozen=True)
class EncryptionSpec:
    """A passphrase to encrypt with (LUKS for .qcow2, age for compressed streams)."""

    passphrase: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.passphrase:
            raise UsageError("The passphrase is empty.")


def detect_format(output: Path, fmt: str | None = None) -> tuple[str, bool]:
    """(format, age-encrypted) from OUTPUT's extension; FMT (if given) must agree."""
    name = output.name.lower()
    found = None
    for key, exts in FORMATS.items():
        for ext in exts:
            if name.endswith(ext) and len(name) > len(ext):
                found = (key, ext.endswith(".age"))
    if found is None:
        raise UsageError(
            f"Cannot tell the backup format from {output.name!r}: use .qcow2, .qcow2.gz, .qcow2.zst, "
            ".raw or .img (add .age after .gz/.zst for an encrypted stream)."
        )
    if fmt is not None and fmt.lstrip(".") not in (found[0], "img" if found[0] == "raw" else found[0]):
        raise UsageError(f"Format {fmt!r} does not match the extension of {output.name!r}.")
    return found


def manifest_path(backup: Path) -> Path:
    return backup.with_name(backup.name + ".json")


def load_manifest(backup: Path) -> dict[str, Any] | None:
    """The qsnap manifest of BACKUP, or None if there is none (or it is not qsnap's)."""
    try:
        data = json.loads(manifest_path(backup).read_text())
    except (OSError, ValueError):
        return None
    if not is_manifest(data):
        return None
    return data  # type: ignore[no-any-return]


def is_manifest(data: object) -> bool:
    return (
        isinstance(data, dict)
        and data.get("tool") == MANIFEST_TOOL
        and isinstance(data.get("format_version"), int)
        and isinstance(data.get("file"), str)
    )


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class BackupResult:
    output: Path
    manifest_path: Path
    manifest: dict[str, Any]
    format: str
    size: int
    sha256: str
    payload_sha256: str
    duration_s: float
    incremental_base: Path | None = None
    warnings: tuple[str, ...] = ()
    method: str = ""  # how it was made: "stream", "qemu-img", "qemu-img+stream"
    location: str = ""  # an off-site backup: s3://BUCKET/KEY or restic:REPO (output is then its name)
    manifest_location: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.location or str(self.output),
            "manifest": self.manifest_location or str(self.manifest_path),
            "format": self.format,
            "size": self.size,
            "sha256": self.sha256,
            "payload_sha256": self.payload_sha256,
            "duration_s": round(self.duration_s, 3),
            "incremental_base": str(self.incremental_base) if self.incremental_base else None,
            "method": self.method,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class VerifyReport:
    backup: Path
    ok: bool
    checks: tuple[Check, ...]
    payload_bytes: int = 0
    duration_s: float = 0.0
    chain: tuple[Path, ...] = ()
    location: str = ""  # an off-site backup: s3://BUCKET/KEY or restic:REPO snapshot ID

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.ok)

    def to_json(self) -> dict[str, Any]:
        return {
            "backup": self.location or str(self.backup),
            "ok": self.ok,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "payload_bytes": self.payload_bytes,
            "duration_s": round(self.duration_s, 3),
            "chain": [str(p) for p in self.chain],
        }


@dataclass(frozen=True)
class ImportResult:
    image: Path
    backup: Path
    previous: Path | None  # the old image, kept as IMAGE.bak-<timestamp>
    duration_s: float
    warnings: tuple[str, ...] = ()
    location: str = ""  # an off-site backup: where it came from

    def to_json(self) -> dict[str, Any]:
        return {
            "image": str(self.image),
            "backup": self.location or str(self.backup),
            "previous": str(self.previous) if self.previous else None,
            "duration_s": round(self.duration_s, 3),
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class ArchiveResult:
    created: tuple[BackupResult, ...]
    skipped: tuple[Path, ...]  # already archived (same snapshot, verified)
    deleted: tuple[Path, ...]
    failures: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "created": [r.to_json() for r in self.created],
            "skipped": [str(p) for p in self.skipped],
            "deleted": [str(p) for p in self.deleted],
            "failures": list(self.failures),
            "warnings": list(self.warnings),
        }
