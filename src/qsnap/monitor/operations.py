"""Operations: snapshots of a running VM through its monitor, one class per protocol.

Both classes offer the same interface (:class:`Monitor`). The traps of spec/QEMU-FACTS.md
are handled here, not left to callers:

- HMP ``savevm`` silently REPLACES a snapshot of the same name → we list first and raise
  :class:`SnapshotExists` (exit 4). (QMP ``snapshot-save`` refuses duplicates itself; we
  check first anyway, for a clear message.)
- ``delvm`` / ``snapshot-delete`` of a missing tag succeeds silently → we list first and
  raise :class:`SnapshotNotFound` (exit 3). Both delete EVERY snapshot with that name, so a
  duplicated name raises :class:`AmbiguousSnapshot` (exit 5) instead.
- A failed ``loadvm`` / ``snapshot-load`` leaves the VM PAUSED → we send ``cont`` if it was
  running before, then raise :class:`MonitorError`.
- A disk-only snapshot (VM state size 0) cannot be loaded live → :class:`DiskOnlySnapshot`
  (a MonitorError, exit 12) before anything is sent; the service may stop the VM and apply
  it offline.

A monitor acts on the whole VM: a save snapshots every writable qcow2 disk of the VM and
a load/delete acts on every disk that has the snapshot.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from qsnap.core.errors import AmbiguousSnapshot, DiskOnlySnapshot, MonitorError, SnapshotExists, SnapshotNotFound
from qsnap.core.models import Snapshot
from qsnap.core.names import assert_monitor_safe, validate_name
from qsnap.monitor.address import MonitorAddress, parse_address
from qsnap.monitor.hmp import HmpSession, parse_info_block, parse_info_snapshots, parse_status, reply_error
from qsnap.monitor.qmp import QmpSession
from qsnap.monitor.transport import DEFAULT_CONNECT_TIMEOUT, SocketTransport, open_socket, peek_protocol

DEFAULT_COMMAND_TIMEOUT = 10.0
DEFAULT_JOB_TIMEOUT = 600.0


@dataclass(frozen=True)
class BlockImage:
    """A qcow2 image a running VM has open, as its monitor describes it."""

    node_name: str
    filename: str  # as QEMU was given it: may be relative, or a path inside a container
    format: str
    virtual_size: int | None
    read_only: bool
    snapshots: tuple[Snapshot, ...]
    device: str | None = None  # HMP/drive name (virtio0 ...) when known

    def to_json(self) -> dict[str, Any]:
        return {
            "node_name": self.node_name,
            "device": self.device,
            "filename": self.filename,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "read_only": self.read_only,
            "snapshots": [s.to_json() for s in self.snapshots],
        }


def _snapshot_name(snapshot: Snapshot | str) -> str:
    return snapshot.name if isinstance(snapshot, Snapshot) else snapshot


def _find_one(snapshots: tuple[Snapshot, ...], snapshot: Snapshot | str, where: str) -> Snapshot:
    """The single snapshot with SNAPSHOT's name; QEMU acts by name on every match."""
    name = _snapshot_name(snapshot)
    matches = [s for s in snapshots if s.name == name]
    if not matches:
        raise SnapshotNotFound(f"Snapshot {name!r} not found in {where}.", hint="see 'qsnap list'")
    if len(matches) > 1:
        listing = ", ".join(f"ID {s.id or '?'} ({s.date_iso})" for s in matches)
        raise AmbiguousSnapshot(
            f"{len(matches)} snapshots are named {name!r} in {where} ({listing}); the monitor would "
            "act on all or the wrong one.",
            hint="rename or delete the duplicates offline with qemu-img",
        )
    return matches[0]


