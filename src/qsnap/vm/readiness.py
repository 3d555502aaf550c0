"""`qsnap vm wait`: wait until the guest is ready instead of the guide's ``sleep 120``.

What "ready" means, checked every fraction of a second until a deadline:

- :class:`SSHBanner`: the guest's SSH server greets with ``SSH-`` on the forwarded port. A
  successful connect alone proves nothing: QEMU's user-mode port forward (and docker's proxy in
  front of it) accept connections even while no SSH server runs in the guest, then hang up.
- :class:`SerialLog`: a regular expression appears in the serial console's log file (QEMU
  writes it even when no client is connected: nothing printed before the wait is missed).
- :class:`SerialPort`: the same, read from the telnet serial console (only what is printed
  after the wait connected: prefer the log file or a container's healthcheck).
- :class:`ContainerHealthy`: the compose service's container reports ``healthy`` (its
  healthcheck runs ``qsnap vm wait`` inside the container, on the full serial log or SSH).

A VM that stops while being waited for (the QEMU process is gone, the container exited) fails
at once instead of at the deadline.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qsnap.core.errors import MonitorError

#: How much of a serial stream is kept for matching (a pattern spanning more is not found).
SERIAL_WINDOW = 256 * 1024


class NotReady(MonitorError):
    """The VM was not ready in time, or stopped while qsnap waited for it."""


class Probe(Protocol):
    """One readiness condition."""

    @property
    def description(self) -> str: ...

    def ready(self) -> bool: ...

    def evidence(self) -> str:
        """What was last seen (for the timeout message)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class WaitResult:
    ready: bool
    how: str  # what was waited for
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"ready": self.ready, "how": self.how, "seconds": round(self.seconds, 3)}


class SSHBanner:
    """Ready when HOST:PORT answers with an SSH version banner (RFC 4253 §4.2)."""

    def __init__(self, host: str, port: int, *, connect_timeout: float = 1.0, read_timeout: float = 2.0) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._last = "nothing tried yet"

    @property
    def description(self) -> str:
        return f"an SSH banner on {self.host}:{self.port}"

    def ready(self) -> bool:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            self._last = f"connecting failed: {exc.strerror or exc}"
            return False
        data = b""
        with sock:
            sock.settimeout(self.read_timeout)
            try:
                while b"\n" not in data and len(data) < 256:
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    data += chunk
            except TimeoutError:
                if not data:
                    self._last = f"the port accepted but sent no banner within {self.read_timeout:g} s"
                    return False
            except OSError as exc:
                self._last = f"reading failed: {exc.strerror or exc}"
                return False
        if data.startswith(b"SSH-"):
            self._last = data.split(b"\n", 1)[0].decode(errors="replace").strip()
            return True
        self._last = ("the port accepted and hung up without a banner (no SSH server in the guest yet)"
                      if not data else f"the port answered {data[:40]!r}, not an SSH banner")
        return False

    def evidence(self) -> str:
        return self._last

    def close(self) -> None:
        pass


class SerialLog:
    """Ready when PATTERN (a regular expression) appears in the serial log file PATH."""

    def __init__(self, path: Path, pattern: str) -> None:
        self.path = Path(path)
        self.pattern = pattern
        self._regex = re.compile(pattern)
        self._offset = 0
        self._text = ""

    @property
    def description(self) -> str:
        return f"{self.pattern!r} in the serial log {self.path}"

    def ready(self) -> bool:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return False
        if data:
            self._offset += len(data)
            self._text = (self._text + data.decode(errors="replace"))[-SERIAL_WINDOW:]
        return self._regex.search(self._text) is not None

    def evidence(self) -> str:
        tail = self._text[-300:].strip()
        return f"the log ends with {tail!r}" if tail else "the log is empty or missing"

    def close(self) -> None:
        pass


class SerialPort:
    """Ready when PATTERN appears on the telnet serial console HOST:PORT (reconnects as needed)."""

    def __init__(self, host: str, port: int, pattern: str) -> None:
        from qsnap.vm.console import _TelnetFilter

        self.host = host
        self.port = port
        self.pattern = pattern
        self._regex = re.compile(pattern)
        self._sock: socket.socket | None = None
        self._filter = _TelnetFilter()
        self._text = ""
        self._last = "nothing tried yet"

    @property
    def description(self) -> str:
        return f"{self.pattern!r} on the serial console {self.host}:{self.port}"

    def ready(self) -> bool:
        if self._sock is None:
            try:
                self._sock = socket.create_connection((self.host, self.port), timeout=1.0)
            except OSError as exc:
                self._last = f"connecting failed: {exc.strerror or exc}"
                return False
            self._sock.settimeout(0.2)
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    self._last = "the console hung up"
                    self.close()
                    break
                self._text = (self._text + self._filter.feed(data).decode(errors="replace"))[-SERIAL_WINDOW:]
        except TimeoutError:
            pass
        except OSError as exc:
            self._last = f"reading failed: {exc.strerror or exc}"
            self.close()
        return self._regex.search(self._text) is not None

    def evidence(self) -> str:
        tail = self._text[-300:].strip()
        return f"the console printed {tail!r}" if tail else self._last

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class ContainerHealthy:
    """Ready when the compose service's container is healthy (or, without a healthcheck, runs)."""

    def __init__(self, service: Any) -> None:
        self.service = service  # a qsnap.vm.ComposeService
        self._last = "not asked yet"
        self._container: str | None = None
        self.stopped: str | None = None  # why the container cannot become ready

    @property
    def description(self) -> str:
        return f"the container of {self.service.name} to be healthy"

    def ready(self) -> bool:
        # compose is asked once for the container (a Python program: slow to start); each poll
        # after that is one `docker inspect`.
        if self._container is None:
            self._container = self.service.container_id()
        state = None if self._container is None else self.service.inspect(self._container)
        if state is None:
            self._last = "compose has no container for the service (docker-compose up -d first)"
            self.stopped = self._last
            return False
        if not state.running:
            self._last = f"the container is {state.status} (exit code {state.exit_code})"
            self.stopped = self._last
            return False
        self._last = f"the container runs, health: {state.health or 'no healthcheck'}"
        return state.health in (None, "healthy")

    def evidence(self) -> str:
        return self._last

    def close(self) -> None:
        pass


def wait_ready(
    probes: Sequence[Probe],
    *,
    timeout: float,
    alive: Callable[[], str | None] | None = None,
    interval: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
) -> WaitResult:
    """Wait until every probe is ready (in order); raise :class:`NotReady` at the deadline, or
    at once when ALIVE returns why the VM is gone."""
    start = clock()
    deadline = start + timeout
    how = " and ".join(p.description for p in probes)
    pending = list(probes)
    try:
        while True:
            while pending and pending[0].ready():
                pending.pop(0)
            if not pending:
                return WaitResult(True, how, clock() - start)
            gone = alive() if alive is not None else None
            if gone is None:
                gone = getattr(pending[0], "stopped", None)
            if gone is not None:
                raise NotReady(f"The VM stopped while qsnap waited for {pending[0].description}: {gone}.",
                               hint="look at its console or `docker-compose logs`")
            if clock() >= deadline:
                raise NotReady(
                    f"The VM was not ready after {timeout:g} s: waited for {pending[0].description} "
                    f"(last: {pending[0].evidence()}).",
                    hint="wait longer with --timeout, or check the guest on its serial console",
                )
            time.sleep(interval)
    finally:
        for probe in probes:
            probe.close()
