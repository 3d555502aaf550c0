"""Export a snapshot (or the current state) into a backup file, safely.

Paths (docs/backup.md has the table):
- ``.qcow2`` / ``.raw``: ``qemu-img convert`` straight into ``OUTPUT.partial`` (no temporary).
- ``.qcow2.gz`` / ``.qcow2.zst`` (+ ``.age``): the snapshot's clusters are read from the image
  (by :mod:`qsnap.qcow2`, through :mod:`qsnap.backup.source`) and written as a compact qcow2
  stream (:mod:`qcow2stream`) through the compressor into
  ``OUTPUT.partial``: no temporary. Images the reader does not handle (encrypted, backing
  file, extended L2, external data file) go through a qemu-img temporary beside OUTPUT.
- ``--incremental``: a compact qcow2 stream whose backing file is the previous backup.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import qsnap
from qsnap.backup import qemu
from qsnap.backup.model import (
    MANIFEST_TOOL,
    MANIFEST_VERSION,
    BackupResult,
    EncryptionSpec,
    detect_format,
    iso,
    load_manifest,
    manifest_path,
    utc_now,
)
from qsnap.backup.partial import (
    FdWriter,
    InsufficientSpace,
    PartialFile,
    check_space,
    clear_stale,
    is_no_space,
    no_space_error,
    partial_path,
)
from qsnap.backup.qcow2stream import Layout, write_blocks, write_skipping_zeros
from qsnap.backup.source import COMPRESSED_DATA, DATA, SourceReader, Unsupported
from qsnap.backup.streams import (
    AsyncHash,
    HashingWriter,
    ParallelGzipWriter,
    Writable,
    ZstdWriter,
    keep_block_memory,
    prefetch,
    sha256_fd,
    sha256_file,
)
from qsnap.core.errors import ImageError, OutputExists, QsnapError, UsageError
from qsnap.core.fsutil import atomic_write_bytes
from qsnap.core.models import Snapshot

if TYPE_CHECKING:
    from qsnap.backup.targets import Sink

Progress = Callable[[int, int], None]
DEFAULT_LEVELS = {"qcow2.gz": 6, "qcow2.zst": 3}
MARGIN = 4 << 20


def export_snapshot(
    image: Path,
    snapshot: Snapshot | None,
    output: Path,
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
    """Back up SNAPSHOT of IMAGE (None: the current state) into OUTPUT.

    The caller guarantees nobody modifies what is read (qsnap's image lock; a temporary
    snapshot when a VM runs). Raises OutputExists (13), UsageError (2), InsufficientSpace,
    ImageError (7); on any failure or KeyboardInterrupt no partial file is left.
    """
    keep_block_memory()
    started = time.monotonic()
    image = Path(image).absolute()
    output = Path(output).absolute()
    form, age = detect_format(output, fmt)
    _check_options(form, age, level, compress, incremental, encrypt)
    if not image.is_file():
        raise ImageError(f"Image {image} does not exist or is not a regular file.")
    if output.exists() and not force:
        raise OutputExists(f"Backup output {output} already exists.", hint="use --force to replace it")
    if os.path.realpath(output) == os.path.realpath(image) or (
        output.exists() and os.path.samefile(output, image)
    ):
        raise UsageError("The backup output is the image itself.", hint="choose another OUTPUT")
    if level is None:
        level = DEFAULT_LEVELS.get(form)
    warnings: list[str] = []
    output.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(partial_path(output), warnings)
    snapshot_id = snapshot.id if snapshot is not None else None

    reader: SourceReader | None = None
    try:
        reader = SourceReader(image, snapshot_id)
    except Unsupported as exc:
        if incremental:
            raise UsageError(f"Incremental backups of {image} are not supported ({exc}).") from exc
        warnings.append(f"image uses {exc}; exporting through a qemu-img temporary file")
    except OSError as exc:
        raise ImageError(f"Cannot read {image}: {exc.strerror}.") from exc

    try:
        base: tuple[Path, dict[str, Any]] | None = None
        if incremental:
            assert reader is not None
            base = find_base(image, output)
            if base is None:
                raise UsageError(
                    f"No previous .qcow2 backup of {image} with a qsnap manifest in {output.parent}; "
                    "make a full backup first."
                )
        info: dict[str, Any] = {}
        try:
            if form == "qcow2" and base is None and reader is not None and not compress and encrypt is None:
                # The compact writer: one read of the data, zero clusters left out (as qemu-img
                # convert does), hashed from the page cache while the fsync runs.
                method = "stream"
                sha, payload_sha, payload_size = _export_qcow2(reader, output, progress, info)
            elif form in ("qcow2", "raw") and base is None:
                method = "qemu-img"
                sha, payload_sha, payload_size = _export_qemu_img(
                    image, snapshot_id, output, form, compress, encrypt, reader, progress, force_share, info
                )
            elif base is not None:
                assert reader is not None
                method = "stream-incremental"
                sha, payload_sha, payload_size = _export_incremental(
                    reader, base, output, progress, info, warnings
                )
            else:
                method = "stream" if reader is not None else "qemu-img+stream"
                sha, payload_sha, payload_size = _export_stream(
                    image, snapshot_id, reader, output, form, level or 0, encrypt, progress, info
                )
        except OSError as exc:
            if is_no_space(exc):
                raise no_space_error(output.parent, exc) from exc
            raise
    finally:
        if reader is not None:
            reader.close()

    duration = time.monotonic() - started
    size = output.stat().st_size
    manifest = build_manifest(
        image, snapshot, output.name, form, age, compress, encrypt, level, size, sha, payload_sha, payload_size,
        info, duration, method, (base[0].name, base[1]) if base is not None else None,
    )
    import json

    atomic_write_bytes(manifest_path(output), (json.dumps(manifest, indent=2) + "\n").encode(), mode=0o600)
    return BackupResult(
        output=output, manifest_path=manifest_path(output), manifest=manifest, format=form, size=size,
        sha256=sha, payload_sha256=payload_sha, duration_s=duration,
        incremental_base=base[0] if base is not None else None, warnings=tuple(warnings), method=method,
    )


def build_manifest(
    image: Path, snapshot: Snapshot | None, file_name: str, form: str, age: bool, compress: bool,
    encrypt: EncryptionSpec | None, level: int | None, size: int, sha: str, payload_sha: str, payload_size: int,
    info: dict[str, Any], duration: float, method: str, base: tuple[str, dict[str, Any]] | None,
) -> dict[str, Any]:
    """The manifest of a backup (wherever it is stored: beside the file, or as KEY.json)."""
    return {
        "format_version": MANIFEST_VERSION,
        "tool": MANIFEST_TOOL,
        "qsnap_version": qsnap.__version__,
        "created_at": iso(utc_now()),
        "file": file_name,
        "format": form,
        "compression": _compression_name(form, compress, info),
        "level": level if form in DEFAULT_LEVELS else None,
        "size": size,
        "sha256": sha,
        "payload": {"format": "raw" if form == "raw" else "qcow2", "size": payload_size, "sha256": payload_sha,
                    "layout": info.get("layout", "qemu-img"), "virtual_size": info.get("virtual_size"),
                    "cluster_size": info.get("cluster_size"), "data_offset": info.get("data_offset")},
        "source": {"image": str(image.resolve()), "snapshot": _snapshot_json(snapshot)},
        "sizes": {"allocated": info.get("allocated"), "payload": payload_size, "file": size},
        "duration_s": round(duration, 3),
        "method": method,
        "incremental": (
            {"base": base[0], "base_sha256": base[1]["sha256"], "changed_clusters": info.get("changed"),
             "diff": info.get("diff")}
            if base is not None else None
        ),
        "encryption": _encryption_json(form, age, encrypt),
    }


def _check_options(
    form: str, age: bool, level: int | None, compress: bool, incremental: bool, encrypt: EncryptionSpec | None
) -> None:
    if compress and form != "qcow2":
        raise UsageError("--compress applies to .qcow2 outputs only (the others are compressed streams).")
    if incremental and form != "qcow2":
        raise UsageError("--incremental writes a .qcow2 whose backing file is the previous backup: use .qcow2.")
    if incremental and (compress or encrypt is not None):
        raise UsageError("--incremental cannot be combined with --compress or --encrypt.")
    if age and encrypt is None:
        raise UsageError("An .age output needs --encrypt and a passphrase.")
    if encrypt is not None and form in ("qcow2.gz", "qcow2.zst") and not age:
        raise UsageError("An encrypted compressed backup is an age file: end OUTPUT with .age "
                         "(e.g. backup.qcow2.zst.age).")
    if encrypt is not None and form == "raw":
        raise UsageError("Raw backups cannot be encrypted; use .qcow2 (LUKS) or .qcow2.zst.age.")
    if level is not None:
        limits = {"qcow2.gz": (1, 9), "qcow2.zst": (1, 19)}
        if form not in limits:
            raise UsageError(f"--level applies to .qcow2.gz (1-9) and .qcow2.zst (1-19), not {form}.")
        low, high = limits[form]
        if not low <= level <= high:
            raise UsageError(f"--level for {form} must be between {low} and {high}.")


def _snapshot_json(snapshot: Snapshot | None) -> dict[str, Any] | None:
    if snapshot is None:
        return None
    return {"id": snapshot.id, "name": snapshot.name, "date": snapshot.date_iso,
            "vm_state_size": snapshot.vm_state_size, "vm_clock_ns": snapshot.vm_clock_ns}


def _encryption_json(form: str, age: bool, encrypt: EncryptionSpec | None) -> dict[str, Any] | None:
    if encrypt is None:
        return None
    if form == "qcow2":
        return {"scheme": "qcow2-luks", "key": "passphrase"}
    return {"scheme": "age-scrypt", "key": "passphrase", "scrypt_log_n": __import__(
        "qsnap.backup.agecrypt", fromlist=["SCRYPT_LOG_N"]).SCRYPT_LOG_N}


def _compression_name(form: str, compress: bool, info: dict[str, Any]) -> str:
    if form == "qcow2.gz":
        return "gzip"
    if form == "qcow2.zst":
        return "zstd"
    if compress:
        return f"qcow2-{info.get('cluster_compression', 'zlib')}"
    return "none"


def _data_bytes(reader: SourceReader) -> int:
    return reader.mapping.count(DATA, COMPRESSED_DATA) * reader.cluster_size


def _estimate_compressed(reader: SourceReader, payload: int) -> int:
    """A cautious estimate of the compressed size from a sample of up to 32 clusters."""
    indices = list(reader.mapping.data_indices())
    if not indices:
        return MARGIN
    step = max(1, len(indices) // 32)
    sample = indices[::step][:32]
    raw = comp = 0
    for _, data in reader.iter_clusters(sample, run=1):
        raw += len(data)
        comp += len(zlib.compress(data, 1))
    return int(payload * min(1.0, comp / raw) * 1.25) + MARGIN


# ------------------------------------------------------------------------ qemu-img path

def _export_qemu_img(
    image: Path, snapshot_id: str | None, output: Path, form: str, compress: bool,
    encrypt: EncryptionSpec | None, reader: SourceReader | None, progress: Progress | None,
    force_share: bool, info: dict[str, Any],
) -> tuple[str, str, int]:
    if reader is not None:
        allocated = _data_bytes(reader)
        info.update(virtual_size=reader.virtual_size, cluster_size=reader.cluster_size)
    else:
        allocated = qemu.measure_required(image, snapshot_id)
    info["allocated"] = allocated
    check_space(output.parent, allocated + MARGIN, f"the backup {output.name}")
    options: list[str] = []
    if compress:
        if qemu.zstd_cluster_compression_supported():
            options.append("compression_type=zstd")
            info["cluster_compression"] = "zstd"
        else:
            info["cluster_compression"] = "zlib"
    warnings: list[str] = []
    with contextlib.ExitStack() as stack:
        secret = None
        if encrypt is not None:
            secret = stack.enter_context(qemu.secret_file(encrypt.passphrase))
            options += ["encrypt.format=luks", "encrypt.key-secret=sec0"]
        part = stack.enter_context(PartialFile(output, warnings))
        argv = qemu.convert_argv(
            image, snapshot_id, part.path, output_format="raw" if form == "raw" else "qcow2",
            compress=compress, options=tuple(options), force_share=force_share, secret=secret,
        )
        total = max(allocated, 1)
        try:
            qemu.run_with_progress(argv, image, total, progress)
        except QsnapError as exc:
            if "No space left" in str(exc):
                raise no_space_error(output.parent) from exc
            raise
        os.fchmod(part.fd, 0o600)
        if form == "raw" and reader is not None and os.fstat(part.fd).st_size > reader.virtual_size:
            # qemu-img convert -l writes an older snapshot at the image's current (larger) size:
            # the raw disk is the snapshot's own size (what the qcow2 formats record)
            os.ftruncate(part.fd, reader.virtual_size)
        sha = sha256_file(part.path)
        part.commit()
    return sha, sha, output.stat().st_size


# ------------------------------------------------------------------------ stream path

class LocalSink:
    """OUTPUT.partial (flocked), written through the writeback-starting writer; commit = fsync +
    rename. The local :class:`qsnap.backup.targets.Sink`."""

    def __init__(self, output: Path) -> None:
        self.part = PartialFile(output, [])
        self.writer = FdWriter(self.part.fd, writeback=True)
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        self.size += len(data)
        return self.writer.write(data)

    def commit(self) -> None:
        try:
            self.part.commit()
        finally:
            self.part.close()

    def abort(self) -> None:
        try:
            self.part.discard()
        finally:
            self.part.close()


class Output:
    """Where a streamed backup goes: a local file (free space checked, ``.partial`` protocol),
    or any :class:`qsnap.backup.targets.Sink` factory (e.g. an S3 multipart upload)."""

    def __init__(self, path: Path, open_sink: Callable[[int], Sink] | None = None) -> None:
        self.path = path
        self._open = open_sink

    @property
    def local(self) -> bool:
        return self._open is None

    def check_space(self, needed: int, what: str) -> None:
        if self._open is None:
            check_space(self.path.parent, needed, what)

    def open(self, size_hint: int) -> Sink:
        return LocalSink(self.path) if self._open is None else self._open(size_hint)


class _Pipeline:
    """payload bytes -> [hash] -> compressor -> [age] -> hashing file writer.

    Both sha256s run on their own threads; the compressors use all cores.
    """

    def __init__(self, out: Writable, form: str, level: int, encrypt: EncryptionSpec | None) -> None:
        self.file = HashingWriter(out)
        self.age: Any = None
        sink: Any = self.file
        if encrypt is not None:
            from qsnap.backup.agecrypt import AgeEncryptWriter

            self.age = AgeEncryptWriter(self.file.write, encrypt.passphrase)
            sink = self.age
        self.compressor: Any = ParallelGzipWriter(sink, level) if form == "qcow2.gz" else ZstdWriter(sink, level)
        self.payload = AsyncHash("qsnap-payload-sha256")
        self.payload_size = 0

    def write(self, data: bytes) -> int:
        self.payload.update(data)
        self.payload_size += len(data)
        self.compressor.write(data)
        return len(data)

    def close(self) -> None:
        self.compressor.close()
        if self.age is not None:
            self.age.close()

    def abort(self) -> None:
        with contextlib.suppress(BaseException):
            self.compressor.abort()
        if self.age is not None:
            with contextlib.suppress(BaseException):
                self.age.abort()

    def release(self) -> None:
        self.payload.close()
        self.file.close()


def _export_stream(
    image: Path, snapshot_id: str | None, reader: SourceReader | None, output: Path, form: str, level: int,
    encrypt: EncryptionSpec | None, progress: Progress | None, info: dict[str, Any],
) -> tuple[str, str, int]:
    if reader is not None:
        return _stream_from_reader(reader, output, form, level, encrypt, progress, info)
    # Fallback: qemu-img flattens what the reader cannot read into a plain qcow2 beside OUTPUT.
    temp = output.with_name(f".{output.name}.qsnap-tmp.qcow2")
    clear_stale(temp, [])
    required = qemu.measure_required(image, snapshot_id)
    check_space(output.parent, 2 * required + MARGIN, f"the temporary copy and {output.name}")
    try:
        with PartialFile(temp, []) as holder:
            argv = qemu.convert_argv(image, snapshot_id, holder.path)
            qemu.run_with_progress(argv, image, required, None)
            holder.commit()
        with SourceReader(temp) as flat:
            return _stream_from_reader(flat, output, form, level, encrypt, progress, info)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        with contextlib.suppress(FileNotFoundError):
            partial_path(temp).unlink()


def _stream_from_reader(
    reader: SourceReader, output: Path | Output, form: str, level: int, encrypt: EncryptionSpec | None,
    progress: Progress | None, info: dict[str, Any],
) -> tuple[str, str, int]:
    out = output if isinstance(output, Output) else Output(output)
    indices = list(reader.mapping.data_indices())
    layout = Layout(reader.cluster_size, reader.virtual_size, indices, [])
    info.update(layout="qsnap-stream-v1", virtual_size=reader.virtual_size, cluster_size=reader.cluster_size,
                data_offset=layout.data_offset, allocated=len(indices) * reader.cluster_size)
    needed = layout.file_size + MARGIN if form == "qcow2" else _estimate_compressed(reader, layout.file_size)
    out.check_space(needed, f"the backup {out.path.name}")
    return _write_layout(layout, prefetch(reader.iter_blocks(indices)), out, form, level, encrypt, progress)


def _export_qcow2(
    reader: SourceReader, output: Path, progress: Progress | None, info: dict[str, Any]
) -> tuple[str, str, int]:
    """A plain .qcow2 backup (canonical qsnap layout) without its zero clusters.

    Data first, metadata last (:func:`write_skipping_zeros`), so the file's sha256 cannot be
    taken while writing: it is taken by re-reading the file (from the page cache) on one
    thread while another fsyncs it, which the durable rename needs anyway and which on most
    disks takes longer than the hash.
    """
    indices = list(reader.mapping.data_indices())
    planned = Layout(reader.cluster_size, reader.virtual_size, indices, [])
    info.update(layout="qsnap-stream-v1", virtual_size=reader.virtual_size, cluster_size=reader.cluster_size,
                data_offset=planned.data_offset, allocated=len(indices) * reader.cluster_size)
    check_space(output.parent, planned.file_size + MARGIN, f"the backup {output.name}")
    warnings: list[str] = []
    # progress: the data pass, then the hash pass over the (smaller) final file
    total = 2 * planned.file_size
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(min(done, total), total)

    with PartialFile(output, warnings) as part:
        writeback = FdWriter(part.fd, writeback=True)

        def written(n: int) -> None:
            writeback.note_written(n)
            tick(n)

        final = write_skipping_zeros(planned, prefetch(reader.iter_blocks(indices)), part.fd, written)
        tick(planned.data_offset)
        scale = planned.file_size / max(1, final.file_size)
        with ThreadPoolExecutor(1, thread_name_prefix="qsnap-fsync") as pool:
            synced = pool.submit(os.fsync, part.fd)
            sha = sha256_fd(part.fd, final.file_size, lambda n: tick(int(n * scale)))
            synced.result()
        if progress is not None:
            progress(total, total)
        part.commit()
    info["data_offset"] = final.data_offset
    info["stored"] = len(final.data_indices) * reader.cluster_size
    return sha, sha, final.file_size


def _write_layout(
    layout: Layout, blocks: Iterator[tuple[int, bytes]], output: Path | Output, form: str, level: int,
    encrypt: EncryptionSpec | None, progress: Progress | None,
) -> tuple[str, str, int]:
    out = output if isinstance(output, Output) else Output(output)
    total = layout.file_size
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    target = out.open(total)
    try:
        if form == "qcow2":
            sink = HashingWriter(target)
            try:
                write_blocks(layout, blocks, sink, tick)
                sha = payload_sha = sink.sha256.hexdigest()
            finally:
                sink.close()
            size = sink.size
        else:
            pipe = _Pipeline(target, form, level, encrypt)
            try:
                write_blocks(layout, blocks, pipe, tick)
                pipe.close()
                sha, payload_sha, size = pipe.file.sha256.hexdigest(), pipe.payload.hexdigest(), pipe.payload_size
            except BaseException:
                pipe.abort()
                raise
            finally:
                pipe.release()
        target.commit()
    except BaseException:
        target.abort()
        raise
    return sha, payload_sha, size


# ------------------------------------------------------------------------ incremental

def find_base(image: Path, output: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest unencrypted .qcow2 backup of IMAGE (by manifest) in OUTPUT's directory."""
    source = str(Path(image).resolve())
    best: tuple[str, Path, dict[str, Any]] | None = None
    for candidate in output.parent.glob("*.qcow2"):
        if candidate == output:
            continue
        manifest = load_manifest(candidate)
        if manifest is None or manifest.get("format") != "qcow2" or manifest.get("encryption"):
            continue
        if manifest.get("source", {}).get("image") != source or manifest.get("file") != candidate.name:
            continue
        if manifest.get("size") != candidate.stat().st_size:
            continue
        created = str(manifest.get("created_at", ""))
        if best is None or created > best[0]:
            best = (created, candidate, manifest)
    return (best[1], best[2]) if best else None


