"""`qsnap vm wait`: which VM to wait for, and for what (the probes live in qsnap.vm.readiness).

- ``--vm compose:SERVICE``: the service's container. With no condition, until its healthcheck
  says healthy (the healthcheck reads the whole serial log inside the container); ``--ssh`` and
  ``--serial`` use the host ports the container's 2222 and 5555 are published on.
- Explicit endpoints (``--ssh-port``, ``--serial-port``, ``--serial-log``): those, whoever runs
  the VM (this is what the container's healthcheck uses inside the container).
- Otherwise the VM that ``qsnap vm start`` runs on the image: its SSH forward, its serial log;
  no condition means ``--ssh`` when it forwards SSH.
- Otherwise the guide's ports: SSH ``QSNAP_SSH`` or localhost:2222, serial localhost:5555.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from qsnap.core.errors import UsageError

if TYPE_CHECKING:
    from qsnap.service.snapshots import Context
    from qsnap.vm.controllers import ContainerState
    from qsnap.vm.readiness import Probe, WaitResult

GUIDE_SSH_PORT = 2222
GUIDE_SERIAL_PORT = 5555


def _ssh_target(environ: Mapping[str, str], host: str, port: int | None) -> tuple[str, int]:
    """--ssh-port on --host, else QSNAP_SSH (``USER@HOST[:PORT]``), else the guide's 2222."""
    if port is not None:
        return host, port
    configured = environ.get("QSNAP_SSH", "").strip()
    if configured:
        from qsnap.service.guest import ssh_argv

        argv = ssh_argv(configured, "true")  # validates the form
        ssh_host = argv[-2].rpartition("@")[2]
        ssh_port = int(argv[argv.index("-p") + 1]) if "-p" in argv else 22
        return ssh_host, ssh_port
    return host, GUIDE_SSH_PORT


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def wait_for_vm(
    ctx: Context,
    *,
    image: Callable[[], Path] | None = None,
    ssh: bool = False,
    serial: str | None = None,
    timeout: float = 300.0,
    host: str = "127.0.0.1",
    ssh_port: int | None = None,
    serial_port: int | None = None,
    serial_log: str | Path | None = None,
) -> WaitResult:
    """Wait until the VM is ready; raise NotReady (exit 12) when it is not in TIMEOUT seconds."""
    from qsnap.vm import readiness

    if timeout <= 0:
        raise UsageError(f"--timeout {timeout:g} must be positive.")
    if serial is not None:
        try:
            re.compile(serial)
        except re.error as exc:
            raise UsageError(f"--serial {serial!r} is not a regular expression: {exc}.") from exc
    elif serial_log is not None or serial_port is not None:
        raise UsageError("--serial-log and --serial-port need --serial PATTERN (what to wait for).")
    probes: list[Probe] = []
    alive: Callable[[], str | None] | None = None
    explicit = ssh_port is not None or serial_port is not None or serial_log is not None
    spec = ctx.vm or ""
    if spec.startswith("compose:"):
        from qsnap.vm.controllers import ComposeService, parse_compose

        service_name, compose_file = parse_compose(spec)
        service = ComposeService(service_name, compose_file, environ=ctx.env())
        health = readiness.ContainerHealthy(service)
        if not ssh and serial is None:
            probes.append(health)
        else:
            state = service.state()
            if state is None or not state.running:
                raise readiness.NotReady(f"The container of {service.name} is not running.",
                                         hint="start it with docker-compose up -d")
            if ssh:
                probes.append(readiness.SSHBanner(*_published(state, GUIDE_SSH_PORT, service.name, host, ssh_port)))
            if serial is not None:
                if serial_log is not None:
                    probes.append(readiness.SerialLog(Path(serial_log), serial))
                else:
                    where = _published(state, GUIDE_SERIAL_PORT, service.name, host, serial_port)
                    probes.append(readiness.SerialPort(*where, serial))
    elif explicit:
        if ssh:
            probes.append(readiness.SSHBanner(*_ssh_target(ctx.env(), host, ssh_port)))
        if serial is not None:
            probes.append(readiness.SerialLog(Path(serial_log), serial) if serial_log is not None
                          else readiness.SerialPort(host, serial_port or GUIDE_SERIAL_PORT, serial))
        elif not ssh:
            raise UsageError("Say what to wait for: --ssh or --serial PATTERN.")
    else:
        from qsnap.vm import find_running, is_qemu_process

        running = find_running(image()) if image is not None else None
        if running is not None:
            pid, qmp = running.pid, running.qmp_socket

            def alive_check() -> str | None:
                return None if is_qemu_process(pid, qmp) else f"QEMU (pid {pid}) exited"

            alive = alive_check
            if ssh or serial is None:
                if running.ssh_port is None:
                    raise UsageError("This VM forwards no SSH port: wait with --serial PATTERN.")
                probes.append(readiness.SSHBanner(_loopback(running.listen_host), running.ssh_port))
            if serial is not None:
                probes.append(readiness.SerialLog(running.serial_log, serial))
        else:
            if not ssh and serial is None:
                raise UsageError("No VM started by qsnap runs on this image: say what to wait for (--ssh or "
                                 "--serial PATTERN), or name the compose service with --vm compose:SERVICE.")
            if ssh:
                probes.append(readiness.SSHBanner(*_ssh_target(ctx.env(), host, None)))
            if serial is not None:
                probes.append(readiness.SerialPort(host, GUIDE_SERIAL_PORT, serial))
    return readiness.wait_ready(probes, timeout=timeout, alive=alive)


def _published(state: ContainerState, container_port: int, name: str, host: str,
               override: int | None) -> tuple[str, int]:
    """Where on the host the container's PORT is published (or the explicit OVERRIDE)."""
    if override is not None:
        return host, override
    for bound_host, bound_port in state.published(container_port):
        if bound_port:
            return _loopback(bound_host), bound_port
    raise UsageError(f"{name} does not publish its port {container_port} on the host.",
                     hint=f"publish it in the compose file (ports: - \"127.0.0.1:{container_port}:{container_port}\")")
