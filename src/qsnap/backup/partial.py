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
import sys
from collections.abc import Callable
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


WRITEBACK_EVERY = 32 << 20


class FdWriter:
    """A minimal file-like writer over a raw fd (no buffering; callers write large blocks).

    With WRITEBACK, every 32 MiB written are handed to the kernel's writeback at once
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait), so the final
    fsync of :meth:`PartialFile.commit` has little left to do. Elsewhere it is a no-op.
    """

    def __init__(self, fd: int, *, writeback: bool = False) -> None:
        self.fd = fd
        self.written = 0
        self._flushed = 0
        self._sync_range = _sync_file_range() if writeback else None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.written += len(data)
        if self._sync_range is not None and self.written - self._flushed >= WRITEBACK_EVERY:
            self._sync_range(self.fd, self._flushed, self.written - self._flushed)
            self._flushed = self.written
        return len(data)

    def note_written(self, n: int) -> None:
        """Account for about N bytes written to the fd by someone else (pwritev, anywhere):
        every WRITEBACK_EVERY of them, start the writeback of the whole file's dirty pages."""
        self.written += n
        if self._sync_range is not None and self.written - self._flushed >= WRITEBACK_EVERY:
            self._sync_range(self.fd, 0, 0)  # 0, 0: from the start to the end of the file
            self._flushed = self.written

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


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """Start writeback of a byte range without waiting (Linux), or None where unavailable."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int

    def start(fd: int, offset: int, length: int) -> None:
        func(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE; a failure only loses the head start

    return start
