"""Where the QEMU monitor listens: parsing ``--monitor`` / ``QSNAP_MONITOR`` / ``MONITOR_PORT``.

Accepted forms (QEMU's own chardev spellings, so a user can paste what they gave ``-monitor``
or ``-qmp``; options after a comma such as ``,server=on,wait=off`` are ignored):

    unix:/run/vm/qmp.sock     a unix socket (QMP or HMP)
    tcp:HOST:PORT             TCP (HMP or QMP)
    telnet:HOST:PORT          TCP speaking telnet (the guide's ``-monitor telnet:0.0.0.0:9999``)
    HOST:PORT                 same as tcp:HOST:PORT
    PORT                      same as tcp:localhost:PORT (the guide's ``MONITOR_PORT``)

IPv6 hosts are written in brackets: ``tcp:[::1]:4444``. The protocol (QMP or HMP) is not
part of the address: it is detected from the monitor's greeting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from qsnap.core.errors import UsageError

FORMS = "unix:/PATH, tcp:HOST:PORT, telnet:HOST:PORT, HOST:PORT or PORT"


@dataclass(frozen=True)
class MonitorAddress:
    """A monitor endpoint. ``kind`` is 'unix', 'tcp' or 'telnet'."""

    kind: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    source: str = "--monitor"  # where the address came from, for error messages

    @property
    def is_tcp(self) -> bool:
        return self.kind in ("tcp", "telnet")

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{self.kind}:{host}:{self.port}"


def _bad(text: str, source: str, why: str) -> UsageError:
    return UsageError(
        f"Invalid monitor address {text!r} ({source}): {why}.",
        hint=f"use one of {FORMS}",
    )


def _port(value: str, text: str, source: str) -> int:
    if not value.isdigit():
        raise _bad(text, source, f"the port {value!r} is not a number")
    port = int(value)
    if not 1 <= port <= 65535:
        raise _bad(text, source, f"the port {port} is not between 1 and 65535")
    return port


def _host_port(rest: str, text: str, source: str) -> tuple[str, int]:
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0 or rest[end + 1 : end + 2] != ":":
            raise _bad(text, source, "an IPv6 host must be written as [ADDRESS]:PORT")
        host, port = rest[1:end], rest[end + 2 :]
    else:
        host, sep, port = rest.rpartition(":")
        if not sep:
            raise _bad(text, source, "it has no port")
        if ":" in host:
            raise _bad(text, source, "write an IPv6 host in brackets, as [::1]:PORT")
    if not host:
        host = "localhost"
    return host, _port(port, text, source)


def parse_address(text: str, source: str = "--monitor") -> MonitorAddress:
    """Parse one address (see the module docstring); raise UsageError (exit 2) if bad."""
    raw = text
    text = text.strip()
    if not text:
        raise _bad(raw, source, "it is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise _bad(raw, source, "it contains control characters")
    if text.startswith("unix:"):
        path = text[len("unix:") :].split(",", 1)[0]
        if not path:
            raise _bad(raw, source, "the unix socket path is empty")
        return MonitorAddress("unix", path=path, source=source)
    if text.startswith("/"):
        return MonitorAddress("unix", path=text, source=source)
    text = text.split(",", 1)[0]
    for kind in ("tcp", "telnet"):
        if text.startswith(kind + ":"):
            host, port = _host_port(text[len(kind) + 1 :], raw, source)
            return MonitorAddress(kind, host=host, port=port, source=source)
    if text.isdigit():
        return MonitorAddress("tcp", host="localhost", port=_port(text, raw, source), source=source)
    scheme = text.split(":", 1)[0]
    if ":" in text and not scheme.replace(".", "").replace("-", "").isalnum():
        raise _bad(raw, source, f"unknown form {scheme!r}")
    if ":" not in text:
        raise _bad(raw, source, "it is neither a port number nor HOST:PORT")
    if scheme in ("udp", "file", "pipe", "stdio", "vc", "pty", "chardev", "mon"):
        raise _bad(raw, source, f"qsnap cannot reach a monitor over {scheme!r}")
    host, port = _host_port(text, raw, source)
    return MonitorAddress("tcp", host=host, port=port, source=source)


def address_from(option: str | None, environ: Mapping[str, str]) -> MonitorAddress | None:
    """The monitor to use: ``--monitor``, else ``QSNAP_MONITOR``, else the guide's ``MONITOR_PORT``.

    Returns None when none is set (the caller then works offline or looks elsewhere,
    e.g. in a ``qsnap vm start`` run directory).
    """
    if option is not None and option.strip():
        return parse_address(option, "--monitor")
    value = environ.get("QSNAP_MONITOR", "")
    if value.strip():
        return parse_address(value, "QSNAP_MONITOR")
    port = environ.get("MONITOR_PORT", "").strip()
    if port:
        return MonitorAddress(
            "tcp", host="localhost", port=_port(port, port, "MONITOR_PORT"), source="MONITOR_PORT"
        )
    return None
