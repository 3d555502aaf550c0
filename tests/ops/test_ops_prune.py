"""`qsnap prune` on a real image with 40 snapshots whose dates are crafted, compared with an
independent port of restic's ApplyPolicy (internal/restic/snapshot_policy.go)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from ops_testlib import (
    clean_environ,
    create_snapshots,
    qemu_img,
    run_cli,
    set_snapshot_dates,
    snapshot_names,
)

from qsnap.service import audit

BERLIN = ZoneInfo("Europe/Berlin")


def restic_keep(items: list[tuple[str, datetime]], *, last: int = 0, daily: int = 0, weekly: int = 0,
                within_days: int = 0) -> set[str]:
    """restic's algorithm, transcribed: newest first; per rule a counter and the last bucket
    value; the oldest snapshot is kept while a counter is left."""
    ordered = sorted(items, key=lambda x: x[1], reverse=True)
    buckets = [
        [last, lambda d, nr: nr, None],
        [daily, lambda d, nr: d.year * 10000 + d.month * 100 + d.day, None],
        [weekly, lambda d, nr: d.isocalendar()[0] * 100 + d.isocalendar()[1], None],
    ]
    latest = ordered[0][1]
    keep = set()
    for nr, (name, when) in enumerate(ordered):
        local = when.astimezone(BERLIN)
        if within_days:
            threshold = (latest.astimezone(BERLIN).replace(tzinfo=None) - timedelta(days=within_days))
            if local.replace(tzinfo=None) > threshold:
                keep.add(name)
        for b in buckets:
            if b[0] > 0:
                val = b[1](local, nr)
                if val != b[2] or nr == len(ordered) - 1:
                    keep.add(name)
                    b[2] = val
                    b[0] -= 1
    return keep


@pytest.fixture
def timeline(image: Path) -> dict[str, datetime]:
    """40 snapshots: 30 daily ones at 02:30 Berlin time over the March 2024 DST change (02:30
    does not exist on March 31: it lands at 03:30 CEST), 6 manual ones, 4 on the last day."""
    dates: dict[str, datetime] = {}
    start = datetime(2024, 3, 10, 2, 30, tzinfo=BERLIN)
    for n in range(30):
        local = datetime.combine(start.date() + timedelta(days=n), start.timetz())
        dates[f"daily-{n:02d}"] = local.astimezone(UTC)
    for n, (day, hour) in enumerate([(12, 9), (12, 18), (20, 23), (31, 1), (31, 4), (7 + 31, 12)]):
        month, d = (3, day) if day <= 31 else (4, day - 31)
        dates[f"manual-{n}"] = datetime(2024, month, d, hour, tzinfo=BERLIN).astimezone(UTC)
    for n in range(4):
        dates[f"late-{n}"] = datetime(2024, 4, 8, 10 + n, 15, tzinfo=BERLIN).astimezone(UTC)
    assert len(dates) == 40
    create_snapshots(image, list(dates))
    set_snapshot_dates(image, dates)
    # qemu-img (the oracle) reads the crafted dates back, and the image is still clean.
    info = json.loads(qemu_img("info", "--output=json", image).stdout)
    assert {s["name"]: s["date-sec"] for s in info["snapshots"]} == {
        k: int(v.timestamp()) for k, v in dates.items()}
    qemu_img("check", image)
    return dates


ENV = clean_environ(TZ="Europe/Berlin")


def test_prune_matches_restic_daily_weekly(image: Path, timeline: dict[str, datetime]) -> None:
    r = run_cli(["-i", str(image), "prune", "--match", "daily-*", "--keep-daily", "7", "--keep-weekly", "3",
                 "--yes"], ENV)
    assert r.code == 0, r.err
    daily = [(k, v) for k, v in timeline.items() if k.startswith("daily-")]
    expected = restic_keep(daily, daily=7, weekly=3)
    left = set(snapshot_names(image))
    assert {n for n in left if n.startswith("daily-")} == expected
    # Outside --match nothing was touched.
    assert {n for n in left if not n.startswith("daily-")} == {k for k in timeline if not k.startswith("daily-")}
    assert f"Deleted {30 - len(expected)} snapshots" in r.out
    qemu_img("check", image)
    records = audit.read(image)
    assert [r["operation"] for r in records].count("delete") == 30 - len(expected)
    assert records[-1]["operation"] == "prune" and records[-1]["result"] == "ok"


def test_dry_run_lists_restic_choice_and_changes_nothing(image: Path, timeline: dict[str, datetime]) -> None:
    before = snapshot_names(image)
    r = run_cli(["-i", str(image), "prune", "--keep-last", "3", "--keep-within", "2d", "--dry-run", "--json"], ENV)
    assert r.code == 0, r.err
    data = json.loads(r.out)
    kept = {d["name"] for d in data["keep"]}
    assert kept == restic_keep(list(timeline.items()), last=3, within_days=2)
    assert {d["name"] for d in data["remove"]} == set(timeline) - kept
    assert all(d["reasons"] for d in data["keep"])
    assert snapshot_names(image) == before
    assert audit.read(image) == []


def test_dry_run_text_says_which_rule_kept_each(image: Path, timeline: dict[str, datetime]) -> None:
    r = run_cli(["-i", str(image), "prune", "--match", "late-*", "--keep-last", "1", "--keep-hourly", "2",
                 "--dry-run"], ENV)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert any("late-3" in line and "last, hourly" in line for line in lines)
    assert any("late-2" in line and "hourly" in line for line in lines)
    assert "would remove 2 snapshots:" in r.out
    assert "(36 others untouched)" in r.out


def test_young_safety_snapshots_survive_unless_matched_explicitly(image: Path) -> None:
    old = datetime.now(UTC) - timedelta(days=30)
    create_snapshots(image, ["base", "pre-restore-20240101-000000", "pre-restore-20240101-000001"])
    set_snapshot_dates(image, {"base": old})
    r = run_cli(["-i", str(image), "prune", "--keep-last", "1", "--yes"], ENV)
    assert r.code == 0, r.err
    assert snapshot_names(image) == ["base", "pre-restore-20240101-000000", "pre-restore-20240101-000001"]
    assert "safety snapshot younger than a day" in r.out
    r = run_cli(["-i", str(image), "prune", "--match", "pre-restore-*", "--keep-last", "1", "--yes"], ENV)
    assert r.code == 0, r.err
    assert snapshot_names(image) == ["base", "pre-restore-20240101-000001"]


def test_old_safety_snapshots_follow_the_policy(image: Path) -> None:
    create_snapshots(image, ["a", "pre-restore-20200101-000000"])
    set_snapshot_dates(image, {"pre-restore-20200101-000000": datetime(2020, 1, 1, tzinfo=UTC),
                               "a": datetime(2020, 1, 2, tzinfo=UTC)})
    r = run_cli(["-i", str(image), "prune", "--keep-last", "1", "--yes"], ENV)
    assert r.code == 0, r.err
    assert snapshot_names(image) == ["a"]


def test_no_rule_is_a_usage_error_and_deletes_nothing(image: Path) -> None:
    create_snapshots(image, ["a", "b"])
    r = run_cli(["-i", str(image), "prune", "--yes"], ENV)
    assert r.code == 2
    assert "at least one rule" in r.err
    assert snapshot_names(image) == ["a", "b"]


def test_on_a_tty_prune_asks_first(image: Path, timeline: dict[str, datetime]) -> None:
    r = run_cli(["-i", str(image), "prune", "--match", "late-*", "--keep-last", "1"], ENV,
                interactive=True, stdin="n\n")
    assert r.code == 1
    assert "Delete 3 snapshots" in r.err and "Nothing was changed." in r.err
    assert len(snapshot_names(image)) == 40
    r = run_cli(["-i", str(image), "prune", "--match", "late-*", "--keep-last", "1"], ENV,
                interactive=True, stdin="y\n")
    assert r.code == 0, r.err
    assert [n for n in snapshot_names(image) if n.startswith("late-")] == ["late-3"]


def test_prune_reattaches_children_of_deleted_snapshots(image: Path) -> None:
    from qsnap import service
    from qsnap.service.history import build_tree

    for name in ("root", "x-1", "x-2", "leaf"):
        service.create(image, name)
    r = run_cli(["-i", str(image), "prune", "--match", "x-*", "--keep-last", "1", "--yes"], ENV)
    assert r.code == 0, r.err
    tree = build_tree(image)
    assert [n.snapshot.name for _, n in tree.walk()] == ["root", "x-2", "leaf"]
    assert tree.nodes[tree.current].snapshot.name == "leaf"  # type: ignore[index]
