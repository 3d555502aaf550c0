"""HMP, the human monitor, over a raw socket: framing, echo, telnet bytes, reply parsing.

What a QEMU 7.2 HMP monitor sends (captured streams are in tests/monitor/fixtures/):

- Greeting: ``QEMU 7.2.22 monitor - type 'help' for more information\\r\\n(qemu) ``; over
  telnet it is preceded by IAC negotiation (``FF FB 01 FF FB 03 FF FB 00 FF FD 00``).
- For each command, the readline editor echoes every typed byte by redrawing the whole line
  (``ESC[K`` erase, ``ESC[D`` cursor left ...), then ``\\r\\n``, then the command's output
  (lines ending ``\\r\\n``), then the prompt ``(qemu) ``. A command with no output ends with
  echo + ``\\r\\n(qemu) ``.
- We send ``\\n`` only: ``\\r\\n`` would run a second, empty command.

The monitor is a line editor: a newline, CR, backspace, DEL or ESC inside an argument would
run or edit other commands. :meth:`HmpSession.command` therefore checks every argument with
:func:`qsnap.core.names.assert_monitor_safe` right before sending (defence in depth; names are
validated earlier too). The parsers below are pure functions, tested over captured bytes.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime

from qsnap.core.errors import MonitorError
from qsnap.core.models import Snapshot
from qsnap.core.names import assert_monitor_safe
from qsnap.monitor.transport import Transport

PROMPT = b"(qemu) "
END_OF_REPLY = b"\r\n" + PROMPT
IAC = 0xFF

_VERB_RE = re.compile(r"[a-z][a-z_-]*\Z")
_ESCAPE_RE = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[@-Z\\-_]")
_FORBIDDEN_RAW = frozenset("\n\r\b\x7f\x1b\x00\t")


# ---------------------------------------------------------------- byte-level parsing (pure)

class TelnetStripper:
    """Removes telnet commands from a byte stream (RFC 854), across chunk boundaries.

    ``IAC IAC`` is a literal 0xFF; ``IAC WILL/WONT/DO/DONT x`` are triples; ``IAC SB ... IAC SE``
    is a subnegotiation; other ``IAC x`` are pairs.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._in_sb = False

    def feed(self, data: bytes) -> bytes:
        data = self._pending + data
        self._pending = b""
        out = bytearray()
        i = 0
        n = len(data)
        while i < n:
            byte = data[i]
            if self._in_sb:
                if byte == IAC and i + 1 < n and data[i + 1] == 0xF0:  # IAC SE
                    self._in_sb = False
                    i += 2
                    continue
                if byte == IAC and i + 1 >= n:
                    self._pending = data[i:]
                    break
                i += 1
                continue
            if byte != IAC:
                out.append(byte)
                i += 1
                continue
            if i + 1 >= n:
                self._pending = data[i:]
                break
            cmd = data[i + 1]
            if cmd == IAC:
                out.append(IAC)
                i += 2
            elif 0xFB <= cmd <= 0xFE:  # WILL WONT DO DONT + option
                if i + 2 >= n:
                    self._pending = data[i:]
                    break
                i += 3
            elif cmd == 0xFA:  # SB
                self._in_sb = True
                i += 2
            else:
                i += 2
        return bytes(out)


def strip_telnet(data: bytes) -> bytes:
    """Telnet commands removed from a complete byte string."""
    return TelnetStripper().feed(data)


def strip_escapes(data: bytes) -> bytes:
    """VT100/ANSI escape sequences removed."""
    return _ESCAPE_RE.sub(b"", data)


def split_reply(raw: bytes) -> tuple[bytes, str]:
    """Split one command's bytes (telnet already stripped) into (echo, output text).

    RAW runs from just after the previous prompt to the end of the next ``\\r\\n(qemu) ``.
    The echo never contains ``\\r\\n`` (we never send one), so the first ``\\r\\n`` ends it.
    """
    if not raw.endswith(END_OF_REPLY):
        raise ValueError("incomplete HMP reply")
    body = raw[: -len(PROMPT)]
    cut = body.find(b"\r\n")
    echo, output = body[:cut], body[cut + 2 :]
    text = strip_escapes(output).decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")
    return echo, text.rstrip("\n")


def parse_greeting(raw: bytes) -> str:
    """The QEMU version from an HMP greeting (telnet stripped), e.g. '7.2.22'; '' if absent."""
    match = re.search(rb"QEMU (\S+) monitor", raw)
    if not match:
        raise MonitorError(f"Unexpected HMP greeting {raw[:80]!r}: this is not a QEMU monitor.")
    return match.group(1).decode("ascii", "replace")


# ---------------------------------------------------------------- reply text parsing (pure)

ERROR_MARKERS = (
    "Error",
    "error",
    "does not exist",
    "does not support",
    "Could not",
    "could not",
    "Failed",
    "failed",
    "unknown command",
    "Invalid",
    "invalid",
    "not found",
    "No block device",
    "Device ",
)


