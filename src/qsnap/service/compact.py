"""`qsnap compact`: reclaim the space of an image and keep every snapshot.

The guide's "qemu-img convert -O qcow2 old new && mv new old" drops every internal snapshot.
This rebuilds the image with QEMU's tools (see :mod:`qsnap.compact.build`) into
``IMAGE.partial`` after a free-space check, fsyncs it, verifies it (``qemu-img check``, then
every snapshot's guest data and VM state and the current state against the original through
the reader), and swaps it in with a rename. At every moment either the old or the new image is
at IMAGE: the old one is first hard-linked as ``IMAGE.old-<timestamp>``, the new one renamed
over IMAGE, the directory fsynced, and the old link removed unless ``keep_old``.

A run that was killed leaves a stale ``IMAGE.partial`` (removed, and reported, by the next run)
or an ``IMAGE.old-*`` (reported, never deleted unless it is the same file as IMAGE).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from qsnap.core.errors import CorruptImage, GuestFsError, ImageError, ImageInUse, UsageError, VerificationFailed
from qsnap.service.snapshots import DEFAULT_CONTEXT, Context

KILL_AT_ENV = "QSNAP_COMPACT_KILL_AT"  # test hook: SIGKILL this process at the named checkpoint
STAGING = (64 + 4) << 20  # qemu-io staging files at most (compact.writer.BATCH_BYTES + one command)
STOP_TIMEOUT_ENV = "QSNAP_STOP_TIMEOUT"


@dataclass(frozen=True)
class Savings:
    """Where the reclaimed bytes come from (they add up to file_size - predicted_size)."""

    leaked: int  # clusters with a refcount that nothing references
    freed: int  # clusters inside the file with refcount 0 (freed, never returned)
    zero: int  # data clusters holding only zeros
    sparsify: int  # free guest filesystem blocks (--sparsify)
    other: int  # fragmentation, metadata and holes (may be negative)

    def to_json(self) -> dict[str, int]:
        return {"leaked": self.leaked, "freed_not_returned": self.freed, "zero_clusters": self.zero,
                "free_guest_blocks": self.sparsify, "fragmentation_and_metadata": self.other}


@dataclass(frozen=True)
class CompactReport:
    image: Path
    dry_run: bool
    file_size: int  # before
    predicted_size: int
    new_size: int | None  # after (None for a dry run)
    savings: Savings
    snapshots: int
    vm_state_snapshots: int
    kept_old: Path | None = None
    found: tuple[str, ...] = ()
    vm_stopped: str | None = None
    verified_bytes: int = 0
    seconds: float = 0.0
    prediction: dict[str, Any] = field(default_factory=dict)

    @property
    def reclaimed(self) -> int:
        return self.file_size - (self.new_size if self.new_size is not None else self.predicted_size)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": str(self.image),
            "dry_run": self.dry_run,
            "file_size": self.file_size,
            "predicted_size": self.predicted_size,
            "new_size": self.new_size,
            "reclaimed_bytes": self.reclaimed,
            "savings": self.savings.to_json(),
            "snapshots": self.snapshots,
            "vm_state_snapshots": self.vm_state_snapshots,
            "kept_old": str(self.kept_old) if self.kept_old else None,
            "found": list(self.found),
            "vm_stopped": self.vm_stopped,
            "verified_bytes": self.verified_bytes,
            "seconds": round(self.seconds, 3),
            "method": self.prediction.get("method"),
            "prediction": self.prediction,
        }


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def workdir_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial.d")


def old_paths(path: Path) -> list[Path]:
    return sorted(path.parent.glob(_glob_escape(path.name) + ".old-*"))


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _findings(path: Path, *, clean: bool) -> list[str]:
    """What earlier (killed) runs left beside PATH; with CLEAN, remove what is safe to remove."""
    import shutil

    found: list[str] = []
    partial, work = partial_path(path), workdir_path(path)
    if partial.exists() or work.exists():
        if clean:
            partial.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
            found.append(f"removed {partial.name}, left by an interrupted compact ({path.name} itself was not changed)")
        else:
            found.append(f"{partial.name} was left by an interrupted compact ({path.name} itself was not changed); "
                         "the next compact removes it")
    for old in old_paths(path):
        try:
            same = os.path.samefile(old, path)
        except OSError:
            same = False
        if same:
            if clean:
                old.unlink()
                found.append(f"removed {old.name}, a second name of {path.name} left by an interrupted compact")
            else:
                found.append(f"{old.name} is a second name of {path.name} left by an interrupted compact")
        else:
            found.append(f"{old.name} holds the image as it was before an earlier compact; "
                         f"{path.name} is the compacted one (delete {old.name} when you no longer need it)")
    return found


_log = logging.getLogger(__name__)
_T0 = time.monotonic()


def _checkpoint(name: str) -> None:
    _log.debug("compact: %s at %.2f s", name, time.monotonic() - _T0)
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(directory: Path) -> None:
    from qsnap.core.fsutil import fsync_dir

    fsync_dir(directory)


def _savings(space: Any, file_size: int, predicted: int, zero: int, sparsify: int) -> Savings:
    leaked, freed = space.leaked_bytes, space.unreferenced_bytes
    other = file_size - predicted - leaked - freed - zero - sparsify
    return Savings(leaked, freed, zero, sparsify, other)


def estimate_reclaimable(space: Any) -> int:
    """A quick lower bound of what compact reclaims, from the space accounting alone (no guest
    data read): leaked clusters and clusters freed inside the file. Used by doctor and info."""
    return int(space.leaked_bytes + space.unreferenced_bytes)


def compact(
    image: str | os.PathLike[str],
    *,
    compress: bool = False,
    sparsify: bool = False,
    dry_run: bool = False,
    keep_old: bool = False,
    ctx: Context = DEFAULT_CONTEXT,
    progress: Callable[[str, int, int], None] | None = None,
) -> CompactReport:
    """Compact IMAGE keeping every snapshot (see the module docstring); DRY_RUN: predict only."""
    from qsnap.compact.build import predict
    from qsnap.qcow2.image import open_image
    from qsnap.service.image import check_image_file
    from qsnap.service.space import account_image

    path = check_image_file(Path(image).absolute())
    started = time.monotonic()
    if dry_run:
        found = _findings(path, clean=False)
        with open_image(path) as src:
            space = account_image(src)
            free = _free_ranges(src) if sparsify else None
            pred = predict(src, compress=compress, sparsify=free)
            entries = src.snapshot_entries()
            reclaimed = _sparsify_savings(src, free)
        return CompactReport(
            image=path, dry_run=True, file_size=space.file_size, predicted_size=pred.size, new_size=None,
            savings=_savings(space, space.file_size, pred.size, pred.zero_bytes, reclaimed),
            snapshots=len(entries), vm_state_snapshots=sum(1 for e in entries if e.vm_state_size),
            found=tuple(found), seconds=time.monotonic() - started, prediction=pred.to_json(),
        )
    return _compact(path, compress=compress, sparsify=sparsify, keep_old=keep_old, ctx=ctx, progress=progress,
                    started=started)


def _free_ranges(src: Any) -> list[tuple[int, int]]:
    """--sparsify: the current state's free guest filesystem blocks, whole clusters only."""
    from qsnap.service.sparsify import free_guest_ranges

    free = free_guest_ranges(src, None, align=src.cluster_size)
    if not free.filesystems:
        raise GuestFsError("--sparsify found no ext2/ext3/ext4 filesystem in the current state "
                           f"({'; '.join(free.skipped) or 'no partitions'}); nothing was changed.",
                           hint="run compact without --sparsify")
    return free.ranges


