"""An image held by a running QEMU is never forced: no monitor configured → qemu-img, which
fails on the write lock → exit 8 naming both ways out; reading still works (with -U)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qsnap_testlib import (
    fingerprint,
    guide_main,
    has_pattern,
    make_image,
    one_error_line,
    qemu_img,
    qsnap_main,
    run_guide,
    run_qsnap,
    snapshot_table,
)

pytestmark = pytest.mark.vm

ACCEL = "tcg" if os.path.exists("/sys/module/kvm_pvm") else "kvm:tcg"


def locked(image: Path) -> bool:
    result = qemu_img("check", "-f", "qcow2", str(image), check=False)
    return "lock" in result.stderr


@pytest.fixture(scope="module")
def running_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """IMAGE (A = 0x11, current 0x22) opened read-write by a paused QEMU; stopped by PID."""
    image = make_image(tmp_path_factory.mktemp("vm"), snapshots=["A"], patterns={"A": 0x11, None: 0x22})
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", f"pc,accel={ACCEL}", "-m", "64", "-nodefaults",
         "-display", "none", "-S", "-drive", f"file={image},if=virtio,format=qcow2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not locked(image):
            if qemu.poll() is not None:
                raise AssertionError(f"QEMU exited: {qemu.stderr.read().decode() if qemu.stderr else ''}")
            if time.monotonic() > deadline:
                raise AssertionError("QEMU did not lock the image within 30 s")
            time.sleep(0.05)
        yield image
    finally:
        if qemu.poll() is None:
            os.kill(qemu.pid, signal.SIGTERM)
            try:
                qemu.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(qemu.pid, signal.SIGKILL)
                qemu.wait()
        if qemu.stderr:
            qemu.stderr.close()


@pytest.mark.parametrize("argv", [["create", "B"], ["create", "A", "--replace"], ["restore", "A"],
                                  ["restore", "A", "--no-safety"], ["delete", "A"]],
                         ids=["create", "replace", "restore", "restore-no-safety", "delete"])
def test_mutations_exit_8_and_change_nothing(running_vm: Path, argv: list[str]) -> None:
    before = fingerprint(running_vm)
    table = snapshot_table(running_vm)
    rc, _, err = run_qsnap("-i", running_vm, *argv)
    assert rc == 8, err
    line = one_error_line(err)
    assert "stop the VM" in line
    assert "--monitor" in line
    assert fingerprint(running_vm) == before
    assert snapshot_table(running_vm) == table


def test_no_writer_is_ever_forced(running_vm: Path) -> None:
    for argv in (["create", "B"], ["restore", "A"], ["delete", "A"]):
        rc, _, err = qsnap_main(["--debug", "-i", running_vm, *argv])
        assert rc == 8
        for line in err.splitlines():
            if "run:" in line and (" snapshot " in line or " check " in line):
                assert " -U " not in line, line
        assert not any("run:" in line and " snapshot " in line for line in err.splitlines()), \
            "no snapshot command may even be tried on a locked image"


def test_guide_cli_exits_8_too(running_vm: Path) -> None:
    before = fingerprint(running_vm)
    for argv in (["create", "B"], ["restore", "A"], ["delete", "A"]):
        rc, _, err = guide_main(["-i", running_vm, *argv])
        assert rc == 8, err
    assert fingerprint(running_vm) == before


def test_reading_still_works(running_vm: Path) -> None:
    rc, out, err = run_qsnap("-i", running_vm, "list")
    assert rc == 0, err
    assert out.splitlines()[1].split()[:2] == ["1", "A"]
    rc, out, err = run_guide("-i", running_vm, "list")
    assert rc == 0, err
    assert any(line.split()[:2] == ["1", "A"] for line in out.splitlines())
    assert qsnap_main(["-i", running_vm, "info"]).rc == 0
    rc, _, err = qsnap_main(["-i", running_vm, "check"])
    assert rc == 0
    assert "running VM" in err


def test_backup_of_a_snapshot_works_while_the_vm_runs(running_vm: Path, tmp_path: Path) -> None:
    before = fingerprint(running_vm)
    output = tmp_path / "A.qcow2"
    rc, _, err = run_guide("-i", running_vm, "backup", "A", output)
    assert rc == 0, err
    assert has_pattern(output, 0x11)
    assert fingerprint(running_vm) == before
