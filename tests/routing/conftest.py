"""Fixtures for the routing tests: the real ``qsnap`` console script against real QEMUs.

Every VM here is a real qemu-system-x86_64 with no guest OS (SeaBIOS is enough for
savevm/loadvm/delvm), started with ``-machine pc,accel=tcg -m 64 -nodefaults -display none``.
Each one also gets a private QMP *side channel* (``-qmp unix:side.sock``, driven with
qemu.qmp, never with qsnap code): the tests' witness for the run state and the snapshot list,
and the way guest-disk patterns are written and read live (HMP ``qemu-io`` sent through
``human-monitor-command``; qemu-io prints to QEMU's stdout, our log file).

Everything a test starts — QEMUs, qsnap processes, fake monitors, proxies — is stopped in
the fixture's teardown, by PID (Popen.kill / os.kill), on every path. Ports are picked free
at run time.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
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
from qsnap_testlib import (
    QSNAP,
    FakeMonitor,
    LoopbackServer,
    QemuProcesses,
    Run,
    clean_environ,
    free_port,
    kill_popen,
    new_image,
    qemu_img,
)

# What the tests import from here (FakeMonitor and new_image are qsnap_testlib's, re-exported).
__all__ = ["MONITOR_KINDS", "VM", "CuttingProxy", "FakeMonitor", "new_image", "offline_snapshots", "qmp_once",
           "recorded_vm", "run_qsnap", "snapshot_has_pattern"]

MONITOR_KINDS = ("qmp", "hmp-tcp", "hmp-telnet")


def offline_snapshots(image: Path) -> list[tuple[str, str, int]]:
    """(id, name, vm_state_size) from qemu-img itself (-U: a VM may hold the image)."""
    out = qemu_img("info", "-U", "-f", "qcow2", "--output=json", str(image)).stdout
    return [(str(s["id"]), str(s["name"]), int(s.get("vm-state-size", 0)))
            for s in json.loads(out).get("snapshots", [])]


def snapshot_has_pattern(image: Path, snapshot: str, byte: int, tmp: Path, length: int = 65536) -> bool:
    """Whether SNAPSHOT of IMAGE starts with LENGTH bytes of BYTE (read with qemu-img -U)."""
    raw = tmp / f"snap-{snapshot}.raw"
    qemu_img("convert", "-U", "-f", "qcow2", "-O", "raw", "-l", f"snapshot.name={snapshot}", str(image), str(raw))
    with open(raw, "rb") as handle:
        data = handle.read(length)
    raw.unlink()
    return data == bytes([byte]) * length


# ---------------------------------------------------------------- QEMU VMs with a side channel

class Side:
    """The tests' private QMP client on one QEMU (a witness, independent of qsnap)."""

    def __init__(self, qmp: QEMUMonitorProtocol, log: Path) -> None:
        self.qmp = qmp
        self.log = log

    def hmp(self, line: str) -> str:
        return str(self.qmp.cmd("human-monitor-command", **{"command-line": line}))

    def status(self) -> str:
        reply: dict[str, Any] = self.qmp.cmd("query-status")  # type: ignore[assignment]
        return str(reply["status"])

    def snapshots(self, qemu_path: str | Path) -> list[tuple[str, str, int]]:
        """(id, name, vm_state_size) of the qcow2 node QEMU opened as QEMU_PATH."""
        reply: list[dict[str, Any]] = self.qmp.cmd("query-named-block-nodes")  # type: ignore[assignment]
        nodes = [n for n in reply if n["drv"] == "qcow2"]
        node = next(n for n in nodes if n["file"] == str(qemu_path))
        return [(s["id"], s["name"], s["vm-state-size"]) for s in node["image"].get("snapshots", [])]

    def write_pattern(self, byte: int, device: str = "virtio0") -> None:
        reply = self.hmp(f'qemu-io {device} "write -P 0x{byte:02x} 0 64k"')
        assert "error" not in reply.lower(), reply

    def has_pattern(self, byte: int, device: str = "virtio0") -> bool:
        before = self.log.read_text(errors="replace") if self.log.exists() else ""
        self.hmp(f'qemu-io {device} "read -P 0x{byte:02x} 0 64k"')
        new = ""
        for _ in range(250):
            new = self.log.read_text(errors="replace")[len(before):]
            if "read 65536/65536" in new or "verification failed" in new:
                return "verification failed" not in new
            time.sleep(0.02)
        raise AssertionError(f"qemu-io printed nothing: {new!r}")


