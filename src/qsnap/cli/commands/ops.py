"""prune, doctor, describe, log."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from qsnap.cli.invocation import Invocation

if TYPE_CHECKING:
    from datetime import datetime

    from qsnap.service.doctor import DoctorReport
    from qsnap.service.prune import PrunePlan, PruneResult
    from qsnap.service.retention import Decision

KEEP_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def _count(text: str) -> int:
    if text.strip().lower() in ("unlimited", "all", "-1"):
        return -1
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'unlimited', not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1 or 'unlimited', not {value}")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from qsnap.cli.options import add_common

    p = sub.add_parser(
        "prune", help="delete the snapshots a retention policy does not keep",
        description="Keep what the --keep-* rules keep (restic/borg semantics: a snapshot kept by any "
        "rule is kept; each calendar rule keeps the newest snapshot of each of the N most recent "
        "periods, in local time) and delete the other snapshots matching --match.",
    )
    add_common(p, json=True)
    p.add_argument("--match", default="*", metavar="GLOB",
                   help="only consider snapshots whose name matches GLOB (default: all); others are never touched")
    for rule in KEEP_RULES:
        what = "newest snapshots" if rule == "last" else f"newest snapshot of each of the last N {rule} periods"
        p.add_argument(f"--keep-{rule}", type=_count, metavar="N", help=f"keep the {what}")
    p.add_argument("--keep-within", metavar="DURATION",
                   help="keep all snapshots within DURATION of the newest one (7d, 2w, 1y2m, 36h)")
    p.add_argument("-n", "--dry-run", action="store_true", help="show what would be kept (and why) and removed")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--allow-empty", action="store_true", help="allow removing the image's last snapshot")
    p.set_defaults(handler=cmd_prune)

    p = sub.add_parser("doctor", help="check the image, QEMU, the VM and the monitor; say how to fix problems")
    add_common(p, json=True)
    p.add_argument("--target", metavar="TARGET", help="also check a backup target (s3://BUCKET/PREFIX, restic:REPO): "
                   "reachable, unfinished uploads, backups without a manifest")
    p.set_defaults(handler=cmd_doctor)

    p = sub.add_parser("describe", help="set the description of a snapshot (empty text clears it)")
    add_common(p, json=True)
    p.add_argument("words", nargs="+", metavar="NAME TEXT", help="the snapshot's name, then the description")
    p.add_argument("--id", dest="snapshot_id", metavar="N",
                   help="select the snapshot by ID (then every word is description)")
    p.set_defaults(handler=cmd_describe)

    p = sub.add_parser("log", help="show the audit log of the image's mutating operations")
    add_common(p, json=True)
    p.add_argument("--since", metavar="ISO|DURATION",
                   help="only records since a date/time (2024-05-01, 2024-05-01T12:00) or DURATION ago (7d, 36h)")
    p.set_defaults(handler=cmd_log)


# ------------------------------------------------------------------ prune

def _policy(inv: Invocation) -> object:
    from qsnap.core.errors import UsageError
    from qsnap.service.retention import Policy, parse_duration

    args = inv.args
    within = parse_duration(args.keep_within) if args.keep_within else None
    policy = Policy(last=args.keep_last, hourly=args.keep_hourly, daily=args.keep_daily,
                    weekly=args.keep_weekly, monthly=args.keep_monthly, yearly=args.keep_yearly,
                    within=within)
    if policy.empty:
        raise UsageError("prune needs at least one rule (--keep-last, --keep-hourly, --keep-daily, "
                         "--keep-weekly, --keep-monthly, --keep-yearly or --keep-within); without one it "
                         "would remove every matched snapshot.")
    return policy


def _decision_rows(decisions: tuple[Decision, ...], with_reasons: bool) -> list[list[str]]:
    from qsnap.cli.render import human_size, local_date

    rows = []
    for d in decisions:
        row = [d.snapshot.id, d.snapshot.name, local_date(d.snapshot), human_size(d.snapshot.vm_state_size)]
        if with_reasons:
            row.append(", ".join(d.reasons))
        rows.append(row)
    return rows


def render_plan(inv: Invocation, the_plan: PrunePlan, *, dry_run: bool) -> None:
    from qsnap.cli.render import table

    inv.out(f"Applying policy: {the_plan.policy} to snapshots matching {the_plan.match!r} in "
            f"{the_plan.image.name}" + (f" ({the_plan.unmatched} others untouched)" if the_plan.unmatched else ""))
    kept, removed = the_plan.kept, the_plan.removed
    inv.out(f"keep {len(kept)} snapshot{'s' if len(kept) != 1 else ''}:")
    for line in table(_decision_rows(kept, True), ["ID", "NAME", "DATE", "VM STATE", "KEPT BY"]):
        inv.out("  " + line)
    verb = "would remove" if dry_run else "remove"
    inv.out(f"{verb} {len(removed)} snapshot{'s' if len(removed) != 1 else ''}" + (":" if removed else "."))
    if removed:
        for line in table(_decision_rows(removed, False), ["ID", "NAME", "DATE", "VM STATE"]):
            inv.out("  " + line)


def cmd_prune(inv: Invocation) -> int:
    from qsnap.service.prune import prune

    policy = _policy(inv)
    image = inv.image()
    ctx = inv.context()
    shown = False

    def approve(the_plan: PrunePlan) -> bool:
        nonlocal shown
        if not inv.json:
            render_plan(inv, the_plan, dry_run=False)
            shown = True
        n = len(the_plan.removed)
        return inv.confirm(f"Delete {n} snapshot{'s' if n != 1 else ''} from {image.name}? This cannot be undone.")

    result: PruneResult = prune(image, match=inv.args.match, policy=policy,  # type: ignore[arg-type]
                                dry_run=inv.args.dry_run, allow_empty=inv.args.allow_empty, ctx=ctx,
                                approve=None if inv.args.dry_run else approve)
    for warning in result.warnings:
        inv.note(f"warning: {warning}")
    if inv.json:
        inv.emit_json(result.to_json())
        return 1 if result.cancelled else 0
    if not shown:
        render_plan(inv, result.plan, dry_run=result.dry_run)
    if result.cancelled:
        inv.note("Nothing was changed.")
        return 1
    if not result.dry_run and result.deleted:
        inv.out(f"Deleted {len(result.deleted)} snapshot{'s' if len(result.deleted) != 1 else ''} "
                f"via {result.plan.engine}.")
    return 0


# ------------------------------------------------------------------ doctor

_MARK = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


def render_doctor(inv: Invocation, report: DoctorReport) -> None:
    inv.out(f"qsnap doctor: {report.image if report.image is not None else '(no image)'}")
    width = max(len(c.name) for c in report.checks)
    for check in report.checks:
        inv.out(f"  {_MARK[check.status]:<4}  {check.name:<{width}}  {check.found}")
        if check.fix and check.status in ("warn", "fail"):
            inv.out(f"  {'':<4}  {'':<{width}}  fix: {check.fix}")
    counts = {s: sum(c.status == s for c in report.checks) for s in ("ok", "warn", "fail", "skip")}
    inv.out(f"{counts['fail']} failed, {counts['warn']} warnings, {counts['ok']} ok, {counts['skip']} skipped.")


def cmd_doctor(inv: Invocation) -> int:
    from pathlib import Path

    from qsnap.core.errors import QsnapError
    from qsnap.service.doctor import doctor

    explicit = getattr(inv.args, "image", None)
    image: Path | None
    try:
        image = inv.image()
    except QsnapError:
        image = (inv.env.cwd / explicit) if explicit else None
    report = doctor(image, inv.context())
    if getattr(inv.args, "target", None):
        from qsnap.service.backups import target_checks
        from qsnap.service.doctor import DoctorReport

        report = DoctorReport(report.image, report.checks + tuple(target_checks(inv.args.target)))
    if inv.json:
        inv.emit_json(report.to_json())
    else:
        render_doctor(inv, report)
    return 1 if report.failed else 0


# ------------------------------------------------------------------ describe

def cmd_describe(inv: Invocation) -> int:
    from qsnap.core.errors import UsageError
    from qsnap.service.history import describe

    words: list[str] = list(inv.args.words)
    if inv.args.snapshot_id is not None:
        name, text = None, " ".join(words)
    else:
        if len(words) < 2:
            raise UsageError("Usage: qsnap describe NAME TEXT (an empty TEXT \"\" clears the description).")
        name, text = words[0], " ".join(words[1:])
    result = describe(inv.image(), name, text, snapshot_id=inv.args.snapshot_id, ctx=inv.context())
    if inv.json:
        inv.emit_json(result.to_json())
    elif result.description is None:
        inv.out(f"Description of {result.snapshot.name!r} (ID {result.snapshot.id}) cleared.")
    else:
        inv.out(f"Description of {result.snapshot.name!r} (ID {result.snapshot.id}) set.")
    return 0


# ------------------------------------------------------------------ log

def parse_since(text: str, now: datetime) -> datetime:
    """An ISO date/time (local when it has no offset) or a DURATION before NOW."""
    from datetime import datetime as dt

    from qsnap.core.errors import UsageError
    from qsnap.service.retention import local_zone, parse_duration

    raw = text.strip()
    try:
        moment = dt.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        try:
            return parse_duration(raw).before(now, local_zone())
        except UsageError:
            raise UsageError(f"--since {text!r}: expected an ISO date/time (2024-05-01, 2024-05-01T12:00) "
                             "or a duration (7d, 36h, 2w).") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=local_zone())
    return moment


def cmd_log(inv: Invocation) -> int:
    from datetime import UTC, datetime

    from qsnap.cli.render import table
    from qsnap.service import audit
    from qsnap.service.image import check_image_file

    image = check_image_file(inv.image())
    records = audit.read(image)
    if inv.args.since:
        since = parse_since(inv.args.since, datetime.now(UTC))
        kept = []
        for record in records:
            try:
                when = datetime.fromisoformat(str(record.get("time", "")).replace("Z", "+00:00"))
            except ValueError:
                continue
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            if when >= since:
                kept.append(record)
        records = kept
    if inv.json:
        inv.emit_json({"image": str(image), "records": records})
        return 0
    if not records:
        inv.out(f"No audit records for {image}" + (f" since {inv.args.since}." if inv.args.since else "."))
        return 0
    rows = []
    for r in records:
        try:
            when = datetime.fromisoformat(str(r.get("time")).replace("Z", "+00:00")).astimezone()
            shown = when.strftime("%Y-%m-%d %H:%M:%S")
        except ValueError:
            shown = str(r.get("time"))
        duration = r.get("duration_s")
        extra = r.get("error") or ""
        if r.get("by"):
            extra = f"(by {r['by']}) {extra}".strip()
        rows.append([shown, str(r.get("user") or ""), str(r.get("operation") or ""), str(r.get("snapshot") or ""),
                     str(r.get("engine") or ""), str(r.get("result") or ""),
                     f"{duration:.2f}s" if isinstance(duration, int | float) else "", extra])
    for line in table(rows, ["TIME", "USER", "OPERATION", "SNAPSHOT", "ENGINE", "RESULT", "TOOK", "ERROR"]):
        inv.out(line)
    return 0
