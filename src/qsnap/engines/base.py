"""What the service layer needs from an engine (qemu-img offline, a monitor online)."""

from __future__ import annotations

from typing import Protocol

from qsnap.core.models import Snapshot


class Engine(Protocol):
    @property
    def name(self) -> str:
        """"qemu-img", "qmp" or "hmp": printed so users know which path was taken."""
        ...

    def list_snapshots(self) -> tuple[Snapshot, ...]: ...

    def create(self, name: str) -> object: ...

    def apply(self, snapshot: Snapshot) -> None: ...

    def delete(self, snapshot: Snapshot) -> None: ...
