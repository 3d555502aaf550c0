"""Every `qsnap` command against the real qemu-img: list, create, restore, delete, info,
check, --version, --help, --debug."""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from qsnap_testlib import (
    fingerprint,
    has_pattern,
    has_traceback,
    make_image,
    one_error_line,
    qemu_img,
    qemu_io,
    qsnap_main,
    run_qsnap,
    snapshot_names,
    snapshot_table,
)

SAFETY_RE = re.compile(r"pre-restore-\d{8}-\d{6}(-\d+)?")


def sidecar(image: Path) -> dict:
    return json.loads(image.with_name(image.name + ".qsnap.json").read_text())


def sidecar_by_name(image: Path) -> dict[str, dict]:
    return {entry["name"]: entry for entry in sidecar(image)["snapshots"]}


# ------------------------------------------------------------------ list

def test_list_json_has_the_documented_schema_ordered_by_id(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["zeta", "alpha", "mid"])
    assert qsnap_main(["-i", image, "create", "with-desc", "-m", "a description"]).rc == 0
    rc, out, err = run_qsnap("-i", image, "list", "--json")
    assert rc == 0, err
    data = json.loads(out)
    # The schema; "engine" (which engine answered) is the one documented-elsewhere extra.
    assert {"image", "snapshots"} <= set(data) <= {"image", "snapshots", "engine"}
    assert data["image"] == str(image)
    assert [s["name"] for s in data["snapshots"]] == ["zeta", "alpha", "mid", "with-desc"]
    assert [s["id"] for s in data["snapshots"]] == ["1", "2", "3", "4"]
    oracle = json.loads(qemu_img("info", "-f", "qcow2", "--output=json", str(image)).stdout)["snapshots"]
    for snap, truth in zip(data["snapshots"], oracle, strict=True):
        assert set(snap) == {"id", "name", "date", "vm_state_size", "vm_clock_ns", "disk_size",
                             "description"}
        assert isinstance(snap["id"], str) and snap["id"] == truth["id"]
        assert snap["vm_state_size"] == truth["vm-state-size"] == 0
        assert snap["vm_clock_ns"] == truth["vm-clock-sec"] * 10**9 + truth["vm-clock-nsec"]
        assert snap["disk_size"] is None or isinstance(snap["disk_size"], int)
        date = datetime.fromisoformat(snap["date"].replace("Z", "+00:00"))
        assert date.utcoffset() == timedelta(0), "date must be UTC"
        assert abs(date.timestamp() - truth["date-sec"]) < 1
        assert abs(datetime.now(UTC) - date) < timedelta(minutes=10)
    assert [s["description"] for s in data["snapshots"]] == [None, None, None, "a description"]


def test_list_json_orders_by_numeric_id_not_text(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=[f"s{i}" for i in range(1, 12)])
    # IDs 10 and 11 sort before 2 as text: the order must be numeric.
    rc, out, _ = qsnap_main(["-i", image, "list", "--json"])
    assert rc == 0
    ids = [s["id"] for s in json.loads(out)["snapshots"]]
    assert ids == [str(i) for i in range(1, 12)]


def test_list_text_shows_every_snapshot_with_id_name_and_description(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["first", "second"])
    qsnap_main(["-i", image, "create", "third", "-m", "after upgrade"])
    rc, out, err = run_qsnap("-i", image, "list")
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [row[:2] for row in rows] == [["1", "first"], ["2", "second"], ["3", "third"]]
    assert out.splitlines()[3].rstrip().endswith("after upgrade")


