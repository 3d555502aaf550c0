"""Shared fixtures for the whole suite: images made with the real qemu-img, patterns written
and read with the real qemu-io, and three ways to run the CLIs.

- ``make_image(tmp_path, size='64M', snapshots=[...], patterns={...})``: a qcow2 image.
- ``qemu_io(image, cmd)``: run one qemu-io command on an image.
- ``run_qsnap(*args, env=..., cwd=..., input=...)`` / ``run_guide(...)``: the installed
  console scripts as subprocesses; return ``(returncode, stdout, stderr)``.
- ``qsnap_main(argv, ...)`` / ``guide_main(argv, ...)``: the same CLIs in-process with an
  injected :class:`qsnap.cli.env.Environment` (StringIO streams); much faster.
- QEMU without a guest OS (tests/monitor, tests/routing): ``accel()``, ``free_port()``,
  ``new_image(path)``, ``kill_popen(proc)``, ``connect_qmp(path, ...)`` and
  :class:`QemuProcesses` (boots QEMUs with a QMP side channel, kills them by PID).
- ``fake_monitor(behaviour)``: a :class:`FakeMonitor`, a TCP monitor that stays silent,
  hangs or hangs up (a :class:`LoopbackServer`, the base of such test servers).

The plain functions are also importable as ``from qsnap_testlib import ...`` (an alias of
this module registered below: ``import conftest`` is ambiguous once several directories have a
conftest.py). Environment variables that choose an image (QCOW2_IMAGE, IMAGE_PATH, ...) are
removed from every run unless a test passes them, so a developer's shell cannot leak in.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

sys.modules.setdefault("qsnap_testlib", sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
QSNAP = VENV_BIN / "qsnap"
GUIDE = VENV_BIN / "manage-snapshots"

#: Variables that change which image or monitor qsnap uses: never inherited by tests.
SCRUBBED_ENV = ("QCOW2_IMAGE", "IMAGE_PATH", "MONITOR_PORT", "QSNAP_MONITOR", "QSNAP_LOCK_TIMEOUT",
                "QSNAP_VM")


class Run(NamedTuple):
    """What a CLI run did. Unpacks as ``rc, out, err``."""

    rc: int
    out: str
    err: str


# ------------------------------------------------------------------ images and qemu-io

def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real qemu-img."""
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=check,
                          stdin=subprocess.DEVNULL)