class Monitor(abc.ABC):
    """A connection to the monitor of one running QEMU. Use as a context manager."""

    protocol: str  # 'qmp' or 'hmp'

    def __init__(self, address: MonitorAddress, *, timeout: float, job_timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self.job_timeout = job_timeout

    # -- what each protocol provides
    @property
    @abc.abstractmethod
    def version(self) -> str:
        """QEMU's version as the monitor reports it ('7.2.22')."""

    @abc.abstractmethod
    def images(self) -> list[BlockImage]:
        """The qcow2 images the VM has open, with their snapshots (real IDs)."""

    @abc.abstractmethod
    def status(self) -> str:
        """The VM's run state, QMP spelling: 'running', 'paused', 'prelaunch', 'shutdown' ..."""

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def cont(self) -> None: ...

    @abc.abstractmethod
    def quit(self) -> None:
        """Make QEMU exit (the connection is closed afterwards)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def _save(self, name: str) -> None: ...

    @abc.abstractmethod
    def _load(self, name: str, targets: list[BlockImage], vmstate: BlockImage) -> None: ...

    @abc.abstractmethod
    def _delete(self, name: str, targets: list[BlockImage]) -> None: ...

    # -- shared operations
    def writable_images(self) -> list[BlockImage]:
        return [img for img in self.images() if img.format == "qcow2" and not img.read_only]

    def list_snapshots(self, image_filename: str | None = None) -> tuple[Snapshot, ...]:
        """Snapshots of IMAGE_FILENAME (as QEMU names it), else of the VM-state disk (the first)."""
        images = self.images()
        if image_filename is not None:
            for img in images:
                if img.filename == image_filename:
                    return img.snapshots
            raise MonitorError(
                f"The VM behind {self.address} has no image {image_filename!r} open.",
                hint="its images: " + ", ".join(i.filename for i in images) if images else None,
            )
        writable = [i for i in images if i.format == "qcow2" and not i.read_only]
        return writable[0].snapshots if writable else ()

    def _targets(self) -> list[BlockImage]:
        writable = self.writable_images()
        if not writable:
            raise MonitorError(
                f"The VM behind {self.address} has no writable qcow2 disk: there is nothing to snapshot."
            )
        return writable

    def save(self, name: str) -> Snapshot:
        """Take a live snapshot NAME (RAM + devices + every writable disk); the new Snapshot."""
        validate_name(name)
        targets = self._targets()
        where = f"the VM behind {self.address}"
        for img in targets:
            if any(s.name == name for s in img.snapshots):
                raise SnapshotExists(
                    f"A snapshot named {name!r} already exists in {img.filename} ({where}).",
                    hint="choose another name, or delete the old one first",
                )
        self._save(name)
        for img in self._targets():
            if img.node_name == targets[0].node_name:
                return _find_one(img.snapshots, name, where)
        return _find_one(self.list_snapshots(), name, where)

    def load(self, snapshot: Snapshot | str) -> None:
        """Revert the running VM to SNAPSHOT (disk and RAM); the guest keeps running from there."""
        name = _snapshot_name(snapshot)
        where = f"the VM behind {self.address}"
        targets = self._targets()
        holders = [img for img in targets if any(s.name == name for s in img.snapshots)]
        if not holders:
            raise SnapshotNotFound(f"Snapshot {name!r} not found in {where}.", hint="see 'qsnap list'")
        missing = [img.filename for img in targets if img not in holders]
        if missing:
            raise MonitorError(
                f"Snapshot {name!r} is missing from {', '.join(missing)} ({where}): loading it would "
                "leave those disks out of step with the restored RAM, so QEMU treats it as non-loadable.",
                hint="restore the images offline with the VM stopped",
            )
        found = [_find_one(img.snapshots, name, img.filename) for img in holders]
        vmstate = [img for img, snap in zip(holders, found, strict=True) if snap.has_vm_state]
        if not vmstate:
            raise DiskOnlySnapshot(
                f"Snapshot {name!r} is disk-only (it has no saved RAM/device state), so the running VM "
                "cannot be reverted to it live.",
                hint="stop the VM and restore it offline (qemu-img), then start the VM again",
            )
        was_running = self.status() == "running"
        try:
            self._load(name, holders, vmstate[0])
        except MonitorError as exc:
            resumed = ""
            if was_running:
                try:
                    if self.status() != "running":
                        self.cont()
                        resumed = " The VM was paused by the failed load and has been resumed."
                except MonitorError:
                    resumed = " The VM may be left paused: 'cont' failed too."
            raise MonitorError(
                f"Loading snapshot {name!r} failed: {exc.message}{resumed}", hint=exc.hint
            ) from exc

    def delete(self, snapshot: Snapshot | str) -> None:
        """Delete SNAPSHOT from every disk of the VM that has it."""
        name = _snapshot_name(snapshot)
        where = f"the VM behind {self.address}"
        holders = [img for img in self._targets() if any(s.name == name for s in img.snapshots)]
        if not holders:
            raise SnapshotNotFound(f"Snapshot {name!r} not found in {where}.", hint="see 'qsnap list'")
        for img in holders:
            _find_one(img.snapshots, name, img.filename)
        self._delete(name, holders)
        left = [img.filename for img in self._targets() if any(s.name == name for s in img.snapshots)]
        if left:
            raise MonitorError(f"Snapshot {name!r} is still present in {', '.join(left)} after deleting it.")

    def __enter__(self) -> Monitor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ---------------------------------------------------------------- QMP

def _qmp_snapshots(image: dict[str, Any]) -> tuple[Snapshot, ...]:
    return tuple(Snapshot.from_qapi(entry) for entry in image.get("snapshots") or ())


def parse_named_block_nodes(nodes: list[dict[str, Any]]) -> list[BlockImage]:
    """``query-named-block-nodes`` → the qcow2 nodes (``drv == "qcow2"``), in QEMU's order."""
    images = []
    for node in nodes:
        if node.get("drv") != "qcow2":
            continue
        image = node.get("image") or {}
        images.append(
            BlockImage(
                node_name=str(node.get("node-name", "")),
                filename=str(node.get("file") or image.get("filename", "")),
                format="qcow2",
                virtual_size=image.get("virtual-size"),
                read_only=bool(node.get("ro", False)),
                snapshots=_qmp_snapshots(image),
            )
        )
    return images


class QmpMonitor(Monitor):
    protocol = "qmp"

    def __init__(self, session: QmpSession, address: MonitorAddress, *, timeout: float, job_timeout: float):
        super().__init__(address, timeout=timeout, job_timeout=job_timeout)
        self.session = session

    @property
    def version(self) -> str:
        return self.session.version

    def images(self) -> list[BlockImage]:
        return parse_named_block_nodes(self.session.execute("query-named-block-nodes"))

    def status(self) -> str:
        return str(self.session.execute("query-status")["status"])

    def stop(self) -> None:
        self.session.execute("stop")

    def cont(self) -> None:
        self.session.execute("cont")

    def quit(self) -> None:
        try:
            self.session.execute("quit")
        finally:
            self.close()

    def close(self) -> None:
        self.session.close()

    def _job(self, command: str, name: str, arguments: dict[str, Any]) -> None:
        self.session.dismiss_stale_jobs()
        error = self.session.run_job(command, {"tag": name, **arguments}, timeout=self.job_timeout)
        if error:
            if "already exists" in error:
                raise SnapshotExists(f"QEMU refused to save {name!r}: {error}.")
            raise MonitorError(f"QEMU's {command} job for {name!r} failed: {error}.")

    def _save(self, name: str) -> None:
        devices = [img.node_name for img in self._targets()]
        self._job("snapshot-save", name, {"vmstate": devices[0], "devices": devices})

    def _load(self, name: str, targets: list[BlockImage], vmstate: BlockImage) -> None:
        devices = [img.node_name for img in targets]
        self._job("snapshot-load", name, {"vmstate": vmstate.node_name, "devices": devices})

    def _delete(self, name: str, targets: list[BlockImage]) -> None:
        self._job("snapshot-delete", name, {"devices": [img.node_name for img in targets]})


# ---------------------------------------------------------------- HMP

class HmpMonitor(Monitor):
    protocol = "hmp"

    def __init__(self, session: HmpSession, address: MonitorAddress, *, timeout: float, job_timeout: float):
        super().__init__(address, timeout=timeout, job_timeout=job_timeout)
        self.session = session

    @property
    def version(self) -> str:
        return self.session.version

    def images(self) -> list[BlockImage]:
        """From ``info block -v``, which (unlike ``info snapshots``) shows real snapshot IDs.

        VM state sizes there are rounded ('816 KiB'): good for "has VM state or not", not for
        byte accounting.
        """
        entries = parse_info_block(self.session.command("info", "block", "-v"))
        return [
            BlockImage(
                node_name=e.node_name,
                filename=e.filename,
                format=e.format,
                virtual_size=e.virtual_size,
                read_only=e.read_only,
                snapshots=e.snapshots,
                device=e.device,
            )
            for e in entries
            if e.format == "qcow2"
        ]

    def info_snapshots(self) -> tuple[Snapshot, ...]:
        """``info snapshots``: loadable snapshots; IDs are '' where QEMU prints '--'."""
        return parse_info_snapshots(self.session.command("info", "snapshots"))

    def status(self) -> str:
        return parse_status(self.session.command("info", "status"))

    def _mutate(self, verb: str, *args: str, timeout: float | None = None) -> None:
        for arg in args:
            assert_monitor_safe(arg)
        text = self.session.command(verb, *args, timeout=timeout)
        error = reply_error(text)
        if error:
            raise MonitorError(f"QEMU refused '{' '.join((verb, *args))}': {error}")

    def stop(self) -> None:
        self._mutate("stop")

    def cont(self) -> None:
        self._mutate("cont")

    def quit(self) -> None:
        try:
            self.session.transport.send(b"quit\n")
        finally:
            self.close()

    def close(self) -> None:
        self.session.close()

    def _save(self, name: str) -> None:
        self._mutate("savevm", name, timeout=self.job_timeout)

    def _load(self, name: str, targets: list[BlockImage], vmstate: BlockImage) -> None:
        self._mutate("loadvm", name, timeout=self.job_timeout)

    def _delete(self, name: str, targets: list[BlockImage]) -> None:
        self._mutate("delvm", name, timeout=self.job_timeout)


# ---------------------------------------------------------------- connect

def connect(
    address: MonitorAddress | str,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    *,
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    job_timeout: float = DEFAULT_JOB_TIMEOUT,
) -> Monitor:
    """Connect to the monitor at ADDRESS and return a QmpMonitor or HmpMonitor.

    The protocol is detected from the greeting's first byte. TIMEOUT bounds the connect and
    the greeting; COMMAND_TIMEOUT every query; JOB_TIMEOUT a save/load/delete.
    """
    if isinstance(address, str):
        address = parse_address(address)
    sock = open_socket(address, timeout)
    try:
        protocol = peek_protocol(sock, address, timeout)
        if protocol == "qmp":
            qmp_session = QmpSession(sock, str(address), timeout=min(timeout, command_timeout))
            qmp_session.timeout = command_timeout
            return QmpMonitor(qmp_session, address, timeout=command_timeout, job_timeout=job_timeout)
        hmp_session = HmpSession(SocketTransport(sock, address), timeout=command_timeout)
        hmp_session.read_greeting(timeout)
        return HmpMonitor(hmp_session, address, timeout=command_timeout, job_timeout=job_timeout)
    except BaseException:
        sock.close()
        raise
