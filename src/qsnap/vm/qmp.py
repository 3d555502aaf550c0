"""A small QMP session for the VM lifecycle (start/stop/status) on qsnap's own unix socket.

Snapshot operations go through :mod:`qsnap.monitor`; this module only needs a handful of
commands (query-status, query-kvm, system_powerdown, quit), so it uses
``qemu.qmp.legacy.QEMUMonitorProtocol`` directly, imported lazily.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qsnap.core.errors import MonitorError


def greeting_ready(path: Path, timeout: float) -> bool:
    """Whether the QMP socket at PATH accepts a connection and sends its greeting within
    TIMEOUT seconds. (The library's own connect has no timeout: a QEMU that is still
    loading a VM state accepts but does not greet yet.)"""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(max(timeout, 0.001))
            sock.connect(str(path))
            data = b""
            while b"\n" not in data:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                data += chunk
            return data.lstrip().startswith(b'{"QMP"')
    except OSError:
        return False


@contextlib.contextmanager
def qmp_session(path: Path, timeout: float = 10.0) -> Iterator[Any]:
    """A negotiated QMP connection to PATH; every command has TIMEOUT seconds."""
    if not greeting_ready(path, timeout):
        raise MonitorError(
            f"The QMP monitor at {path} did not answer within {timeout:g} s.",
            hint="is the VM still running? see `qsnap vm status`",
        )
    from qemu.qmp.legacy import QEMUMonitorProtocol

    qmp = QEMUMonitorProtocol(str(path))
    try:
        qmp.connect()
        qmp.settimeout(timeout)
    except Exception as exc:
        qmp.close()
        raise MonitorError(f"Could not connect to the QMP monitor at {path}: {exc}") from exc
    try:
        yield qmp
    finally:
        with contextlib.suppress(Exception):
            qmp.close()


def command(qmp: Any, name: str, **arguments: object) -> Any:
    """Run one QMP command; QEMU's refusal or a lost connection becomes MonitorError."""
    try:
        return qmp.cmd(name, **arguments)
    except Exception as exc:
        raise MonitorError(f"QMP command {name} failed: {exc}") from exc