def _export_incremental(
    reader: SourceReader, base: tuple[Path, dict[str, Any]], output: Path | Output, progress: Progress | None,
    info: dict[str, Any], warnings: list[str],
) -> tuple[str, str, int]:
    out = output if isinstance(output, Output) else Output(output)
    base_path, base_manifest = base
    old_snap = (base_manifest.get("source") or {}).get("snapshot")
    changed: list[int] = []
    zeros: list[int] = []
    old_entry = None
    if old_snap:
        for entry, snap in zip(reader.snapshot_entries(), reader.image.snapshots(), strict=True):
            if (snap.id, snap.name, snap.date_iso) == (old_snap["id"], old_snap["name"], old_snap["date"]):
                old_entry = entry
                break
    if old_entry is not None:
        info["diff"] = "metadata"
        changed, zeros = reader.diff_state(old_entry)
    else:
        info["diff"] = "content"
        if not out.local:
            raise UsageError(f"The snapshot of the base backup {base_path.name} is gone from {reader.path}; "
                             "make a full backup.")
        warnings.append("the base backup's snapshot is gone from the image; compared contents instead")
        try:
            base_reader = SourceReader(base_path, allow_backing=True)
        except (Unsupported, QsnapError, OSError) as exc:
            raise UsageError(f"Cannot read the base backup {base_path} ({exc}).") from exc
        with base_reader:
            c = reader.cluster_size
            cur = reader.mapping
            if base_reader.cluster_size != c or base_reader.virtual_size != reader.virtual_size:
                raise UsageError(f"The base backup {base_path} has another geometry; make a full backup.")
            for i in range(cur.cluster_count):
                new = reader.read_cluster(i) if cur.kinds[i] >= DATA else None
                old = base_reader.read_cluster(i)
                if new is not None and new.count(0) == c:
                    new = None
                if old is not None and old.count(0) == c:
                    old = None
                if new == old:
                    continue
                (changed if new is not None else zeros).append(i)
    layout = Layout(reader.cluster_size, reader.virtual_size, changed, zeros, backing_file=base_path.name)
    info.update(layout="qsnap-stream-v1", virtual_size=reader.virtual_size, cluster_size=reader.cluster_size,
                data_offset=layout.data_offset, allocated=len(changed) * reader.cluster_size, changed=len(changed))
    out.check_space(layout.file_size + MARGIN, f"the backup {out.path.name}")
    return _write_layout(layout, prefetch(reader.iter_blocks(changed)), out, "qcow2", 0, None, progress)


__all__ = ["InsufficientSpace", "LocalSink", "Output", "build_manifest", "export_snapshot", "find_base",
           "sha256_file"]
