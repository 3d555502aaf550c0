"""Retention policy: the pure function, over synthetic timelines (no QEMU needed)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsnap.core.errors import UsageError
from qsnap.core.models import Snapshot
from qsnap.service.retention import Duration, Policy, parse_duration, select

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def snaps(*local: datetime, tz: ZoneInfo = BERLIN) -> list[Snapshot]:
    """Snapshots with IDs 1.. at the given local (naive → TZ) times."""
    out = []
    for i, when in enumerate(local, 1):
        aware = when if when.tzinfo else when.replace(tzinfo=tz)
        out.append(Snapshot(str(i), f"s{i}", aware.astimezone(UTC), 0, 0))
    return out


def kept_ids(decisions: list) -> set[str]:  # type: ignore[type-arg]
    return {d.snapshot.id for d in decisions if d.kept}


def reasons_of(decisions: list, sid: str) -> tuple[str, ...]:  # type: ignore[type-arg]
    return next(d.reasons for d in decisions if d.snapshot.id == sid)


def test_empty_input_gives_no_decisions() -> None:
    assert select([], Policy(daily=7), NOW, BERLIN) == []


def test_empty_policy_keeps_everything() -> None:
    s = snaps(datetime(2024, 1, 1), datetime(2024, 1, 2))
    decisions = select(s, Policy(), NOW, BERLIN)
    assert all(d.kept and d.reasons == ("policy is empty",) for d in decisions)


def test_restic_doc_example_twelve_sundays_keep_daily_4() -> None:
    # restic doc/060_forget.rst: one backup every Sunday 11:00 for 12 weeks, --keep-daily 4
    # keeps the last four Sundays and removes the other eight.
    sundays = [datetime(2019, 9, 1, 11) + timedelta(weeks=w) for w in range(12)]
    decisions = select(snaps(*sundays), Policy(daily=4), NOW, BERLIN)
    kept = sorted(d.snapshot.date.astimezone(BERLIN).date() for d in decisions if d.kept)
    assert kept == [date(2019, 10, 27), date(2019, 11, 3), date(2019, 11, 10), date(2019, 11, 17)]
    assert all(reasons_of(decisions, d.snapshot.id) == ("daily",) for d in decisions if d.kept)


def test_restic_doc_example_daily_weekly_monthly_yearly() -> None:
    # restic: one backup a day; --keep-daily 7 --keep-weekly 5 --keep-monthly 12 --keep-yearly 75
    # keeps the 7 newest days, 4 more last-days-of-the-week, 12 or 11 more last-days-of-the-month
    # and the last day of each year (75 or 74 more). Newest is a Sunday, as in restic's count.
    newest = date(2023, 12, 3)  # a Sunday
    assert newest.isoweekday() == 7
    days = [newest - timedelta(days=n) for n in range(3 * 365)]
    timeline = [datetime(d.year, d.month, d.day, 3) for d in reversed(days)]
    s = snaps(*timeline)
    decisions = select(s, Policy(daily=7, weekly=5, monthly=12, yearly=75), NOW, BERLIN)
    kept = {d.snapshot.date.astimezone(BERLIN).date() for d in decisions if d.kept}

    daily = {newest - timedelta(days=n) for n in range(7)}
    weekly = {newest - timedelta(weeks=n) for n in range(5)}
    monthly = {newest} | {date(y, m, 1) - timedelta(days=1)
                          for y, m in [(2023, 12), (2023, 11), (2023, 10), (2023, 9), (2023, 8), (2023, 7),
                                       (2023, 6), (2023, 5), (2023, 4), (2023, 3), (2023, 2)]}
    oldest = days[-1]
    yearly = {newest, date(2022, 12, 31), date(2021, 12, 31), date(2020, 12, 31), oldest}
    assert len(weekly - daily) == 4
    assert len(monthly) == 12
    assert len(monthly - daily - weekly) == 10  # Dec 3 and Nov 30 are among the 7 dailies
    assert kept == daily | weekly | monthly | yearly
    # The 75-year rule has periods left: the oldest snapshot is kept too, and says so.
    oldest_id = next(d.snapshot.id for d in decisions if d.snapshot.date.astimezone(BERLIN).date() == oldest)
    assert "oldest yearly" in reasons_of(decisions, oldest_id)


def test_days_are_local_days_across_spring_dst() -> None:
    # Europe/Berlin, 2024-03-31 02:00 CET → 03:00 CEST. 23:30 and 00:30 local are on
    # different local days but the same UTC day (21:30 and 22:30 UTC on March 31).
    s = snaps(datetime(2024, 3, 30, 23, 30), datetime(2024, 3, 31, 1, 30), datetime(2024, 3, 31, 3, 30),
              datetime(2024, 3, 31, 23, 30), datetime(2024, 4, 1, 0, 30))
    decisions = select(s, Policy(daily=2), NOW, BERLIN)
    assert kept_ids(decisions) == {"4", "5"}
    # Judged in UTC, 2..5 are all on March 31 (UTC) and 1 alone on March 30.
    assert kept_ids(select(s, Policy(daily=2), NOW, UTC)) == {"5", "1"}


def test_repeated_autumn_hour_is_two_hourly_periods() -> None:
    # 2024-10-27 03:00 CEST → 02:00 CET: 02:xx happens twice.
    first = [datetime(2024, 10, 27, 2, 10, fold=0), datetime(2024, 10, 27, 2, 50, fold=0)]
    second = [datetime(2024, 10, 27, 2, 10, fold=1), datetime(2024, 10, 27, 2, 50, fold=1)]
    s = snaps(*first, *second)
    assert [x.date.hour for x in s] == [0, 0, 1, 1]  # UTC: four instants over two real hours
    decisions = select(s, Policy(hourly=2), NOW, BERLIN)
    assert kept_ids(decisions) == {"2", "4"}


def test_the_25_hour_day_is_one_day() -> None:
    s = snaps(datetime(2024, 10, 27, 0, 30), datetime(2024, 10, 27, 23, 30), datetime(2024, 10, 26, 12))
    assert kept_ids(select(s, Policy(daily=1), NOW, BERLIN)) == {"2"}
    assert kept_ids(select(s, Policy(daily=2), NOW, BERLIN)) == {"2", "3"}


def test_leap_day_is_its_own_day_and_month_end() -> None:
    s = snaps(datetime(2024, 2, 28, 12), datetime(2024, 2, 29, 12), datetime(2024, 3, 1, 12))
    assert kept_ids(select(s, Policy(daily=3), NOW, BERLIN)) == {"1", "2", "3"}
    assert kept_ids(select(s, Policy(monthly=2), NOW, BERLIN)) == {"2", "3"}


def test_keep_within_a_year_back_from_a_leap_day() -> None:
    # Newest is 2024-02-29 12:00; one year before is "2023-02-29" = 2023-03-01 12:00
    # (calendar arithmetic normalised like Go's AddDate, as restic does).
    s = snaps(datetime(2023, 2, 28, 13), datetime(2023, 3, 1, 11), datetime(2023, 3, 1, 13),
              datetime(2024, 2, 29, 12))
    decisions = select(s, Policy(within=parse_duration("1y")), NOW, BERLIN)
    assert kept_ids(decisions) == {"3", "4"}
    assert reasons_of(decisions, "3") == ("within 1y",)


def test_keep_within_days_are_calendar_days_across_dst() -> None:
    # 2024-03-31 has 23 hours: 1d before 2024-03-31 12:00 CEST is 2024-03-30 12:00 CET (23 h).
    s = snaps(datetime(2024, 3, 30, 11, 59), datetime(2024, 3, 30, 12, 1), datetime(2024, 3, 31, 12))
    assert kept_ids(select(s, Policy(within=parse_duration("1d")), NOW, BERLIN)) == {"2", "3"}
    # 24h is elapsed time: it reaches back to 11:00 CET.
    s2 = snaps(datetime(2024, 3, 30, 10, 59), datetime(2024, 3, 30, 11, 1), datetime(2024, 3, 31, 12))
    assert kept_ids(select(s2, Policy(within=parse_duration("24h")), NOW, BERLIN)) == {"2", "3"}


def test_keep_within_is_relative_to_the_newest_snapshot_not_now() -> None:
    s = snaps(datetime(2020, 1, 1), datetime(2020, 1, 5), datetime(2020, 1, 9))
    assert kept_ids(select(s, Policy(within=parse_duration("7d")), NOW, BERLIN)) == {"2", "3"}


def test_keep_within_ignores_snapshots_dated_in_the_future_as_the_newest() -> None:
    now = datetime(2024, 6, 1, tzinfo=UTC)
    s = snaps(datetime(2024, 5, 20), datetime(2024, 5, 30), datetime(2031, 1, 1))
    decisions = select(s, Policy(within=parse_duration("7d")), now, BERLIN)
    # The future one is newer than the threshold: kept; the 7 days count from May 30.
    assert kept_ids(decisions) == {"2", "3"}


def test_equal_dates_prefer_the_higher_id() -> None:
    same = datetime(2024, 5, 1, 12)
    s = snaps(same, same, same)
    assert kept_ids(select(s, Policy(last=1), NOW, BERLIN)) == {"3"}
    assert kept_ids(select(s, Policy(daily=1), NOW, BERLIN)) == {"3"}
    assert kept_ids(select(s, Policy(last=2), NOW, BERLIN)) == {"3", "2"}


def test_rules_are_ored_and_each_decision_names_its_rules() -> None:
    s = snaps(datetime(2024, 5, 1, 9), datetime(2024, 5, 1, 10), datetime(2024, 5, 2, 9))
    decisions = select(s, Policy(last=2, daily=3), NOW, BERLIN)
    assert kept_ids(decisions) == {"1", "2", "3"}
    assert reasons_of(decisions, "3") == ("last", "daily")
    assert reasons_of(decisions, "2") == ("last", "daily")
    # 1 is not the newest of its day; the daily rule has a period left → restic keeps the oldest.
    assert reasons_of(decisions, "1") == ("oldest daily",)


def test_no_oldest_extra_when_the_rule_is_used_up() -> None:
    s = snaps(datetime(2024, 5, 1, 9), datetime(2024, 5, 1, 10), datetime(2024, 5, 2, 9))
    decisions = select(s, Policy(daily=2), NOW, BERLIN)
    assert kept_ids(decisions) == {"2", "3"}
    assert not next(d for d in decisions if d.snapshot.id == "1").kept


def test_weeks_are_iso_weeks_across_the_new_year() -> None:
    # Mon 2024-12-30 and Thu 2025-01-02 are in ISO week 2025-W01; Sun 2024-12-29 is 2024-W52.
    s = snaps(datetime(2024, 12, 29, 12), datetime(2024, 12, 30, 12), datetime(2025, 1, 2, 12))
    assert kept_ids(select(s, Policy(weekly=2), NOW, BERLIN)) == {"1", "3"}


def test_unlimited_keeps_one_per_period_forever() -> None:
    s = snaps(*(datetime(2024, 1, 1 + d, h) for d in range(10) for h in (8, 20)))
    decisions = select(s, Policy(daily=-1), NOW, BERLIN)
    assert len(kept_ids(decisions)) == 11  # the 10 evening ones + the oldest
    assert all(d.snapshot.date.astimezone(BERLIN).hour == 20 for d in decisions
               if d.kept and d.reasons == ("daily",))


def test_decisions_follow_input_order() -> None:
    s = snaps(datetime(2024, 1, 3), datetime(2024, 1, 1), datetime(2024, 1, 2))
    assert [d.snapshot.id for d in select(s, Policy(last=1), NOW, BERLIN)] == ["1", "2", "3"]


@pytest.mark.parametrize(("text", "expected"), [
    ("7d", Duration(days=7)), ("2w", Duration(weeks=2)), ("1y2m", Duration(years=1, months=2)),
    ("36h", Duration(hours=36)), ("1y5m7d2h", Duration(1, 5, 0, 7, 2)),
])
def test_parse_duration(text: str, expected: Duration) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7", "d7", "7x", "1d1d", "0d", "-1d", "7 days"])
def test_parse_duration_refuses_garbage(text: str) -> None:
    with pytest.raises(UsageError):
        parse_duration(text)


def test_policy_refuses_negative_counts() -> None:
    with pytest.raises(UsageError):
        Policy(daily=-5).validate()


_times = st.lists(st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2026, 1, 1)),
                  min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(_times, st.integers(1, 5), st.integers(0, 4), st.permutations(range(40)))
def test_properties(times: list[datetime], last: int, daily: int, perm: list[int]) -> None:
    s = snaps(*times, tz=ZoneInfo("UTC"))
    policy = Policy(last=last, daily=daily or None)
    decisions = select(s, policy, NOW, BERLIN)
    # The `last` newest are always kept; at least one is kept; order of input is irrelevant.
    newest = sorted(s, key=lambda x: (x.date, int(x.id)), reverse=True)[:last]
    assert {x.id for x in newest} <= kept_ids(decisions)
    shuffled = [s[i] for i in perm if i < len(s)]
    assert kept_ids(select(shuffled, policy, NOW, BERLIN)) == kept_ids(decisions)
    # A kept snapshot always says why; a removed one never does.
    assert all(bool(d.reasons) == d.kept for d in decisions)
