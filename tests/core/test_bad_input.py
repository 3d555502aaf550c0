"""Bad input gets one clear sentence on stderr, no traceback, the documented exit code, and
changes nothing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from qsnap_testlib import (
    QSNAP,
    VENV_BIN,
    fingerprint,
    has_pattern,
    make_image,
    one_error_line,
    qsnap_main,
    run_guide,
    run_qsnap,
    snapshot_table,
)

ALL_COMMANDS = [["list"], ["info"], ["check"], ["create", "X"], ["restore", "A"], ["delete", "A"]]
MUTATIONS = [["create", "X"], ["restore", "A"], ["delete", "A"]]
IDS = [argv[0] for argv in ALL_COMMANDS]


def bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "disk.qcow2"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(os.urandom(256 * 1024))
    elif kind == "raw":  # a raw disk image: an MBR and zeros
        path.write_bytes(b"\x00" * 510 + b"\x55\xaa" + b"\x00" * (1024 * 1024 - 512))
    elif kind == "text":
        path.write_text("QFI is not enough\n")
    return path


def snapshot_of(path: Path) -> object:
    """What a test can compare to prove nothing changed: contents, or the directory listing."""
    if path.is_dir():
        return sorted(os.listdir(path))
    return fingerprint(path)


@pytest.mark.parametrize("argv", ALL_COMMANDS, ids=IDS)
@pytest.mark.parametrize("kind", ["directory", "empty", "random", "raw", "text"])
def test_not_a_qcow2_image_exits_7(tmp_path: Path, kind: str, argv: list[str]) -> None:
    path = bad_file(tmp_path, kind)
    before = snapshot_of(path)
    rc, _, err = qsnap_main(["-i", path, *argv])
    assert rc == 7, err
    line = one_error_line(err)
    assert str(path) in line
    assert snapshot_of(path) == before
    assert not path.with_name(path.name + ".qsnap.json").exists()


def test_not_a_qcow2_image_through_the_console_script(tmp_path: Path) -> None:
    path = bad_file(tmp_path, "random")
    before = fingerprint(path)
    rc, _, err = run_qsnap("-i", path, "create", "X")
    assert rc == 7
    assert "not a qcow2" in one_error_line(err)
    rc, _, err = run_guide("-i", path, "list")
    assert rc == 7
    one_error_line(err, "manage-snapshots")
    assert fingerprint(path) == before


@pytest.mark.parametrize("argv", ALL_COMMANDS, ids=IDS)
def test_missing_image_exits_7(tmp_path: Path, argv: list[str]) -> None:
    path = tmp_path / "missing.qcow2"
    rc, _, err = qsnap_main(["-i", path, *argv])
    assert rc == 7, err
    assert str(path) in one_error_line(err)
    assert not path.exists()


def test_empty_file_message_says_empty(tmp_path: Path) -> None:
    path = bad_file(tmp_path, "empty")
    rc, _, err = qsnap_main(["-i", path, "list"])
    assert rc == 7
    assert "empty" in one_error_line(err)


def test_directory_message_says_directory(tmp_path: Path) -> None:
    path = bad_file(tmp_path, "directory")
    rc, _, err = qsnap_main(["-i", path, "list"])
    assert rc == 7
    assert "directory" in one_error_line(err)


# ------------------------------------------------------------------ truncated qcow2

@pytest.fixture
def truncated(tmp_path: Path) -> Path:
    """A qcow2 with snapshot A and 2 MiB of data, cut to 100 KB (header intact, tables gone)."""
    image = make_image(tmp_path, snapshots=["A"], patterns={"A": 0x11, None: 0x22})
    os.truncate(image, 100_000)
    return image


@pytest.mark.parametrize("argv", MUTATIONS, ids=[a[0] for a in MUTATIONS])
def test_truncated_image_is_refused_as_corrupt_or_unreadable(truncated: Path, argv: list[str]) -> None:
    before = fingerprint(truncated)
    rc, _, err = qsnap_main(["-i", truncated, *argv])
    assert rc in (7, 10), err  # not "snapshot not found": the image is damaged
    one_error_line(err)
    assert fingerprint(truncated) == before


def test_truncated_image_create_says_corrupt(truncated: Path) -> None:
    before = fingerprint(truncated)
    rc, _, err = qsnap_main(["-i", truncated, "create", "X"])
    assert rc == 10, err
    assert "corrupt" in one_error_line(err)
    assert fingerprint(truncated) == before


def test_truncated_image_list_does_not_show_garbage(truncated: Path) -> None:
    """qemu-img reads the lost snapshot table as zeros (an entry with no ID, no name, 1970):
    listing it as a snapshot with exit 0 would hide the damage."""
    rc, out, err = qsnap_main(["-i", truncated, "list", "--json"])
    assert rc in (7, 10), out
    one_error_line(err)


def test_truncated_image_check_exits_10(truncated: Path) -> None:
    rc, out, _ = qsnap_main(["-i", truncated, "check"])
    assert rc == 10
    assert "corrupt" in out


# ------------------------------------------------------------------ read-only image file

@pytest.mark.parametrize("argv", MUTATIONS, ids=[a[0] for a in MUTATIONS])
def test_read_only_image_refuses_changes_even_for_root(tmp_path: Path, argv: list[str]) -> None:
    image = make_image(tmp_path, snapshots=["A"], patterns={"A": 0x11, None: 0x22})
    image.chmod(0o444)
    before = fingerprint(image)
    rc, _, err = run_qsnap("-i", image, *argv)
    assert rc == 7, err
    line = one_error_line(err)
    assert "read-only" in line
    assert fingerprint(image) == before
    assert stat.S_IMODE(image.stat().st_mode) == 0o444
    assert snapshot_table(image) == [("1", "A")]
    assert has_pattern(image, 0x22)


def test_read_only_image_can_still_be_read(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    image.chmod(0o444)
    assert qsnap_main(["-i", image, "list"]).rc == 0
    assert qsnap_main(["-i", image, "info"]).rc == 0


# ------------------------------------------------------------------ unknown snapshot

@pytest.mark.parametrize("command", ["restore", "delete"])
def test_unknown_snapshot_exits_3(tmp_path: Path, command: str) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    before = fingerprint(image)
    rc, _, err = run_qsnap("-i", image, command, "nope")
    assert rc == 3
    assert "nope" in one_error_line(err)
    assert fingerprint(image) == before
    rc, out, err = run_guide("-i", image, command, "nope")
    assert rc == 3
    one_error_line(err, "manage-snapshots")
    assert "successfully" not in out
    assert fingerprint(image) == before


# ------------------------------------------------------------------ qemu-img missing

NEEDS_QEMU_IMG = [["check"], ["create", "X"], ["restore", "A"], ["delete", "A"]]  # list/info may read qcow2 directly


@pytest.mark.parametrize("argv", NEEDS_QEMU_IMG, ids=[a[0] for a in NEEDS_QEMU_IMG])
def test_qemu_img_missing_exits_9_with_the_package_to_install(tmp_path: Path, argv: list[str]) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    before = fingerprint(image)
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    (empty_bin / "python3").symlink_to(VENV_BIN / "python")  # python, but no qemu-img
    rc, _, err = run_qsnap("-i", image, *argv, env={"PATH": str(empty_bin)})
    assert rc == 9, err
    line = one_error_line(err)
    assert "qemu-img" in line
    assert "apt-get install qemu-utils" in line
    assert fingerprint(image) == before
    assert QSNAP.is_absolute()
