"""The exit codes are a contract: every error class carries its documented code, `qsnap --help`
lists them, and each code is produced by a real CLI run against real QEMU programs.

Codes 11 (verification failed) and 12 (monitor or VM error) are produced by the backup and
monitor suites (tests/backup/, tests/monitor/); the rest are produced here.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from qsnap_testlib import (
    QSNAP,
    clean_environ,
    fingerprint,
    make_image,
    one_error_line,
    qemu_img,
    qemu_io,
    qsnap_main,
    run_guide,
    run_qsnap,
)

from qsnap.core import errors

DOCUMENTED = {
    0: "ok", 1: "unexpected error", 2: "usage", 3: "snapshot not found", 4: "snapshot already exists",
    5: "ambiguous snapshot", 6: "invalid name", 7: "image missing, unreadable or not qcow2",
    8: "image in use", 9: "program missing", 10: "image corrupt", 11: "verification failed",
    12: "monitor or VM error", 13: "output exists", 14: "no readable guest filesystem",
    15: "guest path not found", 130: "interrupted",
}

CLASS_CODES = {
    "QsnapError": 1, "ProcessError": 1, "UsageError": 2, "SnapshotNotFound": 3, "SnapshotExists": 4,
    "AmbiguousSnapshot": 5, "InvalidName": 6, "ImageError": 7, "ImageInUse": 8, "LockBusy": 8,
    "ProgramMissing": 9, "CorruptImage": 10, "VerificationFailed": 11, "MonitorError": 12,
    "OutputExists": 13, "Interrupted": 130, "CorruptFilesystem": 10, "GuestFsError": 14, "GuestPathNotFound": 15,
}


def test_every_error_class_has_its_documented_code() -> None:
    for cls in errors.ALL_ERRORS:
        assert issubclass(cls, errors.QsnapError)
        if cls.__name__ in CLASS_CODES:
            assert cls.exit_code == CLASS_CODES[cls.__name__], cls.__name__
        else:  # a class added later must use a documented code
            assert cls.exit_code in DOCUMENTED, cls.__name__
    names = {cls.__name__ for cls in errors.ALL_ERRORS}
    assert set(CLASS_CODES) <= names, set(CLASS_CODES) - names
    assert {cls.exit_code for cls in errors.ALL_ERRORS} == set(DOCUMENTED) - {0}


def test_every_error_class_in_the_module_is_listed() -> None:
    defined = {value for value in vars(errors).values()
               if isinstance(value, type) and issubclass(value, errors.QsnapError)}
    assert defined == set(errors.ALL_ERRORS)


def test_errors_have_a_default_message_and_keep_a_hint() -> None:
    for cls in errors.ALL_ERRORS:
        if cls is errors.ProcessError:
            exc = cls(["qemu-img", "info"], 1, "", "qemu-img: boom\n")
            assert "qemu-img info" in str(exc) and "boom" in str(exc)
            continue
        assert str(cls()), cls.__name__
        assert "do this" in str(cls("failed.", hint="do this"))


def test_help_lists_every_exit_code() -> None:
    rc, out, _ = run_qsnap("--help")
    assert rc == 0
    section = out[out.index("exit codes:"):].split("\n\n")[0].replace("\n", " ")
    for code in DOCUMENTED:
        assert re.search(rf"(?<![0-9]){code} [a-z]", section), code


# ------------------------------------------------------------------ each code from a real run

def test_code_0_ok(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    assert run_qsnap("-i", image, "list").rc == 0


def test_code_1_unexpected_error_is_one_line_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug (simulated: the service raises a plain RuntimeError) → exit 1, one sentence."""
    image = make_image(tmp_path, snapshots=["A"])
    import qsnap.service.snapshots as snapshots

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(snapshots, "list_snapshots", broken)
    monkeypatch.setattr("qsnap.service.list_snapshots", broken, raising=False)
    rc, _, err = qsnap_main(["-i", image, "list"])
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "unexpected error" in lines[0] and "simulated bug" in lines[0]
    assert "--debug" in lines[0]
    rc, _, err = qsnap_main(["-i", image, "list", "--debug"])
    assert rc == 1 and "Traceback" in err


def test_code_2_usage(tmp_path: Path) -> None:
    rc, _, err = run_qsnap("list", "--bogus")
    assert rc == 2 and "usage:" in err
    rc, _, err = run_qsnap("restore", cwd=tmp_path)  # neither NAME nor --id
    assert rc == 2
    rc, _, err = run_qsnap("frobnicate")
    assert rc == 2


