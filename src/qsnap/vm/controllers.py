"""Who runs the VM, so that `restore` can stop it, change the image offline and start it again.

- :class:`QsnapVM`: the VM that ``qsnap vm start`` launched on this image (its run directory);
- :class:`ComposeService`: a docker compose service (``compose:SERVICE[@FILE]``), the guide's
  setup, driven with ``docker-compose`` (v1) or ``docker compose`` (v2) ``[-f FILE] stop|start
  SERVICE``, its container's state read with ``docker inspect``;
- :class:`NoController`: nobody qsnap can drive; stopping explains what to configure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qsnap.core import proc
from qsnap.core.errors import MonitorError, ProgramMissing, UsageError
from qsnap.vm import lifecycle

Runner = Callable[[Sequence[str]], proc.Result]


class Controller(Protocol):
    """Stops and starts the VM that uses an image."""

    @property
    def name(self) -> str: ...

    def is_running(self) -> bool: ...

    def stop(self) -> None: ...

    def start(self) -> None: ...


class QsnapVM:
    """The VM that `qsnap vm start` launched on IMAGE (found through its run directory)."""

    def __init__(self, image: Path, *, stop_timeout: float = 30.0) -> None:
        self.image = Path(image)
        self.stop_timeout = stop_timeout

    @property
    def name(self) -> str:
        return "qsnap"

    def is_running(self) -> bool:
        return lifecycle.find_running(self.image) is not None

    def stop(self) -> None:
        lifecycle.stop(self.image, self.stop_timeout)

    def start(self) -> None:
        """Start the VM again as it was last started (never with -loadvm: that would
        revert the disk that a restore has just written)."""
        spec = lifecycle.recorded_spec(self.image)
        if spec is None:
            raise MonitorError(
                f"No VM was ever started by qsnap on {self.image}, so it cannot be started again.",
                hint="start it with `qsnap vm start`",
            )
        lifecycle.start(spec)


#: The two spellings of docker compose: v1 (``docker-compose``, the guide's) and v2 (the plugin).
COMPOSE_V1: tuple[str, ...] = ("docker-compose",)
COMPOSE_V2: tuple[str, ...] = ("docker", "compose")
_COMPOSE_SETTINGS = {"docker-compose": COMPOSE_V1, "v1": COMPOSE_V1, "docker compose": COMPOSE_V2, "v2": COMPOSE_V2}


def compose_argv(
    action: str, service: str, compose_file: str | None = None, command: Sequence[str] = COMPOSE_V2,
    *, timeout: float | None = None,
) -> list[str]:  # fmt: skip
    """The compose command for ACTION (stop, start, container-id) on SERVICE (pure).

    COMMAND is ``("docker-compose",)`` (v1) or ``("docker", "compose")`` (v2): both accept the
    same arguments for these actions. ``container-id`` lists the service's container, running
    or not (``ps --all --quiet``); its state is then read with ``docker inspect``.
    """
    argv = list(command)
    if compose_file:
        argv += ["-f", compose_file]
    if action == "stop":
        return [*argv, "stop", *(["--timeout", f"{max(1, round(timeout))}"] if timeout is not None else []), service]
    if action == "start":
        return [*argv, "start", service]
    if action == "container-id":
        return [*argv, "ps", "--all", "--quiet", service]
    raise ValueError(f"unknown compose action {action!r}")


def compose_command(
    environ: Mapping[str, str] | None = None,
    *,
    which: Callable[[str], str | None] = shutil.which,
    runner: Runner | None = None,
) -> tuple[str, ...]:
    """Which compose to run: ``QSNAP_COMPOSE`` (``docker-compose`` / ``v1`` or ``docker compose``
    / ``v2``), else ``docker-compose`` when it is installed (the guide's spelling), else the
    ``docker compose`` plugin when ``docker compose version`` works. Neither: exit 9 with the
    command that installs one."""
    environ = os.environ if environ is None else environ
    setting = " ".join(environ.get("QSNAP_COMPOSE", "").split())
    if setting:
        if setting not in _COMPOSE_SETTINGS:
            raise UsageError(f"QSNAP_COMPOSE={setting!r} is neither docker-compose nor 'docker compose'.",
                             hint="set QSNAP_COMPOSE=docker-compose (v1) or QSNAP_COMPOSE='docker compose' (v2)")
        return _COMPOSE_SETTINGS[setting]
    if which("docker-compose"):
        return COMPOSE_V1
    if which("docker"):
        run = runner or (lambda argv: proc.run(argv, check=False, timeout=30))
        if run([*COMPOSE_V2, "version"]).returncode == 0:
            return COMPOSE_V2
        raise ProgramMissing("docker is installed but neither docker-compose nor the docker compose plugin is.",
                             hint="install it with: apt-get install docker-compose")
    raise ProgramMissing("Docker is not installed: no docker-compose and no docker on PATH.",
                         hint="install it with: apt-get install docker.io docker-compose")


@dataclass(frozen=True)
class ContainerState:
    """What ``docker inspect`` says about a compose service's container."""

    id: str
    status: str  # created, running, paused, restarting, exited, dead
    health: str | None  # starting, healthy, unhealthy; None without a healthcheck
    exit_code: int
    #: container port ("9999/tcp") -> [(host ip, host port)] as configured (also when stopped)
    bindings: Mapping[str, tuple[tuple[str, int], ...]]

    @property
    def running(self) -> bool:
        return self.status in ("running", "paused", "restarting")

    def published(self, container_port: int) -> tuple[tuple[str, int], ...]:
        return self.bindings.get(f"{container_port}/tcp", ())

    @classmethod
    def from_inspect(cls, data: Mapping[str, Any]) -> ContainerState:
        state = data.get("State") or {}
        health = state.get("Health") or {}
        raw = (data.get("HostConfig") or {}).get("PortBindings") or {}
        bindings: dict[str, tuple[tuple[str, int], ...]] = {}
        for port, entries in raw.items():
            bound = []
            for entry in entries or ():
                with contextlib.suppress(TypeError, ValueError):
                    bound.append((str(entry.get("HostIp") or "0.0.0.0"), int(entry.get("HostPort") or 0)))
            bindings[str(port)] = tuple(bound)
        return cls(id=str(data.get("Id", "")), status=str(state.get("Status", "unknown")),
                   health=health.get("Status") or None, exit_code=int(state.get("ExitCode") or 0),
                   bindings=bindings)


class ComposeService:
    """A docker compose service that runs QEMU (the guide's `docker-compose` setup).

    The compose command (v1 or v2) is chosen on first use (:func:`compose_command`); the
    project is the one compose itself finds (current directory, ``COMPOSE_FILE``,
    ``COMPOSE_PROJECT_NAME``) unless FILE names the compose file.
    """

    def __init__(
        self, service: str, compose_file: str | None = None, *, runner: Runner | None = None,
        command: Sequence[str] | None = None, stop_timeout: float | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.service = service
        self.compose_file = compose_file
        self.stop_timeout = stop_timeout
        self._environ = environ
        self._run: Runner = runner or (lambda argv: proc.run(argv, timeout=300))
        self._command = tuple(command) if command is not None else None

    @property
    def name(self) -> str:
        suffix = f"@{self.compose_file}" if self.compose_file else ""
        return f"compose:{self.service}{suffix}"

    @property
    def command(self) -> tuple[str, ...]:
        if self._command is None:
            self._command = compose_command(self._environ, runner=self._run)
        return self._command

    def _argv(self, action: str, **kwargs: Any) -> list[str]:
        return compose_argv(action, self.service, self.compose_file, self.command, **kwargs)

    def container_id(self) -> str | None:
        """The service's container (running or stopped), None when compose has none."""
        ids = self._run(self._argv("container-id")).stdout.split()
        return ids[0] if ids else None

    def state(self) -> ContainerState | None:
        """The container's state, ports and health (``docker inspect``); None: no container."""
        container = self.container_id()
        return None if container is None else self.inspect(container)

    def inspect(self, container: str) -> ContainerState:
        """The state of CONTAINER (an id from :meth:`container_id`), without asking compose."""
        result = self._run(["docker", "inspect", "--type", "container", container])
        try:
            data = json.loads(result.stdout)[0]
        except (ValueError, IndexError, TypeError) as exc:
            raise MonitorError(f"docker inspect {container} answered something that is not JSON.") from exc
        return ContainerState.from_inspect(data)

    def is_running(self) -> bool:
        state = self.state()
        return state is not None and state.running

    def stop(self) -> None:
        self._run(self._argv("stop", timeout=self.stop_timeout))

    def start(self) -> None:
        self._run(self._argv("start"))


class NoController:
    """No one qsnap can drive: the VM (if any) must be stopped and started by the user."""

    @property
    def name(self) -> str:
        return "none"

    def is_running(self) -> bool:
        return False

    def _refuse(self, verb: str) -> MonitorError:
        return MonitorError(
            f"qsnap does not know how to {verb} this VM.",
            hint="start it with `qsnap vm start`, or name its compose service: --vm compose:SERVICE[@FILE]",
        )

    def stop(self) -> None:
        raise self._refuse("stop")

    def start(self) -> None:
        raise self._refuse("start")


def parse_compose(spec: str) -> tuple[str, str | None]:
    """``compose:SERVICE[@FILE]`` → (SERVICE, FILE or None)."""
    body = spec.removeprefix("compose:")
    service, _, compose_file = body.partition("@")
    if not service:
        raise UsageError(f"No service in {spec!r}.", hint="use compose:SERVICE or compose:SERVICE@FILE")
    return service, compose_file or None


def controller_for(
    image: str | os.PathLike[str],
    spec: str | None = None,
    *,
    runner: Runner | None = None,
    stop_timeout: float | None = None,
) -> Controller:
    """The controller for IMAGE's VM.

    SPEC: None or "auto" (qsnap's VM if qsnap ever started one on this image, else none),
    "qsnap", "none", or "compose:SERVICE[@FILE]". STOP_TIMEOUT: how long the VM gets to power
    down (ACPI) before it is told to quit (qsnap's VM) or killed (compose); None: 30 s for
    qsnap's VM, the compose file's ``stop_grace_period`` for a service.
    """
    image = Path(image)
    qsnap_timeout = 30.0 if stop_timeout is None else stop_timeout
    if spec is None or spec == "auto":
        if lifecycle.find_running(image) is not None or lifecycle.recorded_spec(image) is not None:
            return QsnapVM(image, stop_timeout=qsnap_timeout)
        return NoController()
    if spec == "qsnap":
        return QsnapVM(image, stop_timeout=qsnap_timeout)
    if spec == "none":
        return NoController()
    if spec.startswith("compose:"):
        service, compose_file = parse_compose(spec)
        return ComposeService(service, compose_file, runner=runner, stop_timeout=stop_timeout)
    raise UsageError(f"Unknown VM controller {spec!r}.", hint="use qsnap, none, or compose:SERVICE[@FILE]")
