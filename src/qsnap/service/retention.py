"""Retention policies: which snapshots a ``--keep-*`` policy keeps, as a pure function.

Semantics follow restic's ``forget`` (doc/060_forget.rst, "Removing snapshots according to
a policy"; internal/restic/snapshot_policy.go), which borg's ``prune`` shares:

- A snapshot kept by any rule is kept (the rules are ORed); every decision lists its rules.
- ``keep-last N`` keeps the N newest snapshots.
- ``keep-hourly/daily/weekly/monthly/yearly N``: for the N most recent periods that have
  snapshots, keep the newest snapshot of each period. Periods are calendar periods in LOCAL
  time (weeks are ISO weeks, Monday to Sunday), not spans relative to now. If a rule still
  has periods left after the oldest snapshot, the oldest snapshot is kept too ("oldest
  daily"), as restic >= 0.17 does: it stretches the history kept.
- ``keep-within DURATION`` keeps every snapshot newer than the newest (non-future) snapshot
  minus DURATION (``1y2m7d3h``, plus ``w`` for weeks): relative to the newest snapshot, so a
  machine that stopped taking snapshots does not lose its history to the calendar.
- N = -1 means unlimited (keep one per period, forever).

DST: a day is a local calendar day whatever its length (23 or 25 hours); an hour is a real
hour, so the repeated 02:00-03:00 of an autumn change is two hourly periods (restic folds
them into one: its key ignores the UTC offset). Dates come from the snapshots, never names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any

from qsnap.core.errors import UsageError
from qsnap.core.models import Snapshot

UNLIMITED = -1

#: The calendar rules, in the order restic evaluates (and reports) them.
PERIOD_RULES = ("hourly", "daily", "weekly", "monthly", "yearly")

_DURATION_RE = re.compile(r"(\d+)([ymwdh])")
_DURATION_UNITS = {"y": "years", "m": "months", "w": "weeks", "d": "days", "h": "hours"}


@dataclass(frozen=True)
class Duration:
    """A calendar duration as restic writes it: years, months, (weeks,) days, hours."""

    years: int = 0
    months: int = 0
    weeks: int = 0
    days: int = 0
    hours: int = 0

    @property
    def zero(self) -> bool:
        return not (self.years or self.months or self.weeks or self.days or self.hours)

    def __str__(self) -> str:
        parts = [(self.years, "y"), (self.months, "m"), (self.weeks, "w"), (self.days, "d"), (self.hours, "h")]
        return "".join(f"{n}{u}" for n, u in parts if n) or "0h"

    def before(self, moment: datetime, tz: tzinfo) -> datetime:
        """MOMENT minus this duration: years/months/days on the local calendar (a day is a
        calendar day across DST; Feb 29 minus 1y is Mar 1, as Go's AddDate normalises),
        then hours as real elapsed time."""
        local = moment.astimezone(tz)
        month_index = local.year * 12 + (local.month - 1) - self.years * 12 - self.months
        year, month = divmod(month_index, 12)
        day = date(year, month + 1, 1) + timedelta(days=local.day - 1 - self.days - 7 * self.weeks)
        wall = datetime.combine(day, local.time().replace(tzinfo=None))
        shifted = wall.replace(tzinfo=tz, fold=local.fold)
        return shifted.astimezone(UTC) - timedelta(hours=self.hours)


def parse_duration(text: str) -> Duration:
    """Parse ``7d``, ``2w``, ``1y2m``, ``36h`` (units y, m = months, w, d, h); UsageError if bad."""
    raw = text
    text = text.strip().lower()
    if not text or _DURATION_RE.sub("", text):
        raise UsageError(f"Invalid duration {raw!r}: write it as numbers with units y (years), "
                         "m (months), w (weeks), d (days), h (hours), e.g. 7d, 2w, 1y2m, 36h.")
    values: dict[str, int] = {}
    for number, unit in _DURATION_RE.findall(text):
        field_name = _DURATION_UNITS[unit]
        if field_name in values:
            raise UsageError(f"Invalid duration {raw!r}: unit {unit!r} given twice.")
        values[field_name] = int(number)
    duration = Duration(**values)
    if duration.zero:
        raise UsageError(f"Invalid duration {raw!r}: it is zero.")
    return duration


@dataclass(frozen=True)
class Policy:
    """What to keep. ``None``/0 = rule not used; -1 (UNLIMITED) = every period."""

    last: int | None = None
    hourly: int | None = None
    daily: int | None = None
    weekly: int | None = None
    monthly: int | None = None
    yearly: int | None = None
    within: Duration | None = None

    def counts(self) -> dict[str, int]:
        """The count rules in use, by name."""
        pairs = {"last": self.last, "hourly": self.hourly, "daily": self.daily,
                 "weekly": self.weekly, "monthly": self.monthly, "yearly": self.yearly}
        return {name: n for name, n in pairs.items() if n}

    @property
    def empty(self) -> bool:
        return not self.counts() and (self.within is None or self.within.zero)

    def validate(self) -> Policy:
        for name, n in self.counts().items():
            if n < UNLIMITED:
                raise UsageError(f"--keep-{name} must be a positive number or 'unlimited', not {n}.")
        return self

    def __str__(self) -> str:
        parts = [f"{'all' if n == UNLIMITED else n} {'newest' if name == 'last' else name}"
                 for name, n in self.counts().items()]
        if self.within is not None and not self.within.zero:
            parts.append(f"all within {self.within} of the newest")
        return "keep " + ", ".join(parts) if parts else "empty policy"

    def to_json(self) -> dict[str, Any]:
        return {**{f"keep_{k}": v for k, v in self.counts().items()},
                **({"keep_within": str(self.within)} if self.within else {})}


@dataclass(frozen=True)
class Decision:
    """The verdict on one snapshot: kept (and by which rules) or removed."""

    snapshot: Snapshot
    kept: bool
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**self.snapshot.to_json(), "kept": self.kept, "reasons": list(self.reasons)}


# ---------------------------------------------------------------- period keys (local time)

def _hour_key(t: datetime) -> tuple[Any, ...]:
    # The UTC offset tells the two 02:xx hours of an autumn DST change apart.
    return (t.year, t.month, t.day, t.hour, t.utcoffset())


def _day_key(t: datetime) -> tuple[Any, ...]:
    return (t.year, t.month, t.day)


def _week_key(t: datetime) -> tuple[Any, ...]:
    iso = t.isocalendar()
    return (iso.year, iso.week)


def _month_key(t: datetime) -> tuple[Any, ...]:
    return (t.year, t.month)


def _year_key(t: datetime) -> tuple[Any, ...]:
    return (t.year,)


_PERIOD_KEYS: dict[str, Callable[[datetime], tuple[Any, ...]]] = {
    "hourly": _hour_key, "daily": _day_key, "weekly": _week_key,
    "monthly": _month_key, "yearly": _year_key,
}


def _newest_first(snapshots: Sequence[Snapshot]) -> list[int]:
    """Indexes of SNAPSHOTS, newest first; equal dates: the higher ID (created later) first."""
    def id_rank(s: Snapshot) -> tuple[int, str]:
        return (int(s.id), s.id) if s.id.isdigit() else (-1, s.id)

    return sorted(range(len(snapshots)),
                  key=lambda i: (snapshots[i].date, id_rank(snapshots[i])), reverse=True)


def select(snapshots: Sequence[Snapshot], policy: Policy, now: datetime, tz: tzinfo) -> list[Decision]:
    """Apply POLICY to SNAPSHOTS; one Decision per snapshot, in the order given.

    NOW only bounds ``keep-within``: the newest snapshot dated after NOW does not count as
    "the newest" (a wrong clock must not make everything look old). An empty policy keeps
    everything (reason "policy is empty"): callers should refuse it before asking.
    """
    if policy.empty:
        return [Decision(s, True, ("policy is empty",)) for s in snapshots]
    if not snapshots:
        return []
    order = _newest_first(snapshots)
    reasons: list[list[str]] = [[] for _ in snapshots]
    local = [s.date.astimezone(tz) for s in snapshots]

    # keep-last and the calendar rules: walk newest → oldest, keep the first of each period.
    counters: list[tuple[str, int, Callable[[datetime], tuple[Any, ...]] | None]] = []
    if policy.last:
        counters.append(("last", policy.last, None))
    for rule in PERIOD_RULES:
        n = getattr(policy, rule)
        if n:
            counters.append((rule, n, _PERIOD_KEYS[rule]))
    for rule, count, key_of in counters:
        left = count
        previous: tuple[Any, ...] | None = None
        for position, i in enumerate(order):
            if left == 0:
                break
            key = (position,) if key_of is None else key_of(local[i])
            is_oldest = position == len(order) - 1
            if key != previous:
                reasons[i].append(rule)
                previous = key
                if left > 0:
                    left -= 1
            elif is_oldest and key_of is not None:
                # restic: periods left over at the end → keep the oldest snapshot too.
                reasons[i].append(f"oldest {rule}")

    if policy.within is not None and not policy.within.zero:
        past = [snapshots[i].date for i in order if snapshots[i].date <= now]
        newest = past[0] if past else None
        if newest is not None:
            threshold = policy.within.before(newest, tz)
            for i, snap in enumerate(snapshots):
                if snap.date > threshold:
                    reasons[i].append(f"within {policy.within}")
        else:
            # Every snapshot is dated in the future: keep them all rather than guess.
            for i in range(len(snapshots)):
                reasons[i].append(f"within {policy.within} (dated in the future)")

    return [Decision(s, bool(r), tuple(r)) for s, r in zip(snapshots, reasons, strict=True)]


def local_zone(environ: dict[str, str] | None = None) -> tzinfo:
    """The local time zone as a DST-aware zone: $TZ, else /etc/localtime, else UTC.

    (``datetime.now().astimezone().tzinfo`` is a fixed offset: wrong across DST changes.)
    """
    import os
    import zoneinfo

    env = os.environ if environ is None else environ
    name = env.get("TZ", "").lstrip(":")
    if name:
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            pass
    try:
        with open("/etc/localtime", "rb") as handle:
            return zoneinfo.ZoneInfo.from_file(handle, key="localtime")
    except (OSError, ValueError):
        return UTC
