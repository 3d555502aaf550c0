"""pytest fixtures for a real booted Linux guest (issue 6). Import them into a conftest::

    from guest.fixtures import guest_build, guest_booted_image, guest_factory, running_guest  # noqa: F401

(``tests/`` is on sys.path when tests/conftest.py exists and tests/ has no __init__.py;
inside tests/guest use ``from .fixtures import ...``.)

Fixtures
- ``guest_build`` (session): the :class:`~guest.builder.GuestBuild` (kernel, initrd, pristine
  disks), built once into the cache; a failed build FAILS the test with the reason.
- ``guest_booted_image`` (session): a qcow2 (copy of the pristine disk) holding a snapshot
  ``booted`` of the guest at its shell prompt, made once per session by a cold boot + savevm.
- ``guest_factory`` (function): ``start(...) -> Guest``; copies a disk into tmp_path and
  starts QEMU with qsnap.vm (TCG unless /dev/kvm is hardware KVM). By default from
  ``-loadvm booted`` (~0.3 s instead of ~3 s), then the ``booted`` snapshot is deleted so the
  test's image starts with no snapshots. Every QEMU it started (and any VM qsnap later
  restarts on those images) is killed by pid at teardown, whatever happened.
- ``running_guest`` (function): ``guest_factory()`` with the defaults.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qsnap import vm
from qsnap.vm.qmp import command, qmp_session

from .builder import READY_MARKER, GuestBuild, GuestBuildError, build_guest
from .console import CommandResult, ConsoleError, SerialConsole, wait_for_text

BOOTED_SNAPSHOT = "booted"
GUEST_MEMORY_MB = 256
BOOT_TIMEOUT = 120.0  # ~3 s alone under TCG; the CPUs are shared with other test runs


def guest_spec(
    build: GuestBuild, image: Path, *, loadvm: str | None = None, monitor_port: int | None = None,
    ssh_port: int | None = None, serial_port: int | None = None,
) -> vm.VMSpec:  # fmt: skip
    """How the test guest is started: virtio disk, PVH kernel, serial console on a unix
    socket (or on a telnet port: SERIAL_PORT, 0 = a free one)."""
    return vm.VMSpec(
        image=image,
        memory_mb=GUEST_MEMORY_MB,
        smp=1,
        disk_interface="virtio",
        ssh_port=ssh_port,
        serial_port=serial_port,
        monitor_port=monitor_port,
        kernel=build.kernel,
        initrd=build.initrd,
        append=build.append,
        loadvm=loadvm,
        no_reboot=True,
    )


def hmp(qmp_socket: Path, command_line: str, timeout: float = 60.0) -> str:
    """Run one HMP command through QMP's human-monitor-command; return its text."""
    with qmp_session(qmp_socket, timeout=timeout) as qmp:
        return str(command(qmp, "human-monitor-command", **{"command-line": command_line}))


@dataclass
class Guest:
    """A running test guest: its image, its qsnap.vm record and an open serial console."""

    image: Path
    build: GuestBuild
    vm: vm.RunningVM
    console: SerialConsole
    pids: set[int] = field(default_factory=set)

    @property
    def qmp_socket(self) -> Path:
        return self.vm.qmp_socket

    @property
    def pid(self) -> int:
        return self.vm.pid

    def run(self, command_line: str, timeout: float = 60.0) -> CommandResult:
        return self.console.run(command_line, timeout=timeout)

    def check(self, command_line: str, timeout: float = 60.0) -> str:
        """Run a command; its output, or the test fails if it exits non-zero."""
        return self.console.check(command_line, timeout=timeout)

    def write_file(self, path: str, text: str, *, sync: bool = True) -> None:
        """Write TEXT (no quotes or newlines inside) to PATH in the guest, then sync."""
        if "'" in text or "\n" in text:
            raise ValueError("keep guest file contents simple: no quotes or newlines")
        self.check(f"printf '%s' '{text}' > {path}" + ("; sync" if sync else ""))

    def read_file(self, path: str) -> str:
        return self.check(f"cat {path}")

    def is_alive(self) -> bool:
        return vm.is_qemu_process(self.vm.pid, self.vm.qmp_socket)

    def hmp(self, command_line: str) -> str:
        return hmp(self.qmp_socket, command_line)

    def reattach(self, timeout: float = BOOT_TIMEOUT) -> Guest:
        """After qsnap restarted the VM (cold boot, e.g. an offline restore through its
        controller): find the new QEMU, wait until the guest is ready, reopen the console."""
        deadline = time.monotonic() + timeout
        while (running := vm.find_running(self.image)) is None:
            if time.monotonic() > deadline:
                raise ConsoleError(f"no running VM on {self.image}")
            time.sleep(0.05)
        self.console.close()
        self.vm = running
        self.pids.add(running.pid)
        self.console = _attach(running, cold=running.spec.loadvm is None, timeout=timeout)
        return self

    def kill(self) -> None:
        """SIGKILL every QEMU this guest ever had, by pid (only if it is still that QEMU)."""
        with contextlib.suppress(Exception):
            self.console.close()
        pids = set(self.pids) | {self.vm.pid}
        record = vm.find_running(self.image)
        candidates = [(pid, self.vm.qmp_socket) for pid in pids]
        if record is not None:
            candidates.append((record.pid, record.qmp_socket))
        for pid, qmp_socket in candidates:
            if vm.is_qemu_process(pid, qmp_socket):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        for pid, qmp_socket in candidates:
            while vm.is_qemu_process(pid, qmp_socket) and time.monotonic() < deadline:
                time.sleep(0.02)
        vm.find_running(self.image)  # cleans the stale record


