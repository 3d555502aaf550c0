"""Fixtures for the operations tests (prune, doctor, history, describe, audit log).

Snapshot dates: qemu-img always stamps a new snapshot with the current time, so
:func:`set_snapshot_dates` rewrites the ``date_sec``/``date_nsec`` fields of the qcow2
snapshot table (docs/interop/qcow2.txt, "Snapshot table entry") in place. qemu-img stays
the oracle: tests read the dates back through ``qemu-img info`` and the image must still
pass ``qemu-img check``.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from qsnap.cli.env import Environment

# Test modules import the helpers below as ``from ops_testlib import ...`` (``import conftest``
# is ambiguous: several directories have one).
sys.modules.setdefault("ops_testlib", sys.modules[__name__])

#: Variables that choose an image or a monitor: never inherited from the developer's shell.
SCRUBBED_ENV = ("QCOW2_IMAGE", "IMAGE_PATH", "MONITOR_PORT", "QSNAP_MONITOR", "QSNAP_LOCK_TIMEOUT", "QSNAP_VM")


def clean_environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(extra)
    return env


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, text=True)


def make_image(path: Path, size: str = "16M") -> Path:
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    os.chmod(path, 0o600)
    return path


def snapshot_table(path: Path) -> list[tuple[int, str, str]]:
    """(entry offset, id, name) for each entry of the qcow2 snapshot table."""
    with open(path, "rb") as handle:
        header = handle.read(72)
        nb_snapshots = struct.unpack(">I", header[60:64])[0]
        offset = struct.unpack(">Q", header[64:72])[0]
        entries = []
        for _ in range(nb_snapshots):
            handle.seek(offset)
            fixed = handle.read(40)
            id_len, name_len = struct.unpack(">HH", fixed[12:16])
            extra = struct.unpack(">I", fixed[36:40])[0]
            handle.seek(offset + 40 + extra)
            sid = handle.read(id_len).decode()
            name = handle.read(name_len).decode()
            entries.append((offset, sid, name))
            size = 40 + extra + id_len + name_len
            offset += (size + 7) & ~7
    return entries


def set_snapshot_dates(path: Path, dates: Mapping[str, datetime]) -> None:
    """Give the snapshots named in DATES (name → aware datetime) those creation dates."""
    table = {name: off for off, _sid, name in snapshot_table(path)}
    with open(path, "r+b") as handle:
        for name, when in dates.items():
            ts = when.timestamp()
            sec = int(ts // 1)
            nsec = round((ts - sec) * 1e9)
            handle.seek(table[name] + 16)
            handle.write(struct.pack(">II", sec, nsec))
        handle.flush()
        os.fsync(handle.fileno())


def create_snapshots(path: Path, names: Sequence[str]) -> None:
    for name in names:
        qemu_img("snapshot", "-c", name, path)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(argv: Sequence[str], environ: Mapping[str, str] | None = None, cwd: Path | None = None,
            *, interactive: bool = False, stdin: str = "") -> CliResult:
    """Run the qsnap CLI in-process, with this module's commands registered even before the
    lead adds them to COMMAND_MODULES."""
    from qsnap.cli import main as cli_main
    from qsnap.cli.commands import ops

    parser = cli_main.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "prune" not in sub.choices:
        ops.register(sub)
    out, err = io.StringIO(), io.StringIO()
    env = Environment(stdin=io.StringIO(stdin), stdout=out, stderr=err, stdin_isatty=interactive,
                      stdout_isatty=interactive, stderr_isatty=interactive,
                      environ=dict(environ if environ is not None else clean_environ()), cwd=cwd or Path.cwd())
    code = cli_main.dispatch(parser, list(argv), env, "qsnap")
    return CliResult(code, out.getvalue(), err.getvalue())


def snapshot_names(path: Path) -> list[str]:
    import json

    data = json.loads(qemu_img("info", "-U", "--output=json", path).stdout)
    return [s["name"] for s in data.get("snapshots", [])]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accel() -> str:
    return "tcg" if Path("/sys/module/kvm_pvm").exists() else "kvm:tcg"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.qcow2")


@pytest.fixture
def qemu_factory() -> Iterator[object]:
    """Start QEMU processes (``-machine none`` plus the given args); each is stopped by PID
    in teardown, on every path."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: Sequence[str]) -> subprocess.Popen[bytes]:
        argv = ["qemu-system-x86_64", "-machine", f"none,accel={accel()}", "-nodefaults",
                "-display", "none", "-serial", "none", *args]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
