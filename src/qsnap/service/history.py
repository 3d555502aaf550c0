"""Snapshot history: the parent tree, the current position, descriptions, name placeholders.

The tree comes from the sidecar's parent links (the snapshot the image was at when each one
was taken: the last one created or restored) laid over the live snapshot list, which stays
the source of truth. A snapshot with no sidecar entry was made outside qsnap: it is a root
marked "unknown parent". A snapshot whose parent was deleted is a root marked "parent
deleted" (qsnap's own deletes re-attach children to the nearest surviving ancestor, see
:func:`reparent_children`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from qsnap.core.errors import UsageError
from qsnap.core.models import Snapshot
from qsnap.core.names import resolve_snapshot, validate_name
from qsnap.service.sidecar import Sidecar, key_of

#: Why a node is a root.
ROOT_FIRST = "first"  # taken by qsnap when no current position was known
ROOT_UNKNOWN = "unknown parent"  # made outside qsnap (no sidecar entry)
ROOT_PARENT_DELETED = "parent deleted"


@dataclass
class TreeNode:
    snapshot: Snapshot
    key: str
    description: str | None = None
    parent: str | None = None  # key of the parent node, None for a root
    root_reason: str | None = None  # set on roots: ROOT_FIRST, ROOT_UNKNOWN, ROOT_PARENT_DELETED
    safety: bool = False
    synced: bool | None = None
    created_by: dict[str, Any] | None = None
    current: bool = False
    children: list[TreeNode] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**self.snapshot.to_json(), "key": self.key, "description": self.description,
                "parent": self.parent, "root_reason": self.root_reason, "safety": self.safety,
                "synced": self.synced, "created_by": self.created_by, "current": self.current,
                "children": [c.to_json() for c in self.children]}


@dataclass
class Tree:
    image: Path
    roots: list[TreeNode]
    nodes: dict[str, TreeNode]
    current: str | None  # key of the snapshot the image was last created from / restored to

    def walk(self) -> Iterable[tuple[int, TreeNode]]:
        """(depth, node) in display order."""
        stack = [(0, r) for r in reversed(self.roots)]
        while stack:
            depth, node = stack.pop()
            yield depth, node
            stack.extend((depth + 1, c) for c in reversed(node.children))

    def to_json(self) -> dict[str, Any]:
        return {"image": str(self.image), "current": self.current,
                "roots": [r.to_json() for r in self.roots]}


def _order(node: TreeNode) -> tuple[datetime, int, str]:
    sid = node.snapshot.id
    return (node.snapshot.date, int(sid) if sid.isdigit() else -1, sid)


def tree_from(image: Path, snapshots: Iterable[Snapshot], sidecar: Sidecar) -> Tree:
    """Build the tree (pure: no I/O)."""
    nodes: dict[str, TreeNode] = {}
    for snap in snapshots:
        key = key_of(snap)
        meta = sidecar.entries.get(key)
        node = TreeNode(snap, key)
        if meta is None:
            node.root_reason = ROOT_UNKNOWN
        else:
            description = meta.get("description")
            node.description = description if isinstance(description, str) else None
            parent = meta.get("parent")
            node.parent = parent if isinstance(parent, str) else None
            node.safety = bool(meta.get("safety"))
            synced = meta.get("synced")
            node.synced = synced if isinstance(synced, bool) else None
            creator = meta.get("created_by")
            node.created_by = creator if isinstance(creator, dict) else None
        node.current = key == sidecar.current
        nodes[key] = node
    roots = []
    for node in nodes.values():
        if node.parent is not None and node.parent in nodes and node.parent != node.key:
            nodes[node.parent].children.append(node)
            continue
        if node.root_reason is None:
            node.root_reason = ROOT_PARENT_DELETED if node.parent is not None else ROOT_FIRST
        node.parent = None
        roots.append(node)
    # A corrupt sidecar could hold a cycle: nodes on it are unreachable from the roots.
    reachable = {n.key for _, n in Tree(image, roots, nodes, None).walk()}
    for node in nodes.values():
        if node.key not in reachable:
            if node.parent is not None:
                nodes[node.parent].children.remove(node)
            node.parent, node.root_reason = None, ROOT_PARENT_DELETED
            roots.append(node)
            reachable |= {n.key for _, n in Tree(image, [node], nodes, None).walk()}
    for node in nodes.values():
        node.children.sort(key=_order)
    roots.sort(key=_order)
    current = sidecar.current if sidecar.current in nodes else None
    return Tree(image, roots, nodes, current)


def build_tree(image: str | os.PathLike[str], ctx: Any = None) -> Tree:
    """The history tree of IMAGE from its live snapshot list and its sidecar."""
    from qsnap.service.context import DEFAULT_CONTEXT
    from qsnap.service.image import check_image_file
    from qsnap.service.routing import open_engine

    ctx = ctx or DEFAULT_CONTEXT
    path = check_image_file(Path(image).absolute())
    with open_engine(path, ctx, write=False) as engine:  # a monitor connection is closed after
        snapshots = engine.list_snapshots()
    return tree_from(path, snapshots, Sidecar.load(path))


def reparent_children(sidecar: Sidecar, removed: Iterable[Snapshot]) -> None:
    """Before dropping REMOVED from the sidecar: point their children at the nearest
    ancestor that survives, so deleting a snapshot does not cut the history in two.
    The current position moves the same way when it pointed at a removed snapshot."""
    gone = {key_of(s) for s in removed}

    def survivor(key: str | None) -> str | None:
        seen: set[str] = set()
        while key is not None and key in gone and key not in seen:
            seen.add(key)
            parent = sidecar.entries.get(key, {}).get("parent")
            key = parent if isinstance(parent, str) else None
        return None if key in gone else key

    for key, entry in sidecar.entries.items():
        if key in gone:
            continue
        parent = entry.get("parent")
        if isinstance(parent, str) and parent in gone:
            new_parent = survivor(parent)
            if new_parent is None:
                entry.pop("parent", None)
            else:
                entry["parent"] = new_parent
    if sidecar.current in gone:
        sidecar.current = survivor(sidecar.current)


# ---------------------------------------------------------------- describe

@dataclass(frozen=True)
class DescribeResult:
    image: Path
    snapshot: Snapshot
    description: str | None
    previous: str | None

    def to_json(self) -> dict[str, Any]:
        return {"image": str(self.image), "snapshot": self.snapshot.to_json(),
                "description": self.description, "previous": self.previous}


MAX_DESCRIPTION = 4096


def describe(
    image: str | os.PathLike[str],
    name: str | None,
    text: str,
    *,
    snapshot_id: str | None = None,
    ctx: Any = None,
) -> DescribeResult:
    """Set (or, with empty TEXT, clear) the description of snapshot NAME (or --id).

    Runs under the image lock; the sidecar is written atomically; recorded in the audit log.
    """
    from qsnap.service import audit
    from qsnap.service.context import DEFAULT_CONTEXT
    from qsnap.service.image import check_image_file
    from qsnap.service.lock import image_lock
    from qsnap.service.routing import open_engine

    ctx = ctx or DEFAULT_CONTEXT
    if name is not None and snapshot_id is None:
        validate_name(name)
    if len(text) > MAX_DESCRIPTION or any(ord(c) < 0x20 and c not in "\t" for c in text):
        raise UsageError(f"A description is one line of at most {MAX_DESCRIPTION} characters "
                         "without control characters.")
    path = check_image_file(Path(image).absolute())
    label = name or f"ID {snapshot_id}"
    with image_lock(path, f"describe {label}", ctx.lock_timeout), \
            audit.recorded(path, "describe", name) as rec:
        with open_engine(path, ctx, write=False) as engine:  # closed: a long-lived caller (qsnap ui)
            rec.engine = engine.name                              # must not keep the VM's monitor
            snapshots = engine.list_snapshots()
        target = resolve_snapshot(snapshots, name, snapshot_id)
        rec.snapshot = target.name
        rec.details["snapshot_id"] = target.id
        sidecar = Sidecar.load(path)
        previous = sidecar.description(target)
        new = text.strip() or None
        sidecar.update(target, description=new)
        try:
            sidecar.save(snapshots)
        except OSError as exc:
            from qsnap.core.errors import ImageError

            raise ImageError(
                f"Cannot write the sidecar {sidecar.path}: {exc.strerror or exc}; the description was not changed.",
                hint="check the permissions of the image's directory",
            ) from None
        return DescribeResult(path, target, new, previous)


# ---------------------------------------------------------------- name placeholders

PLACEHOLDERS = {
    "date": "%Y%m%d",  # the guide's DAILY_NAME="daily-$(date +%Y%m%d)"
    "time": "%H%M%S",
    "datetime": "%Y%m%d-%H%M%S",
}
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


def expand_placeholders(name: str, now: datetime) -> str:
    """Expand ``{date}`` (20240131), ``{time}`` (235959) and ``{datetime}`` (20240131-235959)
    in a snapshot name, in NOW's time zone (pass local time). Other braces are an error."""

    def replace(match: re.Match[str]) -> str:
        fmt = PLACEHOLDERS.get(match.group(1))
        if fmt is None:
            known = ", ".join("{" + k + "}" for k in PLACEHOLDERS)
            raise UsageError(f"Unknown placeholder {match.group(0)!r} in snapshot name {name!r}; "
                             f"known: {known}.")
        return now.strftime(fmt)

    return _PLACEHOLDER_RE.sub(replace, name)
