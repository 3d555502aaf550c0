"""Transport: sockets to a QEMU monitor, with timeouts, and protocol detection.

Nothing here knows HMP or QMP commands. A transport moves bytes with a deadline on every
read; a monitor that stays silent or hangs up becomes a :class:`MonitorError` (exit 12),
never a hang. On TCP, ``TCP_QUICKACK`` is re-armed after every read: without it Linux
delays the ACK of the echoed command and an HMP round trip costs ~45 ms instead of ~1 ms
(see spec/QEMU-FACTS.md).
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from typing import Protocol

from qsnap.core.errors import MonitorError
from qsnap.monitor.address import MonitorAddress

DEFAULT_CONNECT_TIMEOUT = 5.0

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class Transport(Protocol):
    """What the HMP protocol layer needs: bytes out, bytes in with a deadline."""

    description: str

    def send(self, data: bytes) -> None: ...

    def recv(self, timeout: float) -> bytes:
        """Some bytes (never empty); MonitorError on timeout or when the peer hung up."""
        ...

    def close(self) -> None: ...


def open_socket(address: MonitorAddress, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> socket.socket:
    """Connect to ADDRESS within TIMEOUT seconds, or raise MonitorError."""
    try:
        if address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(address.path))
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((str(address.host), int(address.port or 0)), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except TimeoutError as exc:
        raise MonitorError(
            f"Could not connect to the QEMU monitor at {address} ({address.source}): "
            f"no answer within {timeout:g} s.",
            hint="check that the VM is running and the address is right",
        ) from exc
    except OSError as exc:
        raise MonitorError(
            f"Could not connect to the QEMU monitor at {address} ({address.source}): "
            f"{exc.strerror or exc}.",
            hint="check that the VM is running and the address is right",
        ) from exc
    return sock


def detect_protocol(first_bytes: bytes) -> str | None:
    """'qmp', 'hmp' or None from the first byte(s) a monitor sends.

    QMP greets with JSON ``{"QMP": ...}``; HMP with ``QEMU x.y.z monitor - ...``; the telnet
    variant of HMP starts with IAC (0xFF) negotiation.
    """
    data = first_bytes.lstrip(b" \t\r\n")
    if not data:
        return None
    if data[:1] == b"{":
        return "qmp"
    if data[:1] in (b"\xff", b"Q"):
        return "hmp"
    return None


def peek_protocol(sock: socket.socket, address: MonitorAddress, timeout: float) -> str:
    """Wait for the greeting's first byte without consuming it; return 'qmp' or 'hmp'."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MonitorError(
                f"The QEMU monitor at {address} accepted the connection but sent no greeting "
                f"within {timeout:g} s.",
                hint="another client may hold the monitor (QEMU serves one at a time), or the "
                "address is not a QEMU monitor",
            )
        sock.settimeout(remaining)
        try:
            data = sock.recv(64, socket.MSG_PEEK)
        except TimeoutError:
            continue
        except OSError as exc:
            raise MonitorError(f"The QEMU monitor at {address} failed while greeting: {exc}.") from exc
        if not data:
            raise MonitorError(
                f"The QEMU monitor at {address} closed the connection before greeting.",
                hint="another client may hold the monitor (QEMU serves one at a time)",
            )
        stripped = data.lstrip(b" \t\r\n")
        if not stripped:
            sock.recv(len(data))  # leading blank bytes: consume and look again
            continue
        protocol = detect_protocol(stripped)
        if protocol is None:
            raise MonitorError(
                f"{address} does not look like a QEMU monitor: it greeted with {data[:40]!r}."
            )
        return protocol


class SocketTransport:
    """A connected monitor socket with per-read deadlines (used by the HMP protocol)."""

    def __init__(self, sock: socket.socket, address: MonitorAddress) -> None:
        self.sock = sock
        self.address = address
        self.description = str(address)
        self._tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self._closed = False

    def send(self, data: bytes) -> None:
        if self._closed:
            raise MonitorError(f"The connection to the QEMU monitor at {self.description} is closed.")
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise MonitorError(
                f"The QEMU monitor at {self.description} went away while qsnap was sending a command: {exc}."
            ) from exc

    def recv(self, timeout: float) -> bytes:
        if self._closed:
            raise MonitorError(f"The connection to the QEMU monitor at {self.description} is closed.")
        try:
            ready, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
            if not ready:
                raise MonitorError(
                    f"The QEMU monitor at {self.description} did not answer within {timeout:g} s.",
                    hint="the VM may be hung; the command may or may not have run",
                )
            data = self.sock.recv(65536)
        except OSError as exc:
            raise MonitorError(
                f"The QEMU monitor at {self.description} failed while answering: {exc}."
            ) from exc
        if not data:
            raise MonitorError(
                f"The QEMU monitor at {self.description} closed the connection before answering.",
                hint="QEMU may have exited; the command may or may not have run",
            )
        if self._tcp and _QUICKACK is not None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return data

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self.sock.close()
