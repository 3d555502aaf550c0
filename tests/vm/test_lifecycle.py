"""start / status / stop / find_running on a real qemu-system-x86_64 (SeaBIOS, no guest OS)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qsnap import vm
from qsnap.core.errors import ImageError, ImageInUse, MonitorError, ProgramMissing, SnapshotNotFound
from qsnap.vm.qmp import command, qmp_session

from .conftest import kill_qemu, no_os_spec

pytestmark = pytest.mark.vm

Launch = Callable[[vm.VMSpec], vm.RunningVM]


def read_banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        data = b""
        while b"(qemu)" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def test_start_status_stop(blank_image: Path, launch: Launch) -> None:
    running = launch(no_os_spec(blank_image, ssh_port=0, serial_port=0, monitor_port=0))
    assert vm.is_qemu_process(running.pid, running.qmp_socket)

    # Later commands find the VM from the image alone.
    found = vm.find_running(blank_image)
    assert found == running
    record = json.loads((vm.run_dir(blank_image) / "vm.json").read_text())
    assert record["pid"] == running.pid and record["qmp_socket"] == str(running.qmp_socket)
    assert record["argv"][0] == "qemu-system-x86_64"

    state = vm.status(blank_image)
    assert state.state == "running" and state.pid == running.pid
    expected_accel = "tcg" if vm.choose_accel() == "tcg" else state.accel
    assert state.accel == expected_accel
    ports = state.to_json()["ports"]
    assert ports == {"ssh": running.ssh_port, "serial": running.serial_port, "monitor": running.monitor_port}
    assert all(isinstance(p, int) and p > 0 for p in ports.values())

    # The guide's HMP monitor answers on its telnet port, on localhost.
    assert b"QEMU" in read_banner(running.monitor_port or 0)
    assert running.hmp_address == f"telnet:127.0.0.1:{running.monitor_port}"

    # SeaBIOS ignores the ACPI power button: powerdown times out, then QMP quit works.
    result = vm.stop(blank_image, timeout=0.5)
    assert result.method == "quit" and result.pid == running.pid
    assert not vm.is_qemu_process(running.pid, running.qmp_socket)
    assert vm.status(blank_image).state == "stopped"
    assert vm.find_running(blank_image) is None
    assert not (vm.run_dir(blank_image) / "vm.json").exists()
    assert not running.qmp_socket.exists()
    assert vm.stop(blank_image).method == "not-running"


def test_status_reports_a_paused_vm(blank_image: Path, launch: Launch) -> None:
    running = launch(no_os_spec(blank_image))
    with qmp_session(running.qmp_socket) as qmp:
        command(qmp, "stop")
    state = vm.status(blank_image)
    assert state.state == "paused" and state.run_state == "paused"
    assert state.to_json()["state"] == "paused"


def test_stop_kills_a_qemu_whose_monitor_does_not_answer(blank_image: Path, launch: Launch) -> None:
    running = launch(no_os_spec(blank_image))
    os.kill(running.pid, signal.SIGSTOP)  # frozen: neither powerdown nor quit can work
    while Path(f"/proc/{running.pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
        time.sleep(0.01)
    result = vm.stop(blank_image, timeout=0.5, quit_timeout=0.5)
    assert result.method == "kill"
    assert not vm.is_qemu_process(running.pid, running.qmp_socket)
    assert vm.find_running(blank_image) is None


def test_a_killed_qemu_child_is_reaped_not_left_a_zombie(blank_image: Path, launch: Launch) -> None:
    """Its cmdline vanishes before it becomes a zombie: the first look that finds it gone must
    also reap it, or it stays a zombie of this process (a /proc entry answering kill(pid, 0))."""
    running = launch(no_os_spec(blank_image))
    os.kill(running.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while vm.is_qemu_process(running.pid, running.qmp_socket) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not vm.is_qemu_process(running.pid, running.qmp_socket)
    with pytest.raises(ChildProcessError):  # reaped already: no child of that pid is left
        os.waitpid(running.pid, os.WNOHANG)


def test_a_busy_port_fails_before_qemu_starts(blank_image: Path, launch: Launch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(vm.PortBusy, match=f"127.0.0.1:{port}.*--serial-port"):
            launch(no_os_spec(blank_image, serial_port=port))
    assert not vm.run_dir(blank_image).exists()  # nothing was started or recorded


def test_second_start_on_the_same_image_is_refused(blank_image: Path, launch: Launch) -> None:
    running = launch(no_os_spec(blank_image))
    with pytest.raises(ImageInUse, match=f"pid {running.pid}") as raised:
        launch(no_os_spec(blank_image))
    assert raised.value.exit_code == 8
    assert vm.find_running(blank_image) == running


@pytest.fixture
def foreign_qemu(blank_image: Path, tmp_path: Path) -> Iterator[int]:
    """A QEMU started without qsnap holding blank_image's write lock."""
    qmp = tmp_path / "foreign.sock"
    child = subprocess.Popen(  # the test starts QEMU itself, as another tool would
        ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "64", "-nodefaults", "-display", "none",
         "-drive", f"file={blank_image},format=qcow2", "-qmp", f"unix:{qmp},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        from qsnap.vm.qmp import greeting_ready

        deadline = time.monotonic() + 60
        while not (qmp.exists() and greeting_ready(qmp, 1.0, main_loop=True)):
            assert child.poll() is None and time.monotonic() < deadline, "the foreign QEMU did not start"
            time.sleep(0.02)
        yield child.pid
    finally:
        child.kill()
        child.wait()


def test_image_locked_by_another_qemu_is_exit_8(blank_image: Path, foreign_qemu: int, launch: Launch) -> None:
    with pytest.raises(ImageInUse, match='write" lock') as raised:
        launch(no_os_spec(blank_image))
    assert raised.value.exit_code == 8
    assert vm.find_running(blank_image) is None
    assert not (vm.run_dir(blank_image) / "vm.json").exists()


def test_stale_record_is_cleaned(blank_image: Path, launch: Launch) -> None:
    running = launch(no_os_spec(blank_image))
    record = (vm.run_dir(blank_image) / "vm.json").read_text()
    kill_qemu(running.pid, running.qmp_socket)  # QEMU dies behind qsnap's back
    assert vm.find_running(blank_image) is None
    assert not (vm.run_dir(blank_image) / "vm.json").exists()

    # A record whose pid now belongs to another program is stale too (pid reuse).
    data = json.loads(record)
    data["pid"] = os.getpid()
    (vm.run_dir(blank_image) / "vm.json").write_text(json.dumps(data))
    assert vm.status(blank_image).state == "stopped"
    assert not (vm.run_dir(blank_image) / "vm.json").exists()

    # And a start works again.
    again = launch(no_os_spec(blank_image))
    assert vm.find_running(blank_image) == again


def test_missing_image_and_missing_qemu(tmp_path: Path, blank_image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImageError) as no_image:
        vm.start(no_os_spec(tmp_path / "nope.qcow2"))
    assert no_image.value.exit_code == 7
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu-system-x86_64 on PATH
    with pytest.raises(ProgramMissing, match="qemu-system-x86") as missing:
        vm.start(no_os_spec(blank_image))
    assert missing.value.exit_code == 9
    assert vm.find_running(blank_image) is None


def test_loadvm_of_a_missing_snapshot_is_snapshot_not_found(blank_image: Path, launch: Launch) -> None:
    with pytest.raises(SnapshotNotFound, match="nope") as raised:
        launch(no_os_spec(blank_image, loadvm="nope"))
    assert raised.value.exit_code == 3
    assert vm.find_running(blank_image) is None


def test_deep_image_path_uses_short_sockets(tmp_path: Path, launch: Launch) -> None:
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    image = deep / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    running = launch(no_os_spec(image))
    assert len(str(running.qmp_socket)) < 100
    assert vm.status(image).state == "running"
    assert vm.stop(image, timeout=0.2).method == "quit"
    assert not running.qmp_socket.exists()
    assert not running.qmp_socket.parent.exists()  # the fallback directory is removed


def test_monitor_error_when_qemu_rejects_its_arguments(blank_image: Path, launch: Launch) -> None:
    with pytest.raises(MonitorError, match="exited") as raised:
        launch(no_os_spec(blank_image, extra_args=("-no-such-option",)))
    assert raised.value.exit_code == 12
    assert "qemu.log" in str(raised.value)


@pytest.mark.parametrize(
    ("said", "error"),
    [
        # Real QEMU 7.2 messages, captured when a port was taken between qsnap's check and
        # QEMU's bind (a race the pre-check cannot close).
        ("qemu-system-x86_64: -monitor telnet:127.0.0.1:50719,server=on,wait=off: "
         "Failed to find an available port: Address already in use", vm.PortBusy),
        ("qemu-system-x86_64: -netdev user,id=n,hostfwd=tcp:127.0.0.1:50719-:22: "
         "Could not set up host forwarding rule 'tcp:127.0.0.1:50719-:22'", vm.PortBusy),
        ("qemu-system-x86_64: -drive file=d.qcow2,format=qcow2: Failed to get \"write\" lock\n"
         "Is another process using the image [d.qcow2]?", ImageInUse),
    ],
)  # fmt: skip
def test_qemu_startup_failures_become_clear_errors(tmp_path: Path, said: str, error: type[Exception]) -> None:
    from qsnap.vm.lifecycle import _startup_error

    log = tmp_path / "qemu.log"
    log.write_text(said + "\n")
    raised = _startup_error(1, log, no_os_spec(tmp_path / "d.qcow2"))
    assert isinstance(raised, error)
    assert "127.0.0.1:50719" in str(raised) or "lock" in str(raised)
