"""Start, find, inspect and stop the VM that qsnap launches on an image.

Each image gets a run directory beside it (``<image>.qsnap-run/``) holding:

- ``vm.json``   the running VM: pid, argv, sockets, ports (written atomically at start,
                removed at stop; a record whose process is gone is cleaned as stale);
- ``spec.json`` the last VM description started there (kept after stop, so a controller
                can start the same VM again after an offline restore);
- ``qemu.log``  QEMU's stdout/stderr, ``serial.log`` everything the serial console printed;
- ``qmp.sock``  the QMP socket qsnap uses (in a short fallback directory when the run
                directory's path is too long for a unix socket).

So ``find_running(image)`` lets any later qsnap command reach the VM's monitor without
being told where it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qsnap.core import fsutil, proc
from qsnap.core.errors import ImageError, ImageInUse, MonitorError, QsnapError, SnapshotNotFound, first_line
from qsnap.vm.console import SerialConsole
from qsnap.vm.launch import (
    QEMU_SYSTEM,
    PortBusy,
    Sockets,
    VMSpec,
    choose_accel,
    qemu_argv,
    resolve_ports,
    run_dir,
    socket_paths,
)
from qsnap.vm.qmp import command, greeting_ready, qmp_session

RECORD = "vm.json"
SPEC = "spec.json"
QEMU_LOG = "qemu.log"
RECORD_VERSION = 1

# Popen objects of the QEMUs this process started, so their exit can be reaped (a zombie
# still has a /proc entry and answers kill(pid, 0)).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class RunningVM:
    """A QEMU that qsnap started and that is (or was, when read) running."""

    image: Path
    pid: int
    argv: tuple[str, ...]
    qmp_socket: Path
    serial_log: Path
    serial_socket: Path | None  # the serial console's unix socket (when not on TCP)
    serial_port: int | None
    ssh_port: int | None
    monitor_port: int | None
    listen_host: str
    monitor_host: str
    accel: str
    started_at: str
    spec: VMSpec = field(compare=False)

    @property
    def run_dir(self) -> Path:
        return run_dir(self.image)

    @property
    def qmp_address(self) -> str:
        """The address form qsnap's --monitor option takes."""
        return f"unix:{self.qmp_socket}"

    @property
    def hmp_address(self) -> str | None:
        """The guide's HMP telnet monitor, when it is enabled."""
        if self.monitor_port is None:
            return None
        return f"telnet:{self.monitor_host}:{self.monitor_port}"

    @property
    def console_address(self) -> Path | tuple[str, int]:
        """The serial console: its unix socket, or (host, port) of its telnet port."""
        if self.serial_socket is not None:
            return self.serial_socket
        host = self.listen_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return (host, int(self.serial_port or 0))

    def open_console(self, *, connect_timeout: float = 30.0) -> SerialConsole:
        """A :class:`~qsnap.vm.console.SerialConsole` on this VM's serial console."""
        return SerialConsole(self.console_address, connect_timeout=connect_timeout)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "image": str(self.image),
            "pid": self.pid,
            "argv": list(self.argv),
            "qmp_socket": str(self.qmp_socket),
            "serial_log": str(self.serial_log),
            "serial_socket": None if self.serial_socket is None else str(self.serial_socket),
            "serial_port": self.serial_port,
            "ssh_port": self.ssh_port,
            "monitor_port": self.monitor_port,
            "listen_host": self.listen_host,
            "monitor_host": self.monitor_host,
            "accel": self.accel,
            "started_at": self.started_at,
            "spec": self.spec.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunningVM:
        serial_socket = data.get("serial_socket")
        return cls(
            image=Path(data["image"]),
            pid=int(data["pid"]),
            argv=tuple(data["argv"]),
            qmp_socket=Path(data["qmp_socket"]),
            serial_log=Path(data["serial_log"]),
            serial_socket=None if serial_socket is None else Path(serial_socket),
            serial_port=data.get("serial_port"),
            ssh_port=data.get("ssh_port"),
            monitor_port=data.get("monitor_port"),
            listen_host=data.get("listen_host", "127.0.0.1"),
            monitor_host=data.get("monitor_host", "127.0.0.1"),
            accel=data.get("accel", "unknown"),
            started_at=data.get("started_at", ""),
            spec=VMSpec.from_json(data["spec"]),
        )


