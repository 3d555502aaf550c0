"""A live snapshot of the real test guest (tests/guest), compacted, then loaded by a real QEMU:
the guest runs on from where the snapshot was taken."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from compact_helpers import assert_same_images, check_clean, copy, snapshot_records
from qsnap_testlib import Run, qsnap_main

from guest.fixtures import Guest, GuestFactory, start_guest


def qsnap_ok(*args: object, environ: dict[str, str] | None = None) -> str:
    r: Run = qsnap_main([str(a) for a in args], environ=environ)
    assert r.rc == 0, f"qsnap {args} exited {r.rc}: {r.out}{r.err}"
    return r.out


def stop_cleanly(guest: Guest) -> None:
    """QMP quit (QEMU flushes and closes the image), then make sure the pid is gone."""
    with contextlib.suppress(Exception):
        guest.hmp("quit")
    deadline = time.monotonic() + 30
    while guest.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    guest.kill()


def test_compacted_live_snapshot_of_the_real_guest_runs_on(guest_factory: GuestFactory, tmp_path: Path) -> None:
    guest = guest_factory()
    image = guest.image
    guest.write_file("/mnt/state.txt", "at-live-1")
    assert "via qmp" in qsnap_ok("-i", image, "create", "live-1", "-m", "first live snapshot")
    guest.write_file("/mnt/state.txt", "at-live-2")
    qsnap_ok("-i", image, "create", "live-2")
    qsnap_ok("-i", image, "create", "scratch")
    guest.check("dd if=/dev/urandom of=/mnt/big bs=1M count=4 2>/dev/null; sync")
    qsnap_ok("-i", image, "delete", "scratch", "--yes")  # its clusters are freed inside the file
    guest.write_file("/mnt/state.txt", "current")
    stop_cleanly(guest)

    original = copy(image, tmp_path / "original.qcow2")
    out = qsnap_ok("-i", image, "compact")
    assert "2 snapshots kept, 2 with VM state" in out
    check_clean(image)
    assert_same_images(original, image, tmp_path / "raw")
    assert [r["name"] for r in snapshot_records(image)] == ["live-1", "live-2"]
    assert "first live snapshot" in qsnap_ok("-i", image, "list")  # the sidecar still matches

    restored = start_guest(guest.build, image, loadvm="live-1", register=lambda running: guest.pids.add(running.pid))
    try:
        assert restored.read_file("/mnt/state.txt") == "at-live-1"
        restored.write_file("/mnt/after.txt", "runs-on")
        assert restored.read_file("/mnt/after.txt") == "runs-on"
    finally:
        restored.kill()


def test_compact_stops_and_restarts_the_qsnap_vm(guest_factory: GuestFactory) -> None:
    """The image's VM was started by qsnap (`qsnap vm start`, here through qsnap.vm): compact stops
    it through its controller, compacts, starts it again; the guest boots from the new image."""
    guest = guest_factory(cold=True)
    image = guest.image
    first_pid = guest.pid
    guest.write_file("/mnt/state.txt", "kept")
    # the test guest ignores ACPI power-down: 2 s to stop, then QEMU is told to quit
    out = qsnap_ok("-i", image, "compact", environ={"QSNAP_STOP_TIMEOUT": "2"})
    assert "The VM was stopped (qsnap) for the compaction and started again." in out
    guest.reattach()  # a cold boot of the compacted disk
    assert guest.pid != first_pid
    assert guest.read_file("/mnt/state.txt") == "kept"
