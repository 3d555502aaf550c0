"""Oracle helpers for the qcow2 reader tests: qemu-img and qemu-io say what is true."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from qsnap.core.models import Snapshot
from qsnap.engines import qemu_img
from qsnap.qcow2 import Qcow2Image


def run(*argv: str | Path) -> str:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def create(path: Path, size: str, *options: str, backing: Path | None = None, fmt: str = "qcow2") -> Path:
    argv: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    for option in options:
        argv += ["-o", option]
    if backing is not None:
        argv += ["-b", backing, "-F", fmt]
    run(*argv, path, size)
    return path


def io(path: Path, *commands: str) -> None:
    argv: list[str | Path] = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    out = run(*argv, path)
    assert "error" not in out.lower() and "fail" not in out.lower(), out


def snapshot(path: Path, name: str) -> None:
    run("qemu-img", "snapshot", "-c", name, path)


def qemu_sha256(path: Path, snapshot_id: str | None, scratch: Path) -> str:
    """sha256 of what `qemu-img convert -O raw` exports (the oracle)."""
    out = scratch / f"export-{os.getpid()}.raw"
    argv: list[str | Path] = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw"]
    if snapshot_id is not None:
        argv += ["-l", f"snapshot.id={snapshot_id}"]
    run(*argv, path, out)
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    out.unlink()
    return digest.hexdigest()


def reader_sha256(image: Qcow2Image, snap: Snapshot | None, pad_to: int | None = None) -> str:
    digest = hashlib.sha256()
    size = 0
    for _, chunk in image.iter_data(snap, chunk_size=4 << 20):
        digest.update(chunk)
        size += len(chunk)
    if pad_to is not None and pad_to > size:
        digest.update(bytes(pad_to - size))
    return digest.hexdigest()


def qemu_snapshots(path: Path) -> tuple[Snapshot, ...]:
    return qemu_img.info(path).snapshots


def without_disk_size(snaps: tuple[Snapshot, ...]) -> tuple[Snapshot, ...]:
    """qemu-img info does not report a snapshot's disk size: compare the rest."""
    return tuple(s._replace(disk_size=None) for s in snaps)


def qemu_check(path: Path) -> dict[str, object]:
    result = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", "--output=json", str(path)], capture_output=True, text=True
    )
    assert result.returncode in (0, 2, 3), result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data
