"""Verify a backup: checksums, decompression/decryption, qcow2 structure, the incremental chain,
and optionally its content against the source snapshot.

Compressed streams are checked in one pass with bounded memory: the file's sha256, the
decompressed payload's sha256 and the qcow2 stream structure (:class:`StreamChecker`), then
``qemu-img check`` runs on a *skeleton* (the payload's metadata clusters written into a sparse
file of the payload's length): qemu-img check reads metadata only, so the skeleton costs a few
KiB of disk per GiB of backup, not a full copy.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qsnap.backup import qemu
from qsnap.backup.model import Check, VerifyReport, load_manifest
from qsnap.backup.qcow2stream import Malformed, StreamChecker
from qsnap.backup.source import DATA, SourceReader, Unsupported
from qsnap.backup.streams import READ_CHUNK, AsyncHash, ChunkReader, iter_file, parallel_gunzip, unzstd_chunks
from qsnap.core.errors import QsnapError, UsageError, VerificationFailed
from qsnap.core.models import Snapshot

Against = tuple[Path, Snapshot | None]


def verify_backup(
    path: Path,
    *,
    against: Against | None = None,
    passphrase: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check BACKUP against its manifest; raise VerificationFailed (exit 11) naming what failed."""
    started = time.monotonic()
    path = Path(path).absolute()
    checks: list[Check] = []
    chain: list[Path] = [path]
    payload = _verify_one(path, checks, chain, against, passphrase, progress, depth=0)
    report = VerifyReport(path, all(c.ok for c in checks), tuple(checks), payload,
                          time.monotonic() - started, tuple(chain))
    if not report.ok:
        failed = "; ".join(f"{c.name}: {c.detail}" if c.detail else c.name for c in report.failed)
        error = VerificationFailed(f"Backup {path} failed verification: {failed}.")
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report


def _verify_one(
    path: Path, checks: list[Check], chain: list[Path], against: Against | None, passphrase: str | None,
    progress: Callable[[int, int], None] | None, depth: int,
) -> int:
    label = "" if depth == 0 else f"base {path.name}: "

    def add(name: str, ok: bool, detail: str = "") -> bool:
        checks.append(Check(label + name, ok, detail))
        return ok

    if not path.is_file():
        add("exists", False, f"{path} is missing")
        return 0
    manifest = load_manifest(path)
    if manifest is None:
        add("manifest", False, f"no qsnap manifest {path.name}.json beside the backup")
        return 0
    add("manifest", True)
    size = path.stat().st_size
    if not add("size", size == manifest["size"], f"file has {size} bytes, manifest says {manifest['size']}"):
        return 0
    form = manifest["format"]
    encrypted = manifest.get("encryption") or None
    if encrypted and passphrase is None:
        raise UsageError(f"{path.name} is encrypted: a passphrase is needed to verify it.")
    if form in ("qcow2.gz", "qcow2.zst"):
        return _verify_stream(path, manifest, add, against, passphrase, progress)
    digest = _sha256(path, progress, size)
    if not add("sha256", digest == manifest["sha256"], "file checksum differs from the manifest"):
        return size
    if form == "raw":
        virtual = (manifest.get("payload") or {}).get("virtual_size")
        add("raw size", virtual is None or size == virtual, f"raw file has {size} bytes, disk is {virtual}")
        if against is not None:
            _compare_raw(path, against, add)
        return size
    # qcow2: the incremental chain first (qemu-img check opens the backing file).
    inc = manifest.get("incremental")
    if inc:
        base = path.parent / inc["base"]
        chain.append(base)
        base_manifest = load_manifest(base) if base.is_file() else None
        if not add("incremental base", base.is_file(), f"base backup {base} is missing"):
            return size
        ok = base_manifest is not None and base_manifest.get("sha256") == inc["base_sha256"]
        if not add("incremental base sha256", ok, f"{base.name} is not the backup this one was made on"):
            return size
        before = len(checks)
        _verify_one(base, checks, chain, None, passphrase, None, depth + 1)
        if any(not c.ok for c in checks[before:]):
            return size
    with contextlib.ExitStack() as stack:
        secret = stack.enter_context(qemu.secret_file(passphrase)) if encrypted and passphrase else None
        result = qemu.check_json(path, secret=secret)
        ok = not (result.get("corruptions") or result.get("check-errors") or result.get("leaks"))
        detail = str(result.get("error") or f"qemu-img check: {result.get('corruptions', 0)} corruptions, "
                     f"{result.get('leaks', 0)} leaks")
        if not add("qemu-img check", ok, detail):
            return size
        if inc:
            info = qemu.info_json(path, secret=secret)
            backing = info.get("backing-filename")
            add("backing file", backing == inc["base"], f"backing file is {backing!r}, expected {inc['base']!r}")
    if against is not None:
        if encrypted:
            add("content", False, "content comparison of LUKS-encrypted backups is not supported; "
                "verify without --against")
        else:
            _compare_qcow2(path, against, add)
    return size


