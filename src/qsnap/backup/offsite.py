"""Backups that live off-site: ``s3://BUCKET/KEY`` objects and ``restic:REPOSITORY`` snapshots.

The formats, the manifest and the verification are those of local backups
(:mod:`qsnap.backup.export`, :mod:`qsnap.backup.verify`, :mod:`qsnap.backup.importer`); only
where the bytes go changes (:mod:`qsnap.backup.targets`):

- S3: the compressed/encrypted stream goes straight into a multipart upload (no local
  temporary); ``KEY.json`` (the manifest) is written after the object is complete, so an object
  without a manifest is an incomplete backup by definition. Verify and import stream the
  object back with ranged GETs.
- restic: the snapshot's raw guest data is streamed into ``restic backup --stdin``; the manifest
  fields become restic tags. Import streams ``restic dump`` into a compact qcow2.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from qsnap.backup.export import (
    DEFAULT_LEVELS,
    Output,
    _check_options,
    _export_incremental,
    _stream_from_reader,
    build_manifest,
)
from qsnap.backup.model import (
    BackupResult,
    Check,
    EncryptionSpec,
    ImportResult,
    VerifyReport,
    detect_format,
    is_manifest,
    iso,
    utc_now,
)
from qsnap.backup.source import SourceReader, Unsupported
from qsnap.backup.streams import AsyncHash, keep_block_memory
from qsnap.backup.targets import Location, ResticLocation, S3Location, parse_location
from qsnap.core.errors import ImageError, OutputExists, QsnapError, TargetError, UsageError, VerificationFailed
from qsnap.core.models import Snapshot

if TYPE_CHECKING:
    from qsnap.backup.verify import Against

Progress = Callable[[int, int], None]
RAW_BLOCK = 4 << 20


def location_of(text: str | Path | S3Location | ResticLocation) -> Location:
    if isinstance(text, S3Location | ResticLocation | Path):
        return text
    return parse_location(text)


# ------------------------------------------------------------------ export

def export_to(
    image: Path,
    snapshot: Snapshot | None,
    target: S3Location | ResticLocation,
    *,
    force: bool = False,
    fmt: str | None = None,
    level: int | None = None,
    compress: bool = False,
    incremental: bool = False,
    encrypt: EncryptionSpec | None = None,
    progress: Progress | None = None,
    force_share: bool = True,
) -> BackupResult:
    """Back up SNAPSHOT of IMAGE (None: the current state) to an S3 object or a restic repository."""
    del force_share  # the stream paths read the image directly
    keep_block_memory()
    image = Path(image).absolute()
    if not image.is_file():
        raise ImageError(f"Image {image} does not exist or is not a regular file.")
    if isinstance(target, ResticLocation):
        if compress or incremental or encrypt is not None or level is not None or fmt is not None:
            raise UsageError("restic: targets take the raw disk (restic compresses, encrypts and deduplicates "
                             "it itself): drop --compress, --incremental, --encrypt, --level.")
        return _export_restic(image, snapshot, target, force=force, progress=progress)
    return _export_s3(image, snapshot, target, force=force, fmt=fmt, level=level, compress=compress,
                      incremental=incremental, encrypt=encrypt, progress=progress)


def _reader(image: Path, snapshot: Snapshot | None, where: str) -> SourceReader:
    try:
        return SourceReader(image, snapshot.id if snapshot is not None else None)
    except Unsupported as exc:
        raise UsageError(f"{image} uses {exc}; back it up to a local file first, then copy that to {where}.") from exc
    except OSError as exc:
        raise ImageError(f"Cannot read {image}: {exc.strerror}.") from exc


def _export_s3(
    image: Path, snapshot: Snapshot | None, target: S3Location, *, force: bool, fmt: str | None,
    level: int | None, compress: bool, incremental: bool, encrypt: EncryptionSpec | None,
    progress: Progress | None,
) -> BackupResult:
    from qsnap.backup.targets.s3 import S3Target

    started = time.monotonic()
    if not target.key or target.key.endswith("/"):
        raise UsageError(f"{target} names a prefix, not an object: add the file name (e.g. .../disk.qcow2.zst).")
    form, age = detect_format(Path(target.name), fmt)
    _check_options(form, age, level, compress, incremental, encrypt)
    if form == "raw":
        raise UsageError("Raw backups are not stored in S3: use .qcow2.zst (or .qcow2) there, or a restic: target.")
    if form == "qcow2" and (compress or encrypt is not None):
        raise UsageError("An S3 .qcow2 backup is a plain qcow2 stream: for compression or encryption use "
                         ".qcow2.zst[.age] or .qcow2.gz[.age].")
    if level is None:
        level = DEFAULT_LEVELS.get(form)
    bucket = S3Target(target.bucket)
    bucket.check_bucket()
    if not force and (bucket.head(target.key) is not None or bucket.head(target.manifest_key) is not None):
        raise OutputExists(f"Backup output {target} already exists.", hint="use --force to replace it")
    warnings: list[str] = []
    sinks: list[Any] = []

    def open_sink(size_hint: int) -> Any:
        sink = bucket.sink(target.key, force=True, size_hint=size_hint)
        sinks.append(sink)
        return sink

    out = Output(Path(target.name), open_sink)
    info: dict[str, Any] = {}
    base: tuple[str, dict[str, Any]] | None = None
    with _reader(image, snapshot, str(target)) as reader:
        try:
            if incremental:
                found = find_s3_base(bucket, image, target)
                if found is None:
                    raise UsageError(f"No previous .qcow2 backup of {image} with a qsnap manifest under "
                                     f"s3://{target.bucket}/{target.prefix}; make a full backup first.")
                base = (PurePosixPath(found[0]).name, found[1])
                method = "stream-incremental"
                sha, payload_sha, payload_size = _export_incremental(
                    reader, (Path(base[0]), base[1]), out, progress, info, warnings)
            else:
                method = "stream"
                sha, payload_sha, payload_size = _stream_from_reader(
                    reader, out, form, level or 0, encrypt, progress, info)
        except BaseException as exc:
            if any(s.abort_failed for s in sinks):
                said = exc.message if isinstance(exc, QsnapError) else "interrupted"
                error = TargetError if isinstance(exc, TargetError) else QsnapError
                raise error(f"{said.rstrip('.')}; the unfinished upload to {target} could not be aborted either.",
                            hint=f"qsnap doctor --target s3://{target.bucket}/{target.prefix} lists it") from exc
            raise
    size = sinks[-1].size if sinks else 0
    duration = time.monotonic() - started
    manifest = build_manifest(image, snapshot, target.name, form, age, compress, encrypt, level, size, sha,
                              payload_sha, payload_size, info, duration, method, base)
    manifest["location"] = str(target)
    bucket.put_bytes(target.manifest_key, (json.dumps(manifest, indent=2) + "\n").encode())
    return BackupResult(
        output=Path(target.name), manifest_path=Path(target.name + ".json"), manifest=manifest, format=form,
        size=size, sha256=sha, payload_sha256=payload_sha, duration_s=duration,
        incremental_base=Path(base[0]) if base is not None else None, warnings=tuple(warnings), method=method,
        location=str(target), manifest_location=f"s3://{target.bucket}/{target.manifest_key}",
    )


def s3_manifests(bucket: Any, prefix: str, *, recursive: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
    """(object key, manifest) of every qsnap backup under PREFIX whose manifest names it."""
    for item in bucket.list_objects(prefix, recursive=recursive):
        if not item.key.endswith(".json"):
            continue
        data = bucket.get_bytes(item.key)
        try:
            manifest = json.loads(data or b"")
        except ValueError:
            continue
        key = item.key[: -len(".json")]
        if is_manifest(manifest) and PurePosixPath(key).name == manifest["file"]:
            yield key, manifest


def find_s3_base(bucket: Any, image: Path, target: S3Location) -> tuple[str, dict[str, Any]] | None:
    """The newest unencrypted .qcow2 backup of IMAGE beside TARGET (same prefix), by manifest."""
    source = str(Path(image).resolve())
    best: tuple[str, str, dict[str, Any]] | None = None
    for key, manifest in s3_manifests(bucket, target.prefix, recursive=False):
        if key == target.key or manifest.get("format") != "qcow2" or manifest.get("encryption"):
            continue
        if (manifest.get("source") or {}).get("image") != source:
            continue
        info = bucket.head(key)
        if info is None or info.size != manifest.get("size"):
            continue
        created = str(manifest.get("created_at", ""))
        if best is None or created > best[0]:
            best = (created, key, manifest)
    return (best[1], best[2]) if best else None


def raw_blocks(reader: SourceReader, progress: Progress | None = None) -> Iterator[bytes | bytearray]:
    """The guest disk of READER front to back (its whole virtual size) in RAW_BLOCK pieces;
    pieces the mapping says read as zeros are not read (restic deduplicates them)."""
    from qsnap.backup.verify import _reads_as_zeros

    size, c = reader.virtual_size, reader.cluster_size
    zeros = bytes(RAW_BLOCK)
    for offset in range(0, size, RAW_BLOCK):
        length = min(RAW_BLOCK, size - offset)
        if _reads_as_zeros(reader, offset // c, -(-(offset + length) // c)):
            yield zeros if length == RAW_BLOCK else zeros[:length]
        else:
            buf = bytearray(length)
            reader.image.readinto(offset, buf, reader.state)
            yield buf
        if progress is not None:
            progress(offset + length, size)


def _export_restic(
    image: Path, snapshot: Snapshot | None, target: ResticLocation, *, force: bool, progress: Progress | None,
) -> BackupResult:
    import qsnap
    from qsnap.backup.targets.restic import Restic, encode_tag

    started = time.monotonic()
    restic = Restic(target)
    source = str(image.resolve())
    existing = [s for s in restic.snapshots() if s.complete and s.tags.get("image") == source
                and snapshot is not None and s.tags.get("snapshot") == snapshot.name
                and s.tags.get("date") == snapshot.date_iso]
    if existing and not force:
        raise OutputExists(f"The restic repository {target.repository} already holds snapshot "
                           f"{snapshot.name if snapshot else '@current'!r} of {image} ({existing[-1].short_id}).",
                           hint="use --force to back it up again")
    name = f"{image.stem}-{snapshot.name if snapshot is not None else 'current'}.raw"
    tags = [encode_tag("image", source), encode_tag("run", uuid.uuid4().hex), encode_tag("version", qsnap.__version__),
            encode_tag("created", iso(utc_now()))]
    if snapshot is not None:
        tags += [encode_tag("snapshot", snapshot.name), encode_tag("snapshot-id", snapshot.id),
                 encode_tag("date", snapshot.date_iso)]
    with _reader(image, snapshot, str(target)) as reader, AsyncHash("qsnap-restic-sha256") as digest:
        tags += [encode_tag("virtual-size", reader.virtual_size), encode_tag("cluster-size", reader.cluster_size)]

        def chunks() -> Iterator[bytes | bytearray]:
            for block in raw_blocks(reader, progress):
                digest.update(memoryview(block))
                yield block

        first_id = restic.backup(name, tags, chunks())
        sha = digest.hexdigest()
        size = digest.size
    restic.add_tags(first_id, [encode_tag("sha256", sha), encode_tag("size", size)])
    run_tag = next(t for t in tags if t.startswith("qsnap-run="))
    made = [s for s in restic.snapshots() if s.tags.get("run") == run_tag.partition("=")[2]]
    snap_id = made[-1].id if made else first_id
    duration = time.monotonic() - started
    manifest = {"tool": "qsnap", "format": "raw", "file": name, "size": size, "sha256": sha,
                "location": f"{target}", "restic_snapshot": snap_id,
                "source": {"image": source, "snapshot": _snapshot_json(snapshot)}}
    return BackupResult(
        output=Path(name), manifest_path=Path(name), manifest=manifest, format="raw", size=size, sha256=sha,
        payload_sha256=sha, duration_s=duration, method="restic-stdin",
        location=f"{target}", manifest_location=f"restic snapshot {snap_id[:8]} (tags)",
    )


def _snapshot_json(snapshot: Snapshot | None) -> dict[str, Any] | None:
    if snapshot is None:
        return None
    return {"id": snapshot.id, "name": snapshot.name, "date": snapshot.date_iso}


# ------------------------------------------------------------------ manifests, verify, import

def s3_manifest(location: S3Location) -> dict[str, Any] | None:
    from qsnap.backup.targets.s3 import S3Target

    data = S3Target(location.bucket).get_bytes(location.manifest_key)
    try:
        manifest = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return manifest if is_manifest(manifest) else None


def manifest_at(location: S3Location | ResticLocation, snapshot: str | None = None) -> dict[str, Any] | None:
    """The manifest of a remote backup (for restic: built from the snapshot's tags)."""
    if isinstance(location, S3Location):
        return s3_manifest(location)
    from qsnap.backup.targets.restic import Restic

    snap = Restic(location).resolve(snapshot)
    tags = snap.tags
    return {"tool": "qsnap", "format": "raw", "file": snap.file_name, "sha256": tags.get("sha256"),
            "size": int(tags["size"]) if "size" in tags else None, "restic_snapshot": snap.id,
            "source": {"image": tags.get("image"),
                       "snapshot": {"id": tags.get("snapshot-id"), "name": tags.get("snapshot"),
                                    "date": tags.get("date")} if "snapshot" in tags else None}}


def verify_at(
    location: S3Location | ResticLocation, *, snapshot: str | None = None, against: Against | None = None,
    passphrase: str | None = None, progress: Progress | None = None,
) -> VerifyReport:
    """Verify a remote backup; VerificationFailed (11) names what failed."""
    if isinstance(location, ResticLocation):
        return _verify_restic(location, snapshot, against, progress)
    from qsnap.backup.targets.s3 import S3Target
    from qsnap.backup.verify import verify_source

    bucket = S3Target(location.bucket)
    bucket.check_bucket()
    manifest = s3_manifest(location)
    info = bucket.head(location.key)
    chain: list[Check] = []
    chain_paths: list[Path] = []
    inc = (manifest or {}).get("incremental")
    if inc:
        base = location.child(str(inc["base"]))
        chain_paths.append(Path(base.key))
        base_manifest = s3_manifest(base)
        ok = base_manifest is not None and base_manifest.get("sha256") == inc["base_sha256"]
        chain.append(Check("incremental base", ok, f"{base} is missing or is not the backup this one was made on"))
        if ok:
            try:
                report = verify_at(base, passphrase=passphrase)
                chain_paths.extend(report.chain)
                chain.append(Check(f"base {base.name}", True))
            except VerificationFailed as exc:
                chain.append(Check(f"base {base.name}", False, exc.message))
    return verify_source(str(location), manifest, lambda: bucket.reader(location.key),
                         size=info.size if info is not None else None, against=against,
                         passphrase=passphrase, progress=progress, chain=tuple(chain), chain_paths=tuple(chain_paths))


def _verify_restic(
    location: ResticLocation, selector: str | None, against: Against | None, progress: Progress | None,
) -> VerifyReport:
    """``restic check``, then one pass over the ``restic dump`` stream: its sha256 (a thread) and,
    with AGAINST, its content compared with the source snapshot (the comparison of local ``.raw``
    backups, :class:`qsnap.backup.verify.RawComparer`)."""
    from qsnap.backup.targets.restic import Restic, read_blocks
    from qsnap.backup.verify import RawComparer

    started = time.monotonic()
    restic = Restic(location)
    snap = restic.resolve(selector)
    checks: list[Check] = []
    label = f"{location} snapshot {snap.short_id}"
    checks.append(Check("manifest", snap.complete, "the snapshot has no qsnap-sha256 tag: the backup is incomplete"))
    restic.check()  # LockBusy (8) when another process holds the repository's lock
    checks.append(Check("restic check", True))
    total = int(snap.tags.get("size") or 0)
    done = 0
    with contextlib.ExitStack() as stack:
        comparer = stack.enter_context(RawComparer(against)) if against is not None else None
        digest = stack.enter_context(AsyncHash("qsnap-restic-verify"))
        with restic.dump(snap) as handle:
            for block in read_blocks(handle, RAW_BLOCK):
                digest.update(block)
                if comparer is not None:
                    comparer.feed(block)  # after a difference: only hashed
                done += len(block)
                if progress is not None:
                    progress(done, total)
        sha = digest.hexdigest()
        if snap.complete:
            checks.append(Check("size", done == total, f"the restored stream has {done} bytes, the tags say {total}"))
            checks.append(Check("sha256", sha == snap.tags.get("sha256"), "the restored stream's sha256 differs"))
        if comparer is not None:
            def add(name: str, ok: bool, detail: str = "") -> bool:
                checks.append(Check(name, ok, detail))
                return ok

            comparer.finish(add)
    report = VerifyReport(Path(snap.file_name), all(c.ok for c in checks), tuple(checks), done,
                          time.monotonic() - started, (Path(snap.file_name),), location=label)
    if not report.ok:
        failed = "; ".join(f"{c.name}: {c.detail}" for c in report.failed)
        error = VerificationFailed(f"Backup {label} failed verification: {failed}.")
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report


def import_from(
    location: S3Location | ResticLocation, image: Path, *, snapshot: str | None = None,
    passphrase: str | None = None,
) -> ImportResult:
    """Verify a remote backup, then unpack it into IMAGE (the old one kept as .bak-*)."""
    started = time.monotonic()
    image = Path(image).absolute()
    if isinstance(location, ResticLocation):
        return _import_restic(location, snapshot, image, started)
    from qsnap.backup.importer import import_verified
    from qsnap.backup.targets.s3 import S3Target

    verify_at(location, passphrase=passphrase)  # VerificationFailed (11): image untouched
    manifest = s3_manifest(location)
    assert manifest is not None
    bucket = S3Target(location.bucket)
    if manifest.get("incremental"):
        return _import_s3_chain(location, image, started)
    result = import_verified(Path(location.name), manifest, lambda: bucket.reader(location.key), image,
                             passphrase=passphrase, started=started, remote=True)
    return ImportResult(result.image, result.backup, result.previous, result.duration_s, result.warnings,
                        location=str(location))


def _import_s3_chain(location: S3Location, image: Path, started: float) -> ImportResult:
    """An incremental backup: its chain is downloaded beside IMAGE (qemu-img convert flattens a
    backing chain only from files), imported as a local backup, and removed."""
    import shutil
    import tempfile

    from qsnap.backup.importer import import_backup
    from qsnap.backup.partial import check_space
    from qsnap.backup.targets.s3 import S3Target

    bucket = S3Target(location.bucket)
    links: list[tuple[S3Location, dict[str, Any]]] = []
    link: S3Location | None = location
    while link is not None and len(links) < 1000:
        manifest = s3_manifest(link)
        if manifest is None:
            raise VerificationFailed(f"{link} has no qsnap manifest; the image is untouched.")
        links.append((link, manifest))
        base = (manifest.get("incremental") or {}).get("base")
        link = link.child(str(base)) if base else None
    needed = sum(int(m.get("size") or 0) for _, m in links)
    check_space(image.parent, 2 * needed + (4 << 20), f"the incremental chain of {location.name} and the image")
    tmp = Path(tempfile.mkdtemp(prefix=".qsnap-import-", dir=image.parent))
    try:
        for where, manifest in links:
            with bucket.reader(where.key) as reader, open(tmp / where.name, "wb") as out:
                while block := reader.read(8 << 20):
                    out.write(block)
            (tmp / (where.name + ".json")).write_text(json.dumps(manifest))
        result = import_backup(tmp / location.name, image)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportResult(result.image, Path(location.name), result.previous, time.monotonic() - started,
                        result.warnings, location=str(location))


def _import_restic(location: ResticLocation, selector: str | None, image: Path, started: float) -> ImportResult:
    from qsnap.backup.importer import replace_image
    from qsnap.backup.partial import PartialFile, check_space
    from qsnap.backup.qcow2stream import Layout, write_skipping_zeros
    from qsnap.backup.targets.restic import Restic, read_blocks

    restic = Restic(location)
    snap = restic.resolve(selector)
    label = f"{location} snapshot {snap.short_id}"
    if not snap.complete:
        raise VerificationFailed(f"Backup {label} is incomplete (no qsnap-sha256 tag); the image is untouched.")
    tags = snap.tags
    size = int(tags["size"])
    cluster = int(tags.get("cluster-size") or 65536)
    virtual = int(tags.get("virtual-size") or size)
    if virtual != size or size % 512:
        raise VerificationFailed(f"Backup {label} holds {size} bytes for a disk of {virtual}.")
    count = -(-size // cluster)
    planned = Layout(cluster, virtual, range(count), [])
    check_space(image.parent, planned.file_size // 4 + (4 << 20), f"the imported image {image.name}")
    mode = (image.stat().st_mode & 0o777) if image.exists() else 0o600
    warnings: list[str] = []
    digest = AsyncHash("qsnap-restic-import")
    try:
        with PartialFile(image, warnings, mode=mode) as part:
            got = 0

            def blocks(handle: Any) -> Iterator[tuple[int, bytes]]:
                nonlocal got
                for block in read_blocks(handle, RAW_BLOCK):
                    digest.update(block)
                    got += len(block)
                    if len(block) % cluster:  # a disk whose size is not a multiple of the cluster
                        block += bytes(cluster - len(block) % cluster)
                    yield len(block) // cluster, block

            with restic.dump(snap) as handle:
                write_skipping_zeros(planned, blocks(handle), part.fd)
            if got != size or digest.hexdigest() != tags.get("sha256"):
                raise VerificationFailed(f"The disk restored from {label} does not match its sha256 tag; "
                                         "the image is untouched.")
            previous = replace_image(part, image, label)
    except ValueError as exc:  # fewer/more clusters than the tags announce
        raise VerificationFailed(f"The disk restored from {label} has the wrong size ({exc}); "
                                 "the image is untouched.") from exc
    finally:
        digest.close()
    return ImportResult(image, Path(snap.file_name), previous, time.monotonic() - started, tuple(warnings),
                        location=label)


# ------------------------------------------------------------------ listing

def list_backups(location: Location) -> list[dict[str, Any]]:
    """What qsnap stored at LOCATION: one dict per backup (incomplete ones say so)."""
    if isinstance(location, ResticLocation):
        from qsnap.backup.targets.restic import Restic

        return [{"location": f"{location}", "name": s.file_name, **s.to_json(),
                 "image": s.tags.get("image"), "snapshot": s.tags.get("snapshot"),
                 "created_at": s.tags.get("created") or s.time,
                 "size": int(s.tags["size"]) if "size" in s.tags else None}
                for s in Restic(location).snapshots()]
    if isinstance(location, S3Location):
        from qsnap.backup.targets.s3 import S3Target

        bucket = S3Target(location.bucket)
        bucket.check_bucket()
        prefix = location.key
        manifests = dict(s3_manifests(bucket, prefix))
        found: list[dict[str, Any]] = []
        for item in bucket.list_objects(prefix):
            if item.key.endswith(".json"):
                continue
            manifest = manifests.get(item.key)
            found.append(_entry(f"s3://{location.bucket}/{item.key}", item.size, manifest))
        return found
    directory = Path(location)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory.")
    found = []
    for manifest_file in sorted(directory.rglob("*.json")):
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, ValueError):
            continue
        if not is_manifest(manifest) or manifest_file.name != manifest["file"] + ".json":
            continue
        backup = manifest_file.with_name(manifest["file"])
        found.append(_entry(str(backup), backup.stat().st_size if backup.exists() else None, manifest))
    return found


def _entry(where: str, size: int | None, manifest: dict[str, Any] | None) -> dict[str, Any]:
    if manifest is None:
        return {"location": where, "name": PurePosixPath(where).name, "complete": False, "size": size,
                "format": None, "image": None, "snapshot": None, "created_at": None}
    snap = (manifest.get("source") or {}).get("snapshot") or {}
    return {"location": where, "name": manifest["file"], "complete": size == manifest.get("size"), "size": size,
            "format": manifest.get("format"), "image": (manifest.get("source") or {}).get("image"),
            "snapshot": snap.get("name"), "created_at": manifest.get("created_at"),
            "sha256": manifest.get("sha256"), "encrypted": bool(manifest.get("encryption")),
            "incremental_base": (manifest.get("incremental") or {}).get("base")}
