"""A lock file per image, so concurrent qsnap invocations never interleave.

We lock a separate file (``.<image>.qsnap.lock`` beside the image) with flock, never the image
itself: QEMU holds OFD locks on the image and must not see ours. A second invocation waits up
to a bounded time, then fails with LockBusy (exit 8) naming the holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from qsnap.core.errors import LockBusy

DEFAULT_TIMEOUT = 60.0


def lock_path(image: Path) -> Path:
    beside = image.with_name(f".{image.name}.qsnap.lock")
    if os.access(image.parent, os.W_OK):
        return beside
    digest = hashlib.sha256(str(image).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"qsnap-{digest}.lock"


@contextlib.contextmanager
def image_lock(image: Path, operation: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the image's qsnap lock for the duration of the block."""
    if timeout is None:
        timeout = float(os.environ.get("QSNAP_LOCK_TIMEOUT", DEFAULT_TIMEOUT))
    path = lock_path(image)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    raise LockBusy(
                        f"Another qsnap command ({holder}) has been working on {image} for over "
                        f"{timeout:g} s; gave up waiting.",
                        hint="retry when it has finished, or raise QSNAP_LOCK_TIMEOUT",
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {operation}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"
