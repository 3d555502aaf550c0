"""Per-run settings every use case takes (its own module: routing, history and the use cases all need it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Context:
    """How to reach the VM that may hold the image, and other per-run settings."""

    monitor: str | None = None  # monitor address (--monitor, QSNAP_MONITOR, MONITOR_PORT)
    vm: str | None = None  # VM controller spec (--vm)
    lock_timeout: float | None = None
    environ: Mapping[str, str] | None = None
    command: str | None = None  # the command line, recorded as the creator

    def env(self) -> Mapping[str, str]:
        return os.environ if self.environ is None else self.environ


DEFAULT_CONTEXT = Context()
