"""Which engine acts, through the real ``qsnap`` command: the VM's monitor only when its VM
holds our image (same path, a container's copy path matched by name + size, QSNAP_PATH_MAP),
qemu-img otherwise; exit 8 naming the settings when a VM holds the image and no monitor is
configured; a VM started with ``qsnap vm start`` is found without any setting, and restoring
a disk-only snapshot stops it, reverts offline and starts it again."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qsnap_testlib import has_pattern, make_image

from .conftest import (
    VM,
    new_image,
    offline_snapshots,
    qmp_once,
    recorded_vm,
    run_qsnap,
    snapshot_has_pattern,
)

pytestmark = pytest.mark.vm

SETTINGS = ("--monitor", "QSNAP_MONITOR", "MONITOR_PORT")


@pytest.mark.parametrize("kind", ["qmp", "hmp-tcp"])
def test_a_monitor_whose_vm_has_another_image_is_not_used(
    start_vm: Callable[..., VM], tmp_path: Path, kind: str
) -> None:
    (tmp_path / "ours").mkdir()
    ours = make_image(tmp_path / "ours", snapshots=["old"], patterns={"old": 0x11, None: 0x22})
    theirs = new_image(tmp_path / "theirs" / "disk.qcow2", "128M")  # same file name, other size
    vm = start_vm(kind, [theirs])
    env = {"MONITOR_PORT": str(vm.port)} if kind == "hmp-tcp" else {"QSNAP_MONITOR": str(vm.address)}

    rc, out, err = run_qsnap("-i", ours, "create", "A", env=env)
    assert rc == 0, err
    assert "via qemu-img" in out
    rc, out, err = run_qsnap("-i", ours, "restore", "old", "-y", env=env)
    assert rc == 0, err
    assert "via qemu-img" in out and has_pattern(ours, 0x11)
    rc, out, err = run_qsnap("-i", ours, "delete", "A", "-y", "--json", env=env)
    assert rc == 0, err
    assert json.loads(out)["engine"] == "qemu-img"
    assert next(n for _, n, _ in offline_snapshots(ours)) == "old"
    assert vm.names() == [] and vm.status() == "running"  # the other VM was never touched


def test_a_same_name_same_size_copy_not_held_by_the_vm_is_not_routed_to_it(
    start_vm: Callable[..., VM], tmp_path: Path
) -> None:
    """The guide's environment sets MONITOR_PORT for every shell; a user snapshots a COPY of
    the image (same name, same size, another directory, not opened by any VM)."""
    live = new_image(tmp_path / "live" / "disk.qcow2")
    copy = new_image(tmp_path / "copy" / "disk.qcow2")
    vm = start_vm("hmp-tcp", [live])
    rc, out, err = run_qsnap("-i", copy, "create", "A", env={"MONITOR_PORT": str(vm.port)})
    assert vm.names() == []  # the running VM's image must not get the snapshot
    assert rc == 0, err
    assert "via qemu-img" in out
    assert [n for _, n, _ in offline_snapshots(copy)] == ["A"]


def test_vm_holds_the_image_and_no_monitor_is_configured_exit_8(
    start_vm: Callable[..., VM], tmp_path: Path
) -> None:
    image = make_image(tmp_path, snapshots=["A"], patterns={"A": 0x11, None: 0x22})
    vm = start_vm("qmp", [image])  # it has a monitor, but nobody told qsnap
    before = vm.snapshots()
    for args in (["create", "B"], ["restore", "A", "-y"], ["delete", "A", "-y"]):
        rc, _out, err = run_qsnap("-i", image, *args)
        assert rc == 8, (args, err)
        assert "in use" in err
        assert all(setting in err for setting in SETTINGS), err  # names the settings to fix
        assert vm.snapshots() == before and offline_snapshots(image) == before
    assert vm.has_pattern(0x22) and vm.status() == "running"


@pytest.mark.parametrize("link", ["hardlink", "symlink"])
def test_container_copy_path_is_matched_by_name_and_size(
    start_vm: Callable[..., VM], tmp_path: Path, link: str
) -> None:
    """Inside the guide's container QEMU opened /opt/.../disk.qcow2; on the host the same
    file is ./disk.qcow2 (a bind mount: another path to the same file)."""
    host = new_image(tmp_path / "host" / "disk.qcow2")
    inside = tmp_path / "container" / "opt" / "hurd-image" / "disk.qcow2"
    inside.parent.mkdir(parents=True)
    if link == "hardlink":
        os.link(host, inside)
    else:
        inside.symlink_to(host)
    vm = start_vm("hmp-telnet", [inside])
    assert vm.address is not None
    rc, out, err = run_qsnap("-i", host, "--monitor", vm.address, "create", "A")
    assert rc == 0, err
    assert "via hmp" in out
    assert vm.names() == ["A"] and vm.snapshots()[0][2] > 0
    rc, out, err = run_qsnap("-i", host, "--monitor", vm.address, "list", "--json")
    assert rc == 0, err
    assert json.loads(out)["engine"] == "hmp"
    assert [s["name"] for s in json.loads(out)["snapshots"]] == ["A"]


def test_qsnap_path_map_names_the_path_inside_the_vm(start_vm: Callable[..., VM], tmp_path: Path) -> None:
    host = new_image(tmp_path / "host" / "disk.qcow2")
    inside = tmp_path / "container" / "vm.qcow2"  # another file name: only a mapping can tell
    inside.parent.mkdir()
    os.link(host, inside)
    vm = start_vm("qmp", [inside])
    assert vm.address is not None

    rc, out, err = run_qsnap("-i", host, "--monitor", vm.address, "create", "A")
    assert rc == 8, err  # not matched, so qemu-img tried and met QEMU's lock
    assert vm.names() == []

    env = {"QSNAP_PATH_MAP": f"{host}={inside}"}
    rc, out, err = run_qsnap("-i", host, "--monitor", vm.address, "create", "A", env=env)
    assert rc == 0, err
    assert "via qmp" in out
    assert vm.names() == ["A"]


def test_qsnap_vm_is_found_and_disk_only_restore_stops_reverts_restarts(
    qsnap_vm: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    image = make_image(tmp_path, snapshots=["D"], patterns={"D": 0x11, None: 0x22})  # D is disk-only
    started = qsnap_vm(image)
    qemu_log = image.with_name(image.name + ".qsnap-run") / "qemu.log"

    rc, out, err = run_qsnap("-i", image, "create", "L")  # no monitor setting at all
    assert rc == 0, err
    assert "via qmp" in out
    rc, out, err = run_qsnap("-i", image, "list", "--json")
    assert rc == 0, err
    listing = json.loads(out)
    assert listing["engine"] == "qmp"
    assert [(s["name"], s["vm_state_size"] > 0) for s in listing["snapshots"]] == [("D", False), ("L", True)]

    with qmp_once(started["qmp_socket"]) as side:
        side.log = qemu_log
        side.write_pattern(0x33)

    rc, out, err = run_qsnap("-i", image, "restore", "D", "-y", timeout=150)
    assert rc == 0, err
    assert "via qmp+qemu-img" in out
    assert "stopped" in err  # the warning says the VM was stopped and started again

    again = recorded_vm(image)
    assert again is not None and again["pid"] != started["pid"]  # a new QEMU runs the image
    with qmp_once(again["qmp_socket"]) as side:
        side.log = qemu_log
        assert side.status() == "running"
        assert side.has_pattern(0x11)  # D's data is back
    safety = [(n, size) for _, n, size in offline_snapshots(image) if n.startswith("pre-restore-")]
    assert len(safety) == 1 and safety[0][1] > 0  # taken live, through the monitor
    assert snapshot_has_pattern(image, safety[0][0], 0x33, tmp_path)  # it holds the state before
