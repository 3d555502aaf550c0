"""Fixtures for the monitor tests: real qemu-system-x86_64 VMs (no guest OS) and fake monitors.

Every QEMU a test starts is stopped in the fixture's teardown, by PID, on every path.
Each VM also gets a private QMP "side channel" (qemu.qmp, not qsnap code) that tests use
as the witness: run state, snapshot lists, and guest-disk patterns written with HMP
``qemu-io`` (whose quotes and spaces must never go through qsnap's safe HMP API).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

QEMU = "qemu-system-x86_64"


def accel() -> str:
    return "tcg" if Path("/sys/module/kvm_pvm").exists() else "kvm:tcg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_image(path: Path, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


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


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()  # by PID (Popen.kill signals self.pid)
    proc.wait(timeout=10)


@pytest.fixture
def start_vm(tmp_path: Path) -> Iterator[Callable[..., VM]]:
    """start_vm(kind, disks=1) → VM; kind is qmp | hmp-tcp | hmp-telnet | hmp-unix."""
    started: list[tuple[subprocess.Popen[bytes], QEMUMonitorProtocol | None]] = []
    sockdir = Path(tempfile.mkdtemp(prefix="qsm", dir="/tmp"))  # unix paths must stay short

    def start(kind: str, disks: int = 1) -> VM:
        images = [make_image(tmp_path / f"disk{i}.qcow2", "64M" if i == 0 else "32M") for i in range(disks)]
        side_path = sockdir / f"side{len(started)}.sock"
        argv = [QEMU, "-machine", f"pc,accel={accel()}", "-m", "64", "-nodefaults", "-display", "none"]
        for img in images:
            argv += ["-drive", f"file={img},if=virtio,format=qcow2"]
        argv += ["-qmp", f"unix:{side_path},server=on,wait=off"]
        if kind == "qmp":
            path = sockdir / f"mon{len(started)}.sock"
            argv += ["-qmp", f"unix:{path},server=on,wait=off"]
            address = f"unix:{path}"
        elif kind == "hmp-unix":
            path = sockdir / f"mon{len(started)}.sock"
            argv += ["-monitor", f"unix:{path},server=on,wait=off"]
            address = f"unix:{path}"
        else:
            transport = kind.removeprefix("hmp-")
            port = free_port()
            argv += ["-monitor", f"{transport}:127.0.0.1:{port},server=on,wait=off"]
            address = f"{transport}:127.0.0.1:{port}"
        log = tmp_path / f"qemu{len(started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started.append((proc, None))
        deadline = time.monotonic() + 20
        while not side_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"QEMU did not start: {log.read_text(errors='replace')}")
            time.sleep(0.02)
        while True:  # the path appears at bind(), a moment before listen(): retry
            side = QEMUMonitorProtocol(str(side_path))
            try:
                side.connect()
                break
            except Exception:
                side.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        side.settimeout(30)
        started[-1] = (proc, side)
        return VM(proc, kind, address, images, log, side)

    try:
        yield start
    finally:
        for proc, side in started:
            try:
                if side is not None:
                    side.close()
            except Exception:
                pass
            _stop(proc)
        shutil.rmtree(sockdir, ignore_errors=True)


# ---------------------------------------------------------------- fake monitors

class FakeMonitor:
    """A TCP server standing in for a broken QEMU monitor (what cannot be made to happen
    reliably with a real QEMU: a monitor that hangs, or hangs up mid-command).

    behaviour: 'silent' (accept, never send), 'hmp-hang' (greet, never answer),
    'hmp-hangup' (greet, close on the first command), 'qmp-hang' (greet, never answer
    negotiation), 'qmp-hangup' (greet, negotiate, close on the next command).
    """

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.port = int(self.server.getsockname()[1])
        self.received = b""
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def _recv_line(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\n" not in data and not self._stop.is_set():
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                break
            data += chunk
        self.received += data
        return data

    def _recv_json(self, conn: socket.socket) -> dict[str, Any]:
        data = b""
        while not self._stop.is_set():
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                continue
            data += chunk
            try:
                return dict(json.loads(data))
            except ValueError:
                if not chunk:
                    break
        return {}

    def _serve(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(0.2)
            self._conns.append(conn)
            b = self.behaviour
            if b.startswith("hmp"):
                conn.sendall(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
            elif b.startswith("qmp"):
                conn.sendall(
                    b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
                    b'"package": ""}, "capabilities": ["oob"]}}\r\n'
                )
            if b == "qmp-hangup":
                request = self._recv_json(conn)  # qmp_capabilities
                reply = {"return": {}, **({"id": request["id"]} if "id" in request else {})}
                conn.sendall(json.dumps(reply).encode() + b"\r\n")
            if b.endswith("hangup"):
                self._recv_json(conn) if b.startswith("qmp") else self._recv_line(conn)
                conn.close()
                continue
            while not self._stop.is_set():  # hang: read and never answer
                if self._recv_line(conn) == b"":
                    time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self.server.close()


@pytest.fixture
def fake_monitor() -> Iterator[Callable[[str], FakeMonitor]]:
    fakes: list[FakeMonitor] = []

    def make(behaviour: str) -> FakeMonitor:
        fakes.append(FakeMonitor(behaviour))
        return fakes[-1]

    try:
        yield make
    finally:
        for fake in fakes:
            fake.close()


FIXTURES = Path(__file__).parent / "fixtures"
