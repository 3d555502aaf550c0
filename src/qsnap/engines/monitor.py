"""Adapter that lets the service use a running VM's monitor like the qemu-img engine.

The monitor layer knows nothing about host files; this adapter decides whether a monitor's
VM "has this image open" and exposes the service's verbs for that image:

    engine = MonitorEngine.for_image(mon, "/srv/vm/disk.qcow2", virtual_size=..., path_map=...)
    if engine is not None:          # the VM holds the image: go through its monitor
        engine.create("before-upgrade")

Matching (first hit wins): QEMU's filename equals the image path (after resolving both);
a configured mapping {host path: path as QEMU sees it} maps it (the guide's container sees
``/opt/hurd-image/debian-hurd-amd64.qcow2`` for a host file ``./debian-hurd-amd64-*.qcow2``);
or the file names and the virtual sizes are both equal (the only clue left inside a
container without a mapping).

Note: a monitor acts on the whole VM. ``create`` snapshots every writable disk of the VM;
``apply``/``delete`` act on every disk holding that snapshot name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from qsnap.core.models import Snapshot
from qsnap.monitor.operations import BlockImage, Monitor


def _same_path(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except OSError:
        return False


def match_image(
    images: Sequence[BlockImage],
    path: str | os.PathLike[str],
    virtual_size: int | None = None,
    path_map: Mapping[str, str] | None = None,
) -> tuple[BlockImage, str] | None:
    """The writable qcow2 image among IMAGES that is the host file PATH, and how it matched.

    The second item is 'path', 'mapping' or 'name+size'. Only writable qcow2 nodes count
    (a backing file opened read-only is not "in use" for snapshot purposes).
    """
    host = str(path)
    candidates = [img for img in images if img.format == "qcow2" and not img.read_only]
    for img in candidates:
        if _same_path(img.filename, host):
            return img, "path"
    if path_map:
        wanted = {v for k, v in path_map.items() if _same_path(k, host)}
        for img in candidates:
            if img.filename in wanted:
                return img, "mapping"
    if virtual_size is not None:
        name = Path(host).name
        for img in candidates:
            if PurePosixPath(img.filename).name == name and img.virtual_size == virtual_size:
                return img, "name+size"
    return None


def holds_image(
    monitor: Monitor,
    path: str | os.PathLike[str],
    virtual_size: int | None = None,
    path_map: Mapping[str, str] | None = None,
) -> bool:
    """Whether MONITOR's VM has the host image PATH open (see :func:`match_image`)."""
    return match_image(monitor.images(), path, virtual_size, path_map) is not None


class MonitorEngine:
    """The online engine for one image: same verbs as :mod:`qsnap.engines.qemu_img`."""

    def __init__(self, monitor: Monitor, image: BlockImage, matched_by: str = "path") -> None:
        self.monitor = monitor
        self.image = image
        self.matched_by = matched_by

    @property
    def name(self) -> str:
        """'qmp' or 'hmp' (what the service prints as the engine)."""
        return self.monitor.protocol

    @classmethod
    def for_image(
        cls,
        monitor: Monitor,
        path: str | os.PathLike[str],
        virtual_size: int | None = None,
        path_map: Mapping[str, str] | None = None,
    ) -> MonitorEngine | None:
        found = match_image(monitor.images(), path, virtual_size, path_map)
        if found is None:
            return None
        return cls(monitor, found[0], found[1])

    def list_snapshots(self) -> tuple[Snapshot, ...]:
        return self.monitor.list_snapshots(self.image.filename)

    def create(self, name: str) -> Snapshot:
        return self.monitor.save(name)

    def apply(self, snapshot: Snapshot | str) -> None:
        self.monitor.load(snapshot)

    def delete(self, snapshot: Snapshot | str) -> None:
        self.monitor.delete(snapshot)

    def status(self) -> str:
        return self.monitor.status()

    def close(self) -> None:
        self.monitor.close()