@dataclass
class VM:
    """A running QEMU: the monitor under test (ADDRESS, or None) and the side channel."""

    proc: subprocess.Popen[bytes]
    kind: str
    address: str | None
    port: int | None
    drives: list[Path]  # the paths QEMU was given
    side: Side
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def status(self) -> str:
        return self.side.status()

    def snapshots(self, index: int = 0) -> list[tuple[str, str, int]]:
        return self.side.snapshots(self.drives[index])

    def names(self, index: int = 0) -> list[str]:
        return [name for _, name, _ in self.snapshots(index)]

    def write_pattern(self, byte: int) -> None:
        self.side.write_pattern(byte)

    def has_pattern(self, byte: int) -> bool:
        return self.side.has_pattern(byte)

    def hmp(self, line: str) -> str:
        return self.side.hmp(line)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is 108 bytes; tmp_path can be long)."""
    path = Path(tempfile.mkdtemp(prefix="qsr", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_vm(tmp_path: Path, sockdir: Path) -> Iterator[Callable[..., VM]]:
    """``start_vm(kind, drives=[path, ...])`` → VM.

    KIND is the monitor under test: qmp (unix socket), qmp-tcp, hmp-tcp, hmp-telnet, or none
    (only the side channel). DRIVES default to a fresh 64 MiB ``tmp_path/disk.qcow2``; the
    first drive is ``virtio0``.
    """
    qemus = QemuProcesses()

    def start(kind: str, drives: list[Path] | None = None, memory: int = 64) -> VM:
        n = len(qemus)
        if drives is None:
            drives = [new_image(tmp_path / "disk.qcow2")]
        monitor_args: list[str] = []
        address: str | None = None
        port: int | None = None
        if kind == "qmp":
            path = sockdir / f"mon{n}.sock"
            monitor_args = ["-qmp", f"unix:{path},server=on,wait=off"]
            address = f"unix:{path}"
        elif kind in ("qmp-tcp", "hmp-tcp", "hmp-telnet"):
            option, transport = ("-qmp", "tcp") if kind == "qmp-tcp" else ("-monitor", kind.removeprefix("hmp-"))
            port = free_port()
            monitor_args = [option, f"{transport}:127.0.0.1:{port},server=on,wait=off"]
            address = f"{transport}:127.0.0.1:{port}"
        elif kind != "none":
            raise ValueError(kind)
        log = tmp_path / f"qemu{n}.log"
        proc, side = qemus.start(drives, monitor_args, sockdir / f"side{n}.sock", log, memory=memory)
        return VM(proc, kind, address, port, list(drives), Side(side, log))

    try:
        yield start
    finally:
        qemus.stop_all()


# ---------------------------------------------------------------- qsnap processes

def qsnap_argv(*args: Any) -> list[str]:
    return [str(QSNAP), *(str(a) for a in args)]


def run_qsnap(*args: Any, env: dict[str, str] | None = None, timeout: float = 90) -> Run:
    """The installed ``qsnap`` as a subprocess, with the monitor/image variables scrubbed
    from the environment (ENV is applied on top)."""
    result = subprocess.run(qsnap_argv(*args), env=clean_environ(env), capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    return Run(result.returncode, result.stdout, result.stderr)


@pytest.fixture
def spawn_qsnap() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """``spawn_qsnap(*args, env=...)`` → a running qsnap Popen (killed by PID at teardown)."""
    procs: list[subprocess.Popen[str]] = []

    def spawn(*args: Any, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(qsnap_argv(*args), env=clean_environ(env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        procs.append(proc)
        return proc

    try:
        yield spawn
    finally:
        for proc in procs:
            kill_popen(proc)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


# ---------------------------------------------------------------- VMs started by `qsnap vm start`

def _is_qemu_on(pid: int, image: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and any(b"qemu-system" in part for part in cmdline[:1]) and any(
        str(image).encode() in part for part in cmdline)


def recorded_vm(image: Path) -> dict[str, Any] | None:
    record = image.with_name(image.name + ".qsnap-run") / "vm.json"
    try:
        return dict(json.loads(record.read_text()))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def qmp_once(path: str | Path) -> Iterator[Side]:
    """A short QMP session (the qsnap VM's only QMP socket serves one client at a time)."""
    client = QEMUMonitorProtocol(str(path))
    client.connect()
    client.settimeout(60)
    try:
        yield Side(client, Path("/nonexistent"))
    finally:
        client.close()


@pytest.fixture
def qsnap_vm() -> Iterator[Callable[..., dict[str, Any]]]:
    """``qsnap_vm(image)`` runs ``qsnap vm start`` (tiny VM, every port free-picked) and
    returns its JSON. Teardown kills by PID every QEMU seen on those images, including one a
    restore may have restarted since."""
    images: list[Path] = []
    pids: set[int] = set()

    def start(image: Path, *extra: str) -> dict[str, Any]:
        images.append(image)
        rc, out, err = run_qsnap(
            "-i", image, "vm", "start", "--memory", 64, "--smp", 1, "--ssh-port", 0, "--serial-port", 0,
            "--monitor-port", 0, "--disk-interface", "virtio", "--json", *extra)
        record = recorded_vm(image)
        if record is not None:
            pids.add(int(record["pid"]))
        assert rc == 0, err
        data = dict(json.loads(out))
        pids.add(int(data["pid"]))
        return data

    try:
        yield start
    finally:
        for image in images:
            record = recorded_vm(image)
            if record is not None:
                pids.add(int(record["pid"]))
        for pid in pids:
            for image in set(images):
                if _is_qemu_on(pid, image.resolve()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while any(_is_qemu_on(pid, i.resolve()) for i in images) and time.monotonic() < deadline:
                time.sleep(0.02)


# ---------------------------------------------------------------- broken monitors
# (the fake_monitor fixture and FakeMonitor are shared: tests/conftest.py)

class CuttingProxy(LoopbackServer):
    """A TCP proxy in front of a real QEMU monitor that hangs up both sides the moment the
    client sends TRIGGER (the trigger itself is never forwarded): a monitor connection that
    dies in the middle of a mutating command, without QEMU ever running it."""

    def __init__(self, target_port: int, trigger: bytes) -> None:
        self.target_port = target_port
        self.trigger = trigger
        self.cut = threading.Event()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        self._socks.append(upstream)
        self._pump(conn, upstream)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        seen = b""
        while not self._stop.is_set():
            readable, _, _ = select.select([client, upstream], [], [], 0.1)
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self._close(client, upstream)
                    return
                if sock is client:
                    seen = (seen + data)[-4096:]
                    if self.trigger in seen:
                        self.cut.set()
                        self._close(client, upstream)
                        return
                    upstream.sendall(data)
                else:
                    client.sendall(data)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def cutting_proxy() -> Iterator[Callable[[int, bytes], CuttingProxy]]:
    proxies: list[CuttingProxy] = []

    def make(port: int, trigger: bytes) -> CuttingProxy:
        proxies.append(CuttingProxy(port, trigger))
        return proxies[-1]

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()
