"""`qsnap list` startup against `qemu-img snapshot -l` (issue 2 and 4 goals).

Prints medians of several runs and the ratio qsnap/qemu-img, for images with 10 and 200
snapshots. Goals: qsnap list <= 60 ms (core) / <= 30 ms (reader) at 10 snapshots; ratio <= 2.0
(core) / <= 1.0 (reader) at 200. Also checks that `qsnap --version` imports no heavy module.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
RUNS = 15


def median_ms(argv: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def make_image(path: Path, count: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 4M", str(path)], check=True, stdout=subprocess.DEVNULL)
    for i in range(count):
        subprocess.run(["qemu-img", "snapshot", "-c", f"snap-{i:04d}", str(path)], check=True)


def heavy_imports_on_version() -> list[str]:
    code = (
        "import sys; from qsnap.cli.main import main; main(['--version']);"
        "print(','.join(m for m in ('rich','qemu.qmp','zstandard','pyrage','gzip','qsnap.backup')"
        " if m in sys.modules), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in done.stderr.strip().split(",") if m]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'snapshots':>9}  {'qemu-img -l':>12}  {'qsnap list':>11}  {'ratio':>6}  {'json':>9}")
        for count in (10, 200):
            image = Path(tmp) / f"s{count}.qcow2"
            make_image(image, count)
            base = median_ms(["qemu-img", "snapshot", "-l", str(image)])
            ours = median_ms([str(BIN / "qsnap"), "-i", str(image), "list"])
            js = median_ms([str(BIN / "qsnap"), "-i", str(image), "list", "--json"])
            print(f"{count:>9}  {base:>10.1f}ms  {ours:>9.1f}ms  {ours / base:>6.2f}  {js:>7.1f}ms")
        python = median_ms([sys.executable, "-c", "pass"])
        print(f"interpreter start alone: {python:.1f} ms")
        heavy = heavy_imports_on_version()
        print(f"heavy modules imported by --version: {heavy or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
