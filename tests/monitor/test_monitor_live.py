"""Snapshots of a running VM through its monitor, against a real qemu-system-x86_64 (no guest
OS: SeaBIOS is enough for savevm/loadvm/delvm). A private QMP side channel is the witness."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from qsnap.core.errors import InvalidName, MonitorError, SnapshotExists, SnapshotNotFound
from qsnap.engines.monitor import MonitorEngine
from qsnap.monitor import DiskOnlySnapshot, Monitor, connect

if TYPE_CHECKING:  # fixtures' types only: never import conftest at run time
    from conftest import VM, FakeMonitor

pytestmark = pytest.mark.vm

KINDS = ["qmp", "hmp-tcp", "hmp-telnet"]


def open_monitor(vm: VM) -> Monitor:
    return connect(vm.address, timeout=10, command_timeout=30, job_timeout=60)


@pytest.mark.parametrize("kind", [*KINDS, "hmp-unix"])
def test_create_list_restore_delete_online(start_vm: Callable[..., VM], kind: str) -> None:
    vm = start_vm(kind)
    with open_monitor(vm) as mon:
        assert mon.protocol == ("qmp" if kind == "qmp" else "hmp")
        assert mon.status() == "running"
        vm.write_pattern(0x22)
        snap = mon.save("before-upgrade")
        assert snap.name == "before-upgrade" and snap.has_vm_state and snap.id
        assert [(s.id, s.name) for s in mon.list_snapshots()] == [(i, n) for i, n, _ in vm.snapshots()]
        vm.write_pattern(0x33)
        assert vm.has_pattern(0x33)
        mon.load("before-upgrade")
        assert vm.has_pattern(0x22)  # the disk went back
        assert mon.status() == "running" and vm.status() == "running"  # the guest keeps running
        mon.delete(snap)
        assert vm.snapshots() == [] and mon.list_snapshots() == ()


@pytest.mark.parametrize("kind", KINDS)
def test_save_never_overwrites_an_existing_snapshot(start_vm: Callable[..., VM], kind: str) -> None:
    vm = start_vm(kind)
    with open_monitor(vm) as mon:
        mon.save("daily")
        before = vm.snapshots()
        with pytest.raises(SnapshotExists) as info:
            mon.save("daily")  # raw HMP savevm would silently replace it
        assert info.value.exit_code == 4
        assert vm.snapshots() == before  # same ID: the first one is untouched


@pytest.mark.parametrize("kind", KINDS)
def test_delete_or_load_of_missing_tag_is_not_found(start_vm: Callable[..., VM], kind: str) -> None:
    vm = start_vm(kind)
    with open_monitor(vm) as mon:
        mon.save("kept")
        for action in (mon.delete, mon.load):
            with pytest.raises(SnapshotNotFound) as info:
                action("nosuch")  # delvm/snapshot-delete would "succeed" silently
            assert info.value.exit_code == 3
        assert [n for _, n, _ in vm.snapshots()] == ["kept"]
        assert vm.status() == "running"


@pytest.mark.parametrize("kind", KINDS)
def test_failed_load_resumes_a_running_vm_and_reports(
    start_vm: Callable[..., VM], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = start_vm(kind)
    with open_monitor(vm) as mon:
        mon.save("gone-soon")
        stale = mon.images()
        # Another client deletes the snapshot between qsnap's check and its load (a race we
        # simulate by handing qsnap the listing from before the delete; QEMU is real).
        vm.hmp("delvm gone-soon")
        monkeypatch.setattr(mon, "images", lambda: stale)
        with pytest.raises(MonitorError) as info:
            mon.load("gone-soon")
        assert info.value.exit_code == 12
        assert "does not exist" in str(info.value)  # QEMU's own words are kept
        assert "resumed" in str(info.value)
        assert vm.status() == "running"  # QEMU had left it paused (restore-vm)


@pytest.mark.parametrize("kind", KINDS)
def test_disk_only_snapshot_cannot_be_loaded_live(start_vm: Callable[..., VM], kind: str) -> None:
    vm = start_vm(kind)
    vm.write_pattern(0x22)
    vm.side.cmd("blockdev-snapshot-internal-sync", device="virtio0", name="disk-only")  # no VM state
    vm.write_pattern(0x33)
    with open_monitor(vm) as mon:
        snap = mon.list_snapshots()[0]
        assert snap.name == "disk-only" and snap.vm_state_size == 0
        with pytest.raises(DiskOnlySnapshot) as info:
            mon.load(snap)
        assert info.value.exit_code == 12 and "offline" in str(info.value)
        assert vm.status() == "running" and vm.has_pattern(0x33)  # nothing was sent


@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_missing_on_one_disk_is_not_loaded(start_vm: Callable[..., VM], kind: str) -> None:
    vm = start_vm(kind, disks=2)
    with open_monitor(vm) as mon:
        mon.save("both")
        assert [n for _, n, _ in vm.snapshots(1)] == ["both"]
        nodes = [i for i in mon.images() if i.filename == str(vm.images[1])]
        vm.side.cmd("snapshot-delete", **{"job-id": "t1", "tag": "both", "devices": [nodes[0].node_name]})
        time.sleep(0.3)
        vm.side.cmd("job-dismiss", id="t1")
        with pytest.raises(MonitorError, match="missing from"):
            mon.load("both")
        assert vm.status() == "running"


INJECTIONS = [
    "a\nquit", "a\rquit", "a\r\nquit", "x\x08\x08\x08\x08\x08\x08quit", "x\x7f\x7f\x7fquit",
    "\x1b[A", "a\x1b[Aquit", "a\x00quit", 'a"b', "a'b", "a b", "a\\b", "a\tb",
]


@pytest.mark.parametrize("kind", ["qmp", "hmp-tcp", "hmp-telnet"])
def test_injection_names_never_reach_qemu(start_vm: Callable[..., VM], kind: str) -> None:
    vm = start_vm(kind)
    with open_monitor(vm) as mon:
        mon.save("baseline")
        if kind != "qmp":
            vm.hmp("savevm prev")  # so that 'ESC[A' (history recall) would have something to rerun
            vm.hmp("delvm prev")
        before = vm.snapshots()
        for name in INJECTIONS:
            with pytest.raises(InvalidName):
                mon.save(name)
            with pytest.raises((InvalidName, SnapshotNotFound)):
                mon.load(name)
            with pytest.raises((InvalidName, SnapshotNotFound)):
                mon.delete(name)
            if kind != "qmp":  # the protocol layer refuses too, whatever the caller checked
                with pytest.raises(InvalidName):
                    mon.session.command("savevm", name)  # type: ignore[attr-defined]
                with pytest.raises(InvalidName):
                    mon.session.command("delvm", name)  # type: ignore[attr-defined]
        # The VM still runs, no command ran, and the line editor holds no half line.
        assert vm.alive and vm.status() == "running"
        assert vm.snapshots() == before
        assert mon.status() == "running"
        assert [s.name for s in mon.list_snapshots()] == ["baseline"]


def test_engine_adapter_for_a_running_vm(start_vm: Callable[..., VM]) -> None:
    vm = start_vm("hmp-telnet")
    with open_monitor(vm) as mon:
        engine = MonitorEngine.for_image(mon, vm.images[0])
        assert engine is not None and engine.name == "hmp" and engine.matched_by == "path"
        created = engine.create("via-engine")
        assert engine.list_snapshots() == (created,)
        engine.apply(created)
        engine.delete(created)
        assert engine.list_snapshots() == ()
        assert MonitorEngine.for_image(mon, "/elsewhere/other.qcow2", virtual_size=1) is None


# ---------------------------------------------------------------- broken monitors (fakes)

@pytest.mark.timeout(20)
@pytest.mark.parametrize("behaviour", ["silent", "qmp-hang"])
def test_monitor_that_never_greets_fails_within_the_timeout(
    fake_monitor: Callable[[str], FakeMonitor], behaviour: str
) -> None:
    fake = fake_monitor(behaviour)
    with pytest.raises(MonitorError) as info:
        connect(fake.address, timeout=0.5)
    assert info.value.exit_code == 12
    assert str(fake.port) in str(info.value)


@pytest.mark.timeout(20)
def test_hmp_monitor_that_hangs_on_a_command_fails_within_the_timeout(
    fake_monitor: Callable[[str], FakeMonitor],
) -> None:
    fake = fake_monitor("hmp-hang")
    with connect(fake.address, timeout=2, command_timeout=0.5) as mon, pytest.raises(MonitorError) as info:
        mon.save("never")
    assert info.value.exit_code == 12 and "did not" in str(info.value)
    assert b"info block -v\n" in fake.received


@pytest.mark.timeout(20)
@pytest.mark.parametrize("behaviour", ["hmp-hangup", "qmp-hangup"])
def test_monitor_that_disconnects_mid_command_fails_clearly(
    fake_monitor: Callable[[str], FakeMonitor], behaviour: str
) -> None:
    fake = fake_monitor(behaviour)
    with connect(fake.address, timeout=2, command_timeout=2) as mon, pytest.raises(MonitorError) as info:
        mon.status()
    assert info.value.exit_code == 12
    assert "closed the connection" in str(info.value) or "went away" in str(info.value)


def test_unreachable_monitor_is_a_clear_error() -> None:
    with pytest.raises(MonitorError, match="Could not connect") as info:
        connect("unix:/nonexistent/qsnap-test.sock", timeout=1)
    assert info.value.exit_code == 12