def _sha256(path: Path, progress: Callable[[int, int], None] | None, total: int) -> str:
    done = 0
    with AsyncHash() as digest, open(path, "rb", buffering=0) as handle:
        for block in iter_file(handle):
            digest.update(block)
            done += len(block)
            if progress:
                progress(done, total)
        return digest.hexdigest()


def _verify_stream(
    path: Path, manifest: dict[str, Any], add: Callable[..., bool], against: Against | None,
    passphrase: str | None, progress: Callable[[int, int], None] | None,
) -> int:
    """One pass: file sha256 (a thread), decompression (gzip members on a thread pool), payload
    sha256 (a thread) and the structure check (this thread), with bounded queues between them."""
    payload_info = manifest.get("payload") or {}
    comparer = _StreamComparer(against) if against is not None else None
    checker = StreamChecker(comparer.on_data if comparer else None)
    if comparer is not None:
        comparer.checker = checker
    total = manifest["size"]
    done = 0
    gzip = manifest["format"] == "qcow2.gz"
    error: str | None = None
    with AsyncHash("qsnap-file-sha256") as file_hash, AsyncHash("qsnap-payload-sha256") as payload_hash:

        def consume(read: Callable[[int], bytes]) -> None:
            blocks = parallel_gunzip(read) if gzip else unzstd_chunks(iter(lambda: read(READ_CHUNK), b""))
            for block in blocks:
                payload_hash.update(block)
                checker.feed(block)

        try:
            with open(path, "rb") as handle:
                def read(n: int) -> bytes:
                    nonlocal done
                    block = handle.read(n)
                    file_hash.update(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
                    return block

                if manifest.get("encryption"):
                    from qsnap.backup.agecrypt import AgeError, decrypted_chunks

                    class _Tee:
                        def read(self, n: int = -1) -> bytes:
                            block = handle.read(n)
                            file_hash.update(block)
                            return block

                    try:
                        assert passphrase is not None
                        consume(ChunkReader(decrypted_chunks(_Tee(), passphrase)).read)
                    except AgeError as exc:
                        error = f"decryption: {exc}"
                else:
                    consume(read)
        except ValueError as exc:
            error = f"decompression: {exc}"
        except Malformed as exc:
            error = f"qcow2 stream: {exc}"
        file_sha = file_hash.hexdigest()
        payload_sha = payload_hash.hexdigest()
    add("sha256", file_sha == manifest["sha256"] or error is not None,
        "file checksum differs from the manifest")
    if file_sha != manifest["sha256"] and error is None:
        error = "file checksum differs from the manifest"
    if error is not None:
        add("payload", False, error)
        return 0
    try:
        result = checker.finish()
    except Malformed as exc:
        add("qcow2 stream", False, str(exc))
        return 0
    add("qcow2 stream", True)
    ok = payload_sha == payload_info.get("sha256")
    if not add("payload sha256", ok, "decompressed qcow2 differs from the manifest"):
        return result.file_size
    _skeleton_check(path, result.metadata, result.file_size, add)
    if comparer is not None:
        comparer.finish(result, add)
    return result.file_size


def _skeleton_check(path: Path, metadata: bytes, length: int, add: Callable[..., bool]) -> None:
    skeleton = path.with_name(f".{path.name}.qsnap-verify.qcow2")
    try:
        fd = os.open(skeleton, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, metadata)
            os.ftruncate(fd, length)
        finally:
            os.close(fd)
        result = qemu.check_json(skeleton)
        ok = not (result.get("corruptions") or result.get("check-errors") or result.get("leaks"))
        add("qemu-img check", ok, str(result.get("error") or f"{result.get('corruptions', 0)} corruptions, "
                                      f"{result.get('leaks', 0)} leaks"))
    finally:
        with contextlib.suppress(FileNotFoundError):
            skeleton.unlink()


# ------------------------------------------------------------------------ content comparison

def _source_reader(against: Against) -> SourceReader:
    image, snapshot = against
    try:
        return SourceReader(image, snapshot.id if snapshot is not None else None)
    except Unsupported as exc:
        raise UsageError(f"--against cannot read {image} directly ({exc}).") from exc


def _compare_readers(backup: SourceReader, source: SourceReader, add: Callable[..., bool]) -> None:
    if backup.virtual_size != source.virtual_size:
        add("content", False, f"disk sizes differ ({backup.virtual_size} vs {source.virtual_size})")
        return
    c = source.cluster_size
    step = backup.cluster_size
    for offset in range(0, source.virtual_size, max(c, step)):
        mine = _read_at(backup, offset, max(c, step))
        theirs = _read_at(source, offset, max(c, step))
        if mine != theirs:
            add("content", False, f"content differs from the source at byte {offset}")
            return
    add("content", True)


def _read_at(reader: SourceReader, offset: int, length: int) -> bytes:
    c = reader.cluster_size
    out = bytearray()
    for index in range(offset // c, (offset + length + c - 1) // c):
        if index >= reader.mapping.cluster_count:
            break
        data = reader.read_cluster(index)
        out += data if data is not None else bytes(c)
    skip = offset % c
    return bytes(out[skip : skip + length]).rstrip(b"\0")


def _compare_qcow2(path: Path, against: Against, add: Callable[..., bool]) -> None:
    try:
        backup = SourceReader(path, allow_backing=True)
    except (Unsupported, QsnapError, OSError) as exc:
        add("content", False, f"cannot read the backup ({exc})")
        return
    with backup, _source_reader(against) as source:
        _compare_readers(backup, source, add)


def _compare_raw(path: Path, against: Against, add: Callable[..., bool]) -> None:
    with _source_reader(against) as source, open(path, "rb") as handle:
        c = source.cluster_size
        for index in range(source.mapping.cluster_count):
            mine = handle.read(c).rstrip(b"\0")
            theirs = (source.read_cluster(index) or b"").rstrip(b"\0")
            if mine != theirs:
                add("content", False, f"content differs from the source at byte {index * c}")
                return
    add("content", True)


class _StreamComparer:
    """Compare the data clusters of a stream, as they go by, with the source snapshot."""

    def __init__(self, against: Against) -> None:
        self.source = _source_reader(against)
        self.buf = bytearray()
        self.index = 0
        self.mismatch: str | None = None
        self.seen: set[int] = set()
        self.checker: StreamChecker | None = None

    def on_data(self, pos: int, data: bytes) -> None:
        if self.mismatch:
            return
        self.buf += data
        c = self.source.cluster_size
        while len(self.buf) >= c:
            block, self.buf = bytes(self.buf[:c]), self.buf[c:]
            self._compare(block)

    def _compare(self, block: bytes) -> None:
        assert self.checker is not None
        guest = self.checker.result.guest_of_data[self.index]
        self.index += 1
        self.seen.add(guest)
        theirs = self.source.read_cluster(guest) if guest < self.source.mapping.cluster_count else None
        if block.rstrip(b"\0") != (theirs or b"").rstrip(b"\0"):
            self.mismatch = f"content differs from the source in guest cluster {guest}"

    def finish(self, result: Any, add: Callable[..., bool]) -> None:
        with self.source:
            if result.cluster_size != self.source.cluster_size or result.virtual_size != self.source.virtual_size:
                add("content", False, "disk geometry differs from the source")
                return
            if self.mismatch is None:
                for i in range(self.source.mapping.cluster_count):
                    if i not in self.seen and self.source.mapping.kinds[i] >= DATA:
                        data = self.source.read_cluster(i)
                        if data is not None and data.count(0) != len(data):
                            self.mismatch = f"the backup lacks data of guest cluster {i}"
                            break
            add("content", self.mismatch is None, self.mismatch or "")
