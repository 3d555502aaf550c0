"""Prune: delete the snapshots a retention policy does not keep, and nothing else.

Never deleted, whatever the policy says:
- snapshots whose name does not match ``--match`` (they are not even considered);
- safety snapshots (``pre-restore-*`` or flagged in the sidecar) younger than a day, unless
  ``--match`` names the safety prefix explicitly (e.g. ``pre-restore-*``); protected safety
  snapshots do not take a period's slot from an ordinary snapshot;
- the image's last snapshot, unless ``allow_empty``.

The image lock is taken once for the whole run. Deletion uses the engine verbs directly
(an unlocked variant of :func:`qsnap.service.snapshots.delete`: that function takes the
lock itself, and a second flock of the same file from this process would wait for us
forever). Each deletion is recorded in the audit log as a ``delete`` with ``by: prune``,
and the whole run as one ``prune`` record.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from qsnap.core.errors import QsnapError, UsageError
from qsnap.core.models import Snapshot
from qsnap.service import audit
from qsnap.service.retention import Decision, Policy, local_zone, select
from qsnap.service.sidecar import Sidecar, key_of

SAFETY_PREFIX = "pre-restore-"
SAFETY_GRACE = timedelta(days=1)

REASON_SAFETY = "safety snapshot younger than a day"
REASON_LAST = "last snapshot of the image (--allow-empty to remove it)"


@dataclass(frozen=True)
class PrunePlan:
    image: Path
    engine: str
    match: str
    policy: Policy
    decisions: tuple[Decision, ...]  # for every matched snapshot, newest first
    unmatched: int  # snapshots outside --match (never touched)

    @property
    def kept(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.kept)

    @property
    def removed(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if not d.kept)


@dataclass(frozen=True)
class PruneResult:
    plan: PrunePlan
    dry_run: bool
    deleted: tuple[Snapshot, ...]
    cancelled: bool = False
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "image": str(self.plan.image), "engine": self.plan.engine, "match": self.plan.match,
            "policy": self.plan.policy.to_json(), "dry_run": self.dry_run, "cancelled": self.cancelled,
            "unmatched": self.plan.unmatched,
            "keep": [d.to_json() for d in self.plan.kept],
            "remove": [d.to_json() for d in self.plan.removed],
            "deleted": [s.to_json() for s in self.deleted],
            "warnings": list(self.warnings),
        }


def names_safety_prefix(match: str) -> bool:
    """Whether GLOB names the safety prefix explicitly (``pre-restore-*``, ``pre-restore*``)."""
    return match.startswith("pre-restore")


def plan(
    snapshots: tuple[Snapshot, ...],
    sidecar: Sidecar,
    *,
    image: Path,
    engine: str,
    match: str,
    policy: Policy,
    allow_empty: bool,
    now: datetime,
    tz: tzinfo,
) -> PrunePlan:
    """Decide what a prune would do (pure apart from its arguments)."""
    matched = [s for s in snapshots if fnmatch.fnmatchcase(s.name, match)]
    explicit_safety = names_safety_prefix(match)
    protected: list[Snapshot] = []
    candidates: list[Snapshot] = []
    for snap in matched:
        is_safety = snap.name.startswith(SAFETY_PREFIX) or bool(sidecar.get(snap).get("safety"))
        if is_safety and not explicit_safety and now - snap.date < SAFETY_GRACE:
            protected.append(snap)
        else:
            candidates.append(snap)
    decisions = select(candidates, policy, now, tz)
    decisions += [Decision(s, True, (REASON_SAFETY,)) for s in protected]
    if not allow_empty and snapshots and all(not d.kept for d in decisions) and len(matched) == len(snapshots):
        newest = max(range(len(decisions)), key=lambda i: (decisions[i].snapshot.date, decisions[i].snapshot.id))
        decisions[newest] = replace(decisions[newest], kept=True, reasons=(REASON_LAST,))
    decisions.sort(key=lambda d: (d.snapshot.date, int(d.snapshot.id) if d.snapshot.id.isdigit() else -1),
                   reverse=True)
    return PrunePlan(image, engine, match, policy, tuple(decisions), len(snapshots) - len(matched))


def prune(
    image: str | os.PathLike[str],
    *,
    match: str = "*",
    policy: Policy,
    dry_run: bool = False,
    allow_empty: bool = False,
    ctx: Any = None,
    now: datetime | None = None,
    tz: tzinfo | None = None,
    approve: Callable[[PrunePlan], bool] | None = None,
) -> PruneResult:
    """Apply POLICY to the snapshots of IMAGE whose names match MATCH.

    ``approve`` (e.g. a TTY prompt from the CLI) sees the plan under the lock, before
    anything is deleted; returning False cancels. ``now``/``tz`` default to the clock and
    the local zone ($TZ or /etc/localtime).
    """
    from qsnap.engines import qemu_img
    from qsnap.service import snapshots as svc
    from qsnap.service.image import check_image_file
    from qsnap.service.lock import image_lock

    ctx = ctx or svc.DEFAULT_CONTEXT
    policy.validate()
    if policy.empty:
        raise UsageError("No retention rule given: refusing to prune (that would remove every matched "
                         "snapshot).", hint="add --keep-last/--keep-daily/... or --keep-within")
    now = now or datetime.now(UTC)
    tz = tz or local_zone(dict(ctx.env()))
    path = check_image_file(Path(image).absolute())

    if dry_run:
        engine = svc.select_engine(path, ctx, write=False)
        the_plan = plan(engine.list_snapshots(), Sidecar.load(path), image=path, engine=engine.name,
                        match=match, policy=policy, allow_empty=allow_empty, now=now, tz=tz)
        return PruneResult(the_plan, True, ())

    with image_lock(path, f"prune --match {match}", ctx.lock_timeout), \
            audit.recorded(path, "prune", None) as rec:
        engine = svc.select_engine(path, ctx, write=True)
        rec.engine = engine.name
        rec.details.update({"match": match, "policy": policy.to_json()})
        before = engine.list_snapshots()
        the_plan = plan(before, Sidecar.load(path), image=path, engine=engine.name, match=match,
                        policy=policy, allow_empty=allow_empty, now=now, tz=tz)
        if approve is not None and the_plan.removed and not approve(the_plan):
            rec.details["cancelled"] = True
            return PruneResult(the_plan, False, (), cancelled=True)
        targets = [d.snapshot for d in the_plan.removed]
        if targets and engine.name == qemu_img.NAME:
            svc._preflight_offline(path)
        deleted: list[Snapshot] = []
        warnings: list[str] = []
        try:
            for target in targets:
                with audit.recorded(path, "delete", target.name) as one:
                    one.engine = engine.name
                    one.details.update({"snapshot_id": target.id, "by": "prune"})
                    engine.delete(target)
                deleted.append(target)
        finally:
            rec.details["deleted"] = [s.name for s in deleted]
            after = engine.list_snapshots()
            _update_sidecar(path, before, after, deleted, warnings)
        still = {(s.id, s.name, s.date) for s in after}
        survivors = [s for s in deleted if (s.id, s.name, s.date) in still]
        if survivors:
            raise QsnapError(f"{len(survivors)} snapshot(s) were still there after deleting them: "
                             f"{', '.join(s.name for s in survivors)}.")
        expected = {key_of(s) for s in before} - {key_of(s) for s in deleted}
        if {key_of(s) for s in after} < expected:
            lost = expected - {key_of(s) for s in after}
            raise QsnapError(f"Pruning removed snapshots it was not asked to: {sorted(lost)} — please report this.")
        return PruneResult(the_plan, False, tuple(deleted), warnings=tuple(warnings))


def _update_sidecar(path: Path, before: tuple[Snapshot, ...], after: tuple[Snapshot, ...],
                    deleted: list[Snapshot], warnings: list[str]) -> None:
    from qsnap.service.history import reparent_children

    sidecar = Sidecar.load(path)
    live = {key_of(s) for s in after}
    reparent_children(sidecar, [s for s in before if key_of(s) not in live])
    try:
        sidecar.save(after)
    except OSError as exc:
        warnings.append(f"could not write {sidecar.path}: {exc.strerror}")
