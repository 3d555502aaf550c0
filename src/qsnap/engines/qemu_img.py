"""Adapter for `qemu-img` (the offline engine).

Knows nothing about sockets or monitors. argv builders are pure functions (tested without
QEMU); the runners call :func:`qsnap.core.proc.run` and turn qemu-img's failures into
qsnap errors. Facts this module relies on (reproduced on QEMU 7.2, pinned by tests):

- ``snapshot -a X`` looks X up as an ID first, then as a name: we always pass the ID.
- ``snapshot -d X`` looks X up by *name* only and deletes the first match in table order.
- ``snapshot -c X`` creates duplicates happily: the service layer checks first.
- A running QEMU holds locks: writers fail with 'Failed to get "write" lock'. Only
  read-only commands ever get ``-U`` (force-share).
- ``-f qcow2`` is always given: never let qemu-img probe the format of a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qsnap.core import proc
from qsnap.core.errors import (
    CorruptImage,
    ImageError,
    ImageInUse,
    ProcessError,
    QsnapError,
    SnapshotNotFound,
)
from qsnap.core.models import CheckResult, ImageInfo, Snapshot

QEMU_IMG = "qemu-img"
NAME = "qemu-img"

LOCK_MARKERS = ('Failed to get "write" lock', "Failed to get shared", 'Failed to get "consistent read" lock')


# ---------------------------------------------------------------- argv builders (pure)

def info_argv(path: Path | str, *, force_share: bool = True) -> list[str]:
    argv = [QEMU_IMG, "info", "-f", "qcow2", "--output=json"]
    if force_share:
        argv.append("-U")
    return [*argv, str(path)]


def image_opts(path: Path | str) -> str:
    """`--image-opts` spec forcing the qcow2 driver (`qemu-img snapshot` has no -f).

    Commas in option values are escaped by doubling them (QEMU's option syntax).
    """
    return "driver=qcow2,file.driver=file,file.filename=" + str(path).replace(",", ",,")


def create_argv(path: Path | str, name: str) -> list[str]:
    return [QEMU_IMG, "snapshot", "--image-opts", "-c", name, image_opts(path)]


def apply_argv(path: Path | str, snapshot_id: str) -> list[str]:
    return [QEMU_IMG, "snapshot", "--image-opts", "-a", snapshot_id, image_opts(path)]


def delete_argv(path: Path | str, name: str) -> list[str]:
    return [QEMU_IMG, "snapshot", "--image-opts", "-d", name, image_opts(path)]


def check_argv(path: Path | str, *, force_share: bool = False) -> list[str]:
    argv = [QEMU_IMG, "check", "-f", "qcow2", "--output=json"]
    if force_share:
        argv.append("-U")
    return [*argv, str(path)]


def convert_argv(
    path: Path | str,
    snapshot_id: str | None,
    output: Path | str,
    *,
    output_format: str = "qcow2",
    compress: bool = False,
    force_share: bool = True,
    progress: bool = False,
    target_options: Sequence[str] = (),
    skip_create: bool = False,
) -> list[str]:
    """Copy snapshot SNAPSHOT_ID (or the current state when None) into OUTPUT.

    Reading a snapshot with force-share is safe: a snapshot's clusters never change.
    """
    argv = [QEMU_IMG, "convert", "-f", "qcow2", "-O", output_format]
    if force_share:
        argv.append("-U")
    if snapshot_id is not None:
        argv += ["-l", f"snapshot.id={snapshot_id}"]
    if compress:
        argv.append("-c")
    if progress:
        argv.append("-p")
    if skip_create:
        argv.append("-n")
    for option in target_options:
        argv += ["-o", option]
    return [*argv, str(path), str(output)]


# ---------------------------------------------------------------- parsing (pure)

def parse_snapshots(data: Sequence[dict[str, Any]]) -> tuple[Snapshot, ...]:
    return tuple(Snapshot.from_qapi(entry) for entry in data)


def parse_info(path: Path | str, data: dict[str, Any]) -> ImageInfo:
    specific = (data.get("format-specific") or {}).get("data") or {}
    try:
        file_size = os.stat(path).st_size
    except OSError:
        file_size = 0
    return ImageInfo(
        path=str(path),
        format=str(data.get("format")),
        virtual_size=int(data.get("virtual-size", 0)),
        actual_size=int(data.get("actual-size", 0)),
        file_size=file_size,
        cluster_size=data.get("cluster-size"),
        snapshots=parse_snapshots(data.get("snapshots", [])),
        compat=specific.get("compat"),
        compression_type=specific.get("compression-type"),
        refcount_bits=specific.get("refcount-bits"),
        lazy_refcounts=specific.get("lazy-refcounts"),
        extended_l2=specific.get("extended-l2"),
        corrupt=specific.get("corrupt"),
        encrypted=bool(data.get("encrypted", False)),
        backing_file=data.get("backing-filename") or data.get("full-backing-filename"),
        dirty=bool(data.get("dirty-flag", False)),
    )


def parse_check(path: Path | str, data: dict[str, Any]) -> CheckResult:
    return CheckResult(
        path=str(path),
        corruptions=int(data.get("corruptions", 0)),
        leaks=int(data.get("leaks", 0)),
        check_errors=int(data.get("check-errors", 0)),
        corruptions_fixed=int(data.get("corruptions-fixed", 0)),
        leaks_fixed=int(data.get("leaks-fixed", 0)),
        image_end_offset=data.get("image-end-offset"),
        total_clusters=data.get("total-clusters"),
        allocated_clusters=data.get("allocated-clusters"),
        fragmented_clusters=data.get("fragmented-clusters"),
        raw=data,
    )


def translate_error(exc: ProcessError, path: Path | str) -> QsnapError:
    """Turn a qemu-img failure into the qsnap error a user can act on."""
    stderr = exc.stderr
    said = exc.stderr.strip().replace("\n", " ") or f"exit code {exc.returncode}"
    if any(marker in stderr for marker in LOCK_MARKERS):
        return ImageInUse(
            f"{path} is in use by a running VM (qemu-img: {said}).",
            hint="stop the VM, or let qsnap use the VM's monitor with --monitor ADDR "
            "(or QSNAP_MONITOR / MONITOR_PORT)",
        )
    if "No space left on device" in stderr or "Disk quota exceeded" in stderr:
        return QsnapError(
            f"The filesystem holding {path} is full, so qemu-img could not finish ({said}).",
            hint="free some space (qsnap prune, or delete old backups) and retry; the image may hold a few "
            "leaked clusters, which 'qemu-img check -r leaks' reclaims",
        )
    if "No such file or directory" in stderr or "regular file" in stderr:
        return ImageError(f"Cannot open {path}: {said}.")
    if "Permission denied" in stderr or "Read-only file system" in stderr:
        return ImageError(f"Cannot write {path}: {said}.", hint="check the file's permissions")
    if "not in qcow2 format" in stderr:
        return ImageError(f"{path} is not a qcow2 image: {said}.")
    if "snapshot not found" in stderr.lower() or "Can't find the snapshot" in stderr:
        return SnapshotNotFound(f"qemu-img could not find the snapshot in {path}: {said}.")
    if "Could not open" in stderr or "Could not read" in stderr or "corrupt" in stderr.lower():
        return CorruptImage(f"qemu-img cannot read {path}: {said}.", hint="run 'qsnap check'")
    return exc


def _run(argv: list[str], path: Path | str, **kwargs: Any) -> proc.Result:
    try:
        return proc.run(argv, **kwargs)
    except ProcessError as exc:
        raise translate_error(exc, path) from exc


# ---------------------------------------------------------------- operations

def info(path: Path | str, *, force_share: bool = True) -> ImageInfo:
    result = _run(info_argv(path, force_share=force_share), path)
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise CorruptImage(f"qemu-img info printed no JSON for {path}.") from exc
    return parse_info(path, data)


def list_snapshots(path: Path | str) -> tuple[Snapshot, ...]:
    return info(path).snapshots


READER = "reader"


def read_snapshots(path: Path | str) -> tuple[tuple[Snapshot, ...], str]:
    """The snapshot table and who read it: the qcow2 reader (no process) or, when the reader
    refuses the file (it is stricter than QEMU on damaged images), `qemu-img info`."""
    from qsnap.qcow2 import open_image

    try:
        with open_image(path) as reader:
            return reader.snapshots(), READER
    except CorruptImage as reader_error:
        try:
            snapshots = list_snapshots(path)
        except CorruptImage:
            raise reader_error from None
        if any(not s.id for s in snapshots):
            raise reader_error from None  # qemu-img read a truncated table as zeros
        return snapshots, NAME


def create(path: Path | str, name: str) -> None:
    _run(create_argv(path, name), path)


def apply(path: Path | str, snapshot_id: str) -> None:
    _run(apply_argv(path, snapshot_id), path)


def delete(path: Path | str, name: str) -> None:
    _run(delete_argv(path, name), path)


def check(path: Path | str, *, force_share: bool = False) -> CheckResult:
    """Run `qemu-img check`; its exit codes 2 (corrupt) and 3 (leaks) still print JSON."""
    result = _run(check_argv(path, force_share=force_share), path, check=False)
    if result.returncode not in (0, 2, 3):
        raise translate_error(
            ProcessError(result.argv, result.returncode, result.stdout, result.stderr), path
        )
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise CorruptImage(
            f"qemu-img check could not check {path}: {result.stderr.strip() or 'no output'}."
        ) from exc
    return parse_check(path, data)


def convert(path: Path | str, snapshot_id: str | None, output: Path | str, **kwargs: Any) -> None:
    _run(convert_argv(path, snapshot_id, output, **kwargs), path)


def version() -> str:
    result = proc.run([QEMU_IMG, "--version"])
    return result.stdout.splitlines()[0] if result.stdout else ""


class QemuImgEngine:
    """The offline engine: every verb is one qemu-img run on a stopped VM's image."""

    name = NAME

    def __init__(self, path: Path) -> None:
        self.path = path

    def list_snapshots(self) -> tuple[Snapshot, ...]:
        # The reader answers without starting a process; qemu-img writes, the reader reads.
        return read_snapshots(self.path)[0]

    def create(self, name: str) -> None:
        create(self.path, name)

    def apply(self, snapshot: Snapshot) -> None:
        # -a looks its argument up as an ID first: the ID selects exactly this snapshot.
        apply(self.path, snapshot.id)

    def delete(self, snapshot: Snapshot) -> None:
        # -d looks its argument up by name only and takes the first match in table order.
        current = self.list_snapshots()
        first = next((s for s in current if s.name == snapshot.name), None)
        if first is not None and first.id == snapshot.id:
            delete(self.path, snapshot.name)
            return
        from qsnap.engines import storage_daemon

        storage_daemon.delete_snapshot(self.path, snapshot)