def qemu_io(image: Path | str, cmd: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one qemu-io command (``'write -P 0x11 0 1M'``, ``'read -P 0x11 0 1M'``) on IMAGE.

    With ``check`` a failed command (including a pattern mismatch, which qemu-io 7.2 reports
    with exit 1 and 'Pattern verification failed') raises AssertionError.
    """
    result = subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(image)], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL)
    if check and (result.returncode != 0 or "verification failed" in result.stdout + result.stderr):
        raise AssertionError(f"qemu-io -c {cmd!r} {image} failed ({result.returncode}): "
                             f"{result.stdout}{result.stderr}")
    return result


def has_pattern(image: Path | str, pattern: int, offset: str = "0", length: str = "1M") -> bool:
    """True when IMAGE's current state holds byte PATTERN over [offset, offset+length)."""
    result = qemu_io(image, f"read -P {pattern:#04x} {offset} {length}", check=False)
    return result.returncode == 0 and "verification failed" not in result.stdout + result.stderr


def make_image(
    tmp_path: Path,
    size: str = "64M",
    snapshots: Sequence[str] = (),
    patterns: Mapping[str | None, int] | None = None,
    name: str = "disk.qcow2",
) -> Path:
    """A fresh qcow2 image at ``tmp_path/name``.

    ``snapshots`` are taken in order with plain ``qemu-img snapshot -c`` (so duplicates and
    numeric names are possible, as other tools make them). ``patterns`` maps a snapshot name
    to the byte written over the first MiB just before that snapshot is taken; the key
    ``None`` is written last, into the current state.
    """
    patterns = dict(patterns or {})
    path = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", str(path), size)
    for snap in snapshots:
        if snap in patterns:
            qemu_io(path, f"write -P {patterns[snap]:#04x} 0 1M")
        qemu_img("snapshot", "-c", snap, str(path))
    if None in patterns:
        qemu_io(path, f"write -P {patterns[None]:#04x} 0 1M")
    return path


def snapshot_table(image: Path | str) -> list[tuple[str, str]]:
    """(id, name) of every snapshot, from qemu-img itself (the oracle), in table order."""
    out = qemu_img("info", "-U", "-f", "qcow2", "--output=json", str(image)).stdout
    return [(str(s["id"]), str(s["name"])) for s in json.loads(out).get("snapshots", [])]


def snapshot_names(image: Path | str) -> list[str]:
    return [name for _, name in snapshot_table(image)]


def fingerprint(path: Path | str) -> tuple[str, int, int]:
    """sha256, size and mtime (ns) of a file: equal fingerprints mean nothing touched it."""
    st = os.stat(path)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digest, st.st_size, st.st_mtime_ns


# ------------------------------------------------------------------ QEMU VMs (no guest OS)

QEMU = "qemu-system-x86_64"


def accel() -> str:
    """The -machine accel= value: KVM where it works (falling back to TCG), TCG under kvm_pvm."""
    return "tcg" if Path("/sys/module/kvm_pvm").exists() else "kvm:tcg"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (picked at run time, never hard-coded)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_image(path: Path, size: str = "64M") -> Path:
    """An empty qcow2 image at exactly PATH (parent directories made as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", str(path), size)
    return path


def kill_popen(proc: subprocess.Popen[Any]) -> None:
    """Stop PROC by PID (Popen.kill is SIGKILL to proc.pid) and reap it."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def connect_qmp(path: Path | str, proc_alive: Callable[[], bool], timeout: float = 20,
                reply_timeout: float = 60) -> QEMUMonitorProtocol:
    """A qemu.qmp client on the QMP unix socket PATH. The path appears at bind(), a moment
    before listen(): retry until connected, PROC_ALIVE() turns false, or TIMEOUT passes."""
    deadline = time.monotonic() + timeout
    while True:
        qmp = QEMUMonitorProtocol(str(path))
        try:
            qmp.connect()
            qmp.settimeout(reply_timeout)
            return qmp
        except Exception:
            qmp.close()
            if not proc_alive() or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class QemuProcesses:
    """The QEMUs one fixture starts, each with a private QMP side channel (the tests' witness,
    never qsnap code). :meth:`stop_all` (the fixture's teardown) closes the side channels and
    kills every QEMU by PID, including one whose side channel never came up."""

    def __init__(self) -> None:
        self.started: list[tuple[subprocess.Popen[bytes], QEMUMonitorProtocol | None]] = []

    def __len__(self) -> int:
        return len(self.started)

    def start(self, drives: Iterable[Path], monitor_args: Sequence[str], side_path: Path, log: Path, *,
              memory: int = 64, side_timeout: float = 60) -> tuple[subprocess.Popen[bytes], QEMUMonitorProtocol]:
        """Boot ``-machine pc -nodefaults -display none`` with DRIVES as virtio disks, the side
        channel on SIDE_PATH and MONITOR_ARGS (the monitor under test); stdout/stderr to LOG."""
        argv = [QEMU, "-machine", f"pc,accel={accel()}", "-m", str(memory), "-nodefaults", "-display", "none"]
        for drive in drives:
            argv += ["-drive", f"file={drive},if=virtio,format=qcow2"]
        argv += ["-qmp", f"unix:{side_path},server=on,wait=off", *monitor_args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started.append((proc, None))
        deadline = time.monotonic() + 20
        while not side_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"QEMU did not start: {log.read_text(errors='replace')}")
            time.sleep(0.02)
        side = connect_qmp(side_path, lambda: proc.poll() is None, reply_timeout=side_timeout)
        self.started[-1] = (proc, side)
        return proc, side

    def stop_all(self) -> None:
        for proc, side in self.started:
            if side is not None:
                with contextlib.suppress(Exception):
                    side.close()
            kill_popen(proc)


# ------------------------------------------------------------------ fake (broken) monitors