def reply_error(text: str) -> str | None:
    """For a MUTATING command (savevm, loadvm, delvm, stop, cont): any reply text is an error.

    These commands print nothing on success in QEMU 7.2, and HMP has no error channel:
    ``Error: ...`` arrives inside a normal reply. Returns the error text or None.
    """
    text = text.strip()
    return text or None


def parse_status(text: str) -> str:
    """``info status`` → QMP-style run state: 'running', 'paused', 'prelaunch', ...

    HMP prints ``VM status: running``, ``VM status: paused`` or ``VM status: paused (REASON)``
    where REASON is the QMP run state (``prelaunch``, ``postmigrate``, ``shutdown`` ...).
    """
    match = re.search(r"VM status:\s*(\w+)(?:\s*\(([^)]*)\))?", text)
    if not match:
        raise MonitorError(f"Unexpected reply to 'info status': {text!r}.")
    state, detail = match.group(1), match.group(2)
    if state == "paused" and detail:
        return detail.strip().replace(" ", "-")
    return state


_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5, "E": 1024**6}


def parse_size(text: str) -> int:
    """A size as HMP prints it ('816 KiB', '0 B', '1.5 MiB', old '228M', '0') → bytes (rounded)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGTPE]?)(?:i?B)?\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return round(float(match.group(1)) * _UNITS[match.group(2)])


def parse_clock(text: str) -> int:
    """VM clock 'HH:MM:SS.mmm' → nanoseconds."""
    hours, minutes, seconds = text.split(":")
    whole, _, frac = seconds.partition(".")
    frac_ns = int((frac + "000000000")[:9]) if frac else 0
    return ((int(hours) * 60 + int(minutes)) * 60 + int(whole)) * 1_000_000_000 + frac_ns


_SNAPSHOT_ROW = re.compile(
    r"^(?P<id>\S+)\s+(?P<tag>.*?)\s+(?P<size>[0-9.]+\s?[KMGTPE]?(?:i?B)?)\s+"
    r"(?P<date>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})\s+(?P<clock>\d+:\d{2}:\d{2}(?:\.\d+)?)"
    r"(?:\s+(?P<icount>\d+))?\s*$"
)


def parse_snapshot_row(line: str) -> Snapshot | None:
    """One row of a snapshot table (``info snapshots`` or ``info block -v``), or None.

    The date is printed in the monitor's local time; it is read as this process's local
    time (the two agree unless QEMU runs with another TZ, e.g. in a container).
    ID ``--`` (snapshot present on all disks) becomes the empty string: unknown.
    """
    match = _SNAPSHOT_ROW.match(line.rstrip())
    if not match:
        return None
    snap_id = match.group("id")
    date = datetime.strptime(match.group("date"), "%Y-%m-%d %H:%M:%S").astimezone()
    icount = match.group("icount")
    return Snapshot(
        id="" if snap_id == "--" else snap_id,
        name=match.group("tag"),
        date=date,
        vm_state_size=parse_size(match.group("size")),
        vm_clock_ns=parse_clock(match.group("clock")),
        disk_size=None,
        icount=int(icount) if icount else None,
    )


def _is_table_header(line: str) -> bool:
    return line.startswith("ID") and "TAG" in line and "DATE" in line


def parse_info_snapshots(text: str) -> tuple[Snapshot, ...]:
    """The snapshots ``info snapshots`` lists as loadable (present on all disks).

    QEMU >= 5.x prints 'List of snapshots present on all disks:' with ID ``--`` and then,
    if any, 'List of partial (non-loadable) snapshots on 'DRIVE':' tables, which are skipped.
    Older QEMU printed a single table with real IDs. 'There is no snapshot available.' and
    'No available block device supports snapshots' mean none.
    """
    snaps: list[Snapshot] = []
    in_table = False
    for line in text.splitlines():
        if line.startswith("List of partial"):
            break
        if _is_table_header(line):
            in_table = True
            continue
        if in_table:
            snap = parse_snapshot_row(line)
            if snap is not None:
                snaps.append(snap)
    return tuple(snaps)


@dataclass(frozen=True)
class HmpBlockEntry:
    """One block device as ``info block -v`` describes it."""

    device: str
    node_name: str
    filename: str
    format: str
    read_only: bool
    virtual_size: int | None
    snapshots: tuple[Snapshot, ...]


_DEVICE_LINE = re.compile(
    r"^(?P<device>\S+)(?: \((?P<node>[^)]*)\))?: (?P<file>.*?) \((?P<fmt>[^,)]+)(?P<flags>[^)]*)\)$"
)


def parse_info_block(text: str) -> tuple[HmpBlockEntry, ...]:
    """``info block -v`` → devices with node name, file, format, size and snapshot table (real IDs).

    QEMU 7.2 layout (one paragraph per device, separated by a blank line)::

        virtio0 (#block126): /tmp/d.qcow2 (qcow2)
            Attached to:      /machine/peripheral-anon/device[0]/virtio-backend
            ...
        Images:
        image: /tmp/d.qcow2
        file format: qcow2
        virtual size: 64 MiB (67108864 bytes)
        ...
        Snapshot list:
        ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT
        4         snapB             816 KiB 2026-11-26 15:01:39 00:00:01.860
    """
    entries: list[HmpBlockEntry] = []
    current: dict[str, object] | None = None
    snaps: list[Snapshot] = []
    in_snapshots = False
    images_seen = 0  # 1 while reading the device's own image; >1 is its backing chain

    def flush() -> None:
        if current is not None:
            size = current.get("size")
            entries.append(
                HmpBlockEntry(
                    device=str(current["device"]),
                    node_name=str(current["node"]),
                    filename=str(current["file"]),
                    format=str(current["format"]),
                    read_only=bool(current["ro"]),
                    virtual_size=size if isinstance(size, int) else None,
                    snapshots=tuple(snaps),
                )
            )

    for line in text.splitlines():
        match = None if line.startswith((" ", "image:")) else _DEVICE_LINE.match(line)
        if match and not in_snapshots:
            flush()
            snaps = []
            images_seen = 0
            flags = match.group("flags") or ""
            current = {
                "device": match.group("device"),
                "node": match.group("node") or "",
                "file": match.group("file"),
                "format": match.group("fmt").strip(),
                "ro": "read-only" in flags,
            }
            continue
        if current is None:
            continue
        if line.startswith("image:"):
            images_seen += 1
            continue
        if images_seen != 1:
            continue
        if line.startswith("virtual size:"):
            exact = re.search(r"\((\d+) bytes\)", line)
            if exact:
                current["size"] = int(exact.group(1))
            continue
        if line.startswith("Snapshot list:"):
            in_snapshots = True
            continue
        if in_snapshots:
            if _is_table_header(line):
                continue
            snap = parse_snapshot_row(line)
            if snap is None:
                in_snapshots = False
            else:
                snaps.append(snap)
    flush()
    return tuple(entries)


# ---------------------------------------------------------------- session over a transport

class HmpSession:
    """Commands and replies over a transport (a socket, or a fake one in tests)."""

    def __init__(self, transport: Transport, *, timeout: float = 10.0) -> None:
        self.transport = transport
        self.timeout = timeout
        self.version = ""
        self._telnet = TelnetStripper()
        self._buffer = b""

    def _read_until_prompt(self, timeout: float, what: str) -> bytes:
        """Bytes up to and including the next ``\r\n(qemu) ``; anything after it is kept."""
        deadline = time.monotonic() + timeout
        while (end := self._buffer.find(END_OF_REPLY)) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MonitorError(
                    f"The QEMU monitor at {self.transport.description} did not finish answering "
                    f"{what} within {timeout:g} s.",
                    hint="the VM may be hung; the command may or may not have run",
                )
            try:
                chunk = self.transport.recv(remaining)
            except MonitorError as exc:
                raise MonitorError(f"{exc.message.rstrip('.')} ({what}).", hint=exc.hint) from exc
            self._buffer += self._telnet.feed(chunk)
        end += len(END_OF_REPLY)
        reply, self._buffer = self._buffer[:end], self._buffer[end:]
        return reply

    def read_greeting(self, timeout: float | None = None) -> str:
        raw = self._read_until_prompt(self.timeout if timeout is None else timeout, "greeting")
        self.version = parse_greeting(raw)
        return self.version

    def command(self, verb: str, *args: str, timeout: float | None = None) -> str:
        """Run ``VERB ARG...`` and return its output text.

        Every argument passes :func:`assert_monitor_safe` here, right before sending:
        whatever the callers checked, no control byte, quote or space reaches the editor.
        """
        if not _VERB_RE.match(verb):
            raise MonitorError(f"Refusing to send the HMP command {verb!r}: not a plain command word.")
        for arg in args:
            assert_monitor_safe(arg)
        return self._exchange(" ".join((verb, *args)), timeout)

    def raw_command(self, line: str, timeout: float | None = None) -> str:
        """A whole command line with quotes/spaces allowed (tests and diagnostics only).

        Still refuses the bytes that make the line editor run or edit other commands.
        """
        bad = sorted({c for c in line if c in _FORBIDDEN_RAW or ord(c) < 0x20 or ord(c) > 0x7E})
        if bad or not line.strip():
            raise MonitorError(f"Refusing to send {line!r} to the HMP monitor: it contains control bytes.")
        return self._exchange(line, timeout)

    def _exchange(self, line: str, timeout: float | None) -> str:
        self.transport.send(line.encode("ascii") + b"\n")
        raw = self._read_until_prompt(self.timeout if timeout is None else timeout, repr(line))
        return split_reply(raw)[1]

    def close(self) -> None:
        self.transport.close()