def test_code_3_not_found(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    rc, _, err = run_qsnap("-i", image, "restore", "B")
    assert rc == 3
    one_error_line(err)


def test_code_4_exists(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    rc, _, err = run_qsnap("-i", image, "create", "A")
    assert rc == 4
    one_error_line(err)


def test_code_5_ambiguous(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A", "A"])
    rc, _, err = run_qsnap("-i", image, "delete", "A")
    assert rc == 5
    one_error_line(err)


def test_code_6_invalid_name(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    rc, _, err = run_qsnap("-i", image, "create", "bad name")
    assert rc == 6
    one_error_line(err)


def test_code_7_image(tmp_path: Path) -> None:
    rc, _, err = run_qsnap("-i", tmp_path / "none.qcow2", "list")
    assert rc == 7
    one_error_line(err)


def test_code_8_lock_held(tmp_path: Path) -> None:
    from qsnap.service.lock import lock_path

    image = make_image(tmp_path, snapshots=["A"])
    fd = os.open(lock_path(image), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        rc, _, err = run_qsnap("-i", image, "delete", "A", env={"QSNAP_LOCK_TIMEOUT": "0.5"})
    finally:
        os.close(fd)
    assert rc == 8
    one_error_line(err)


def test_code_9_program_missing(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    (tmp_path / "bin").mkdir()
    rc, _, err = run_qsnap("-i", image, "create", "X", env={"PATH": str(tmp_path / "bin")})
    assert rc == 9
    assert "apt-get install qemu-utils" in one_error_line(err)


def test_code_10_corrupt(tmp_path: Path) -> None:
    import struct

    image = make_image(tmp_path)
    qemu_io(image, "write -P 0x11 0 64k")
    with open(image, "r+b") as handle:
        (l1_offset,) = struct.unpack(">Q", handle.read(48)[40:48])
        handle.seek(l1_offset)
        (l1_entry,) = struct.unpack(">Q", handle.read(8))
        handle.seek(l1_entry & 0x00FFFFFFFFFFFE00)
        handle.write(struct.pack(">Q", (1 << 63) | l1_offset))  # data cluster = the L1 table
    assert qemu_img("check", str(image), check=False).returncode == 2
    assert run_qsnap("-i", image, "check").rc == 10
    before = fingerprint(image)
    rc, _, err = run_qsnap("-i", image, "create", "X")
    assert rc == 10
    one_error_line(err)
    assert fingerprint(image) == before


@pytest.mark.parametrize("runner", ["qsnap", "manage-snapshots"])
def test_code_13_output_exists(tmp_path: Path, runner: str) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    output = tmp_path / "A.qcow2"
    output.write_bytes(b"keep me")
    run = run_qsnap if runner == "qsnap" else run_guide
    rc, _, err = run("-i", image, "backup", "A", output)
    assert rc == 13, err
    one_error_line(err, runner)
    assert output.read_bytes() == b"keep me"


def test_code_14_no_guest_filesystem(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])  # a blank disk: no partition table, no filesystem
    rc, _, err = run_qsnap("-i", image, "ls", "A:/")
    assert rc == 14, err
    one_error_line(err)
    assert "No ext2/ext3/ext4 filesystem" in err


def test_code_15_guest_path_not_found(tmp_path: Path) -> None:
    fs = tmp_path / "fs.raw"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", "-o", "hurd", str(fs), "8M"], check=True)
    image = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(fs), str(image))
    qemu_img("snapshot", "-c", "A", str(image))
    rc, _, err = run_qsnap("-i", image, "cat", "A:/tmp/test.txt")
    assert rc == 15, err
    one_error_line(err)
    assert "/tmp/test.txt" in err


def test_code_130_interrupted_while_waiting_for_the_lock(tmp_path: Path) -> None:
    from qsnap.service.lock import lock_path

    image = make_image(tmp_path, snapshots=["A"])
    before = fingerprint(image)
    fd = os.open(lock_path(image), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = subprocess.Popen([str(QSNAP), "-i", str(image), "create", "X"], env=clean_environ(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            time.sleep(1.0)  # let it start and block on the lock
            assert proc.poll() is None
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        os.close(fd)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted" in err.lower()
    assert fingerprint(image) == before
