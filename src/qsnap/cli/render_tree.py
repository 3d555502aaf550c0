"""Drawing the snapshot history as a tree (`qsnap list --tree`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qsnap.cli.invocation import Invocation

if TYPE_CHECKING:
    from qsnap.service.history import Tree


def render_tree(inv: Invocation, tree: Tree) -> None:
    """Draw the history like `virsh snapshot-list --tree`, with a "You are here" marker."""
    from qsnap.cli.render import human_size, local_date
    from qsnap.service.history import TreeNode

    if inv.json:
        inv.emit_json(tree.to_json())
        return
    if not tree.nodes:
        inv.out(f"No snapshots in {tree.image}.")
        return
    encoding = (getattr(inv.env.stdout, "encoding", None) or "").lower().replace("-", "")
    fancy = encoding in ("utf8", "utf_8")
    tee, last, pipe, space = ("├── ", "└── ", "│   ", "    ") if fancy else ("|-- ", "`-- ", "|   ", "    ")
    here = "● You are here" if fancy else "* You are here"

    def label(node: TreeNode) -> str:
        snap = node.snapshot
        size = human_size(snap.vm_state_size) + " VM state" if snap.has_vm_state else "disk only"
        bits = [f"{snap.name}  (ID {snap.id}, {local_date(snap)}, {size}"]
        if node.synced:
            bits.append(", synced")
        bits.append(")")
        if node.safety:
            bits.append(" [safety]")
        if node.root_reason in ("unknown parent", "parent deleted"):
            bits.append(f" [{node.root_reason}]")
        if node.description:
            bits.append(f"  {node.description}")
        return "".join(bits)

    # Iterative: a linear history of thousands of snapshots must not hit the recursion limit.
    stack: list[tuple[TreeNode | None, str, str, str]] = [(r, "", "", "") for r in reversed(tree.roots)]
    while stack:
        node, prefix, connector, child_prefix = stack.pop()
        if node is None:
            inv.out(prefix + connector + here)
            continue
        inv.out(prefix + connector + label(node))
        items: list[TreeNode | None] = [*node.children, *([None] if node.current else [])]
        for i in reversed(range(len(items))):
            is_last = i == len(items) - 1
            stack.append((items[i], child_prefix, last if is_last else tee,
                          child_prefix + (space if is_last else pipe)))