class LoopbackServer:
    """A TCP server on 127.0.0.1 at a port the kernel picks free at run time. A daemon thread
    accepts until :meth:`close` and hands each connection to :meth:`handle` (on that thread:
    a handler that blocks serves one connection at a time). Subclasses set their own
    attributes before calling ``super().__init__()``, which starts the thread; sockets put in
    ``_socks`` and threads in ``_threads`` are closed and joined by :meth:`close`."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.port = int(self.server.getsockname()[1])
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.server.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            self._socks.append(conn)
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        for thread in [self.thread, *self._threads]:
            thread.join(timeout=5)
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()
        self.server.close()


class FakeMonitor(LoopbackServer):
    """A TCP server standing in for a QEMU monitor that misbehaves (what a real QEMU cannot be
    made to do reliably: hang on purpose, or hang up mid-command).

    BEHAVIOUR, for every connection (each served on its own thread, so a client may open
    several): 'silent' (accept, never send a byte), 'hmp-hang' (greet like HMP, read commands,
    never answer), 'hmp-hangup' (greet, close on the first command line), 'qmp-hang' (greet
    like QMP, never answer the negotiation), 'qmp-hangup' (greet, negotiate, close on the next
    command). Every byte a client sends is appended to :attr:`received` as it arrives.
    """

    BEHAVIOURS = ("silent", "hmp-hang", "hmp-hangup", "qmp-hang", "qmp-hangup")
    HMP_GREETING = b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) "
    QMP_GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
                    b'"package": ""}, "capabilities": ["oob"]}}\r\n')

    def __init__(self, behaviour: str) -> None:
        if behaviour not in self.BEHAVIOURS:
            raise ValueError(f"unknown FakeMonitor behaviour {behaviour!r}")
        self.behaviour = behaviour
        self.received = b""
        self._lock = threading.Lock()
        super().__init__()

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        handler = threading.Thread(target=self._behave, args=(conn,), daemon=True)
        self._threads.append(handler)
        handler.start()

    def _recv(self, conn: socket.socket) -> bytes | None:
        """One chunk (recorded in :attr:`received`); b'' at EOF, None when nothing came yet."""
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            return None
        except OSError:
            return b""
        with self._lock:
            self.received += chunk
        return chunk

    def _recv_line(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\n" not in data and not self._stop.is_set():
            chunk = self._recv(conn)
            if chunk == b"":
                break
            data += chunk or b""
        return data

    def _recv_json(self, conn: socket.socket) -> dict[str, Any]:
        data = b""
        while not self._stop.is_set():
            chunk = self._recv(conn)
            if chunk is None:
                continue
            data += chunk
            try:
                return dict(json.loads(data))
            except ValueError:
                if not chunk:
                    break
        return {}

    def _behave(self, conn: socket.socket) -> None:
        b = self.behaviour
        with contextlib.suppress(OSError):
            if b.startswith("hmp"):
                conn.sendall(self.HMP_GREETING)
            elif b.startswith("qmp"):
                conn.sendall(self.QMP_GREETING)
            if b == "qmp-hangup":
                request = self._recv_json(conn)  # qmp_capabilities
                reply = {"return": {}, **({"id": request["id"]} if "id" in request else {})}
                conn.sendall(json.dumps(reply).encode() + b"\r\n")
            if b.endswith("hangup"):
                self._recv_json(conn) if b.startswith("qmp") else self._recv_line(conn)
                conn.close()
                return
            while not self._stop.is_set():  # hang: read and never answer
                if self._recv(conn) == b"":
                    time.sleep(0.05)


# ------------------------------------------------------------------ running the CLIs

def clean_environ(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without the image/monitor variables, then ENV on top."""
    base = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    base.update(env or {})
    return base


