"""Which engine acts on an image: the running VM's monitor, or qemu-img when no VM holds it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qsnap.core.models import ImageInfo, Snapshot
from qsnap.engines import qemu_img
from qsnap.engines.base import Engine

if TYPE_CHECKING:
    from qsnap.service.audit import Operation
    from qsnap.service.snapshots import Context, RestoreResult


def select_engine(image: Path, ctx: Context, *, write: bool) -> Engine:
    return qemu_img.QemuImgEngine(image)


def read_info(image: Path, ctx: Context) -> ImageInfo:
    return qemu_img.info(image)


def restore(
    path: Path,
    engine: Engine,
    target: Snapshot,
    before: tuple[Snapshot, ...],
    *,
    safety: bool,
    ctx: Context,
    rec: Operation,
) -> RestoreResult:
    from qsnap.service import snapshots as svc

    warnings: list[str] = []
    if engine.name == qemu_img.NAME:
        svc._preflight_offline(path)
    safety_snapshot = svc.take_safety_snapshot(path, engine, before, target, ctx) if safety else None
    if safety_snapshot is not None:
        rec.details["safety_snapshot"] = safety_snapshot.name
    engine.apply(target)
    after = engine.list_snapshots()
    svc.record_restored(path, target, after, warnings)
    return svc.RestoreResult(path, engine.name, target, safety_snapshot, tuple(warnings))
