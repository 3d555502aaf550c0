"""Every operation resolves NAME to exactly one snapshot: duplicates and numeric names made by
other tools are refused with exit 5 and --id N picks one; create never replaces silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qsnap_testlib import (
    fingerprint,
    guide_main,
    has_pattern,
    make_image,
    one_error_line,
    qemu_img,
    qemu_io,
    qsnap_main,
    run_qsnap,
    snapshot_table,
)


def duplicates(tmp_path: Path) -> Path:
    """Two snapshots named A (IDs 1 and 2, holding 0x11 and 0x22), current state 0x33."""
    image = make_image(tmp_path)
    for pattern in (0x11, 0x22):
        qemu_io(image, f"write -P {pattern:#04x} 0 1M")
        qemu_img("snapshot", "-c", "A", str(image))
    qemu_io(image, "write -P 0x33 0 1M")
    assert snapshot_table(image) == [("1", "A"), ("2", "A")]
    return image


def numeric(tmp_path: Path) -> Path:
    """A (ID 1, 0x11), B (ID 2, 0x22), one named "1" (ID 3, 0x33), one named "2" (ID 4, 0x44)."""
    image = make_image(tmp_path, snapshots=["A", "B", "1", "2"],
                       patterns={"A": 0x11, "B": 0x22, "1": 0x33, "2": 0x44, None: 0x55})
    assert snapshot_table(image) == [("1", "A"), ("2", "B"), ("3", "1"), ("4", "2")]
    return image


# ------------------------------------------------------------------ duplicates

@pytest.mark.parametrize("command", ["restore", "delete"])
def test_duplicate_names_are_refused_with_the_candidates(tmp_path: Path, command: str) -> None:
    image = duplicates(tmp_path)
    before = fingerprint(image)
    rc, _, err = run_qsnap("-i", image, command, "A", "--yes")
    assert rc == 5
    line = one_error_line(err)
    assert "ID 1" in line and "ID 2" in line
    assert "--id" in line
    assert fingerprint(image) == before


@pytest.mark.parametrize(("snapshot_id", "pattern"), [("1", 0x11), ("2", 0x22)])
def test_restore_by_id_picks_exactly_that_duplicate(tmp_path: Path, snapshot_id: str, pattern: int) -> None:
    image = duplicates(tmp_path)
    rc, _, err = qsnap_main(["-i", image, "restore", "--id", snapshot_id])
    assert rc == 0, err
    assert has_pattern(image, pattern)
    # A safety snapshot of 0x33 was taken, the duplicates are untouched.
    names = [name for _, name in snapshot_table(image)]
    assert names[:2] == ["A", "A"] and names[2].startswith("pre-restore-")


def test_restore_by_id_with_the_name_checks_they_agree(tmp_path: Path) -> None:
    image = duplicates(tmp_path)
    assert qsnap_main(["-i", image, "restore", "A", "--id", "2", "--no-safety"]).rc == 0
    assert has_pattern(image, 0x22)
    before = fingerprint(image)
    rc, _, err = qsnap_main(["-i", image, "restore", "B", "--id", "2"])
    assert rc == 3, err
    assert fingerprint(image) == before


@pytest.mark.parametrize("attempt", range(3))  # the daemon's shutdown raced in 1 run of 3
def test_delete_the_second_of_two_duplicates(tmp_path: Path, attempt: int) -> None:
    """qemu-img -d can only delete the first: qsnap goes through qemu-storage-daemon."""
    image = duplicates(tmp_path)
    rc, _, err = run_qsnap("-i", image, "delete", "--id", "2", "--yes")
    assert rc == 0, err
    assert snapshot_table(image) == [("1", "A")]
    assert qemu_img("check", str(image), check=False).returncode == 0
    assert has_pattern(image, 0x33), "deleting a snapshot must not touch the current state"
    assert qsnap_main(["-i", image, "restore", "A", "--no-safety"]).rc == 0
    assert has_pattern(image, 0x11), "the surviving A must be the first one"


def test_delete_the_first_of_two_duplicates(tmp_path: Path) -> None:
    image = duplicates(tmp_path)
    rc, _, err = qsnap_main(["-i", image, "delete", "--id", "1"])
    assert rc == 0, err
    assert snapshot_table(image) == [("2", "A")]
    assert qsnap_main(["-i", image, "restore", "A", "--no-safety"]).rc == 0
    assert has_pattern(image, 0x22)


def test_unknown_id_is_not_found(tmp_path: Path) -> None:
    image = duplicates(tmp_path)
    before = fingerprint(image)
    for command in ("restore", "delete"):
        rc, _, err = qsnap_main(["-i", image, command, "--id", "9"])
        assert rc == 3
        one_error_line(err)
    assert fingerprint(image) == before


def test_guide_cli_refuses_duplicates_and_accepts_id(tmp_path: Path) -> None:
    image = duplicates(tmp_path)
    before = fingerprint(image)
    rc, _, err = guide_main(["-i", image, "delete", "A"])
    assert rc == 5, err
    assert fingerprint(image) == before
    rc, out, err = guide_main(["-i", image, "delete", "A", "--id", "2"])
    assert rc == 0, err
    assert "Snapshot 'A' deleted successfully" in out
    assert snapshot_table(image) == [("1", "A")]


# ------------------------------------------------------------------ numeric names (QEMU reads them as IDs)

@pytest.mark.parametrize("command", ["restore", "delete"])
@pytest.mark.parametrize("name", ["1", "2"])
def test_numeric_name_never_acts_on_the_wrong_snapshot(tmp_path: Path, command: str, name: str) -> None:
    image = numeric(tmp_path)
    before = fingerprint(image)
    rc, _, err = qsnap_main(["-i", image, command, "--", name])
    assert rc != 0
    one_error_line(err)
    assert fingerprint(image) == before


@pytest.mark.parametrize("command", ["restore", "delete"])
def test_numeric_name_is_ambiguous_and_lists_the_candidates(tmp_path: Path, command: str) -> None:
    """The issue: an image holding numeric names made by other tools → exit 5, candidates listed
    ("1" is both the ID of A and the name of ID 3)."""
    image = numeric(tmp_path)
    before = fingerprint(image)
    rc, _, err = qsnap_main(["-i", image, command, "--", "1"])
    assert rc == 5, err
    line = one_error_line(err)
    assert "ID 1" in line and "ID 3" in line and "--id" in line
    assert fingerprint(image) == before


@pytest.mark.parametrize(("snapshot_id", "pattern"), [("1", 0x11), ("2", 0x22), ("3", 0x33), ("4", 0x44)])
def test_restore_by_id_with_numeric_names(tmp_path: Path, snapshot_id: str, pattern: int) -> None:
    image = numeric(tmp_path)
    rc, _, err = qsnap_main(["-i", image, "restore", "--id", snapshot_id, "--no-safety"])
    assert rc == 0, err
    assert has_pattern(image, pattern)


@pytest.mark.parametrize("snapshot_id", ["1", "2", "3", "4"])
def test_delete_by_id_with_numeric_names(tmp_path: Path, snapshot_id: str) -> None:
    image = numeric(tmp_path)
    table = snapshot_table(image)
    rc, _, err = qsnap_main(["-i", image, "delete", "--id", snapshot_id])
    assert rc == 0, err
    assert snapshot_table(image) == [row for row in table if row[0] != snapshot_id]


# ------------------------------------------------------------------ create never replaces silently

def test_create_of_an_existing_name_exits_4_and_changes_nothing(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    assert qsnap_main(["-i", image, "create", "A", "-m", "original"]).rc == 0
    side = image.with_name(image.name + ".qsnap.json")
    before = (fingerprint(image), side.read_bytes())
    rc, _, err = run_qsnap("-i", image, "create", "A", "-m", "second")
    assert rc == 4
    line = one_error_line(err)
    assert "A" in line and "--replace" in line
    assert (fingerprint(image), side.read_bytes()) == before


def test_guide_create_of_an_existing_name_exits_4(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["initial-setup"])
    before = fingerprint(image)
    rc, out, err = guide_main(["-i", image, "create", "initial-setup"])
    assert rc == 4, err
    assert "created successfully" not in out
    assert fingerprint(image) == before


def test_replace_leaves_one_snapshot_holding_the_new_data(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["keep", "A"], patterns={"keep": 0x01, "A": 0x11, None: 0x22})
    assert qsnap_main(["-i", image, "create", "B"]).rc == 0
    rc, _out, err = run_qsnap("--debug", "-i", image, "create", "A", "--replace", "-m", "new one")
    assert rc == 0, err
    names = [name for _, name in snapshot_table(image)]
    assert sorted(names) == ["A", "B", "keep"]
    # The new snapshot is taken before the old one is removed: never a moment with neither.
    runs = [line for line in err.splitlines() if "run:" in line or "spawn:" in line]
    created = next(i for i, line in enumerate(runs) if " -c A " in line)
    removed = next(i for i, line in enumerate(runs) if " -d A " in line or "qemu-storage-daemon" in line)
    assert created < removed
    qemu_io(image, "write -P 0x99 0 1M")
    assert qsnap_main(["-i", image, "restore", "A", "--no-safety"]).rc == 0
    assert has_pattern(image, 0x22)
    listed = json.loads(qsnap_main(["-i", image, "list", "--json"]).out)["snapshots"]
    assert [s["description"] for s in listed if s["name"] == "A"] == ["new one"]


def test_replace_of_a_missing_name_just_creates(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    rc, _, err = qsnap_main(["-i", image, "create", "A", "--replace"])
    assert rc == 0, err
    assert snapshot_table(image) == [("1", "A")]


def test_replace_refuses_duplicates(tmp_path: Path) -> None:
    image = duplicates(tmp_path)
    rc, _, err = qsnap_main(["-i", image, "create", "A", "--replace"])
    assert rc == 5, err
    assert snapshot_table(image) == [("1", "A"), ("2", "A")]
