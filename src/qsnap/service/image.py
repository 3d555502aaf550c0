"""Checks on an image file before anything runs on it."""

from __future__ import annotations

import os
import stat

from qsnap.core.errors import ImageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

QCOW2_MAGIC = b"QFI\xfb"


def check_image_file(path: Path) -> Path:  # also accepts a str (and returns a str)
    """PATH must be an existing, readable regular file that starts with the qcow2 magic.

    Returns the image's real path (symlinks and ``..`` resolved): the lock, the sidecar, the
    audit log and the VM run directory all hang off it, so every spelling of one image must
    lead to the same files.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"Image not found: {path}.", hint="pass -i IMAGE or set QCOW2_IMAGE") from None
    except OSError as exc:
        raise ImageError(f"Cannot read {path}: {exc.strerror}.") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{path} is a directory, not a qcow2 image.")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path} is not a regular file.")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ImageError(f"Cannot read {path}: {exc.strerror}.") from None
    if magic != QCOW2_MAGIC:
        what = "an empty file" if st.st_size == 0 else "not a qcow2 image (no QFI\\xfb magic)"
        raise ImageError(f"{path} is {what}.", hint="qsnap manages qcow2 images only")
    real = os.path.realpath(path)
    if isinstance(path, str):
        return real
    return type(path)(real)


def check_writable(path: Path) -> None:
    """Refuse to modify an image whose permissions say read-only — even for root."""
    st = os.stat(path)
    if not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or not os.access(path, os.W_OK):
        raise ImageError(
            f"{path} is read-only (mode {stat.filemode(st.st_mode)}); refusing to modify it.",
            hint="make it writable with chmod u+w if you mean to change it",
        )


# QEMU's file-posix driver locks bytes 100.. (permissions it holds) and 200.. (permissions it
# refuses to share) with OFD locks while an image is open (block/file-posix.c, raw_apply_lock_bytes).
_QEMU_LOCK_START = 100
_QEMU_LOCK_LENGTH = 200


def image_held(path: Path | str) -> bool:
    """Whether some process (a running QEMU) holds QEMU's locks on PATH.

    Asks the kernel with F_OFD_GETLK, which takes no lock and runs no program: a file nobody
    locks cannot be open in a VM (unless that VM disabled locking with file.locking=off).
    """
    import fcntl
    import struct

    getlk = getattr(fcntl, "F_OFD_GETLK", None)
    if getlk is None:  # not Linux: assume it may be held, routing then asks the monitor
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _QEMU_LOCK_START, _QEMU_LOCK_LENGTH, 0)
        reply = fcntl.fcntl(fd, getlk, request)
        return int(struct.unpack("hhqqi4x", reply)[0]) != fcntl.F_UNLCK
    except OSError:
        return True
    finally:
        os.close(fd)
