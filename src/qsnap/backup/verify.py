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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qsnap.backup import qemu
from qsnap.backup.model import Check, VerifyReport, load_manifest
from qsnap.backup.qcow2stream import Malformed, StreamChecker
from qsnap.backup.source import COMPRESSED_DATA, DATA, UNALLOCATED, SourceReader, Unsupported
from qsnap.backup.streams import (
    AsyncHash,
    ChunkReader,
    keep_block_memory,
    parallel_gunzip,
    parallel_unzstd,
    sha256_file,
)
from qsnap.core.errors import QsnapError, UsageError, VerificationFailed
from qsnap.core.models import Snapshot

Against = tuple[Path, Snapshot | None]
DATA_KIND, COMPRESSED_KIND = bytes((DATA,)), bytes((COMPRESSED_DATA,))
UNALLOCATED_KIND = bytes((UNALLOCATED,))


def verify_backup(
    path: Path,
    *,
    against: Against | None = None,
    passphrase: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check BACKUP against its manifest; raise VerificationFailed (exit 11) naming what failed."""
    keep_block_memory()
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

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    return sha256_file(path, tick)


def verify_source(
    label: str,
    manifest: dict[str, Any] | None,
    opener: Callable[[], Any],
    *,
    size: int | None,
    against: Against | None = None,
    passphrase: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    chain: tuple[Check, ...] = (),
    chain_paths: tuple[Path, ...] = (),
) -> VerifyReport:
    """Verify a backup stored elsewhere (an S3 object) from its MANIFEST and a stream of its bytes
    (OPENER() -> a context manager with ``read(n)``), as thoroughly as a local one: size, sha256,
    decompression/decryption, the qcow2 stream structure, the payload sha256, qemu-img check of
    the metadata, and the content ``--against`` the source. CHAIN: the checks of an incremental's
    bases, already made by the caller (who knows where they are). Raises VerificationFailed (11)."""
    keep_block_memory()
    started = time.monotonic()
    checks: list[Check] = list(chain)

    def add(name: str, ok: bool, detail: str = "") -> bool:
        checks.append(Check(name, ok, detail))
        return ok

    payload = 0
    if add("manifest", manifest is not None, f"no qsnap manifest {label}.json: the backup is incomplete"):
        assert manifest is not None
        if manifest.get("encryption") and passphrase is None:
            raise UsageError(f"{label} is encrypted: a passphrase is needed to verify it.")
        if add("exists", size is not None, f"{label} is missing") and add(
                "size", size == manifest["size"], f"object has {size} bytes, manifest says {manifest['size']}"):
            if manifest["format"] not in ("qcow2.gz", "qcow2.zst", "qcow2") \
                    or (manifest.get("payload") or {}).get("layout") != "qsnap-stream-v1":
                add("format", False, f"{manifest['format']} backups of this kind cannot be verified here")
            elif manifest.get("incremental") and against is not None:
                add("content", False, "--against compares full backups; verify this incremental without it")
            elif all(c.ok for c in checks):
                payload = _verify_stream(Path(label), manifest, add, against, passphrase, progress, opener=opener)
    report = VerifyReport(Path(label.rsplit("/", 1)[-1]), all(c.ok for c in checks), tuple(checks), payload,
                          time.monotonic() - started, (Path(label.rsplit("/", 1)[-1]), *chain_paths),
                          location=label)
    if not report.ok:
        failed = "; ".join(f"{c.name}: {c.detail}" if c.detail else c.name for c in report.failed)
        error = VerificationFailed(f"Backup {label} failed verification: {failed}.")
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report


def _verify_stream(
    path: Path, manifest: dict[str, Any], add: Callable[..., bool], against: Against | None,
    passphrase: str | None, progress: Callable[[int, int], None] | None,
    opener: Callable[[], Any] | None = None,
) -> int:
    """One pass: file sha256 (a thread), decompression (gzip members on a thread pool), payload
    sha256 (a thread) and the structure check (this thread), with bounded queues between them.
    OPENER: where the bytes come from when PATH is not a local file (the skeleton for qemu-img
    check then goes to a temporary directory)."""
    payload_info = manifest.get("payload") or {}
    comparer = _StreamComparer(against) if against is not None else None
    checker = StreamChecker(comparer.on_data if comparer else None)
    if comparer is not None:
        comparer.checker = checker
    total = manifest["size"]
    done = 0
    gzip = manifest["format"] == "qcow2.gz"
    plain = manifest["format"] == "qcow2"
    error: str | None = None
    with AsyncHash("qsnap-file-sha256") as file_hash, AsyncHash("qsnap-payload-sha256") as payload_hash:

        def consume(read: Callable[[int], bytes]) -> None:
            blocks: Iterator[bytes]
            if plain:
                blocks = iter(lambda: read(4 << 20), b"")
            else:
                blocks = parallel_gunzip(read) if gzip else parallel_unzstd(read)
            for block in blocks:
                payload_hash.update(block)
                checker.feed(block)

        try:
            with (opener() if opener is not None else open(path, "rb")) as handle:
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
    if opener is None:
        _skeleton_check(path, result.metadata, result.file_size, add)
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="qsnap-verify-") as tmp:
            if result.backing_file:
                # qemu-img check opens the backing file: an empty qcow2 of the same geometry
                # stands in for the base (verified on its own by the caller)
                from qsnap.backup.qcow2stream import Layout

                empty = Layout(result.cluster_size, result.virtual_size, [], [])
                (Path(tmp) / Path(result.backing_file).name).write_bytes(b"".join(empty.metadata()).ljust(
                    empty.file_size, b"\0"))
            _skeleton_check(Path(tmp) / path.name, result.metadata, result.file_size, add)
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


COMPARE_BLOCK = 4 << 20


def _reads_as_zeros(reader: SourceReader, first: int, last: int) -> bool:
    """Whether guest clusters [FIRST, LAST) of READER read as zeros without any I/O."""
    kinds = reader.mapping.kinds
    if kinds.find(DATA_KIND, first, last) >= 0 or kinds.find(COMPRESSED_KIND, first, last) >= 0:
        return False
    return not reader.has_backing or kinds.find(UNALLOCATED_KIND, first, last) < 0


def _guest_block(reader: SourceReader, offset: int, length: int, into: bytearray | None = None) -> bytearray:
    """LENGTH guest bytes at OFFSET, into INTO when given (reused: fresh buffers cost page faults)."""
    if into is None or len(into) != length:
        into = bytearray(length)
        reader.image.readinto(offset, into, reader.state)
    else:
        reader.image.readinto(offset, into, reader.state, zeroed=False)
    return into


_ZEROS: dict[int, bytes] = {}


def _zeros(length: int) -> bytes:
    if length not in _ZEROS:
        _ZEROS.clear()
        _ZEROS[length] = bytes(length)
    return _ZEROS[length]


def _compare_readers(backup: SourceReader, source: SourceReader, add: Callable[..., bool]) -> None:
    """Compare the guest content of two readers in COMPARE_BLOCK pieces; pieces that both
    mappings say read as zeros are not read at all."""
    if backup.virtual_size != source.virtual_size:
        add("content", False, f"disk sizes differ ({backup.virtual_size} vs {source.virtual_size})")
        return
    size = source.virtual_size
    block = max(COMPARE_BLOCK, source.cluster_size, backup.cluster_size)
    mine = theirs = None
    for offset in range(0, size, block):
        length = min(block, size - offset)
        if all(_reads_as_zeros(r, offset // r.cluster_size, -(-(offset + length) // r.cluster_size))
               for r in (backup, source)):
            continue
        mine, theirs = _guest_block(backup, offset, length, mine), _guest_block(source, offset, length, theirs)
        if mine != theirs:
            at = next(k for k in range(length) if mine[k] != theirs[k])
            add("content", False, f"content differs from the source at byte {offset + at}")
            return
    add("content", True)


def _compare_qcow2(path: Path, against: Against, add: Callable[..., bool]) -> None:
    try:
        backup = SourceReader(path, allow_backing=True)
    except (Unsupported, QsnapError, OSError) as exc:
        add("content", False, f"cannot read the backup ({exc})")
        return
    with backup, _source_reader(against) as source:
        _compare_readers(backup, source, add)


def _compare_raw(path: Path, against: Against, add: Callable[..., bool]) -> None:
    with RawComparer(against) as comparer, open(path, "rb", buffering=0) as handle:
        mine = bytearray(COMPARE_BLOCK)  # reused: fresh buffers cost page faults
        while (got := handle.readinto(mine)) and comparer.feed(mine if got == len(mine) else mine[:got]):
            pass
        comparer.finish(add)


class RawComparer:
    """Compare a raw guest stream (a ``.raw`` backup, a ``restic dump``), fed front to back in
    pieces of any size, with the source snapshot: one COMPARE_BLOCK of the source in memory at a
    time; pieces the source maps as zeros are compared with zeros without reading it."""

    def __init__(self, against: Against) -> None:
        self.source = _source_reader(against)
        self.offset = 0
        self.mismatch: str | None = None
        self.theirs: bytearray | None = None

    def __enter__(self) -> RawComparer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.source.close()

    def feed(self, block: bytes | bytearray) -> bool:
        """Compare the next BLOCK of the stream; False once a difference was found."""
        source, c, size = self.source, self.source.cluster_size, self.source.virtual_size
        pos = 0
        while self.mismatch is None and pos < len(block):
            offset = self.offset
            if offset >= size:
                self.mismatch = f"the raw backup is longer than the source disk ({size} bytes)"
                break
            length = min(len(block) - pos, COMPARE_BLOCK - offset % COMPARE_BLOCK, size - offset)
            if _reads_as_zeros(source, offset // c, -(-(offset + length) // c)):
                expected: bytes | bytearray = _zeros(length)
            else:
                expected = self.theirs = _guest_block(source, offset, length, self.theirs)
            # bytes == bytes is a memcmp; a memoryview compares item by item (60 times slower)
            mine = block if length == len(block) else block[pos : pos + length]
            if mine != expected:
                at = next(k for k in range(length) if mine[k] != expected[k])
                self.mismatch = f"content differs from the source at byte {offset + at}"
            self.offset += length
            pos += length
        return self.mismatch is None

    def finish(self, add: Callable[..., bool]) -> bool:
        """Add the "content" check (a stream shorter than the disk differs where it ends)."""
        if self.mismatch is None and self.offset < self.source.virtual_size:
            self.mismatch = f"content differs from the source at byte {self.offset} (the raw backup ends there)"
        return bool(add("content", self.mismatch is None, self.mismatch or ""))


class _StreamComparer:
    """Compare the data clusters of a stream, as they go by, with the source snapshot
    (runs of guest-consecutive clusters are compared a block at a time)."""

    def __init__(self, against: Against) -> None:
        self.source = _source_reader(against)
        self.buf = bytearray()
        self.index = 0
        self.mismatch: str | None = None
        self.seen = bytearray(self.source.mapping.cluster_count)
        self.theirs: bytearray | None = None
        self.checker: StreamChecker | None = None

    def on_data(self, pos: int, data: bytes) -> None:
        if self.mismatch:
            return
        self.buf += data
        c = self.source.cluster_size
        n = len(self.buf) // c
        if not n:
            return
        assert self.checker is not None
        guests = self.checker.result.guest_of_data
        view = memoryview(self.buf)
        k = 0
        while k < n and self.mismatch is None:
            first = guests[self.index + k]
            j = k + 1
            while j < n and guests[self.index + j] == first + (j - k):
                j += 1
            self._compare(first, j - k, view[k * c : j * c])
            k = j
        view.release()
        self.index += n
        del self.buf[: n * c]

    def _compare(self, first: int, count: int, block: memoryview) -> None:
        source, c = self.source, self.source.cluster_size
        if first + count > len(self.seen):
            self.mismatch = f"the backup holds guest cluster {first + count - 1}, beyond the source disk"
            return
        self.seen[first : first + count] = b"\1" * count
        self.theirs = theirs = _guest_block(source, first * c, min(count * c, source.virtual_size - first * c),
                                            self.theirs)
        mine = bytes(block[: len(theirs)])
        if mine != theirs or any(block[len(theirs) :]):
            at = next((k for k in range(len(theirs)) if mine[k] != theirs[k]), len(theirs))
            self.mismatch = f"content differs from the source in guest cluster {first + at // c}"

    def finish(self, result: Any, add: Callable[..., bool]) -> None:
        with self.source:
            if result.cluster_size != self.source.cluster_size or result.virtual_size != self.source.virtual_size:
                add("content", False, "disk geometry differs from the source")
                return
            if self.mismatch is None:
                kinds, seen = self.source.mapping.kinds, self.seen
                for i in range(len(kinds)):
                    if kinds[i] >= DATA and not seen[i]:
                        data = self.source.read_cluster(i)
                        if data is not None and data.count(0) != len(data):
                            self.mismatch = f"the backup lacks data of guest cluster {i}"
                            break
            add("content", self.mismatch is None, self.mismatch or "")