def _sparsify_savings(src: Any, free: list[tuple[int, int]] | None) -> int:
    """Bytes of the current state that --sparsify turns into zero clusters and that hold data now
    (free blocks already reading as zeros would be zero clusters anyway)."""
    if not free:
        return 0
    from qsnap.qcow2.image import COMPRESSED, DATA

    total = 0
    for offset, length in free:
        for ext in src.iter_extents(None, offset, offset + length):
            if ext.kind in (DATA, COMPRESSED):
                total += ext.length
    return total


def _compact(
    path: Path, *, compress: bool, sparsify: bool, keep_old: bool, ctx: Context,
    progress: Callable[[str, int, int], None] | None, started: float,
) -> CompactReport:
    from qsnap.engines import qemu_img
    from qsnap.service import audit
    from qsnap.service.image import check_writable, image_held
    from qsnap.service.lock import image_lock
    from qsnap.vm import NoController, controller_for

    with image_lock(path, "compact", ctx.lock_timeout), audit.recorded(path, "compact", None) as rec:
        rec.engine = qemu_img.NAME
        check_writable(path)
        controller: Any = None
        if image_held(path):
            controller = controller_for(path, ctx.vm, stop_timeout=_stop_timeout(ctx))
            if isinstance(controller, NoController) or not controller.is_running():
                raise ImageInUse(
                    f"{path} is in use by a running VM; compact must rewrite the whole file.",
                    hint="stop the VM first, or tell qsnap how to stop and restart it: --vm compose:SERVICE[@FILE] "
                    "(a VM started with 'qsnap vm start' is stopped and restarted by itself)",
                )
            from qsnap.service.routing import _wait_unlocked

            controller.stop()
            _wait_unlocked(path)
            rec.details["vm_stopped"] = controller.name
        try:
            report = _rebuild(path, compress=compress, sparsify=sparsify, keep_old=keep_old, progress=progress,
                              started=started)
        finally:
            if controller is not None:
                controller.start()
        if controller is not None:
            report = _with(report, vm_stopped=controller.name)
        rec.details.update(file_size=report.file_size, new_size=report.new_size,
                           kept_old=str(report.kept_old) if report.kept_old else None)
        return report


def _stop_timeout(ctx: Context) -> float:
    """Seconds a VM qsnap launched gets to power down before it is told to quit
    (QSNAP_STOP_TIMEOUT, default 30)."""
    try:
        return max(0.0, float(ctx.env().get(STOP_TIMEOUT_ENV, "30")))
    except ValueError:
        raise UsageError(f"{STOP_TIMEOUT_ENV} must be a number of seconds.") from None


