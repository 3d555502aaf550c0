"""compact: reclaim space and keep every snapshot."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from qsnap.cli.invocation import Invocation

if TYPE_CHECKING:
    from qsnap.service.compact import CompactReport


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from qsnap.cli.options import add_common

    p = sub.add_parser(
        "compact", help="rewrite the image to reclaim space, keeping every snapshot and its VM state",
        description="Rebuild the image with qemu-img/qemu-io into IMAGE.partial (same cluster size, compat, "
        "extended L2 and compression type; clusters shared between snapshots stay shared), verify it "
        "(qemu-img check; every snapshot's guest data and VM state and the current state compared with the "
        "original), then swap it in atomically. Unlike 'qemu-img convert', every internal snapshot is kept.",
    )
    add_common(p, json=True)
    p.add_argument("--compress", action="store_true",
                   help="store data clusters compressed (the image's compression type: zlib or zstd)")
    p.add_argument("--sparsify", action="store_true",
                   help="turn blocks the current state's ext2/3/4 filesystems mark free into zero clusters "
                   "(snapshots untouched)")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="only predict the new size and where the savings come from; change nothing")
    p.add_argument("--keep-old", action="store_true",
                   help="keep the original image as IMAGE.old-<timestamp>")
    p.set_defaults(handler=cmd_compact)


def render(inv: Invocation, report: CompactReport) -> None:
    from qsnap.cli.render import human_size

    for note in report.found:
        inv.note(f"note: {note}")
    size = report.file_size
    share = 100.0 * report.reclaimed / size if size else 0.0
    s = report.savings
    vm = f", {report.vm_state_snapshots} with VM state" if report.vm_state_snapshots else ""
    if report.dry_run:
        inv.out(f"qsnap compact --dry-run: {report.image}")
        inv.out(f"  file size now              {human_size(size)}")
        inv.out(f"  predicted size             {human_size(report.predicted_size)}  "
                f"(reclaims {human_size(max(0, report.reclaimed))}, {share:.1f}%)")
        inv.out(f"    leaked clusters          {human_size(s.leaked)}")
        inv.out(f"    freed, not returned      {human_size(s.freed)}")
        inv.out(f"    zero clusters            {human_size(s.zero)}")
        inv.out(f"    fragmentation, metadata  {human_size(s.other)}")
        inv.out(f"  snapshots kept             {report.snapshots} (all{vm})")
        inv.out("Nothing was changed. Run without --dry-run to compact "
                "(a running VM is stopped and restarted through its controller, or the command exits 8).")
        return
    assert report.new_size is not None
    inv.out(f"Compacted {report.image.name}: {human_size(size)} -> {human_size(report.new_size)} "
            f"({human_size(max(0, report.reclaimed))} reclaimed, {share:.1f}%); "
            f"{report.snapshots} snapshots kept{vm}.")
    inv.out("Verified: qemu-img check clean; guest data of every snapshot and of the current state, "
            "and every VM state, identical to the original.")
    if report.vm_stopped:
        inv.out(f"The VM was stopped ({report.vm_stopped}) for the compaction and started again.")
    if report.kept_old is not None:
        inv.out(f"The original is kept as {report.kept_old}.")


def progress_for(inv: Invocation) -> Callable[[str, int, int], None] | None:
    """One line rewritten in place on a TTY (stderr), JSON lines with --json (stderr), nothing
    when piped."""
    if inv.json:
        def emit(phase: str, done: int, total: int) -> None:
            inv.env.stderr.write(json.dumps({"progress": {"phase": phase, "done": done, "total": total}}) + "\n")
        return emit
    if not inv.env.stderr_isatty:
        return None
    words = {"states": "written", "verify": "verified"}

    def show(phase: str, done: int, total: int) -> None:
        end = "\n" if phase == "verify" and done >= total else ""
        inv.env.stderr.write(f"\rcompact: {done}/{total} states {words.get(phase, phase)}{end}")
        inv.env.stderr.flush()
    return show


def cmd_compact(inv: Invocation) -> int:
    from qsnap.service.compact import compact

    report = compact(inv.image(), compress=inv.args.compress, sparsify=inv.args.sparsify,
                     dry_run=inv.args.dry_run, keep_old=inv.args.keep_old, ctx=inv.context(),
                     progress=progress_for(inv))
    if inv.json:
        inv.emit_json(report.to_json())
    else:
        render(inv, report)
    return 0
