"""Run a shell command on a guest's serial console and get its exit status and output.

For guests whose serial console runs a POSIX shell as root (the test guest; a Hurd or Linux
console logged in), e.g. to ``sync`` before a snapshot. The console is QEMU's serial
chardev: a unix socket (raw) or the guide's telnet port 5555 (telnet negotiation bytes are
stripped). Three traps shape the driver (spec/TEST-GUEST.md):

- the shell echoes what is typed (and sends ``ESC[6n`` with each prompt), so the command is
  wrapped in begin/end markers printed by ``printf`` from split strings: the echo shows
  ``QSNAP_END 1a2b`` while the output shows ``QSNAP_END_1a2b``, which the echo never matches;
- everything is sent as ONE line, so no typed-ahead input is echoed into the output;
- closing the socket with input still queued truncates the line (the guest would run a
  fragment), so the socket stays open until the end marker has been read.
"""

from __future__ import annotations

import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qsnap.core.errors import MonitorError

IAC = 0xFF


class ConsoleError(MonitorError):
    """The guest's serial console did not answer as expected."""


@dataclass(frozen=True)
class CommandResult:
    command: str
    status: int
    output: str  # \r\n normalized to \n; a final newline printed by the command is kept

    @property
    def ok(self) -> bool:
        return self.status == 0


class _TelnetFilter:
    """Removes telnet negotiation (IAC WILL/WONT/DO/DONT x, IAC SB ... IAC SE) from a stream."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        data = self._pending + data
        self._pending = b""
        out = bytearray()
        i = 0
        while i < len(data):
            byte = data[i]
            if byte != IAC:
                out.append(byte)
                i += 1
                continue
            if i + 1 >= len(data):
                self._pending = data[i:]
                break
            verb = data[i + 1]
            if verb == IAC:  # an escaped 0xff data byte
                out.append(IAC)
                i += 2
            elif verb in (0xFB, 0xFC, 0xFD, 0xFE):  # WILL WONT DO DONT + option
                if i + 2 >= len(data):
                    self._pending = data[i:]
                    break
                i += 3
            elif verb == 0xFA:  # SB ... IAC SE
                end = data.find(bytes([IAC, 0xF0]), i + 2)
                if end == -1:
                    self._pending = data[i:]
                    break
                i = end + 2
            else:
                i += 2
        return bytes(out)


class SerialConsole:
    """One connection to a guest's serial console.

    ADDRESS: a unix socket path, or ``(host, port)`` of QEMU's telnet serial port.
    """

    def __init__(self, address: Path | str | tuple[str, int], *, connect_timeout: float = 30.0) -> None:
        self.address = address
        self.transcript = bytearray()  # everything received, for error messages
        self._buffer = bytearray()
        self._telnet = _TelnetFilter() if isinstance(address, tuple) else None
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._sock = self._connect(address, max(deadline - time.monotonic(), 0.1))
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ConsoleError(f"Cannot connect to the serial console {address}: {exc}.") from exc
                time.sleep(0.05)

    @staticmethod
    def _connect(address: Path | str | tuple[str, int], timeout: float) -> socket.socket:
        if isinstance(address, tuple):
            return socket.create_connection(address, timeout=timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(address))
        except OSError:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SerialConsole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tail(self, size: int = 2000) -> str:
        """The last SIZE bytes the console printed (for error messages)."""
        return bytes(self.transcript[-size:]).decode(errors="replace")

    def _accept(self, chunk: bytes) -> None:
        if self._telnet is not None:
            chunk = self._telnet.feed(chunk)
        self._buffer += chunk
        self.transcript += chunk

    def _receive(self, deadline: float) -> bool:
        """Read what arrives before DEADLINE; False when the deadline passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError:
            return False
        if not chunk:
            raise ConsoleError(f"The serial console closed (QEMU exited?); it printed:\n{self.tail()}")
        self._accept(chunk)
        return True

    def drain(self) -> None:
        """Drop whatever the guest printed so far (prompts, old output)."""
        self._sock.settimeout(0)
        try:
            while chunk := self._sock.recv(65536):
                self._accept(chunk)
        except (BlockingIOError, TimeoutError):
            pass
        self._buffer.clear()

    def run(self, command: str, *, timeout: float = 60.0) -> CommandResult:
        """Run COMMAND (one line of shell) in the guest and wait until it has finished."""
        if "\n" in command or "\r" in command:
            raise ValueError("one line of shell only (join commands with ';')")
        nonce = secrets.token_hex(6)
        begin = f"QSNAP_BEGIN_{nonce}".encode()
        end = re.compile(rb"\r?\nQSNAP_END_" + nonce.encode() + rb" (\d+)\r?\n")
        line = f"printf '%s_%s\\n' QSNAP_BEGIN {nonce}; {command} ; printf '\\n%s_%s %d\\n' QSNAP_END {nonce} $?\n"
        self.drain()
        self._sock.settimeout(timeout)
        self._sock.sendall(line.encode())
        deadline = time.monotonic() + timeout
        while True:
            data = bytes(self._buffer)
            start = data.find(begin)
            if start != -1:
                found = end.search(data, start + len(begin))
                if found:
                    body = data[start + len(begin) : found.start()]
                    body = body.removeprefix(b"\r\n").removeprefix(b"\n")
                    del self._buffer[: found.end()]
                    output = body.decode(errors="replace").replace("\r\n", "\n")
                    return CommandResult(command, int(found.group(1)), output)
            if not self._receive(deadline):
                raise ConsoleError(
                    f"Guest command {command!r} did not finish within {timeout:g} s; the console shows:\n{self.tail()}"
                )

    def check(self, command: str, *, timeout: float = 60.0) -> str:
        """Run COMMAND and return its output; a non-zero exit status raises ConsoleError."""
        result = self.run(command, timeout=timeout)
        if not result.ok:
            raise ConsoleError(f"Guest command {command!r} exited {result.status}:\n{result.output}")
        return result.output


def wait_for_text(log: Path, text: str, *, timeout: float, alive: Callable[[], bool] | None = None) -> None:
    """Wait until the serial LOG file contains TEXT (QEMU logs output even with no client).

    ALIVE, if given, returns False once QEMU is gone: then fail at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            content = log.read_text(errors="replace")
        except FileNotFoundError:
            content = ""
        if text in content:
            return
        if alive is not None and not alive():
            raise ConsoleError(f"QEMU exited before the guest printed {text!r}; serial log:\n{content[-2000:]}")
        if time.monotonic() > deadline:
            raise ConsoleError(f"The guest did not print {text!r} within {timeout:g} s; serial log:\n{content[-2000:]}")
        time.sleep(0.05)
