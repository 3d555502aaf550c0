"""Restore a backup into an image ("Restoring from Backup"), never losing the previous image.

verify the backup -> write IMAGE.partial (decrypt/decompress, or qemu-img convert which
flattens an incremental chain and opens LUKS) -> qemu-img check it -> hard-link the old image
to IMAGE.bak-<timestamp> -> rename IMAGE.partial over IMAGE. The caller (service) makes sure
no VM holds the image.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qsnap.backup import qemu
from qsnap.backup.model import ImportResult, load_manifest
from qsnap.backup.partial import FdWriter, PartialFile, check_space, is_no_space, no_space_error
from qsnap.backup.streams import AsyncHash, ChunkReader, parallel_gunzip, parallel_unzstd
from qsnap.backup.verify import verify_backup
from qsnap.core.errors import VerificationFailed
from qsnap.core.fsutil import fsync_dir


def import_backup(backup: Path, image: Path, *, passphrase: str | None = None) -> ImportResult:
    started = time.monotonic()
    backup, image = Path(backup).absolute(), Path(image).absolute()
    verify_backup(backup, passphrase=passphrase)  # VerificationFailed (11): image untouched
    manifest = load_manifest(backup)
    assert manifest is not None
    return import_verified(backup, manifest, lambda: open(backup, "rb"), image, passphrase=passphrase,
                           started=started)


def import_verified(
    backup: Path, manifest: dict[str, Any], opener: Callable[[], Any], image: Path, *,
    passphrase: str | None = None, started: float | None = None, remote: bool = False,
) -> ImportResult:
    """Unpack a verified backup (its bytes from OPENER(), a context manager with ``read(n)``)
    into IMAGE.partial, check it, keep the old image as .bak-*, rename. REMOTE: BACKUP is only
    a label (the bytes are not in a local file), so .qcow2 backups are copied as a stream."""
    started = time.monotonic() if started is None else started
    image = Path(image).absolute()
    payload = manifest.get("payload") or {}
    form = manifest["format"]
    warnings: list[str] = []
    needed = int(payload.get("size") or 0) if form != "raw" else int(manifest.get("sizes", {}).get("allocated") or 0)
    check_space(image.parent, needed + (4 << 20), f"the imported image {image.name}")
    mode = (image.stat().st_mode & 0o777) if image.exists() else 0o600
    try:
        with contextlib.ExitStack() as stack:
            part = stack.enter_context(PartialFile(image, warnings, mode=mode))
            if form in ("qcow2.gz", "qcow2.zst") or (remote and form == "qcow2"):
                digest = stack.enter_context(AsyncHash("qsnap-import-sha256"))
                out = FdWriter(part.fd, writeback=True)
                with opener() as handle:
                    read: Callable[[int], bytes] = handle.read
                    if manifest.get("encryption"):
                        from qsnap.backup.agecrypt import decrypted_chunks

                        assert passphrase is not None
                        read = ChunkReader(decrypted_chunks(handle, passphrase)).read
                    blocks: Iterator[bytes]
                    if form == "qcow2":
                        blocks = iter(lambda: read(4 << 20), b"")
                    else:
                        blocks = (parallel_gunzip if form == "qcow2.gz" else parallel_unzstd)(read)
                    for block in blocks:
                        digest.update(block)
                        out.write(block)
                if digest.hexdigest() != payload.get("sha256"):
                    raise VerificationFailed(f"The qcow2 unpacked from {backup} does not match its manifest.")
            else:
                secret = stack.enter_context(qemu.secret_file(passphrase)) if manifest.get("encryption") and \
                    passphrase else None
                argv = [qemu.QEMU_IMG, "convert", "-p"]
                if secret is not None:
                    argv += [*qemu.secret_object(secret, "sec1"), "--image-opts"]
                    src = f"driver=qcow2,file.filename={backup},encrypt.key-secret=sec1"
                else:
                    argv += ["-f", "raw" if form == "raw" else "qcow2"]
                    src = str(backup)
                argv += ["-O", "qcow2", src, str(part.path)]
                qemu.run_with_progress(argv, backup, 1, None)
            previous = replace_image(part, image, str(backup))
    except OSError as exc:
        if is_no_space(exc):
            raise no_space_error(image.parent, exc) from exc
        raise
    return ImportResult(image, backup, previous, time.monotonic() - started, tuple(warnings))


def replace_image(part: PartialFile, image: Path, label: str) -> Path | None:
    """fsync and qemu-img check IMAGE.partial, keep the old IMAGE as .bak-*, rename; return the .bak."""
    os.fsync(part.fd)
    result = qemu.check_json(part.path)
    if result.get("corruptions") or result.get("check-errors"):
        raise VerificationFailed(f"The image unpacked from {label} fails qemu-img check.")
    previous = None
    if image.exists():
        previous = image.with_name(f"{image.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while previous.exists():
            previous = image.with_name(f"{image.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            n += 1
        try:
            os.link(image, previous)
        except OSError:
            os.rename(image, previous)  # no hard links here: a moment without IMAGE, nothing lost
        fsync_dir(image.parent)
    part.commit()
    return previous
