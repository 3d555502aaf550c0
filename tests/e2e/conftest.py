"""End-to-end fixtures: the real ``qsnap`` CLI (a subprocess, as a user runs it) against the
real Linux test guest (tests/guest; TCG unless /dev/kvm is hardware KVM).

- ``qsnap_ok(*args)`` runs ``.venv/bin/qsnap`` and fails the test, with its output, unless it
  exits 0; ``run_qsnap`` (tests/conftest.py) returns ``(rc, out, err)`` for expected failures.
- ``cli_guest(image, loadvm=...)`` starts the guest with ``qsnap vm start`` (the hidden
  ``--kernel/--initrd/--append`` options, every port 0 = free), waits until its shell answers
  on the serial console (not a fixed sleep) and returns a :class:`guest.fixtures.Guest`.
  Every QEMU it started, and any QEMU qsnap restarted on those images, is SIGKILLed by pid at
  teardown (after checking the pid still is that QEMU).
- ``booted_copy(name)``: a copy of a booted image for ``qsnap vm start --loadvm booted``
  (~0.3 s instead of a ~3 s boot). Made once per session by a cold boot with ``qsnap vm
  start`` itself: its VM has an e1000 NIC (the SSH forward) that the guest fixtures' VMs lack,
  and ``-loadvm`` needs the same devices as ``savevm`` had.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qsnap_testlib import Run, run_qsnap

from guest.builder import GuestBuild
from guest.fixtures import BOOT_TIMEOUT, BOOTED_SNAPSHOT, GUEST_MEMORY_MB, Guest, _attach
from qsnap import vm

#: Generous: a TCG guest on 2 cores shared with other test runs.
CLI_TIMEOUT = 240.0


def qsnap_ok(*args: Any, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT) -> str:
    """Run ``qsnap ARGS``; its stdout, or the test fails showing what qsnap said."""
    result = run_qsnap(*args, env=env, timeout=timeout)
    assert result.rc == 0, f"qsnap {' '.join(map(str, args))} exited {result.rc}:\n{result.out}{result.err}"
    return result.out


def vm_start_argv(build: GuestBuild, image: Path, *, loadvm: str | None = None) -> list[str]:
    """``qsnap vm start`` for the test guest, every port chosen free at run time."""
    argv = [
        "-i", str(image), "vm", "start", "--json",
        "--memory", str(GUEST_MEMORY_MB), "--smp", "1", "--disk-interface", "virtio",
        "--ssh-port", "0", "--serial-port", "0", "--monitor-port", "0",
        "--kernel", str(build.kernel), "--initrd", str(build.initrd), "--append", build.append,
    ]  # fmt: skip
    if loadvm is not None:
        argv += ["--loadvm", loadvm]
    return argv


class CliGuests:
    """Starts guests through the ``qsnap vm start`` CLI and kills them all at teardown."""

    def __init__(self, build: GuestBuild) -> None:
        self.build = build
        self.guests: list[Guest] = []
        self.images: list[Path] = []
        self.pids: set[int] = set()

    def start(self, image: Path, *, loadvm: str | None = None) -> Guest:
        self.images.append(Path(image))
        out = qsnap_ok(*vm_start_argv(self.build, image, loadvm=loadvm))
        self.pids.add(int(json.loads(out)["pid"]))
        return self.attach(image, cold=loadvm is None)

    def attach(self, image: Path, *, cold: bool) -> Guest:
        """A Guest on the VM that qsnap runs on IMAGE (wait for its shell)."""
        running = vm.find_running(image)
        assert running is not None, f"qsnap vm start reported success but no VM runs on {image}"
        self.pids.add(running.pid)
        console = _attach(running, cold=cold, timeout=BOOT_TIMEOUT)
        guest = Guest(image=Path(image), build=self.build, vm=running, console=console, pids={running.pid})
        self.guests.append(guest)
        return guest

    def kill_all(self) -> None:
        for guest in self.guests:
            guest.kill()  # every pid it had, plus the VM qsnap records for its image now
        for image in self.images:
            running = vm.find_running(image)
            if running is not None:
                Guest(image=image, build=self.build, vm=running, console=_Closed(), pids={running.pid}).kill()  # type: ignore[arg-type]


class _Closed:
    def close(self) -> None:
        pass


@pytest.fixture
def cli_guests(guest_build: GuestBuild) -> Iterator[CliGuests]:
    guests = CliGuests(guest_build)
    try:
        yield guests
    finally:
        guests.kill_all()


@pytest.fixture(scope="session")
def cli_booted_image(guest_build: GuestBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The pristine disk, cold-booted by ``qsnap vm start``, with snapshot ``booted``."""
    image = tmp_path_factory.mktemp("cli-booted") / "booted.qcow2"
    shutil.copyfile(guest_build.disk, image)
    guests = CliGuests(guest_build)
    try:
        guest = guests.start(image)
        guest.check("sync")
        reply = guest.hmp(f"savevm {BOOTED_SNAPSHOT}")
        assert not reply.strip(), f"savevm said: {reply}"
    finally:
        guests.kill_all()
    yield image


@pytest.fixture
def booted_copy(cli_booted_image: Path, tmp_path: Path) -> Callable[[str], Path]:
    def copy(name: str = "debian-hurd-amd64.qcow2") -> Path:
        target = tmp_path / name
        shutil.copyfile(cli_booted_image, target)
        return target

    return copy


def hmp_snapshot_names(guest: Guest) -> list[str]:
    """Snapshot names the running QEMU itself lists (QMP query-named-block-nodes)."""
    from qsnap.vm.qmp import command, qmp_session

    with qmp_session(guest.qmp_socket, timeout=30) as qmp:
        nodes = command(qmp, "query-named-block-nodes")
    names: list[str] = []
    for node in nodes:
        if node.get("drv") == "qcow2":
            names += [s["name"] for s in node.get("image", {}).get("snapshots", [])]
    return names


__all__ = ["BOOTED_SNAPSHOT", "CLI_TIMEOUT", "CliGuests", "Run", "hmp_snapshot_names", "qsnap_ok", "vm_start_argv"]
