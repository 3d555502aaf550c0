"""The guide's workflows on a real booted Linux guest, driven by the real ``qsnap`` CLI.

Each test writes files in the guest over its serial console, runs ``qsnap`` as a subprocess
(the user's way), and reads the files back in the guest: a snapshot tool earns trust only
when a real guest's files come back.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guest.builder import HELLO_TEXT
from guest.fixtures import Guest, GuestFactory

from .conftest import CliGuests, qsnap_ok

pytestmark = [pytest.mark.guest, pytest.mark.vm]

SAFETY = re.compile(r"Safety snapshot '(pre-restore-[0-9-]+)' \(ID \d+\)")


def safety_name(restore_output: str) -> str:
    found = SAFETY.search(restore_output)
    assert found, f"restore did not name its safety snapshot:\n{restore_output}"
    return found.group(1)


def safe_upgrade_live(guest: Guest) -> None:
    image = guest.image
    guest.write_file("/mnt/app.txt", "app-v1")  # printf > file; sync
    out = qsnap_ok("-i", image, "create", "before-upgrade", "-m", "before the upgrade")
    assert "Snapshot 'before-upgrade' created (ID 1) via qmp." in out
    guest.write_file("/mnt/app.txt", "app-v2")
    guest.write_file("/mnt/upgrade.log", "upgraded")

    out = qsnap_ok("-i", image, "restore", "before-upgrade")
    assert "Snapshot 'before-upgrade' (ID 1) restored via qmp." in out
    safety = safety_name(out)
    assert f"To undo: qsnap -i {image} restore {safety}" in out
    # Still the same QEMU, still running, and the guest is back where it was.
    assert guest.is_alive()
    assert guest.read_file("/mnt/app.txt") == "app-v1"
    assert guest.run("test -e /mnt/upgrade.log").status == 1

    # The safety snapshot holds the upgraded state: going back to it brings v2 back.
    out = qsnap_ok("-i", image, "restore", safety, "--no-safety")
    assert "restored via qmp" in out
    assert guest.read_file("/mnt/app.txt") == "app-v2"
    assert guest.read_file("/mnt/upgrade.log") == "upgraded"


def test_workflow1_safe_upgrade_live(running_guest: Guest) -> None:
    safe_upgrade_live(running_guest)


def test_workflow1_safe_upgrade_live_on_hurd_ext2(guest_factory: GuestFactory) -> None:
    guest = guest_factory(hurd=True)  # mke2fs -o hurd: cold boot of the Hurd-style disk
    assert guest.check("dd if=/dev/vda bs=1 skip=1096 count=1 2>/dev/null | od -An -tu1").strip() == "1"
    safe_upgrade_live(guest)


def test_workflow1_safe_upgrade_offline(guest_factory: GuestFactory) -> None:
    guest = guest_factory(name="debian-hurd-amd64.qcow2")
    image = guest.image
    guest.write_file("/mnt/app.txt", "app-v1")
    assert "via qmp" in qsnap_ok("-i", image, "create", "before-upgrade")
    guest.write_file("/mnt/app.txt", "app-v2")

    out = qsnap_ok("-i", image, "vm", "stop")  # power off (ACPI: the guest syncs first)
    assert "the guest powered off" in out
    assert not guest.is_alive()
    out = qsnap_ok("-i", image, "restore", "before-upgrade")
    assert "Snapshot 'before-upgrade' (ID 1) restored via qemu-img." in out
    safety = safety_name(out)

    booted = guest_factory(disk=image, name=image.name)  # cold boot of the reverted disk
    assert booted.read_file("/mnt/app.txt") == "app-v1"
    assert booted.read_file("/mnt/hello.txt") == HELLO_TEXT
    booted.kill()
    # The offline safety snapshot is disk-only and holds v2.
    assert "restored via qemu-img" in qsnap_ok("-i", image, "restore", safety, "--no-safety")
    again = guest_factory(disk=image, name=image.name)
    assert again.read_file("/mnt/app.txt") == "app-v2"


def test_workflow2_development_checkpoints(running_guest: Guest) -> None:
    guest, image = running_guest, running_guest.image
    for day, name in enumerate(["day1-fresh-install", "day2-dev-tools", "day3-project-built"], start=1):
        guest.write_file(f"/mnt/day{day}.txt", f"made-on-day-{day}")
        guest.write_file("/mnt/state.txt", f"state-{day}")
        assert f"Snapshot '{name}' created (ID {day}) via qmp." in qsnap_ok("-i", image, "create", name)
    guest.write_file("/mnt/state.txt", "broken-on-day-4")

    assert "restored via qmp" in qsnap_ok("-i", image, "restore", "day2-dev-tools")
    assert guest.read_file("/mnt/state.txt") == "state-2"
    assert guest.read_file("/mnt/day1.txt") == "made-on-day-1"
    assert guest.read_file("/mnt/day2.txt") == "made-on-day-2"
    assert guest.run("test -e /mnt/day3.txt").status == 1
    listing = qsnap_ok("-i", image, "list")
    for name in ("day1-fresh-install", "day2-dev-tools", "day3-project-built", "pre-restore-"):
        assert name in listing
    # Later checkpoints survive a restore of an earlier one.
    assert "restored via qmp" in qsnap_ok("-i", image, "restore", "day3-project-built", "--no-safety")
    assert guest.read_file("/mnt/day3.txt") == "made-on-day-3"
    assert guest.read_file("/mnt/state.txt") == "state-3"


def test_workflow3_ci_pipeline(cli_guests: CliGuests, booted_copy) -> None:  # type: ignore[no-untyped-def]
    """ci-test.sh with qsnap: restore the baseline, start, wait until ready, test, snapshot
    on success, restore the baseline, stop."""
    image: Path = booted_copy("debian-hurd-amd64.qcow2")
    # The baseline: a disk-only snapshot of the installed system, taken offline.
    assert "via qemu-img" in qsnap_ok("-i", image, "create", "ci-baseline")

    # 1. Start with the clean snapshot (VM stopped: qemu-img).
    assert "restored via qemu-img" in qsnap_ok("-i", image, "restore", "ci-baseline", "--no-safety")
    # 2-3. Start the VM and wait for the guest's shell (cli_guests polls, no fixed sleep).
    guest = cli_guests.start(image)  # cold boot, like `docker compose up -d`
    status = qsnap_ok("-i", image, "vm", "status")
    assert ": running" in status
    # 4. Run the tests in the guest.
    result = guest.run(
        "echo '<testsuite failures=\"0\"/>' > /mnt/test-results.xml; sync; grep -c failures=.0. /mnt/test-results.xml"
    )
    assert result.status == 0 and result.output.strip() == "1"
    # 6. Tests passed: a success snapshot (live, with the VM state).
    out = qsnap_ok("-i", image, "create", "ci-test-20260101-000000")
    assert "Snapshot 'ci-test-20260101-000000' created" in out and "via qmp" in out
    # 7. Clean up: back to the baseline (disk-only: qsnap stops and restarts its VM).
    out = qsnap_ok("-i", image, "restore", "ci-baseline", "--no-safety")
    assert "restored via qmp+qemu-img" in out
    guest.reattach()
    assert guest.run("test -e /mnt/test-results.xml").status == 1
    # 8. Shut down.
    assert "VM stopped" in qsnap_ok("-i", image, "vm", "stop")
    assert not guest.is_alive()
    assert "stopped" in qsnap_ok("-i", image, "vm", "status")
    listing = qsnap_ok("-i", image, "list")
    assert "ci-baseline" in listing and "ci-test-20260101-000000" in listing


def test_unsynced_writes_are_lost_offline_and_create_sync_keeps_them(guest_factory: GuestFactory) -> None:
    guest = guest_factory(name="debian-hurd-amd64.qcow2")
    image = guest.image
    guest.write_file("/mnt/unsynced.txt", "in-page-cache-only", sync=False)
    assert "via qmp" in qsnap_ok("-i", image, "create", "no-sync")
    guest.write_file("/mnt/synced.txt", "flushed-by-create-sync", sync=False)
    # --sync runs `sync` on the serial console of the qsnap VM: QEMU serves one client per
    # serial socket, so the test's own console connection steps aside meanwhile.
    guest.console.close()
    out = qsnap_ok("-i", image, "create", "with-sync", "--sync")
    assert "Snapshot 'with-sync' created (ID 2) via qmp" in out
    assert "serial console" in out
    guest.console = guest.vm.open_console()
    guest.kill()  # a hard power cut: only the disk counts now

    # What the user gets from the unsynced snapshot offline: the file is not on its disk.
    assert "restored via qemu-img" in qsnap_ok("-i", image, "restore", "no-sync", "--no-safety")
    booted = guest_factory(disk=image, name=image.name)
    assert booted.run("test -e /mnt/unsynced.txt").status == 1
    assert booted.read_file("/mnt/hello.txt") == HELLO_TEXT  # the filesystem itself is fine
    booted.kill()
    # With --sync, both writes made before it are on the snapshot's disk.
    assert "restored via qemu-img" in qsnap_ok("-i", image, "restore", "with-sync", "--no-safety")
    again = guest_factory(disk=image, name=image.name)
    assert again.read_file("/mnt/synced.txt") == "flushed-by-create-sync"
    assert again.read_file("/mnt/unsynced.txt") == "in-page-cache-only"


def test_create_sync_says_when_the_serial_console_is_busy(running_guest: Guest) -> None:
    """A user sits in `telnet localhost 5555` (here: the test's own console connection).
    QEMU serves one client per serial socket, so qsnap's connection is never served: it
    should say so (exit 12, naming the busy console), not time out on a silent guest."""
    from qsnap_testlib import run_qsnap

    rc, _, err = run_qsnap("-i", running_guest.image, "create", "s", "--sync", timeout=200)
    assert rc == 12
    assert "in use" in err or "another client" in err or "one client" in err, err
    assert "did not finish" not in err
    from qsnap.engines import qemu_img

    assert "s" not in [snap.name for snap in qemu_img.list_snapshots(running_guest.image)]