@dataclass(frozen=True)
class VMStatus:
    """What `qsnap vm status` reports."""

    image: Path
    state: str  # "running", "paused", "stopped" or "unresponsive"
    run_state: str | None = None  # QEMU's own word (query-status), e.g. "restore-vm"
    pid: int | None = None
    accel: str | None = None
    qmp_socket: Path | None = None
    ssh_port: int | None = None
    serial_port: int | None = None
    monitor_port: int | None = None
    monitor_host: str | None = None
    started_at: str | None = None
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.state in ("running", "paused", "unresponsive")

    def to_json(self) -> dict[str, Any]:
        return {
            "image": str(self.image),
            "state": self.state,
            "run_state": self.run_state,
            "pid": self.pid,
            "accel": self.accel,
            "qmp_socket": None if self.qmp_socket is None else str(self.qmp_socket),
            "ports": {"ssh": self.ssh_port, "serial": self.serial_port, "monitor": self.monitor_port},
            "monitor_host": self.monitor_host,
            "started_at": self.started_at,
            "error": self.error,
        }


@dataclass(frozen=True)
class StopResult:
    """How a VM was stopped: "powerdown" (the guest shut down), "quit" (QEMU was told to
    exit), "kill" (SIGKILL) or "not-running"."""

    image: Path
    method: str
    pid: int | None = None


# --- processes -------------------------------------------------------------------------


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        _children.pop(pid, None)


def _reap_exiting(pid: int) -> None:
    """Reap PID if it is a child of ours on its way out: its memory (and so its cmdline) is gone
    before it becomes a zombie, so poll() alone can miss it and leave a zombie behind."""
    child = _children.get(pid)
    if child is None:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=1.0)
    if child.returncode is not None:
        _children.pop(pid, None)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(part) for part in raw.split(b"\0") if part]


def is_qemu_process(pid: int, qmp_socket: Path) -> bool:
    """Whether PID is alive and is the QEMU that serves QMP_SOCKET (not a recycled pid)."""
    _reap(pid)
    argv = _cmdline(pid)  # empty for a zombie or a vanished process
    if not argv:
        _reap_exiting(pid)
        return False
    if not os.path.basename(argv[0]).startswith("qemu-system"):
        return False
    needles = (str(qmp_socket), str(qmp_socket).replace(",", ",,"))  # QEMU option escaping
    return any(needle in arg for arg in argv for needle in needles)