def _attach(running: vm.RunningVM, *, cold: bool, timeout: float = BOOT_TIMEOUT) -> SerialConsole:
    """Wait until the guest shell answers on the serial console; return the console."""
    if cold:
        wait_for_text(
            running.serial_log,
            READY_MARKER,
            timeout=timeout,
            alive=lambda: vm.is_qemu_process(running.pid, running.qmp_socket),
        )
    console = running.open_console()
    try:
        console.check("true", timeout=timeout)
    except BaseException:
        console.close()
        raise
    return console


def start_guest(
    build: GuestBuild,
    image: Path,
    *,
    loadvm: str | None = None,
    monitor_port: int | None = None,
    ssh_port: int | None = None,
    serial_port: int | None = None,
    register: Callable[[vm.RunningVM], None] | None = None,
) -> Guest:
    """Start the guest on IMAGE (cold boot, or from snapshot LOADVM) and wait until ready.

    REGISTER is told the RunningVM as soon as QEMU runs, so teardown can kill it even if waiting
    for the guest fails."""
    spec = guest_spec(
        build, image, loadvm=loadvm, monitor_port=monitor_port, ssh_port=ssh_port, serial_port=serial_port
    )
    running = vm.start(spec, timeout=BOOT_TIMEOUT)
    if register is not None:
        register(running)
    try:
        console = _attach(running, cold=loadvm is None)
    except BaseException:
        _kill_pid(running)
        raise
    return Guest(image=Path(image), build=build, vm=running, console=console, pids={running.pid})


def _kill_pid(running: vm.RunningVM) -> None:
    if vm.is_qemu_process(running.pid, running.qmp_socket):
        with contextlib.suppress(ProcessLookupError):
            os.kill(running.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while vm.is_qemu_process(running.pid, running.qmp_socket) and time.monotonic() < deadline:
        time.sleep(0.02)
    vm.find_running(running.image)


def make_booted_image(build: GuestBuild, image: Path) -> Path:
    """Copy the pristine disk to IMAGE, cold-boot it, ``savevm booted``, stop QEMU."""
    shutil.copyfile(build.disk, image)
    guest = start_guest(build, image)
    try:
        guest.check("sync")
        reply = guest.hmp(f"savevm {BOOTED_SNAPSHOT}")
        if reply.strip():
            raise ConsoleError(f"savevm {BOOTED_SNAPSHOT} said: {reply.strip()}")
    finally:
        guest.kill()
    return image


# --- fixtures ------------------------------------------------------------------------------


def build_or_fail(cache_dir: Path | None = None) -> GuestBuild:
    """The built guest, or a test FAILURE saying why it cannot be built (never a skip)."""
    try:
        return build_guest(cache_dir)
    except GuestBuildError as exc:
        pytest.fail(f"cannot build the test guest: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def guest_build() -> GuestBuild:
    return build_or_fail()


@pytest.fixture(scope="session")
def guest_booted_image(guest_build: GuestBuild, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("booted-guest")
    return make_booted_image(guest_build, directory / "booted.qcow2")


GuestFactory = Callable[..., Guest]


@pytest.fixture
def guest_factory(guest_build: GuestBuild, guest_booted_image: Path, tmp_path: Path) -> Iterator[GuestFactory]:
    guests: list[Guest] = []
    pending: list[vm.RunningVM] = []
    counter = iter(range(1000))

    def start(
        *,
        name: str | None = None,
        disk: Path | None = None,
        hurd: bool = False,
        cold: bool = False,
        keep_booted_snapshot: bool = False,
        monitor_port: int | None = None,
        ssh_port: int | None = None,
        serial_port: int | None = None,
    ) -> Guest:
        """Start a guest on a fresh copy of a disk.

        DISK: an existing qcow2 to boot as is (cold); HURD: the ``mke2fs -o hurd`` disk
        (cold); COLD: boot the pristine disk instead of loading the ``booted`` snapshot.
        MONITOR_PORT / SSH_PORT / SERIAL_PORT: 0 = a free port for the guide's HMP telnet
        monitor / the SSH forward / the serial console on telnet (default: a unix socket)."""
        image = tmp_path / (name or f"guest{next(counter)}.qcow2")
        if disk is not None:
            if Path(disk).resolve() != image.resolve():
                shutil.copyfile(disk, image)
            loadvm = None
        elif hurd or cold:
            shutil.copyfile(guest_build.disk_hurd if hurd else guest_build.disk, image)
            loadvm = None
        else:
            shutil.copyfile(guest_booted_image, image)
            loadvm = BOOTED_SNAPSHOT
        guest = start_guest(
            guest_build, image, loadvm=loadvm, monitor_port=monitor_port, ssh_port=ssh_port,
            serial_port=serial_port, register=pending.append,
        )  # fmt: skip
        guests.append(guest)
        if loadvm is not None and not keep_booted_snapshot:
            reply = guest.hmp(f"delvm {BOOTED_SNAPSHOT}")
            if reply.strip():
                raise ConsoleError(f"delvm {BOOTED_SNAPSHOT} said: {reply.strip()}")
        return guest

    try:
        yield start
    finally:
        for guest in guests:
            guest.kill()
        for running in pending:  # also a QEMU whose guest never became ready
            _kill_pid(running)


@pytest.fixture
def running_guest(guest_factory: GuestFactory) -> Guest:
    return guest_factory()


__all__ = [
    "BOOTED_SNAPSHOT",
    "CommandResult",
    "Guest",
    "GuestBuild",
    "GuestFactory",
    "guest_booted_image",
    "guest_build",
    "guest_factory",
    "guest_spec",
    "hmp",
    "make_booted_image",
    "running_guest",
    "start_guest",
]
