"""The sidecar ``<image>.qsnap.json``: what qcow2 cannot hold about its snapshots.

Per snapshot (matched by ID *and* name *and* date, since QEMU reuses IDs): description,
parent (the snapshot the image was at when this one was taken), creator (user, host, command),
whether the guest was synced, and whether it is a safety snapshot. Plus ``current``: the
snapshot the image was last created from or restored to. Entries whose snapshot is gone are
dropped on the next write. Written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qsnap.core.fsutil import atomic_write_bytes
from qsnap.core.models import Snapshot

FORMAT_VERSION = 1


def sidecar_path(image: Path) -> Path:
    return image.with_name(image.name + ".qsnap.json")


def key_of(snapshot: Snapshot) -> str:
    """A key that survives ID reuse: id, name and creation time (whole seconds: HMP's text
    listing has no sub-second dates) together."""
    return f"{snapshot.id}|{snapshot.name}|{int(snapshot.date.timestamp())}"


class Sidecar:
    """The sidecar's content (a plain class, not a dataclass: `qsnap list` loads it at start-up)."""

    def __init__(
        self, path: Path, entries: dict[str, dict[str, Any]] | None = None, current: str | None = None
    ) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = entries if entries is not None else {}
        self.current = current

    @classmethod
    def load(cls, image: Path) -> Sidecar:
        path = sidecar_path(image)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            return cls(path)
        except (OSError, ValueError):
            # A damaged sidecar must never block snapshot work; it only loses annotations.
            return cls(path)
        entries = {}
        for entry in data.get("snapshots", []):
            if isinstance(entry, dict) and "key" in entry:
                entries[str(entry["key"])] = {k: v for k, v in entry.items() if k != "key"}
        current = data.get("current")
        return cls(path, entries, current if isinstance(current, str) else None)

    def get(self, snapshot: Snapshot) -> dict[str, Any]:
        return self.entries.get(key_of(snapshot), {})

    def description(self, snapshot: Snapshot) -> str | None:
        value = self.get(snapshot).get("description")
        return value if isinstance(value, str) else None

    def update(self, snapshot: Snapshot, **fields: Any) -> None:
        entry = self.entries.setdefault(key_of(snapshot), {})
        entry.update({"id": snapshot.id, "name": snapshot.name})
        for name, value in fields.items():
            if value is None:
                entry.pop(name, None)
            else:
                entry[name] = value

    def current_snapshot(self, snapshots: Iterable[Snapshot]) -> Snapshot | None:
        for snap in snapshots:
            if key_of(snap) == self.current:
                return snap
        return None

    def save(self, snapshots: Iterable[Snapshot]) -> None:
        live = {key_of(s) for s in snapshots}
        kept = [{"key": k, **v} for k, v in self.entries.items() if k in live]
        current = self.current if self.current in live else None
        payload = {"format": "qsnap-sidecar", "version": FORMAT_VERSION, "current": current,
                   "snapshots": kept}
        atomic_write_bytes(self.path, (json.dumps(payload, indent=2) + "\n").encode(), mode=0o600)
