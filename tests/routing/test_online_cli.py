"""Online snapshots through the real ``qsnap`` command against a running QEMU, as a user runs it:
create/list/restore/delete over QMP, the guide's HMP TCP port (``MONITOR_PORT``) and HMP telnet;
the monitor traps (overwrite, missing name, disk-only load, --replace); the injection list."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from qsnap_testlib import Run, make_image

from .conftest import MONITOR_KINDS, VM, run_qsnap

pytestmark = pytest.mark.vm


def reach(vm: VM) -> tuple[list[str], dict[str, str]]:
    """How a user points qsnap at VM's monitor: --monitor, or the guide's MONITOR_PORT."""
    if vm.kind == "hmp-tcp":
        return [], {"MONITOR_PORT": str(vm.port)}
    assert vm.address is not None
    return ["--monitor", vm.address], {}


def engine_of(vm: VM) -> str:
    return "qmp" if vm.kind.startswith("qmp") else "hmp"


def qsnap_on(vm: VM, *args: str, image: Path | None = None, timeout: float = 90) -> Run:
    opts, env = reach(vm)
    return run_qsnap("-i", image or vm.drives[0], *opts, *args, env=env, timeout=timeout)


@pytest.mark.parametrize("kind", MONITOR_KINDS)
def test_create_list_restore_delete_online(start_vm: Callable[..., VM], kind: str) -> None:
    vm = start_vm(kind)
    engine = engine_of(vm)

    vm.write_pattern(0x11)
    rc, out, err = qsnap_on(vm, "create", "A")
    assert rc == 0, err
    assert f"via {engine}" in out
    assert vm.names() == ["A"]

    rc, out, err = qsnap_on(vm, "create", "B", "--json")
    assert rc == 0, err
    created = json.loads(out)
    assert created["engine"] == engine and created["snapshot"]["name"] == "B"

    rc, out, err = qsnap_on(vm, "list", "--json")
    assert rc == 0, err
    listing = json.loads(out)
    assert listing["engine"] == engine
    # QEMU's real IDs (HMP's `info snapshots` would print "--"), in QEMU's order
    assert [(s["id"], s["name"]) for s in listing["snapshots"]] == [(i, n) for i, n, _ in vm.snapshots()]
    assert all(s["id"].isdigit() for s in listing["snapshots"])
    assert all(s["vm_state_size"] > 0 for s in listing["snapshots"])  # live: RAM + devices saved

    vm.write_pattern(0x22)
    rc, out, err = qsnap_on(vm, "restore", "A", "-y")
    assert rc == 0, err
    assert f"via {engine}" in out
    assert vm.has_pattern(0x11)  # the disk came back
    assert vm.status() == "running"  # and the guest runs on from the saved state
    safety = [(n, size) for _, n, size in vm.snapshots() if n.startswith("pre-restore-")]
    assert len(safety) == 1 and safety[0][1] > 0  # taken through the monitor, with VM state
    assert safety[0][0] in out  # the user is told how to undo

    vm.hmp(f"loadvm {safety[0][0]}")  # the safety snapshot holds the state before the restore
    assert vm.has_pattern(0x22)

    rc, out, err = qsnap_on(vm, "delete", "A", "-y", "--json")
    assert rc == 0, err
    assert json.loads(out)["engine"] == engine
    assert vm.names() == ["B", safety[0][0]]
    assert vm.alive and vm.status() == "running"


@pytest.mark.parametrize("kind", MONITOR_KINDS)
def test_online_traps_exist_missing_replace(start_vm: Callable[..., VM], kind: str) -> None:
    vm = start_vm(kind)
    assert qsnap_on(vm, "create", "daily").rc == 0
    before = vm.snapshots()

    rc, out, err = qsnap_on(vm, "create", "daily")  # HMP savevm would silently overwrite it
    assert rc == 4, err
    assert "already exists" in err
    assert vm.snapshots() == before  # same ID, same VM state: untouched

    for verb in ("delete", "restore"):  # delvm / snapshot-delete of a missing tag "succeed"
        rc, out, err = qsnap_on(vm, verb, "nosuch", "-y")
        assert rc == 3, (verb, err)
        assert "nosuch" in err
    assert vm.snapshots() == before

    rc, out, err = qsnap_on(vm, "create", "daily", "--replace")
    assert rc == 0, err
    assert f"replacing ID {before[0][0]}" in out
    after = vm.snapshots()
    assert [n for _, n, _ in after] == ["daily"]  # exactly one, and no temporary snapshot left
    assert after[0][0] != before[0][0]
    assert vm.alive and vm.status() == "running"


@pytest.mark.parametrize("kind", ["qmp", "hmp-telnet"])
def test_restore_disk_only_snapshot_without_controller_is_refused_cleanly(
    start_vm: Callable[..., VM], tmp_path: Path, kind: str
) -> None:
    image = make_image(tmp_path, snapshots=["D"], patterns={"D": 0x11, None: 0x22})  # offline: no VM state
    vm = start_vm(kind, [image])
    before = vm.snapshots()
    assert before[0][2] == 0
    for vm_option in (["--vm", "none"], []):  # explicit none, and auto with no qsnap-launched VM
        rc, _out, err = qsnap_on(vm, *vm_option, "restore", "D", "-y")
        assert rc == 12, err
        assert "disk-only" in err and "--vm" in err  # why, and what to configure
        assert vm.snapshots() == before  # no safety snapshot left behind
    assert vm.has_pattern(0x22) and vm.status() == "running"


# ---------------------------------------------------------------- injection

# Each would run another monitor command if it reached HMP's line editor as typed:
# newline/CR end the line, backspace/DEL erase "savevm ", ESC [A recalls the previous line,
# quotes and spaces split arguments. (NUL cannot travel in argv: see the library test below.)
INJECTIONS = [
    "a\nquit",
    "a\rquit",
    "a\r\nstop",
    "x\b\b\b\b\b\b\b\b\bquit",
    "a\x7f\x7f\x7f\x7f\x7f\x7f\x7fstop",
    "a\x1b[Aquit",
    "\x1b[A",
    "a\x1bOAstop",
    'a"quit',
    "a'quit",
    'a";stop;"',
    "a quit",
    "a\tstop",
    "a\\nquit",
]


@pytest.mark.parametrize("kind", ["hmp-tcp", "hmp-telnet"])
def test_injection_names_never_reach_hmp(start_vm: Callable[..., VM], kind: str) -> None:
    vm = start_vm(kind)
    assert qsnap_on(vm, "create", "kept").rc == 0
    before = vm.snapshots()
    attempts = [("create", name) for name in INJECTIONS]
    attempts += [(verb, name) for verb in ("restore", "delete") for name in ("a\nquit", "a\x1b[Aquit", "a'stop")]
    for verb, name in attempts:
        rc, _out, err = qsnap_on(vm, verb, name, "-y") if verb != "create" else qsnap_on(vm, verb, name)
        assert rc == 6, (verb, name, err)
        assert "\x1b" not in err and "\r" not in err  # nor are the bytes echoed to the user's terminal
        assert vm.alive, (verb, name)
        assert vm.status() == "running", (verb, name)  # no stop, no quit ran
        assert vm.snapshots() == before, (verb, name)  # no savevm/delvm ran


def test_nul_in_a_name_never_reaches_hmp(start_vm: Callable[..., VM]) -> None:
    """argv cannot carry NUL; a library caller can. The service refuses it (exit 6)."""
    from qsnap import service
    from qsnap.core.errors import InvalidName
    from qsnap.service.snapshots import Context

    vm = start_vm("hmp-tcp")
    image = vm.drives[0]
    assert vm.address is not None
    ctx = Context(monitor=vm.address, environ={})
    service.create(image, "kept", ctx=ctx)
    before = vm.snapshots()
    for name in ("a\x00quit", "a\x00\nstop", "\x00"):
        for call in (service.create, service.restore, service.delete):
            with pytest.raises(InvalidName) as info:
                call(image, name, ctx=ctx)
            assert info.value.exit_code == 6
            assert vm.alive and vm.status() == "running"
            assert vm.snapshots() == before
