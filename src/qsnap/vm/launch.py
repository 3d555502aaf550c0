"""How qsnap starts qemu-system-x86_64: the VM description and its (pure) command line.

:func:`qemu_argv` mirrors the guide's container entrypoint: one qcow2 disk, RAM, CPUs, KVM
when it is real hardware virtualization (TCG otherwise), user networking with the SSH
forward 2222→22, the serial console on telnet port 5555 (plus a log file, because serial
output is lost while no client is connected), the HMP monitor on telnet port 9999 bound to
127.0.0.1 (an HMP monitor has no authentication: see QEMU-FACTS.md), and a QMP unix socket
that qsnap itself uses. It never touches the filesystem or the network: ports must have
been resolved (``0`` → a free port) by :func:`resolve_ports` first.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from qsnap.core.errors import UsageError

QEMU_SYSTEM = "qemu-system-x86_64"

DEFAULT_SSH_PORT = 2222
DEFAULT_SERIAL_PORT = 5555
DEFAULT_MONITOR_PORT = 9999
LOCALHOST = "127.0.0.1"

DiskInterface = Literal["virtio", "ide"]


class PortBusy(UsageError):
    """A port the VM needs is already in use."""


@dataclass(frozen=True)
class VMSpec:
    """Everything needed to start one VM on one qcow2 image.

    Ports: an int is a TCP port on the host (``0`` = pick a free one when starting),
    ``None`` turns that endpoint off (the serial console then goes to a unix socket in the
    run directory instead of telnet).
    """

    image: Path
    memory_mb: int = 2048
    smp: int = 2
    disk_interface: DiskInterface = "ide"
    accel: str = "auto"  # "auto", "kvm", "tcg", "kvm:tcg"
    cpu: str | None = None  # None: "host" with KVM, "max" with TCG
    ssh_port: int | None = DEFAULT_SSH_PORT
    serial_port: int | None = DEFAULT_SERIAL_PORT
    monitor_port: int | None = DEFAULT_MONITOR_PORT
    listen_host: str = LOCALHOST  # where the serial console and the SSH forward listen
    monitor_host: str = LOCALHOST  # where the HMP monitor listens (keep it local!)
    nic_model: str = "e1000"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    loadvm: str | None = None
    no_reboot: bool = False
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", Path(self.image))
        for name in ("kernel", "initrd"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if self.disk_interface not in ("virtio", "ide"):
            raise UsageError(f"Unknown disk interface {self.disk_interface!r}.", hint="use virtio or ide")
        if self.memory_mb <= 0 or self.smp <= 0:
            raise UsageError("RAM and CPU count must be positive.")
        for port_name in ("ssh_port", "serial_port", "monitor_port"):
            port = getattr(self, port_name)
            if port is not None and not 0 <= port <= 65535:
                raise UsageError(f"{port_name.replace('_', ' ')} {port} is not a TCP port (0-65535).")
        if self.initrd is not None and self.kernel is None:
            raise UsageError("An initrd needs a kernel (-kernel).")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("image", "kernel", "initrd"):
            data[key] = None if data[key] is None else str(data[key])
        data["extra_args"] = list(self.extra_args)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VMSpec:
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["extra_args"] = tuple(kwargs.get("extra_args") or ())
        return cls(**kwargs)


@dataclass(frozen=True)
class Sockets:
    """Where the unix sockets and logs of one VM live (the run directory, or a short
    fallback directory when the run directory's path is too long for a unix socket)."""

    qmp: Path
    serial: Path  # used only when the serial console is not on a TCP port
    serial_log: Path


def choose_accel(kvm_device: Path = Path("/dev/kvm"), pvm_module: Path = Path("/sys/module/kvm_pvm")) -> str:
    """``kvm:tcg`` when /dev/kvm is real hardware virtualization, else ``tcg``.

    Some machines expose a software "PVM" /dev/kvm (module kvm_pvm) on which stock kernels
    fail or crawl; TCG is the safe choice there.
    """
    if kvm_device.exists() and not pvm_module.exists():
        return "kvm:tcg"
    return "tcg"


def _escape(value: str | Path) -> str:
    """Escape a value for a QEMU ``-opt key=value,...`` list (a comma is written twice)."""
    return str(value).replace(",", ",,")


def qemu_argv(spec: VMSpec, sockets: Sockets | None = None, *, accel: str | None = None) -> list[str]:
    """The qemu-system-x86_64 command line for SPEC (pure; ports already resolved).

    SOCKETS defaults to the image's run directory (:func:`socket_paths`). ACCEL overrides
    ``spec.accel``; with ``"auto"`` and no override :func:`choose_accel` decides.
    """
    sockets = sockets or socket_paths(spec.image)
    for port_name in ("ssh_port", "serial_port", "monitor_port"):
        if getattr(spec, port_name) == 0:
            raise UsageError(f"{port_name} is 0: resolve free ports (resolve_ports) before building argv.")
    chosen = accel or (choose_accel() if spec.accel == "auto" else spec.accel)
    cpu = spec.cpu or ("host" if chosen.startswith("kvm") else "max")
    argv = [
        QEMU_SYSTEM,
        "-name", f"qsnap:{spec.image.name}",
        "-machine", f"pc,accel={chosen}",
        "-cpu", cpu,
        "-m", str(spec.memory_mb),
        "-smp", str(spec.smp),
        "-nodefaults",
        "-display", "none",
        "-drive", f"file={_escape(spec.image)},if={spec.disk_interface},format=qcow2",
    ]  # fmt: skip
    if spec.ssh_port is not None:
        forward = f"hostfwd=tcp:{spec.listen_host}:{spec.ssh_port}-:22"
        argv += ["-netdev", f"user,id=net0,{forward}", "-device", f"{spec.nic_model},netdev=net0"]
    if spec.serial_port is not None:
        serial = f"socket,id=serial0,host={spec.listen_host},port={spec.serial_port},telnet=on"
    else:
        serial = f"socket,id=serial0,path={_escape(sockets.serial)}"
    serial += f",server=on,wait=off,logfile={_escape(sockets.serial_log)}"
    argv += ["-chardev", serial, "-serial", "chardev:serial0"]
    if spec.monitor_port is not None:
        argv += [
            "-chardev",
            f"socket,id=hmp0,host={spec.monitor_host},port={spec.monitor_port},telnet=on,server=on,wait=off",
            "-mon", "chardev=hmp0,mode=readline",
        ]  # fmt: skip
    argv += [
        "-chardev", f"socket,id=qmp0,path={_escape(sockets.qmp)},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
    ]  # fmt: skip
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    if spec.append is not None:
        argv += ["-append", spec.append]
    if spec.no_reboot:
        argv.append("-no-reboot")
    if spec.loadvm is not None:
        argv += ["-loadvm", spec.loadvm]
    argv += list(spec.extra_args)
    return argv


def port_is_free(host: str, port: int) -> bool:
    """Whether a listening TCP socket could be bound on HOST:PORT right now (as QEMU does,
    with SO_REUSEADDR, so a port in TIME_WAIT counts as free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free on HOST now (the kernel picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def resolve_ports(spec: VMSpec) -> VMSpec:
    """SPEC with every ``0`` port replaced by a free one; a busy port raises PortBusy.

    Checked before QEMU starts, so the user gets one clear sentence instead of QEMU's
    "Failed to bind socket" after a half start.
    """
    chosen: dict[str, int] = {}
    taken: set[int] = set()
    endpoints = (
        ("ssh_port", spec.listen_host, "--ssh-port"),
        ("serial_port", spec.listen_host, "--serial-port"),
        ("monitor_port", spec.monitor_host, "--monitor-port"),
    )
    for name, host, option in endpoints:
        port = getattr(spec, name)
        if port is None:
            continue
        if port == 0:
            for _ in range(50):
                port = free_port(host)
                if port not in taken:
                    break
        elif port in taken or not port_is_free(host, port):
            label = name.removesuffix("_port").replace("ssh", "SSH forward")
            raise PortBusy(
                f"Port {host}:{port} for the {label} is already in use.",
                hint=f"stop what listens there, or pick another port with {option} PORT (0 = any free port)",
            )
        taken.add(port)
        chosen[name] = port
    return replace(spec, **chosen)  # type: ignore[arg-type]


def run_dir(image: Path) -> Path:
    """The run directory of IMAGE: ``<image>.qsnap-run/`` beside it."""
    image = Path(image)
    return image.with_name(image.name + ".qsnap-run")


_UNIX_PATH_MAX = 100  # sun_path holds 108 bytes; keep a margin


def short_socket_dir(image: Path) -> Path:
    """A short per-image directory for unix sockets, used when the run directory's path is
    too long for a unix socket (sun_path is 108 bytes)."""
    import hashlib

    digest = hashlib.sha256(str(image).encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/qsnap-{os.getuid()}")
    return base / f"qsnap-{digest}"


def socket_paths(image: Path) -> Sockets:
    """Where IMAGE's VM puts its QMP socket, serial socket and serial log (pure)."""
    directory = run_dir(image)
    socket_dir = directory
    if len(os.fsencode(directory / "serial.sock")) > _UNIX_PATH_MAX:
        socket_dir = short_socket_dir(image)
    return Sockets(qmp=socket_dir / "qmp.sock", serial=socket_dir / "serial.sock", serial_log=directory / "serial.log")
