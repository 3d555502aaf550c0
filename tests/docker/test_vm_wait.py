"""`qsnap vm wait` on a VM that `qsnap vm start` runs (the real test guest, no container), and
the readiness probes against small loopback servers where the guest cannot play the part: it has
no SSH server, so an SSH banner comes from a fake one (a thread on 127.0.0.1 that sends it)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from qsnap_testlib import run_qsnap

from e2e.conftest import CliGuests, qsnap_ok, vm_start_argv
from guest.builder import READY_MARKER, GuestBuild
from qsnap.vm import readiness


@pytest.fixture
def cli_vms(guest_build: GuestBuild) -> Iterator[CliGuests]:
    guests = CliGuests(guest_build)
    try:
        yield guests
    finally:
        guests.kill_all()  # every QEMU by pid


def test_vm_wait_serial_on_a_vm_started_by_qsnap(cli_vms: CliGuests, guest_build: GuestBuild, tmp_path: Path) -> None:
    image = tmp_path / "debian-hurd-amd64.qcow2"
    image.write_bytes(guest_build.disk_hurd.read_bytes())
    cli_vms.images.append(image)
    started = json.loads(qsnap_ok(*vm_start_argv(guest_build, image)))
    cli_vms.pids.add(int(started["pid"]))
    # Right after start, while the guest boots: the serial log holds everything it printed.
    ready = json.loads(qsnap_ok("-i", image, "vm", "wait", "--serial", READY_MARKER, "--timeout", "240", "--json"))
    assert ready["ready"] and READY_MARKER in ready["how"] and "serial log" in ready["how"]
    # No condition on a qsnap VM means --ssh: its forward is there, its guest has no sshd.
    no_ssh = run_qsnap("-i", image, "vm", "wait", "--timeout", "2")
    assert no_ssh.rc == 12 and f"SSH banner on 127.0.0.1:{started['ssh_port']}" in no_ssh.err
    qsnap_ok("-i", image, "vm", "stop")
    gone = run_qsnap("-i", image, "vm", "wait", "--serial", "never-printed", "--serial-log",
                     str(image) + ".qsnap-run/serial.log", "--timeout", "1")
    assert gone.rc == 12


def _serve(behaviour: bytes | None) -> tuple[socket.socket, threading.Thread]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)

    def loop() -> None:
        while server.fileno() != -1:
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                if behaviour:
                    conn.sendall(behaviour)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return server, thread


@pytest.mark.parametrize(("answer", "ready"), [(b"SSH-2.0-OpenSSH_9.2\r\n", True), (None, False),
                                                 (b"HTTP/1.1 400\r\n", False)])
def test_ssh_banner_probe(answer: bytes | None, ready: bool) -> None:
    server, thread = _serve(answer)
    try:
        probe = readiness.SSHBanner("127.0.0.1", server.getsockname()[1], read_timeout=1)
        assert probe.ready() is ready
        if answer is None:  # accepted and hung up: what QEMU's forward does without an sshd
            assert "without a banner" in probe.evidence()
    finally:
        server.close()
        thread.join(timeout=5)


def test_wait_ready_times_out_and_stops_early(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_text("booting\n")
    with pytest.raises(readiness.NotReady) as late:
        readiness.wait_ready([readiness.SerialLog(log, "login:")], timeout=0.5, interval=0.05)
    assert late.value.exit_code == 12 and "booting" in late.value.message
    with pytest.raises(readiness.NotReady) as gone:  # at once, not after the 600 s
        readiness.wait_ready([readiness.SerialLog(log, "login:")], timeout=600, alive=lambda: "QEMU exited")
    assert "stopped while qsnap waited" in gone.value.message and "QEMU exited" in gone.value.message
    log.write_text("booting\nDebian GNU/Hurd login: ")
    assert readiness.wait_ready([readiness.SerialLog(log, r"login: ?$")], timeout=5).ready


def test_vm_wait_usage_errors(tmp_path: Path) -> None:
    image = tmp_path / "d.qcow2"
    image.write_bytes(b"")
    assert run_qsnap("-i", image, "vm", "wait").rc == 2  # no VM and no condition
    assert run_qsnap("vm", "wait", "--serial", "(", "--serial-log", image).rc == 2
    assert run_qsnap("vm", "wait", "--serial-log", image).rc == 2
    assert run_qsnap("vm", "wait", "--ssh", "--ssh-port", "1", "--timeout", "0").rc == 2
