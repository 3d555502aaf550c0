"""The `.partial` protocol: write beside the target, hold an flock, fsync, rename.

A `.partial` file whose flock nobody holds is left over from a killed run (stale): it is
removed and reported. One whose flock is held belongs to a run in progress: refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path

from qsnap.core.errors import LockBusy, QsnapError
from qsnap.core.fsutil import fsync_dir


class InsufficientSpace(QsnapError):
    """Not enough free disk space."""


def partial_path(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def clear_stale(path: Path, warnings: list[str]) -> None:
    """Remove PATH if it is a stale partial file; refuse if another run holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise LockBusy(f"Another qsnap run is writing {path}.", hint="wait for it to finish") from exc
        path.unlink()
        warnings.append(f"removed stale partial file {path} left by an interrupted run")
    finally:
        os.close(fd)


class PartialFile:
    """Create TARGET.partial (mode 0600, flocked); :meth:`commit` renames it to TARGET."""

    def __init__(self, target: Path, warnings: list[str], *, mode: int = 0o600) -> None:
        self.target = target
        self.path = partial_path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        clear_stale(self.path, warnings)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        os.fchmod(self.fd, mode)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.committed = False

    def commit(self) -> None:
        os.fsync(self.fd)
        os.replace(self.path, self.target)
        self.committed = True
        fsync_dir(self.target.parent)

    def discard(self) -> None:
        if not self.committed:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def __enter__(self) -> PartialFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is not None or not self.committed:
                self.discard()
        finally:
            self.close()


class FdWriter:
    """A minimal file-like writer over a raw fd (no buffering; callers write large blocks)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        return len(data)

    def flush(self) -> None:
        pass


def free_bytes(directory: Path) -> int:
    directory = Path(directory)
    while not directory.exists():
        directory = directory.parent
    return shutil.disk_usage(directory).free


def check_space(directory: Path, needed: int, what: str) -> None:
    free = free_bytes(directory)
    if needed > free:
        raise InsufficientSpace(
            f"Not enough free space in {directory} for {what}: about {human(needed)} needed, "
            f"{human(free)} free; nothing was written.",
            hint="free some space or choose another OUTPUT directory",
        )


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def no_space_error(directory: Path, exc: BaseException | None = None) -> InsufficientSpace:
    detail = f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else ""
    return InsufficientSpace(
        f"The disk holding {directory} filled up during the backup{detail}; the partial file was removed.",
        hint="free some space or choose another OUTPUT directory",
    )


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
