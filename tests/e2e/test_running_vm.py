"""A running guest and the two things that can hurt it: a disk-only snapshot (which a running
VM cannot load) and hostile names sent toward the guide's HMP telnet monitor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from qsnap_testlib import one_error_line, run_qsnap, snapshot_names

from guest.builder import HELLO_TEXT
from guest.fixtures import GuestFactory
from qsnap import vm

from .conftest import BOOTED_SNAPSHOT, CliGuests, hmp_snapshot_names, qsnap_ok

pytestmark = [pytest.mark.guest, pytest.mark.vm]


def test_disk_only_snapshot_restore_restarts_the_qsnap_vm(
    cli_guests: CliGuests, booted_copy: Callable[[str], Path]
) -> None:
    image = booted_copy("debian-hurd-amd64.qcow2")
    out = qsnap_ok("-i", image, "create", "clean-disk")  # offline, before the VM starts
    assert "via qemu-img" in out
    guest = cli_guests.start(image, loadvm=BOOTED_SNAPSHOT)  # `qsnap vm start --loadvm booted`
    first_pid = guest.pid
    guest.write_file("/mnt/hello.txt", "overwritten")
    guest.write_file("/mnt/junk.txt", "junk")

    rc, out, err = run_qsnap("-i", image, "restore", "clean-disk", timeout=240)
    assert rc == 0, err
    assert "Snapshot 'clean-disk' (ID 2) restored via qmp+qemu-img." in out
    assert "warning: the VM was stopped (qsnap), reverted offline and started again" in err
    guest.reattach()  # the new QEMU qsnap started: a cold boot of the reverted disk
    assert guest.pid != first_pid
    assert vm.status(image).state == "running"
    assert guest.read_file("/mnt/hello.txt") == HELLO_TEXT
    assert guest.run("test -e /mnt/junk.txt").status == 1
    # The safety snapshot was taken live (with VM state) before the VM was stopped.
    safety = [n for n in snapshot_names(image) if n.startswith("pre-restore-")]
    assert len(safety) == 1
    assert "restored via qmp" in qsnap_ok("-i", image, "restore", safety[0], "--no-safety")
    assert guest.read_file("/mnt/junk.txt") == "junk"


HOSTILE_NAMES = [
    "a\nquit",  # a second HMP command
    "a\rquit",
    "x;quit",
    "snap\x7f\x7f\x7f\x7fquit",  # DEL erases the line editor's buffer
    "\x1b[A",  # history recall
    "a b",
    "",
    "1",  # read as an ID by QEMU
    "-x",
    "'quoted'",
    "ünïcode",
    "n" * 129,
]


def test_hostile_names_through_the_hmp_telnet_monitor_are_refused(guest_factory: GuestFactory) -> None:
    guest = guest_factory(monitor_port=0)  # the guide's -monitor telnet:127.0.0.1:PORT
    port = guest.vm.monitor_port
    assert port
    env = {"MONITOR_PORT": str(port)}
    # The route really is the guide's HMP monitor (so the refusals below are qsnap's).
    out = qsnap_ok("-i", guest.image, "create", "legit", env=env)
    assert "Snapshot 'legit' created (ID 1) via hmp." in out
    guest.write_file("/mnt/after-legit.txt", "still-here")

    for name in HOSTILE_NAMES:
        for command in (["create", "--", name], ["restore", "--", name], ["delete", "--", name]):
            rc, _, err = run_qsnap("-i", guest.image, *command, env=env)
            # A lookup may name an all-digit snapshot made by another tool: not found (3).
            expected = 3 if name == "1" and command[0] != "create" else 6
            assert rc == expected, f"qsnap {command!r} exited {rc}: {err}"
            assert "Traceback" not in err
            one_error_line(err)
    # The guest still runs, nothing was restored, and no snapshot appeared.
    assert guest.is_alive()
    assert guest.read_file("/mnt/after-legit.txt") == "still-here"
    assert hmp_snapshot_names(guest) == ["legit"]
    assert snapshot_names(guest.image) == ["legit"]
    assert "running" in qsnap_ok("-i", guest.image, "vm", "status")