def _wait_gone(pid: int, qmp_socket: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not is_qemu_process(pid, qmp_socket):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# --- the run directory ----------------------------------------------------------------


def _canonical(image: str | os.PathLike[str]) -> Path:
    return Path(image).expanduser().resolve()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove_runtime(sockets: Sockets | None, directory: Path) -> None:
    paths = [directory / RECORD]
    if sockets is not None:
        paths += [sockets.qmp, sockets.serial]
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if sockets is not None and sockets.qmp.parent != directory:
        with contextlib.suppress(OSError):  # the short fallback directory, once empty
            sockets.qmp.parent.rmdir()


def find_running(image: str | os.PathLike[str]) -> RunningVM | None:
    """The qsnap-launched VM running on IMAGE, or None (a stale record is cleaned)."""
    image = _canonical(image)
    directory = run_dir(image)
    data = _read_json(directory / RECORD)
    if data is None:
        return None
    try:
        vm = RunningVM.from_json(data)
    except (KeyError, TypeError, ValueError, QsnapError):
        _remove_runtime(None, directory)
        return None
    if is_qemu_process(vm.pid, vm.qmp_socket):
        return vm
    _remove_runtime(Sockets(vm.qmp_socket, vm.serial_socket or vm.qmp_socket, vm.serial_log), directory)
    return None


def recorded_spec(image: str | os.PathLike[str]) -> VMSpec | None:
    """The last VM description started on IMAGE (kept after stop), or None."""
    data = _read_json(run_dir(_canonical(image)) / SPEC)
    if data is None:
        return None
    try:
        return VMSpec.from_json(data)
    except (TypeError, ValueError, QsnapError):
        return None


# --- start ---------------------------------------------------------------------------


def _startup_error(returncode: int, log: Path, spec: VMSpec) -> QsnapError:
    """Turn QEMU's dying words into the error a user can act on."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    said = " ".join(lines[-3:]) if lines else f"exit code {returncode}, no output"
    if 'Failed to get "write" lock' in text or "Failed to get shared" in text:
        return ImageInUse(
            f"Another process (QEMU or qemu-img) is using {spec.image}: {said}",
            hint="stop that VM first, or work on it through its monitor (--monitor)",
        )
    if "Address already in use" in text or "Could not set up host forwarding rule" in text:
        return PortBusy(f"QEMU could not listen on a port: {said}", hint="pick other ports (0 = any free port)")
    if spec.loadvm is not None and ("does not exist" in text or "not found" in text.lower()):
        return SnapshotNotFound(f"QEMU could not load snapshot {spec.loadvm!r}: {said}")
    if "Could not open" in text or "Image is not in qcow2 format" in text:
        return ImageError(f"QEMU could not open {spec.image}: {said}")
    return MonitorError(
        f"QEMU exited with code {returncode} before its monitor came up: {first_line(said)}",
        hint=f"its full output is in {log}",
    )


def start(spec: VMSpec, *, timeout: float = 60.0) -> RunningVM:
    """Start QEMU for SPEC in its own session and return once its QMP monitor answers.

    Raises ImageError (no such image), ImageInUse (qsnap's VM or another process already
    has the image), PortBusy (a port is taken), ProgramMissing (no qemu-system-x86_64),
    MonitorError (QEMU died or did not come up within TIMEOUT seconds).
    """
    image = _canonical(spec.image)
    if not image.is_file():
        raise ImageError(f"Image not found: {image}.")
    spec = replace(spec, image=image)
    running = find_running(image)
    if running is not None:
        raise ImageInUse(
            f"A VM started by qsnap is already running on {image} (pid {running.pid}).",
            hint="see `qsnap vm status`; stop it with `qsnap vm stop`",
        )
    spec = resolve_ports(spec)
    accel = choose_accel() if spec.accel == "auto" else spec.accel
    sockets = socket_paths(image)
    directory = run_dir(image)
    directory.mkdir(mode=0o700, exist_ok=True)
    _remove_runtime(sockets, directory)  # leftovers of a QEMU that died (checked above)
    sockets.qmp.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    argv = qemu_argv(spec, sockets, accel=accel)
    log_path = directory / QEMU_LOG
    with open(log_path, "wb") as log:
        child = proc.spawn(argv, stdout=log, stderr=subprocess.STDOUT, new_session=True)
    _children[child.pid] = child
    try:
        _wait_for_monitor(child, sockets.qmp, log_path, spec, timeout)
    except BaseException:
        if child.poll() is None:
            child.kill()
            child.wait()
        _children.pop(child.pid, None)
        _remove_runtime(sockets, directory)
        raise
    vm = RunningVM(
        image=image,
        pid=child.pid,
        argv=tuple(argv),
        qmp_socket=sockets.qmp,
        serial_log=sockets.serial_log,
        serial_socket=None if spec.serial_port is not None else sockets.serial,
        serial_port=spec.serial_port,
        ssh_port=spec.ssh_port,
        monitor_port=spec.monitor_port,
        listen_host=spec.listen_host,
        monitor_host=spec.monitor_host,
        accel=accel,
        started_at=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        spec=spec,
    )
    fsutil.atomic_write_bytes(directory / RECORD, json.dumps(vm.to_json(), indent=2).encode())
    restartable = replace(spec, loadvm=None)  # a restart must not revert the disk
    fsutil.atomic_write_bytes(directory / SPEC, json.dumps(restartable.to_json(), indent=2).encode())
    return vm


def _wait_for_monitor(
    child: subprocess.Popen[bytes], qmp_socket: Path, log: Path, spec: VMSpec, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        returncode = child.poll()
        if returncode is not None:
            raise _startup_error(returncode, log, spec)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MonitorError(
                f"QEMU (pid {child.pid}) did not open its QMP monitor within {timeout:g} s.",
                hint=f"its output is in {log}",
            )
        if qmp_socket.exists() and greeting_ready(qmp_socket, min(remaining, 2.0), main_loop=True):
            return
        time.sleep(0.02)


# --- stop and status -------------------------------------------------------------------


def stop(image: str | os.PathLike[str], timeout: float = 30.0, *, quit_timeout: float = 5.0) -> StopResult:
    """Stop IMAGE's qsnap-launched VM: ACPI powerdown and wait up to TIMEOUT seconds, then
    QMP ``quit`` (QUIT_TIMEOUT seconds), then SIGKILL by pid."""
    image = _canonical(image)
    vm = find_running(image)
    if vm is None:
        return StopResult(image, "not-running")
    method = "kill"
    try:
        with qmp_session(vm.qmp_socket, timeout=min(5.0, max(timeout, 1.0))) as qmp:
            command(qmp, "system_powerdown")
            if _wait_gone(vm.pid, vm.qmp_socket, timeout):
                method = "powerdown"
            else:
                with contextlib.suppress(MonitorError):
                    command(qmp, "quit")
                if _wait_gone(vm.pid, vm.qmp_socket, quit_timeout):
                    method = "quit"
    except MonitorError:
        pass  # the monitor does not answer: kill below
    if method == "kill":
        _kill(vm.pid)
        if not _wait_gone(vm.pid, vm.qmp_socket, 10.0):
            raise MonitorError(f"QEMU (pid {vm.pid}) survived SIGKILL.")
    _children.pop(vm.pid, None)
    _remove_runtime(Sockets(vm.qmp_socket, vm.serial_socket or vm.qmp_socket, vm.serial_log), vm.run_dir)
    return StopResult(image, method, vm.pid)


def status(image: str | os.PathLike[str], *, timeout: float = 5.0) -> VMStatus:
    """Running/paused/stopped, accelerator, ports and pid of IMAGE's qsnap-launched VM."""
    image = _canonical(image)
    vm = find_running(image)
    if vm is None:
        return VMStatus(image, "stopped")
    common: dict[str, Any] = {
        "pid": vm.pid,
        "accel": vm.accel,
        "qmp_socket": vm.qmp_socket,
        "ssh_port": vm.ssh_port,
        "serial_port": vm.serial_port,
        "monitor_port": vm.monitor_port,
        "monitor_host": vm.monitor_host,
        "started_at": vm.started_at,
    }
    try:
        with qmp_session(vm.qmp_socket, timeout=timeout) as qmp:
            run_state = str(command(qmp, "query-status")["status"])
            kvm = command(qmp, "query-kvm")
    except MonitorError as exc:
        return VMStatus(image, "unresponsive", error=str(exc), **common)
    common["accel"] = "kvm" if kvm.get("enabled") else "tcg"
    state = "running" if run_state == "running" else "paused"
    return VMStatus(image, state, run_state=run_state, **common)


__all__ = [
    "QEMU_SYSTEM",
    "RunningVM",
    "StopResult",
    "VMStatus",
    "find_running",
    "is_qemu_process",
    "recorded_spec",
    "start",
    "status",
    "stop",
]
