"""Read-only questions answered from qcow2 metadata: space per snapshot, and what changed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from qsnap.core.models import Snapshot
from qsnap.core.names import resolve_snapshot, validate_lookup_name
from qsnap.service.image import check_image_file

if TYPE_CHECKING:
    from qsnap.service.diff import DiffReport
    from qsnap.service.space import SpaceReport

CURRENT = "@current"


def space(image: str | os.PathLike[str]) -> SpaceReport:
    """Bytes each snapshot alone holds (what deleting it frees), shared bytes, leaks."""
    from qsnap.service.space import account

    return account(check_image_file(Path(image).absolute()))


def _pick(snapshots: tuple[Snapshot, ...], name: str, snapshot_id: str | None) -> Snapshot | None:
    if name == CURRENT and snapshot_id is None:
        return None
    if snapshot_id is None:
        validate_lookup_name(name)
    return resolve_snapshot(snapshots, name if snapshot_id is None else None, snapshot_id)


def diff(
    image: str | os.PathLike[str],
    a: str,
    b: str,
    *,
    a_id: str | None = None,
    b_id: str | None = None,
) -> DiffReport:
    """Changed guest ranges between snapshots A and B (``@current``: the current state)."""
    from qsnap.qcow2 import open_image
    from qsnap.service.diff import diff_image

    path = check_image_file(Path(image).absolute())
    with open_image(path) as reader:
        snapshots = reader.snapshots()
        first = _pick(snapshots, a, a_id)
        second = _pick(snapshots, b, b_id)
        return diff_image(reader, first, second)
