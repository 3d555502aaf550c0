"""Fixtures for the VM lifecycle tests: a blank qcow2 (QEMU boots SeaBIOS, no OS needed)
and a launcher whose VMs are killed by pid at teardown, whatever the test did."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qsnap import vm
from qsnap.core import proc


@pytest.fixture
def blank_image(tmp_path: Path) -> Path:
    image = tmp_path / "disk.qcow2"
    proc.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"])
    return image


def no_os_spec(image: Path, **changes: Any) -> vm.VMSpec:
    """A tiny VM: 64 MiB, one CPU, no ports unless the test asks (0 = a free port)."""
    settings: dict[str, Any] = {
        "memory_mb": 64,
        "smp": 1,
        "ssh_port": None,
        "serial_port": None,
        "monitor_port": None,
    }
    settings.update(changes)
    return vm.VMSpec(image=image, **settings)


def kill_qemu(pid: int, qmp_socket: Path) -> None:
    """SIGKILL PID if it still is the QEMU serving QMP_SOCKET; wait until it is gone."""
    if vm.is_qemu_process(pid, qmp_socket):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while vm.is_qemu_process(pid, qmp_socket) and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[[vm.VMSpec], vm.RunningVM]]:
    """``launch(spec)`` = ``qsnap.vm.start(spec)``; teardown kills every VM it started and
    any VM still recorded on those images (a controller may have restarted one)."""
    started: list[vm.RunningVM] = []

    def start(spec: vm.VMSpec) -> vm.RunningVM:
        running = vm.start(spec)
        started.append(running)
        return running

    yield start
    for running in started:
        kill_qemu(running.pid, running.qmp_socket)
        again = vm.find_running(running.image)
        if again is not None:
            kill_qemu(again.pid, again.qmp_socket)