def _with(report: CompactReport, **changes: Any) -> CompactReport:
    from dataclasses import replace

    return replace(report, **changes)


def _rebuild(
    path: Path, *, compress: bool, sparsify: bool, keep_old: bool, progress: Callable[[str, int, int], None] | None,
    started: float,
) -> CompactReport:
    from qsnap.backup.partial import InsufficientSpace, check_space
    from qsnap.compact.build import build, verify
    from qsnap.core.fsutil import fsync_file
    from qsnap.engines import qemu_img
    from qsnap.qcow2.image import open_image
    from qsnap.service.space import account_image

    checked = qemu_img.check(path)  # takes QEMU's write lock: a VM we could not see is exit 8
    if checked.corruptions or checked.check_errors:
        raise CorruptImage(
            f"qemu-img check found {checked.corruptions} corruptions in {path}: compact copies only a sound image.",
            hint="qemu-img check -r all on a copy first, or restore the image from a backup")
    found = _findings(path, clean=True)
    partial, work = partial_path(path), workdir_path(path)
    st = os.stat(path)
    with open_image(path) as src:
        space = account_image(src)
        entries = src.snapshot_entries()
        # upper bound of the result without reading guest data: what some root still reaches
        reachable = space.allocated_bytes - space.leaked_bytes
        needed = int(reachable * 1.02) + min(STAGING, reachable) + (1 << 20)
        check_space(path.parent, needed, f"the compacted copy of {path.name}")
        free = _free_ranges(src) if sparsify else None
        reclaimed = _sparsify_savings(src, free)
        try:
            result = build(src, partial, work, compress=compress, sparsify=free, checkpoint=_checkpoint,
                           progress=progress)
            _checkpoint("built")
            # the disk writes the new file while the CPU checks and compares it (the swap waits
            # for both)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qsnap-fsync") as pool:
                def flush() -> None:
                    fsync_file(partial)
                    _checkpoint("synced")

                synced = pool.submit(flush)
                try:
                    checked = qemu_img.check(partial)
                    _checkpoint("checked")
                    if checked.corruptions or checked.leaks or checked.check_errors:
                        raise VerificationFailed(
                            f"qemu-img check of the compacted image found {checked.corruptions} corruptions, "
                            f"{checked.leaks} leaked clusters and {checked.check_errors} errors; {path} was not "
                            "changed.")
                    with open_image(partial) as new:  # the metadata, and the states not verified yet
                        verified = result.verified_bytes + verify(src, new, progress, start=result.verified_states,
                                                                  sparsified=free)
                finally:
                    wait([synced])
                synced.result()
            _checkpoint("verified")
        except OSError as exc:
            _discard(partial, work)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientSpace(
                    f"The disk holding {path.parent} filled up while compacting; the partial file was removed "
                    f"and {path.name} was not changed.", hint="free some space and run compact again") from exc
            raise
        except BaseException:
            _discard(partial, work)
            raise
    os.chmod(partial, st.st_mode & 0o7777)
    with contextlib.suppress(PermissionError):
        os.chown(partial, st.st_uid, st.st_gid)
    new_size = os.stat(partial).st_size
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    old = path.with_name(f"{path.name}.old-{stamp}")
    for n in range(2, 100):
        if not os.path.lexists(old):
            break
        old = path.with_name(f"{path.name}.old-{stamp}-{n}")
    try:
        os.link(path, old)  # IMAGE keeps its name throughout: the swap below is one rename
    except OSError as exc:
        _discard(partial, work)
        raise ImageError(
            f"Cannot give {path.name} a second name ({old.name}) in {path.parent}: {exc.strerror}; "
            f"the compacted copy was removed and {path.name} was not changed.",
            hint="compact needs a filesystem with hard links") from exc
    _fsync_dir(path.parent)
    _checkpoint("linked")
    os.replace(partial, path)
    _fsync_dir(path.parent)
    _checkpoint("swapped")
    kept: Path | None = old
    if not keep_old:
        with open_image(path) as swapped:  # the file now at PATH is the verified one
            if len(swapped.snapshot_entries()) != len(entries):
                raise VerificationFailed(f"{path} changed under compact; the original is kept as {old}.")
        old.unlink()  # 2-5 s for 6 GiB on an ext4 mounted with discard (the freed blocks are discarded)
        _fsync_dir(path.parent)
        _checkpoint("removed")
        kept = None
    return CompactReport(
        image=path, dry_run=False, file_size=st.st_size, predicted_size=result.prediction.size,
        new_size=new_size,
        savings=_savings(space, st.st_size, new_size, result.prediction.zero_bytes, reclaimed),
        snapshots=len(entries), vm_state_snapshots=sum(1 for e in entries if e.vm_state_size),
        kept_old=kept, found=tuple(found), verified_bytes=verified,
        seconds=time.monotonic() - started, prediction=result.prediction.to_json(),
    )


def _discard(partial: Path, work: Path) -> None:
    import shutil

    partial.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