def test_list_of_image_without_snapshots_says_so(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    rc, out, _ = qsnap_main(["-i", image, "list"])
    assert rc == 0
    assert "No snapshots" in out
    rc, out, _ = qsnap_main(["-i", image, "list", "--json"])
    assert json.loads(out)["snapshots"] == []


# ------------------------------------------------------------------ create and the sidecar

def test_create_takes_a_snapshot_and_keeps_the_description_in_the_sidecar(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    rc, out, err = run_qsnap("-i", image, "create", "before-upgrade", "-m", "pre dist-upgrade")
    assert rc == 0, err
    assert "before-upgrade" in out
    assert snapshot_names(image) == ["before-upgrade"]
    entry = sidecar_by_name(image)["before-upgrade"]
    assert entry["description"] == "pre dist-upgrade"
    assert entry["id"] == "1"
    side = image.with_name(image.name + ".qsnap.json")
    assert stat.S_IMODE(side.stat().st_mode) == 0o600


def test_create_without_description_lists_none(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    assert qsnap_main(["-i", image, "create", "plain"]).rc == 0
    snaps = json.loads(qsnap_main(["-i", image, "list", "--json"]).out)["snapshots"]
    assert snaps[0]["description"] is None


def test_sidecar_drops_entries_of_deleted_snapshots(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    for name in ("one", "two", "three"):
        assert qsnap_main(["-i", image, "create", name, "-m", f"desc {name}"]).rc == 0
    assert set(sidecar_by_name(image)) == {"one", "two", "three"}
    assert qsnap_main(["-i", image, "delete", "two"]).rc == 0
    assert set(sidecar_by_name(image)) == {"one", "three"}
    # A snapshot removed behind qsnap's back disappears from the sidecar at the next write.
    qemu_img("snapshot", "-d", "one", str(image))
    assert qsnap_main(["-i", image, "create", "four"]).rc == 0
    assert set(sidecar_by_name(image)) == {"three", "four"}
    assert sidecar_by_name(image)["three"]["description"] == "desc three"


def test_sidecar_description_does_not_stick_to_a_reused_id(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    assert qsnap_main(["-i", image, "create", "old", "-m", "old description"]).rc == 0
    qemu_img("snapshot", "-d", "old", str(image))
    qemu_img("snapshot", "-c", "new", str(image))  # gets ID 1 again, made by another tool
    snaps = json.loads(qsnap_main(["-i", image, "list", "--json"]).out)["snapshots"]
    assert [(s["id"], s["name"], s["description"]) for s in snaps] == [("1", "new", None)]


def test_sidecar_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the final rename fails the old sidecar stays whole and no temp file is left."""
    image = make_image(tmp_path)
    assert qsnap_main(["-i", image, "create", "one", "-m", "kept"]).rc == 0
    side = image.with_name(image.name + ".qsnap.json")
    before = side.read_bytes()

    import qsnap.core.fsutil as fsutil

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "replace", failing_replace)
    rc, _, err = qsnap_main(["-i", image, "create", "two", "-m", "lost"])
    monkeypatch.undo()
    assert rc == 0, err  # the snapshot itself is taken; only the annotation is lost
    assert "warning" in err
    assert side.read_bytes() == before
    assert json.loads(before)["snapshots"][0]["description"] == "kept"
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == []
    assert snapshot_names(image) == ["one", "two"]


def test_damaged_sidecar_never_blocks_snapshot_work(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    image.with_name(image.name + ".qsnap.json").write_text("{not json")
    assert qsnap_main(["-i", image, "list"]).rc == 0
    assert qsnap_main(["-i", image, "create", "B", "-m", "fresh"]).rc == 0
    assert sidecar_by_name(image)["B"]["description"] == "fresh"


# ------------------------------------------------------------------ restore

def test_restore_brings_the_data_back_and_the_safety_snapshot_keeps_the_current_state(
    tmp_path: Path,
) -> None:
    image = make_image(tmp_path)
    qemu_io(image, "write -P 0x11 0 1M")
    rc, _, err = run_qsnap("-i", image, "create", "A")
    assert rc == 0, err
    qemu_io(image, "write -P 0x22 0 1M")

    rc, out, err = run_qsnap("-i", image, "restore", "A")
    assert rc == 0, err
    qemu_io(image, "read -P 0x11 0 1M")  # raises if the data did not come back

    names = snapshot_names(image)
    safety = [n for n in names if n.startswith("pre-restore-")]
    assert len(safety) == 1 and SAFETY_RE.fullmatch(safety[0])
    assert safety[0] in out, "the safety snapshot's name must be printed"
    undo = [line for line in out.splitlines() if "restore" in line and safety[0] in line
            and "qsnap" in line]
    assert undo, f"the command that goes back must be printed: {out!r}"

    rc, _, err = run_qsnap("-i", image, "restore", safety[0], "--no-safety")
    assert rc == 0, err
    qemu_io(image, "read -P 0x22 0 1M")
    assert not has_pattern(image, 0x11)


def test_the_printed_undo_command_works(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"], patterns={"A": 0x11, None: 0x22})
    rc, out, err = run_qsnap("-i", image, "restore", "A")
    assert rc == 0, err
    undo = next(line for line in out.splitlines() if line.startswith("To undo:"))
    argv = undo.removeprefix("To undo:").split()
    assert argv[0] == "qsnap"
    rc, _, err = run_qsnap(*argv[1:], "--no-safety")
    assert rc == 0, err
    assert has_pattern(image, 0x22)


def test_safety_snapshot_name_has_the_documented_format_and_is_unique(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    for _ in range(3):  # three restores within the same second or two
        assert qsnap_main(["-i", image, "restore", "A"]).rc == 0
    safety = [n for n in snapshot_names(image) if n.startswith("pre-restore-")]
    assert len(safety) == 3 and len(set(safety)) == 3
    for name in safety:
        assert SAFETY_RE.fullmatch(name), name
        stamp = datetime.strptime(name[len("pre-restore-"):][:15], "%Y%m%d-%H%M%S")
        assert abs(datetime.now() - stamp) < timedelta(minutes=10)  # local time, like the guide


def test_safety_snapshot_is_described_in_the_sidecar(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    assert qsnap_main(["-i", image, "restore", "A"]).rc == 0
    entries = sidecar_by_name(image)
    safety = next(n for n in entries if n.startswith("pre-restore-"))
    assert entries[safety].get("description")


def test_restore_no_safety_takes_no_snapshot(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"], patterns={"A": 0x11, None: 0x22})
    rc, out, err = qsnap_main(["-i", image, "restore", "A", "--no-safety"])
    assert rc == 0, err
    assert snapshot_names(image) == ["A"]
    assert "pre-restore-" not in out
    assert has_pattern(image, 0x11)


def test_restore_json_reports_the_safety_snapshot(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    rc, out, err = qsnap_main(["-i", image, "restore", "A", "--json"])
    assert rc == 0, err
    data = json.loads(out)
    assert data["snapshot"]["name"] == "A"
    assert SAFETY_RE.fullmatch(data["safety_snapshot"]["name"])
    assert data["safety_snapshot"]["name"] in snapshot_names(image)


# ------------------------------------------------------------------ delete

def test_delete_removes_exactly_that_snapshot(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A", "B", "C"], patterns={"A": 0x11, "C": 0x33})
    rc, out, err = run_qsnap("-i", image, "delete", "B")
    assert rc == 0, err
    assert "B" in out
    assert snapshot_names(image) == ["A", "C"]
    # The others still hold their data.
    assert qsnap_main(["-i", image, "restore", "A", "--no-safety"]).rc == 0
    assert has_pattern(image, 0x11)
    assert qsnap_main(["-i", image, "restore", "C", "--no-safety"]).rc == 0
    assert has_pattern(image, 0x33)


def test_delete_json(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A", "B"])
    rc, out, err = qsnap_main(["-i", image, "delete", "A", "--json"])
    assert rc == 0, err
    assert json.loads(out)["snapshot"]["name"] == "A"
    assert snapshot_names(image) == ["B"]


# ------------------------------------------------------------------ info and check

def test_info_text_and_json(tmp_path: Path) -> None:
    image = make_image(tmp_path, size="32M", snapshots=["A", "B"])
    rc, out, err = run_qsnap("-i", image, "info", "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["virtual_size"] == 32 * 1024 * 1024
    assert data["file_size"] == image.stat().st_size
    assert data["cluster_size"] == 65536
    assert data["snapshot_count"] == 2
    assert data["format"] == "qcow2"
    assert data["compat"] == "1.1"
    rc, out, err = qsnap_main(["-i", image, "info"])
    assert rc == 0, err
    assert re.search(r"virtual size:.*33554432", out)
    assert re.search(r"snapshots:\s+2\b", out)
    assert re.search(r"cluster size:\s+64 KiB", out)
    assert re.search(rf"file size:.*\b{image.stat().st_size}\b", out)


def corrupt_image(tmp_path: Path) -> Path:
    """An image whose L2 table points a data cluster at the L1 table (qemu-img check: exit 2)."""
    image = make_image(tmp_path, name="corrupt.qcow2", patterns={None: 0x11})
    with open(image, "r+b") as handle:
        header = handle.read(104)
        (l1_offset,) = struct.unpack(">Q", header[40:48])
        handle.seek(l1_offset)
        (l1_entry,) = struct.unpack(">Q", handle.read(8))
        handle.seek(l1_entry & 0x00FFFFFFFFFFFE00)
        handle.write(struct.pack(">Q", (1 << 63) | l1_offset))
    assert qemu_img("check", str(image), check=False).returncode == 2
    return image


def test_check_clean_image(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    rc, out, err = run_qsnap("-i", image, "check", "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["verdict"] == "clean"
    assert data["corruptions"] == data["leaks"] == data["check_errors"] == 0
    rc, out, _ = qsnap_main(["-i", image, "check"])
    assert rc == 0 and "clean" in out


def test_check_corrupt_image_exits_10(tmp_path: Path) -> None:
    image = corrupt_image(tmp_path)
    before = fingerprint(image)
    rc, out, err = run_qsnap("-i", image, "check", "--json")
    assert rc == 10, err
    data = json.loads(out)
    assert data["verdict"] == "corrupt" and data["corruptions"] >= 1
    rc, out, err = run_qsnap("-i", image, "check")
    assert rc == 10
    assert "corrupt" in out + err and not has_traceback(err)
    assert fingerprint(image) == before, "check must never repair or write"


def test_check_leaks_only_is_not_an_error(tmp_path: Path) -> None:
    image = make_image(tmp_path, patterns={None: 0x11})
    # Point the only L2 entry at nothing: its data cluster leaks (qemu-img check exit 3).
    with open(image, "r+b") as handle:
        header = handle.read(104)
        (l1_offset,) = struct.unpack(">Q", header[40:48])
        handle.seek(l1_offset)
        (l1_entry,) = struct.unpack(">Q", handle.read(8))
        handle.seek(l1_entry & 0x00FFFFFFFFFFFE00)
        handle.write(struct.pack(">Q", 0))
    assert qemu_img("check", str(image), check=False).returncode == 3
    rc, out, _ = qsnap_main(["-i", image, "check", "--json"])
    assert rc == 0
    assert json.loads(out)["verdict"] == "leaks"


def test_mutations_refuse_a_corrupt_image(tmp_path: Path) -> None:
    image = corrupt_image(tmp_path)
    before = fingerprint(image)
    for argv in (["create", "X"],):
        rc, _, err = qsnap_main(["-i", image, *argv])
        assert rc == 10, err
        one_error_line(err)
    assert fingerprint(image) == before


# ------------------------------------------------------------------ --version, --help, --debug

def test_version() -> None:
    import qsnap

    rc, out, _err = run_qsnap("--version")
    assert rc == 0
    assert out.strip() == f"qsnap {qsnap.__version__}"


def test_help_names_every_command_and_the_exit_codes() -> None:
    rc, out, _ = run_qsnap("--help")
    assert rc == 0
    for command in ("list", "create", "restore", "delete", "backup", "info", "check"):
        assert re.search(rf"\b{command}\b", out), command
    assert "exit codes" in out
    for command in ("list", "create", "restore", "delete", "info", "check"):
        rc, out, _ = run_qsnap(command, "--help")
        assert rc == 0 and f"usage: qsnap {command}" in out


def test_help_and_version_in_process_go_to_the_injected_stdout() -> None:
    """main(argv, env) must write everything to env's streams (argparse prints to sys.stdout)."""
    rc, out, _ = qsnap_main(["list", "--help"])
    assert rc == 0 and "usage: qsnap list" in out
    rc, out, _ = qsnap_main(["--version"])
    assert rc == 0 and out.startswith("qsnap ")


def test_no_command_prints_usage_and_exits_2() -> None:
    rc, out, err = qsnap_main([])
    assert rc == 2
    assert "usage:" in out + err


def test_unknown_option_is_a_usage_error() -> None:
    rc, _, err = run_qsnap("list", "--no-such-option")
    assert rc == 2
    assert "usage:" in err and not has_traceback(err)


def test_debug_shows_the_commands_run(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    rc, _, err = run_qsnap("--debug", "-i", image, "create", "B")
    assert rc == 0, err
    runs = [line for line in err.splitlines() if "run:" in line]
    assert any("qemu-img snapshot" in line and " -c B " in line for line in runs), err
    # Without --debug: nothing but the result.
    rc, _, err = run_qsnap("-i", image, "create", "C")
    assert rc == 0 and err == ""


def test_debug_shows_a_traceback_on_error_and_plain_mode_does_not(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    rc, _, err = run_qsnap("-i", image, "restore", "missing", "--debug")
    assert rc == 3
    assert has_traceback(err)
    assert "SnapshotNotFound" in err
    rc, _, err = run_qsnap("-i", image, "restore", "missing")
    assert rc == 3
    one_error_line(err)


def test_qsnap_runs_with_a_relative_image_path(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    rc, out, err = run_qsnap("-i", image.name, "list", "--json", cwd=tmp_path)
    assert rc == 0, err
    assert json.loads(out)["image"] == str(image)
    assert os.path.isabs(json.loads(out)["image"])


def test_snapshot_table_oracle_agrees_with_list(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A", "B"])
    data = json.loads(qsnap_main(["-i", image, "list", "--json"]).out)
    assert [(s["id"], s["name"]) for s in data["snapshots"]] == snapshot_table(image)
