"""The test guest itself: it boots, runs commands, and its ext2 disk keeps files."""

from __future__ import annotations

import pytest

from qsnap import vm

from .builder import HELLO_TEXT
from .fixtures import Guest, GuestFactory

pytestmark = [pytest.mark.guest, pytest.mark.vm]


def test_console_reports_exit_status_and_output(running_guest: Guest) -> None:
    result = running_guest.run("echo one; echo two; false")
    assert result.status == 1
    assert result.output == "one\ntwo\n"
    assert running_guest.run("exit_code_test() { return 7; }; exit_code_test").status == 7
    # Output without a trailing newline, and output that repeats the command text.
    assert running_guest.check("printf abc") == "abc"
    assert running_guest.check("echo 'printf QSNAP_END'") == "printf QSNAP_END\n"


def test_synced_file_on_mnt_survives_a_hard_kill_and_a_cold_boot(guest_factory: GuestFactory) -> None:
    guest = guest_factory(name="disk.qcow2")
    assert "/dev/vda /mnt ext2 rw" in guest.check("cat /proc/mounts")
    assert guest.read_file("/mnt/hello.txt") == HELLO_TEXT
    guest.write_file("/mnt/v.txt", "version-1")  # printf > file; sync
    assert guest.read_file("/mnt/v.txt") == "version-1"
    guest.kill()  # SIGKILL: only what sync put on the disk survives
    again = guest_factory(disk=guest.image, name="disk.qcow2")
    assert again.pid != guest.pid
    assert again.read_file("/mnt/v.txt") == "version-1"


def test_guest_is_a_qsnap_vm_without_snapshots(running_guest: Guest) -> None:
    found = vm.find_running(running_guest.image)
    assert found is not None and found.pid == running_guest.pid
    assert vm.status(running_guest.image).state == "running"
    # The session's "booted" snapshot was only a fast start: the test image has none.
    assert "booted" not in running_guest.hmp("info snapshots")


def test_hurd_style_ext2_disk_mounts_read_write(guest_factory: GuestFactory) -> None:
    guest = guest_factory(hurd=True)
    mounts = guest.check("cat /proc/mounts")
    assert "/dev/vda /mnt ext2 rw" in mounts
    # -o hurd: the superblock's creator OS is Hurd (byte 0x48 of the superblock at 1024).
    creator_os = guest.check("dd if=/dev/vda bs=1 skip=1096 count=1 2>/dev/null | od -An -tu1").strip()
    assert creator_os == "1"
    assert guest.read_file("/mnt/hello.txt") == HELLO_TEXT
    guest.write_file("/mnt/hurd.txt", "written-on-hurd-ext2")
    assert guest.read_file("/mnt/hurd.txt") == "written-on-hurd-ext2"


def test_console_over_the_guides_telnet_serial_port(guest_factory: GuestFactory) -> None:
    guest = guest_factory(serial_port=0, monitor_port=0)
    host, port = guest.vm.console_address  # type: ignore[misc]
    assert host == "127.0.0.1" and port == guest.vm.serial_port
    assert guest.check("cat /mnt/hello.txt") == HELLO_TEXT  # telnet negotiation bytes stripped
    assert guest.run("(exit 3)").status == 3


def test_vm_stop_powers_the_guest_down_through_acpi(guest_factory: GuestFactory) -> None:
    guest = guest_factory(name="disk.qcow2")
    guest.write_file("/mnt/before-stop.txt", "unsynced-at-stop", sync=False)
    result = vm.stop(guest.image, timeout=60)
    assert result.method == "powerdown"  # the guest's acpid ran sync + poweroff
    assert not guest.is_alive()
    again = guest_factory(disk=guest.image, name="disk.qcow2")
    assert again.read_file("/mnt/before-stop.txt") == "unsynced-at-stop"


def test_controller_restart_cold_boots_and_reattach_finds_the_guest(running_guest: Guest) -> None:
    running_guest.write_file("/mnt/kept.txt", "kept-across-restart")
    controller = vm.controller_for(running_guest.image)  # how restore stops/starts the VM
    assert controller.name == "qsnap"
    first_pid = running_guest.pid
    controller.stop()  # ACPI powerdown: the guest syncs and powers off
    assert not running_guest.is_alive()
    controller.start()  # the recorded spec, without -loadvm: a cold boot of the disk as it is
    running_guest.reattach()
    assert running_guest.pid != first_pid
    assert running_guest.read_file("/mnt/kept.txt") == "kept-across-restart"
