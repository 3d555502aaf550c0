"""A small QMP session for the VM lifecycle (start/stop/status) on qsnap's own unix socket.

Snapshot operations go through :mod:`qsnap.monitor`; this module only needs a handful of
commands (query-status, query-kvm, system_powerdown, quit). It drives ``qemu.qmp.QMPClient``
(imported lazily) with a timeout on every step.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qsnap.core.errors import MonitorError


def _lines(sock: socket.socket, deadline: float) -> Iterator[bytes]:
    buffer = b""
    while True:
        while b"\n" in buffer:
            line, _, buffer = buffer.partition(b"\n")
            yield line
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(4096)
        if not chunk:
            return
        buffer += chunk


def _is_reply(line: bytes, reply_id: int) -> bool:
    try:
        message = json.loads(line)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("id") == reply_id and "return" in message


def greeting_ready(path: Path, timeout: float, *, main_loop: bool = False) -> bool:
    """Whether the QMP socket at PATH accepts a connection and greets within TIMEOUT s.

    The library's own connect has no timeout. QMP greets from its own I/O thread, even while
    QEMU is still loading a ``-loadvm`` state (and may yet fail); with MAIN_LOOP a
    ``query-status`` must also be answered, which only QEMU's main loop does.
    """
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(max(timeout, 0.001))
            sock.connect(str(path))
            lines = _lines(sock, deadline)
            if not next(lines, b"").lstrip().startswith(b'{"QMP"'):
                return False
            if not main_loop:
                return True
            sock.sendall(b'{"execute": "qmp_capabilities", "id": 1}\n{"execute": "query-status", "id": 2}\n')
            return any(_is_reply(line, 2) for line in lines)
    except OSError:
        return False


class QMPSession:
    """A synchronous face over ``qemu.qmp.QMPClient`` where every step has a timeout.

    (``qemu.qmp.legacy.QEMUMonitorProtocol.connect`` waits for the greeting with no
    timeout: a frozen QEMU would hang `qsnap vm stop` forever.)
    """

    def __init__(self, path: Path, timeout: float) -> None:
        import asyncio

        from qemu.qmp import QMPClient

        self.path = path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("qsnap-vm")

    def _wait(self, awaitable: Any) -> Any:
        import asyncio

        return self._loop.run_until_complete(asyncio.wait_for(awaitable, self.timeout))

    def connect(self) -> None:
        self._wait(self._client.connect(str(self.path)))

    def cmd(self, name: str, **arguments: object) -> Any:
        return self._wait(self._client.execute(name, arguments or None))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._wait(self._client.disconnect())
        self._loop.close()


@contextlib.contextmanager
def qmp_session(path: Path, timeout: float = 10.0) -> Iterator[QMPSession]:
    """A negotiated QMP connection to PATH; connecting and every command get TIMEOUT s."""
    session = QMPSession(path, timeout)
    try:
        session.connect()
    except Exception as exc:
        session.close()
        reason = "did not answer in time" if isinstance(exc, TimeoutError) else f"refused: {exc}"
        raise MonitorError(
            f"The QMP monitor at {path} {reason}.",
            hint="is the VM still running? see `qsnap vm status`",
        ) from exc
    try:
        yield session
    finally:
        session.close()


def command(qmp: QMPSession, name: str, **arguments: object) -> Any:
    """Run one QMP command; QEMU's refusal, a timeout or a lost connection → MonitorError."""
    try:
        return qmp.cmd(name, **arguments)
    except TimeoutError as exc:
        raise MonitorError(f"QMP command {name} got no answer within {qmp.timeout:g} s.") from exc
    except Exception as exc:
        raise MonitorError(f"QMP command {name} failed: {exc}") from exc
