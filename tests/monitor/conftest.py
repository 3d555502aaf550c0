"""Fixtures for the monitor tests: real qemu-system-x86_64 VMs (no guest OS). The fake
(broken) monitors, ``fake_monitor`` and :class:`FakeMonitor`, live in tests/conftest.py.

Every QEMU a test starts is stopped in the fixture's teardown, by PID, on every path.
Each VM also gets a private QMP "side channel" (qemu.qmp, not qsnap code) that tests use
as the witness: run state, snapshot lists, and guest-disk patterns written with HMP
``qemu-io`` (whose quotes and spaces must never go through qsnap's safe HMP API).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol
from qsnap_testlib import FakeMonitor, QemuProcesses, free_port, new_image

# What the tests' type hints import from here (FakeMonitor is qsnap_testlib's, re-exported).
__all__ = ["FIXTURES", "VM", "FakeMonitor"]


@dataclass
class VM:
    """A running QEMU and the address of the monitor under test."""

    proc: subprocess.Popen[bytes]
    kind: str
    address: str
    images: list[Path]
    log: Path
    side: QEMUMonitorProtocol
    extra: dict[str, Any] = field(default_factory=dict)

    def hmp(self, line: str) -> str:
        """HMP text through the side channel's human-monitor-command (test-only raw path)."""
        return str(self.side.cmd("human-monitor-command", **{"command-line": line}))

    def status(self) -> str:
        return str(self.side.cmd("query-status")["status"])

    def snapshots(self, index: int = 0) -> list[tuple[str, str, int]]:
        """(id, name, vm_state_size) of the INDEX-th qcow2 disk, from query-named-block-nodes."""
        nodes = [n for n in self.side.cmd("query-named-block-nodes") if n["drv"] == "qcow2"]
        node = next(n for n in nodes if n["file"] == str(self.images[index]))
        return [(s["id"], s["name"], s["vm-state-size"]) for s in node["image"].get("snapshots", [])]

    def write_pattern(self, byte: int, device: str = "virtio0") -> None:
        self.hmp(f'qemu-io {device} "write -P 0x{byte:02x} 0 64k"')

    def has_pattern(self, byte: int, device: str = "virtio0") -> bool:
        """qemu-io prints to QEMU's stdout (our log), not to the monitor: read it there."""
        before = self.log.read_text(errors="replace")
        self.hmp(f'qemu-io {device} "read -P 0x{byte:02x} 0 64k"')
        for _ in range(100):
            new = self.log.read_text(errors="replace")[len(before) :]
            if "read 65536/65536" in new:
                return "Pattern verification failed" not in new
            time.sleep(0.02)
        raise AssertionError(f"qemu-io printed nothing: {new!r}")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture
def start_vm(tmp_path: Path) -> Iterator[Callable[..., VM]]:
    """start_vm(kind, disks=1) → VM; kind is qmp | hmp-tcp | hmp-telnet | hmp-unix."""
    qemus = QemuProcesses()
    sockdir = Path(tempfile.mkdtemp(prefix="qsm", dir="/tmp"))  # unix paths must stay short

    def start(kind: str, disks: int = 1) -> VM:
        n = len(qemus)
        images = [new_image(tmp_path / f"disk{i}.qcow2", "64M" if i == 0 else "32M") for i in range(disks)]
        if kind in ("qmp", "hmp-unix"):
            path = sockdir / f"mon{n}.sock"
            monitor_args = ["-qmp" if kind == "qmp" else "-monitor", f"unix:{path},server=on,wait=off"]
            address = f"unix:{path}"
        else:
            transport = kind.removeprefix("hmp-")
            port = free_port()
            monitor_args = ["-monitor", f"{transport}:127.0.0.1:{port},server=on,wait=off"]
            address = f"{transport}:127.0.0.1:{port}"
        log = tmp_path / f"qemu{n}.log"
        proc, side = qemus.start(images, monitor_args, sockdir / f"side{n}.sock", log, side_timeout=30)
        return VM(proc, kind, address, images, log, side)

    try:
        yield start
    finally:
        qemus.stop_all()
        shutil.rmtree(sockdir, ignore_errors=True)


FIXTURES = Path(__file__).parent / "fixtures"
