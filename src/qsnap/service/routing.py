"""Which engine acts on an image: the running VM's monitor, or qemu-img when no VM holds it.

The monitor is found from ``--monitor``, ``QSNAP_MONITOR``, the guide's ``MONITOR_PORT``, or
the run directory of a VM that ``qsnap vm start`` launched on this image. It is used only if
its VM really has this image open (same path, a ``QSNAP_PATH_MAP`` entry, or same file name
and virtual size — inside a container the path differs). Otherwise qemu-img acts, and if a
VM we cannot reach holds the image, qemu-img's lock error becomes exit 8 naming the settings.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from qsnap.core.errors import ImageInUse, MonitorError, UsageError
from qsnap.core.models import ImageInfo
from qsnap.engines import qemu_img
from qsnap.engines.base import Engine

if TYPE_CHECKING:
    from qsnap.monitor.address import MonitorAddress
    from qsnap.service.context import Context

CONNECT_TIMEOUT = 3.0


def virtual_size(image: Path) -> int | None:
    """The virtual disk size from the qcow2 header (bytes 24..32), without running anything."""
    try:
        with open(image, "rb") as handle:
            header = handle.read(32)
    except OSError:
        return None
    if len(header) < 32:
        return None
    return int(struct.unpack(">Q", header[24:32])[0])


def path_map(environ: Mapping[str, str]) -> dict[str, str]:
    """``QSNAP_PATH_MAP=HOST=QEMU[,HOST=QEMU...]``: how the VM names host images."""
    raw = environ.get("QSNAP_PATH_MAP", "").strip()
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        host, sep, guest = item.partition("=")
        if not sep or not host or not guest:
            raise UsageError(f"QSNAP_PATH_MAP entry {item!r} is not HOST_PATH=QEMU_PATH.")
        mapping[str(Path(host).absolute())] = guest
    return mapping


def monitor_address(image: Path, ctx: Context) -> MonitorAddress | None:
    env = ctx.env()
    configured = bool((ctx.monitor or "").strip() or env.get("QSNAP_MONITOR", "").strip()
                      or env.get("MONITOR_PORT", "").strip())
    launched = image.with_name(image.name + ".qsnap-run").is_dir()
    if not configured and not launched:
        return None  # the common offline case: import nothing of the monitor or vm layers
    from qsnap.monitor.address import address_from, parse_address

    address = address_from(ctx.monitor, env)
    if address is not None:
        return address
    from qsnap.vm import find_running

    running = find_running(image)
    if running is not None:
        return parse_address(running.qmp_address, "qsnap vm")
    return None


def _quiet_qmp_library() -> None:
    """qemu.qmp logs its own ERROR lines on failed negotiations; qsnap's exit-12 sentence says
    it better. Keep them unless --debug configured the qsnap logger."""
    import logging

    if not logging.getLogger("qsnap").handlers:
        library = logging.getLogger("qemu.qmp")
        library.propagate = False
        if not library.handlers:
            library.addHandler(logging.NullHandler())


def _monitor_engine(image: Path, ctx: Context) -> Engine | None:
    from qsnap.service.image import image_held

    if not image_held(image):
        return None  # no QEMU has this file open: qemu-img acts, whatever monitor exists
    address = monitor_address(image, ctx)
    if address is None:
        return None
    from qsnap.engines.monitor import MonitorEngine
    from qsnap.monitor import connect

    _quiet_qmp_library()
    try:
        monitor = connect(address, CONNECT_TIMEOUT)
    except MonitorError as exc:
        if exc.message.startswith("Could not connect"):
            # Nothing listens there: qemu-img decides, and its lock error then says which
            # settings to fix (exit 8).
            return None
        # Something listens but does not act like a monitor while a VM holds the image:
        # offline is impossible, so say what is wrong with the monitor (exit 12).
        raise MonitorError(
            f"{exc.message} A VM holds {image}, so qsnap needs this monitor.",
            hint="QEMU serves one client per monitor socket: close any telnet or nc session on it",
        ) from exc
    try:
        engine = MonitorEngine.for_image(monitor, image, virtual_size(image), path_map(ctx.env()))
    except BaseException:
        monitor.close()
        raise
    if engine is None or not _really_ours(image, engine.image.filename, engine.matched_by):
        monitor.close()
        return None
    return engine


def _really_ours(image: Path, qemu_filename: str, matched_by: str) -> bool:
    """A name+size match stands only when QEMU's path is not some other file on this host
    (inside a container the path QEMU reports does not exist here, or is this very file)."""
    if matched_by != "name+size":
        return True
    import os

    try:
        return os.path.samefile(qemu_filename, image)
    except OSError:
        return not os.path.exists(qemu_filename)


def choose_engine(image: Path, ctx: Context, *, write: bool) -> Engine:
    return _monitor_engine(image, ctx) or qemu_img.QemuImgEngine(image)


@contextlib.contextmanager
def open_engine(image: Path, ctx: Context, *, write: bool) -> Iterator[Engine]:
    engine = choose_engine(image, ctx, write=write)
    try:
        yield engine
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()


def read_info(image: Path, ctx: Context) -> ImageInfo:
    from qsnap.core.errors import CorruptImage
    from qsnap.qcow2 import open_image

    try:
        with open_image(image) as reader:
            return reader.info()
    except CorruptImage:
        return qemu_img.info(image)


def _wait_unlocked(path: Path, timeout: float = 30.0) -> None:
    """After stopping a VM, wait until QEMU has released the image's locks (asked of the
    kernel, no process per try)."""
    from qsnap.service.image import image_held

    deadline = time.monotonic() + timeout
    while image_held(path):
        if time.monotonic() > deadline:
            raise ImageInUse(f"{path} is still held {timeout:g} s after the VM was stopped.")
        time.sleep(0.05)
