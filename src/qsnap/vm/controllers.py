"""Who runs the VM, so that `restore` can stop it, change the image offline and start it again.

- :class:`QsnapVM`: the VM that ``qsnap vm start`` launched on this image (its run directory);
- :class:`ComposeService`: a docker compose service (``compose:SERVICE[@FILE]``), the guide's
  setup, driven with ``docker compose [-f FILE] stop|start SERVICE``;
- :class:`NoController`: nobody qsnap can drive; stopping explains what to configure.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from qsnap.core import proc
from qsnap.core.errors import MonitorError, UsageError
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


def compose_argv(action: str, service: str, compose_file: str | None = None) -> list[str]:
    """The ``docker compose`` command for ACTION (stop, start, is-running) on SERVICE (pure)."""
    argv = ["docker", "compose"]
    if compose_file:
        argv += ["-f", compose_file]
    if action in ("stop", "start"):
        return [*argv, action, service]
    if action == "is-running":
        return [*argv, "ps", "--status", "running", "--quiet", service]
    raise ValueError(f"unknown compose action {action!r}")


class ComposeService:
    """A docker compose service that runs QEMU (the guide's `docker-compose` setup)."""

    def __init__(self, service: str, compose_file: str | None = None, *, runner: Runner | None = None) -> None:
        self.service = service
        self.compose_file = compose_file
        self._run: Runner = runner or (lambda argv: proc.run(argv, timeout=180))

    @property
    def name(self) -> str:
        suffix = f"@{self.compose_file}" if self.compose_file else ""
        return f"compose:{self.service}{suffix}"

    def is_running(self) -> bool:
        result = self._run(compose_argv("is-running", self.service, self.compose_file))
        return bool(result.stdout.strip())

    def stop(self) -> None:
        self._run(compose_argv("stop", self.service, self.compose_file))

    def start(self) -> None:
        self._run(compose_argv("start", self.service, self.compose_file))


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
    stop_timeout: float = 30.0,
) -> Controller:
    """The controller for IMAGE's VM.

    SPEC: None or "auto" (qsnap's VM if qsnap ever started one on this image, else none),
    "qsnap", "none", or "compose:SERVICE[@FILE]". STOP_TIMEOUT: how long qsnap's VM gets
    to power down (ACPI) before it is told to quit.
    """
    image = Path(image)
    if spec is None or spec == "auto":
        if lifecycle.find_running(image) is not None or lifecycle.recorded_spec(image) is not None:
            return QsnapVM(image, stop_timeout=stop_timeout)
        return NoController()
    if spec == "qsnap":
        return QsnapVM(image, stop_timeout=stop_timeout)
    if spec == "none":
        return NoController()
    if spec.startswith("compose:"):
        service, compose_file = parse_compose(spec)
        return ComposeService(service, compose_file, runner=runner)
    raise UsageError(f"Unknown VM controller {spec!r}.", hint="use qsnap, none, or compose:SERVICE[@FILE]")
