"""Helpers shared by bench_prune.py and bench_doctor.py (not a benchmark itself)."""

from __future__ import annotations

import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

#: Runs the qsnap CLI with the ops commands registered even before COMMAND_MODULES lists them.
CLI = """
import argparse, sys
from qsnap.cli import main as m
from qsnap.cli.commands import ops
p = m.build_parser()
sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
if "prune" not in sub.choices:
    ops.register(sub)
from qsnap.cli.env import Environment
sys.exit(m.dispatch(p, sys.argv[1:], Environment(), "qsnap"))
"""


def cache_dir() -> Path:
    path = Path(os.environ.get("QSNAP_BENCH_DIR", Path(tempfile.gettempdir()) / "qsnap-bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def qsnap_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", CLI, *args]


def timed(fn: Callable[[], object], repeat: int = 5) -> float:
    """Median wall time of FN over REPEAT runs, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(argv: list[str], env: Mapping[str, str] | None = None, ok: tuple[int, ...] = (0,)) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, env=dict(env) if env else None)
    if result.returncode not in ok:
        raise SystemExit(f"{argv[:4]}... failed ({result.returncode}): {result.stderr.strip()}")


def set_snapshot_dates(path: Path, dates: Mapping[str, datetime]) -> None:
    """Rewrite date_sec/date_nsec in the qcow2 snapshot table (docs/interop/qcow2.txt)."""
    with open(path, "r+b") as f:
        header = f.read(72)
        count = struct.unpack(">I", header[60:64])[0]
        offset = struct.unpack(">Q", header[64:72])[0]
        for _ in range(count):
            f.seek(offset)
            fixed = f.read(40)
            id_len, name_len = struct.unpack(">HH", fixed[12:16])
            extra = struct.unpack(">I", fixed[36:40])[0]
            f.seek(offset + 40 + extra + id_len)
            name = f.read(name_len).decode()
            if name in dates:
                f.seek(offset + 16)
                f.write(struct.pack(">II", int(dates[name].timestamp()), 0))
            offset += (40 + extra + id_len + name_len + 7) & ~7