def _run_script(script: Path, args: Iterable[Any], env: Mapping[str, str] | None, cwd: Path | str | None,
                input: str | None, timeout: float) -> Run:
    result = subprocess.run(
        [str(script), *(str(a) for a in args)],
        env=clean_environ(env), cwd=cwd, input=input, capture_output=True, text=True, timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    return Run(result.returncode, result.stdout, result.stderr)


def run_qsnap(*args: Any, env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
              input: str | None = None, timeout: float = 120) -> Run:
    """The installed ``qsnap`` console script as a subprocess (stdin /dev/null unless INPUT)."""
    return _run_script(QSNAP, args, env, cwd, input, timeout)


def run_guide(*args: Any, env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
              input: str | None = None, timeout: float = 120) -> Run:
    """The installed ``manage-snapshots`` console script as a subprocess."""
    return _run_script(GUIDE, args, env, cwd, input, timeout)


def _in_process(main: Callable[..., int], argv: Sequence[Any], env: Any, environ: Mapping[str, str] | None,
                cwd: Path | str | None, stdin: str | io.StringIO, tty: bool) -> Run:
    from qsnap.cli.env import Environment

    if env is None:
        stdin_stream = stdin if isinstance(stdin, io.StringIO) else io.StringIO(stdin)
        env = Environment(
            stdin=stdin_stream, stdout=io.StringIO(), stderr=io.StringIO(),
            stdin_isatty=tty, stdout_isatty=tty, stderr_isatty=tty,
            environ=clean_environ(environ), cwd=Path(cwd) if cwd is not None else Path.cwd(),
        )
    logger = logging.getLogger("qsnap")
    saved = (logger.handlers[:], logger.level)
    try:
        rc = main([str(a) for a in argv], env)
    finally:
        # --debug attaches a handler to the 'qsnap' logger: do not let it outlive this run.
        logger.handlers[:], _ = saved
        logger.setLevel(saved[1])
    return Run(rc, env.stdout.getvalue(), env.stderr.getvalue())


def qsnap_main(argv: Sequence[Any], env: Any = None, *, environ: Mapping[str, str] | None = None,
               cwd: Path | str | None = None, stdin: str | io.StringIO = "", tty: bool = False) -> Run:
    """``qsnap.cli.main.main(argv, env)`` in-process.

    Pass a ready :class:`Environment` (with StringIO stdout/stderr) as ENV, or let one be
    built: ENVIRON over a clean os.environ, CWD, STDIN text, and TTY for all three isatty flags.
    """
    from qsnap.cli.main import main

    return _in_process(main, argv, env, environ, cwd, stdin, tty)


def guide_main(argv: Sequence[Any], env: Any = None, *, environ: Mapping[str, str] | None = None,
               cwd: Path | str | None = None, stdin: str | io.StringIO = "", tty: bool = False) -> Run:
    """``qsnap.cli.guide.main(argv, env)`` (manage-snapshots) in-process."""
    from qsnap.cli.guide import main

    return _in_process(main, argv, env, environ, cwd, stdin, tty)


def has_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" in text


def one_error_line(err: str, prog: str = "qsnap") -> str:
    """Assert ERR is exactly one 'PROG: error: ...' line with no traceback; return it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert not has_traceback(err), err
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------ fixtures (the helpers above)

def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist (the test command's default `-n auto`), the docker tests run on one
    worker: they share one dockerd and the guide's image. Every other test is its own scope, so
    they spread over the workers as with `--dist load`. (An xdist_group marker does not do this
    with pytest 9: xdist's nodeid rewrite no longer reaches the scheduler.)"""
    from xdist.scheduler import LoadScopeScheduling

    class DockerTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "docker" if nodeid.startswith("tests/docker/") else nodeid

    return DockerTogether(config, log)


@pytest.fixture(name="make_image", scope="session")
def _make_image_fixture() -> Callable[..., Path]:
    return make_image


@pytest.fixture(name="qemu_io", scope="session")
def _qemu_io_fixture() -> Callable[..., subprocess.CompletedProcess[str]]:
    return qemu_io


@pytest.fixture(name="run_qsnap", scope="session")
def _run_qsnap_fixture() -> Callable[..., Run]:
    return run_qsnap


@pytest.fixture(name="run_guide", scope="session")
def _run_guide_fixture() -> Callable[..., Run]:
    return run_guide


@pytest.fixture(name="qsnap_main", scope="session")
def _qsnap_main_fixture() -> Callable[..., Run]:
    return qsnap_main


@pytest.fixture(name="guide_main", scope="session")
def _guide_main_fixture() -> Callable[..., Run]:
    return guide_main


@pytest.fixture
def fake_monitor() -> Iterator[Callable[[str], FakeMonitor]]:
    """``fake_monitor(behaviour)`` → a running :class:`FakeMonitor`, closed at teardown."""
    fakes: list[FakeMonitor] = []

    def make(behaviour: str) -> FakeMonitor:
        fakes.append(FakeMonitor(behaviour))
        return fakes[-1]

    try:
        yield make
    finally:
        for fake in fakes:
            fake.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 64 MiB image: 0x11 in snapshot A, current state 0x22."""
    return make_image(tmp_path, snapshots=["A"], patterns={"A": 0x11, None: 0x22})


# The real-guest fixtures (tests/guest/fixtures.py), available to every test folder.
from guest.fixtures import guest_booted_image, guest_build, guest_factory, running_guest  # noqa: E402, F401
