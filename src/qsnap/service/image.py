"""Checks on an image file before anything runs on it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from qsnap.core.errors import ImageError

QCOW2_MAGIC = b"QFI\xfb"


def check_image_file(path: Path) -> Path:
    """PATH must be an existing, readable regular file that starts with the qcow2 magic."""
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
    return path


def check_writable(path: Path) -> None:
    """Refuse to modify an image whose permissions say read-only — even for root."""
    st = os.stat(path)
    if not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or not os.access(path, os.W_OK):
        raise ImageError(
            f"{path} is read-only (mode {stat.filemode(st.st_mode)}); refusing to modify it.",
            hint="make it writable with chmod u+w if you mean to change it",
        )
