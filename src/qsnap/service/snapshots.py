"""Use cases on snapshots: list, create, restore, delete, info, check.

Each mutating use case: validate the name, check the image file, take the image lock,
pick the engine, resolve the name to exactly one snapshot, act, re-read the snapshot list to
confirm what happened, update the sidecar, and record the operation in the audit log.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsnap.core.errors import (
    CorruptImage,
    ImageInUse,
    MonitorError,
    QsnapError,
    SnapshotExists,
    SnapshotNotFound,
)
from qsnap.core.models import CheckResult, ImageInfo, Snapshot
from qsnap.core.names import find_by_name, resolve_snapshot, validate_lookup_name, validate_name
from qsnap.engines import qemu_img
from qsnap.engines.base import Engine
from qsnap.service.context import DEFAULT_CONTEXT, Context
from qsnap.service.image import check_image_file, check_writable
from qsnap.service.sidecar import Sidecar, key_of

if TYPE_CHECKING:
    from qsnap.service.audit import Operation

__all__ = ["DEFAULT_CONTEXT", "Context"]  # re-exported: callers import the per-run settings from here too

SAFETY_PREFIX = "pre-restore-"




@dataclass(frozen=True)
class SnapshotEntry:
    snapshot: Snapshot
    description: str | None = None
    parent: str | None = None
    safety: bool = False
    current: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**self.snapshot.to_json(), "description": self.description}


@dataclass(frozen=True)
class ListResult:
    image: Path
    engine: str
    entries: tuple[SnapshotEntry, ...]

    @property
    def snapshots(self) -> tuple[Snapshot, ...]:
        return tuple(e.snapshot for e in self.entries)

    def to_json(self) -> dict[str, Any]:
        return {"image": str(self.image), "engine": self.engine,
                "snapshots": [e.to_json() for e in self.entries]}


@dataclass(frozen=True)
class CreateResult:
    image: Path
    engine: str
    snapshot: Snapshot
    replaced: Snapshot | None = None
    warnings: tuple[str, ...] = ()
    synced: str | None = None  # how the guest was synced first (--sync), if it was

    def to_json(self) -> dict[str, Any]:
        return {"image": str(self.image), "engine": self.engine, "snapshot": self.snapshot.to_json(),
                "replaced": self.replaced.to_json() if self.replaced else None,
                "synced": self.synced, "warnings": list(self.warnings)}


@dataclass(frozen=True)
class RestoreResult:
    image: Path
    engine: str
    snapshot: Snapshot
    safety_snapshot: Snapshot | None
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"image": str(self.image), "engine": self.engine, "snapshot": self.snapshot.to_json(),
                "safety_snapshot": self.safety_snapshot.to_json() if self.safety_snapshot else None,
                "warnings": list(self.warnings)}


@dataclass(frozen=True)
class DeleteResult:
    image: Path
    engine: str
    snapshot: Snapshot
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"image": str(self.image), "engine": self.engine, "snapshot": self.snapshot.to_json(),
                "warnings": list(self.warnings)}


@dataclass
class _Run:
    """State of one mutating operation."""

    image: Path
    engine: Engine
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ engine choice

def open_engine(image: Path, ctx: Context, *, write: bool) -> contextlib.AbstractContextManager[Engine]:
    """The engine for IMAGE: the VM's monitor when a running VM holds it, else qemu-img.

    A context manager: a monitor connection is closed when the block ends.
    """
    from qsnap.service import routing

    return routing.open_engine(image, ctx, write=write)


def select_engine(image: Path, ctx: Context, *, write: bool) -> Engine:
    """Like :func:`open_engine`, for callers that close the engine themselves (``close()``)."""
    from qsnap.service import routing

    return routing.choose_engine(image, ctx, write=write)


def _preflight_offline(image: Path) -> None:
    """Before qemu-img modifies IMAGE: not locked by a VM, not corrupt, writable."""
    check_writable(image)
    result = qemu_img.check(image)  # no -U: fails with a lock error if a VM holds it
    if result.corruptions or result.check_errors:
        raise CorruptImage(
            f"{image} is corrupt ({result.corruptions} corruptions, {result.check_errors} check "
            "errors); refusing to modify it.",
            hint="run 'qsnap check' and 'qemu-img check -r all' on a copy",
        )


def _creator(ctx: Context) -> dict[str, str]:
    import getpass
    import shlex
    import socket
    import sys

    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname(),
            "command": ctx.command or shlex.join(sys.argv)}


def _now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


# ------------------------------------------------------------------ read-only

def list_snapshots(image: str | os.PathLike[str], ctx: Context = DEFAULT_CONTEXT) -> ListResult:
    path = check_image_file(Path(image).absolute())
    with open_engine(path, ctx, write=False) as engine:
        if engine.name == qemu_img.NAME:
            snapshots, engine_name = qemu_img.read_snapshots(path)
        else:
            snapshots, engine_name = engine.list_snapshots(), engine.name
    sidecar = Sidecar.load(path)
    current = sidecar.current
    entries = []
    for snap in snapshots:
        meta = sidecar.get(snap)
        entries.append(SnapshotEntry(
            snap, meta.get("description"), meta.get("parent"), bool(meta.get("safety")),
            key_of(snap) == current,
        ))
    return ListResult(path, engine_name, tuple(entries))


def info(image: str | os.PathLike[str], ctx: Context = DEFAULT_CONTEXT) -> ImageInfo:
    path = check_image_file(Path(image).absolute())
    from qsnap.service import routing

    return routing.read_info(path, ctx)


def check(image: str | os.PathLike[str], ctx: Context = DEFAULT_CONTEXT) -> tuple[CheckResult, bool]:
    """`qemu-img check`; returns (result, in_use). In use: read with -U, results approximate."""
    path = check_image_file(Path(image).absolute())
    try:
        return qemu_img.check(path), False
    except ImageInUse:
        return qemu_img.check(path, force_share=True), True


# ------------------------------------------------------------------ mutations

def create(
    image: str | os.PathLike[str],
    name: str,
    *,
    description: str | None = None,
    replace: bool = False,
    ctx: Context = DEFAULT_CONTEXT,
    extra: Mapping[str, Any] | None = None,
    sync: bool = False,
) -> CreateResult:
    """Take snapshot NAME of the image's current state.

    An existing NAME is refused (SnapshotExists) unless ``replace``: then the new snapshot is
    taken first and the old one removed after, so there is never a moment with neither.
    """
    from qsnap.service import audit
    from qsnap.service.lock import image_lock

    if "{" in name:
        from qsnap.service.history import expand_placeholders

        name = expand_placeholders(name, datetime.now())
    validate_name(name)
    path = check_image_file(Path(image).absolute())
    with image_lock(path, f"create {name}", ctx.lock_timeout), \
            audit.recorded(path, "create", name) as rec, \
            open_engine(path, ctx, write=True) as engine:
        rec.engine = engine.name
        online = engine.name != qemu_img.NAME
        if not online:
            _preflight_offline(path)
        before = engine.list_snapshots()
        existing = find_by_name(before, name)
        old: Snapshot | None = None
        if existing:
            if not replace:
                raise SnapshotExists(
                    f"Snapshot {name!r} already exists (ID {existing[0].id}, {existing[0].date_iso}).",
                    hint="choose another name, or use --replace to take a new one and drop the old",
                )
            old = resolve_snapshot(before, name)  # refuses duplicates (exit 5)
        synced: str | None = None
        if sync:
            from qsnap.service.guest import sync_guest

            synced = sync_guest(path, ctx.env())
            rec.details["synced"] = synced
        holder: Snapshot | None = None
        if old is not None and online:
            # A monitor refuses (QMP) or silently overwrites (HMP) a duplicate name, so the
            # new state is first kept under a temporary name, then the old snapshot goes.
            holder_name = safety_name(before).replace(SAFETY_PREFIX, "qsnap-replace-")
            engine.create(holder_name)
            holder = resolve_snapshot(engine.list_snapshots(), holder_name)
            engine.delete(old)
            old_deleted = True
        else:
            old_deleted = False
        engine.create(name)
        if holder is not None:
            engine.delete(holder)
        after = engine.list_snapshots()
        before_ids = {(s.id, s.name, s.date) for s in before}
        new = [s for s in after if s.name == name and (s.id, s.name, s.date) not in before_ids]
        if len(new) != 1:
            raise QsnapError(f"Snapshot {name!r} was not found after creating it; the image was "
                             f"left as QEMU left it.", hint="run 'qsnap list' to see its state")
        snapshot = new[0]
        warnings: list[str] = []
        if old is not None:
            if not old_deleted:
                engine.delete(old)
            rec.details["replaced_id"] = old.id
        sidecar = Sidecar.load(path)
        parent = sidecar.current_snapshot(before)
        sidecar.update(
            snapshot,
            description=description,
            parent=key_of(parent) if parent else None,
            created_by=_creator(ctx),
            created_at=_now_iso(),
            engine=engine.name,
            synced=True if synced else None,
            **(dict(extra) if extra else {}),
        )
        sidecar.current = key_of(snapshot)
        final = engine.list_snapshots() if old is not None else after
        _save_sidecar(sidecar, final, warnings)
        rec.details["snapshot_id"] = snapshot.id
        return CreateResult(path, engine.name, snapshot, old, tuple(warnings), synced)


def _save_sidecar(sidecar: Sidecar, snapshots: tuple[Snapshot, ...], warnings: list[str]) -> None:
    try:
        sidecar.save(snapshots)
    except OSError as exc:
        warnings.append(f"could not write {sidecar.path}: {exc.strerror}; descriptions not saved")


def safety_name(existing: tuple[Snapshot, ...], now: datetime | None = None) -> str:
    now = now or datetime.now()
    base = f"{SAFETY_PREFIX}{now:%Y%m%d-%H%M%S}"
    names = {s.name for s in existing}
    candidate, n = base, 2
    while candidate in names:
        candidate, n = f"{base}-{n}", n + 1
    return candidate


def restore(
    image: str | os.PathLike[str],
    name: str | None = None,
    *,
    snapshot_id: str | None = None,
    safety: bool = True,
    ctx: Context = DEFAULT_CONTEXT,
) -> RestoreResult:
    """Revert the image to a snapshot, after taking a safety snapshot of the current state."""
    with _on_existing_snapshot(image, "restore", name, snapshot_id, ctx) as (path, rec, engine, before, target):
        return _restore_with_engine(path, engine, target, before, safety=safety, ctx=ctx, rec=rec)


@contextlib.contextmanager
def _on_existing_snapshot(
    image: str | os.PathLike[str], verb: str, name: str | None, snapshot_id: str | None, ctx: Context
) -> Iterator[tuple[Path, Any, Engine, tuple[Snapshot, ...], Snapshot]]:
    """What restore and delete share: the image checked, its lock held, the operation recorded,
    the engine chosen, the image checked for damage (offline), and NAME resolved to one snapshot.

    Yields (path, audit record, engine, snapshots before, target).
    """
    from qsnap.service import audit
    from qsnap.service.lock import image_lock

    if name is not None and snapshot_id is None:
        validate_lookup_name(name)
    path = check_image_file(Path(image).absolute())
    label = name or f"ID {snapshot_id}"
    with image_lock(path, f"{verb} {label}", ctx.lock_timeout), \
            audit.recorded(path, verb, name) as rec, \
            open_engine(path, ctx, write=True) as engine:
        rec.engine = engine.name
        if engine.name == qemu_img.NAME:
            _preflight_offline(path)  # first: a damaged table must not read as "not found"
        before = engine.list_snapshots()
        target = resolve_snapshot(before, name, snapshot_id)
        rec.snapshot = target.name
        rec.details["snapshot_id"] = target.id
        yield path, rec, engine, before, target


def take_safety_snapshot(
    path: Path, engine: Engine, before: tuple[Snapshot, ...], target: Snapshot, ctx: Context
) -> Snapshot:
    name = safety_name(before)
    engine.create(name)
    after = engine.list_snapshots()
    found = [s for s in after if s.name == name]
    if len(found) != 1:
        raise QsnapError(f"The safety snapshot {name!r} could not be confirmed; nothing was restored.")
    safety = found[0]
    sidecar = Sidecar.load(path)
    parent = sidecar.current_snapshot(before)
    sidecar.update(safety, description=f"automatic safety snapshot before restoring {target.name!r}",
                   parent=key_of(parent) if parent else None, safety=True,
                   created_by=_creator(ctx), created_at=_now_iso(), engine=engine.name)
    warnings: list[str] = []
    _save_sidecar(sidecar, after, warnings)
    return safety


def record_restored(path: Path, target: Snapshot, snapshots: tuple[Snapshot, ...], warnings: list[str]) -> None:
    sidecar = Sidecar.load(path)
    sidecar.current = key_of(target)
    _save_sidecar(sidecar, snapshots, warnings)


def delete(
    image: str | os.PathLike[str],
    name: str | None = None,
    *,
    snapshot_id: str | None = None,
    ctx: Context = DEFAULT_CONTEXT,
) -> DeleteResult:
    with _on_existing_snapshot(image, "delete", name, snapshot_id, ctx) as (path, _rec, engine, before, target):
        engine.delete(target)
        after = engine.list_snapshots()
        if any(s.id == target.id and s.name == target.name and s.date == target.date for s in after):
            raise QsnapError(f"Snapshot {target.name!r} (ID {target.id}) is still there after deleting it.")
        gone = {(s.id, s.name) for s in before} - {(s.id, s.name) for s in after}
        if gone != {(target.id, target.name)}:
            raise QsnapError(f"Deleting {target.name!r} removed {sorted(gone)} — please report this.")
        warnings: list[str] = []
        from qsnap.service.history import reparent_children

        sidecar = Sidecar.load(path)
        reparent_children(sidecar, [target])
        _save_sidecar(sidecar, after, warnings)
        return DeleteResult(path, engine.name, target, tuple(warnings))


def resolve(image: str | os.PathLike[str], name: str | None, snapshot_id: str | None = None,
            ctx: Context = DEFAULT_CONTEXT) -> tuple[Path, Snapshot]:
    """Resolve NAME (or ID) in IMAGE to one snapshot, for read-only users such as backup."""
    if name is not None and snapshot_id is None:
        validate_lookup_name(name)
    path = check_image_file(Path(image).absolute())
    with open_engine(path, ctx, write=False) as engine:
        # Offline this is the strict reader: a damaged table is exit 10, never "not found".
        return path, resolve_snapshot(engine.list_snapshots(), name, snapshot_id)


__all__ = [
    "Context", "CreateResult", "DeleteResult", "ListResult", "RestoreResult", "SnapshotEntry",
    "SnapshotNotFound", "check", "create", "delete", "info", "list_snapshots", "resolve", "restore",
]


# ------------------------------------------------------------------ restore, given an engine

def _restore_with_engine(
    path: Path,
    engine: Engine,
    target: Snapshot,
    before: tuple[Snapshot, ...],
    *,
    safety: bool,
    ctx: Context,
    rec: Operation,
) -> RestoreResult:
    warnings: list[str] = []
    online = engine.name != qemu_img.NAME
    controller: Any = None
    if online and not target.has_vm_state:
        # A disk-only snapshot cannot be loaded into a running VM: stop it, revert offline,
        # start it again — only when we know how to stop and start it. Check before the
        # safety snapshot, so a refusal leaves nothing behind.
        from qsnap.vm import NoController, controller_for

        # The safety snapshot (with VM state) is taken first and the disk is about to be
        # reverted, so a long wait for a clean guest shutdown gains nothing.
        controller = controller_for(path, ctx.vm, stop_timeout=3.0)
        if isinstance(controller, NoController):
            raise MonitorError(
                f"Snapshot {target.name!r} is disk-only (no VM state), so it cannot be loaded into "
                "the running VM, and qsnap does not know how to stop and restart this VM.",
                hint="pass --vm compose:SERVICE[@FILE] (or start the VM with 'qsnap vm start'), "
                "or stop the VM and run the restore again",
            )
    safety_snapshot = take_safety_snapshot(path, engine, before, target, ctx) if safety else None
    if safety_snapshot is not None:
        rec.details["safety_snapshot"] = safety_snapshot.name
    engine_name = engine.name
    if controller is None:
        engine.apply(target)
        after = engine.list_snapshots()
    else:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
        controller.stop()
        from qsnap.service.routing import _wait_unlocked

        _wait_unlocked(path)
        qemu_img.apply(path, target.id)
        after = qemu_img.read_snapshots(path)[0]
        controller.start()
        engine_name = f"{engine.name}+qemu-img"
        warnings.append(f"the VM was stopped ({controller.name}), reverted offline and started again")
    rec.engine = engine_name
    record_restored(path, target, after, warnings)
    return RestoreResult(path, engine_name, target, safety_snapshot, tuple(warnings))
