"""Snapshot names: the rule every name must pass, and name → snapshot resolution.

QEMU looks a name up as an *ID first* (`qemu-img snapshot -a 1`, `loadvm 1`), accepts
duplicate names, and its HMP monitor is a line editor where control bytes in a name run
other commands (see spec/QEMU-FACTS.md). So qsnap allows only a conservative alphabet,
refuses all-digit names, and resolves a name to exactly one snapshot itself before
anything reaches QEMU.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from qsnap.core.errors import AmbiguousSnapshot, InvalidName, SnapshotNotFound
from qsnap.core.models import Snapshot

MAX_NAME_LENGTH = 128
NAME_RULE = (
    "1-128 characters from letters, digits and . _ - + : @, starting with a letter, "
    "digit or underscore, and not all digits"
)
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+:@-]{0,127}\Z")
_DIGITS_RE = re.compile(r"[0-9]+\Z")
_FIRST_RE = re.compile(r"[A-Za-z0-9_]\Z")
_ALLOWED_RE = re.compile(r"[A-Za-z0-9._+:@-]\Z")


def describe_bad_name(name: str) -> str | None:
    """Why NAME breaks the rule, or None when it is valid."""
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"it is {len(name)} characters long"
    if _DIGITS_RE.match(name):
        return "it is all digits, which QEMU would read as a snapshot ID"
    if not _NAME_RE.match(name):
        if not _FIRST_RE.match(name[0]):
            return f"it starts with {name[0]!r}"
        bad = next(c for c in name if not _ALLOWED_RE.match(c))
        return f"it contains {bad!r}"
    return None


def validate_lookup_name(name: str) -> str:
    """Check a name used to *find* an existing snapshot (restore, delete, backup).

    The same rule as :func:`validate_name`, except that all-digit names are allowed: other
    tools may have made them, and resolution then refuses them as ambiguous when they clash
    with an ID (exit 5) instead of calling them invalid.
    """
    reason = describe_bad_name(name)
    if reason is not None and not _DIGITS_RE.match(name):
        raise InvalidName(f"Invalid snapshot name {name!r}: {reason}; a name must be {NAME_RULE}.")
    if reason is not None and len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"Invalid snapshot name {name!r}: {reason}; a name must be {NAME_RULE}.")
    return name


def is_valid_name(name: str) -> bool:
    return describe_bad_name(name) is None


def validate_name(name: str) -> str:
    """Return NAME if it passes the rule, else raise InvalidName (exit 6)."""
    reason = describe_bad_name(name)
    if reason is not None:
        raise InvalidName(f"Invalid snapshot name {name!r}: {reason}; a name must be {NAME_RULE}.")
    return name


def assert_monitor_safe(text: str) -> str:
    """Last check before a name is written to a raw HMP line editor.

    Independent of :func:`validate_name` on purpose (defence in depth): only printable
    ASCII without quotes, backslashes or whitespace may ever reach the monitor.
    """
    if not text or any(not (0x21 <= ord(c) <= 0x7E) or c in "\"'\\" for c in text):
        raise InvalidName(f"Refusing to send {text!r} to the QEMU monitor: it contains unsafe characters.")
    return text


def resolve_snapshot(
    snapshots: Sequence[Snapshot], name: str | None = None, snapshot_id: str | None = None
) -> Snapshot:
    """Find the one snapshot NAME (or ID) means, or raise.

    - ``snapshot_id`` selects by ID exactly (and, if ``name`` is given too, checks it).
    - Otherwise NAME must match exactly one snapshot's name, and no *other* snapshot may
      have NAME as its ID (QEMU would pick that one).
    """
    if snapshot_id is not None:
        for snap in snapshots:
            if snap.id == snapshot_id:
                if name is not None and snap.name != name:
                    raise SnapshotNotFound(
                        f"Snapshot ID {snapshot_id} is named {snap.name!r}, not {name!r}."
                    )
                return snap
        raise SnapshotNotFound(f"No snapshot with ID {snapshot_id}.", hint="see 'qsnap list'")
    if name is None:
        raise SnapshotNotFound("No snapshot name given.")
    by_name = [s for s in snapshots if s.name == name]
    by_id = [s for s in snapshots if s.id == name and s.name != name]
    candidates = by_name + by_id
    if not candidates:
        raise SnapshotNotFound(f"Snapshot {name!r} not found.", hint="see 'qsnap list' for the names")
    if len(candidates) > 1:
        listing = ", ".join(f"ID {s.id} {s.name!r} ({s.date_iso})" for s in candidates)
        raise AmbiguousSnapshot(
            f"{len(candidates)} snapshots match {name!r}: {listing}.",
            hint="choose one with --id N",
        )
    if not by_name:
        # Only an ID matched; valid qsnap names are never all digits, so this is a
        # name that QEMU would read as an ID. Refuse: the user should say --id.
        raise SnapshotNotFound(
            f"Snapshot {name!r} not found.", hint=f"to select by ID use --id {name}"
        )
    return by_name[0]


def find_by_name(snapshots: Iterable[Snapshot], name: str) -> list[Snapshot]:
    return [s for s in snapshots if s.name == name]
