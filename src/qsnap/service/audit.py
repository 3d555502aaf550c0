"""The append-only audit log: one JSON line per mutating operation.

Each record is written with a single ``write`` on an ``O_APPEND`` descriptor, then fsynced, so
concurrent writers never interleave inside a line. The file is created with mode 0600.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def audit_path(image: Path) -> Path:
    return image.with_name(image.name + ".qsnap-audit.log")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


def append(image: Path, record: dict[str, Any]) -> None:
    line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
    fd = os.open(audit_path(image), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Operation:
    """A mutating operation being recorded; set ``engine``/``snapshot``/``details`` as known."""

    operation: str
    image: Path
    snapshot: str | None = None
    engine: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def recorded(image: Path, operation: str, snapshot: str | None = None) -> Iterator[Operation]:
    """Record the operation run in the block, whatever its outcome."""
    op = Operation(operation, image, snapshot)
    started = time.monotonic()
    error: str | None = None
    result = "ok"
    try:
        yield op
    except BaseException as exc:
        result = "interrupted" if isinstance(exc, KeyboardInterrupt) else "error"
        error = str(exc) or type(exc).__name__
        raise
    finally:
        record = {
            "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "user": _user(),
            "host": socket.gethostname(),
            "operation": op.operation,
            "image": str(op.image),
            "snapshot": op.snapshot,
            "engine": op.engine,
            "result": result,
            "duration_s": round(time.monotonic() - started, 4),
            "error": error,
            **op.details,
        }
        with contextlib.suppress(OSError):
            append(image, record)


def read(image: Path) -> list[dict[str, Any]]:
    path = audit_path(image)
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
    except FileNotFoundError:
        return []
    return records
