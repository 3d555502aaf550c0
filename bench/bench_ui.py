"""Completion latency and `qsnap ui` start-up (issue 15).

Prints, for images with 10 and 200 snapshots, the median wall time of one <Tab> (the callback
`qsnap __complete`, warm spec cache, as the shells run it) against two baselines measured in the
same run: the bare interpreter start and `qsnap list` (its fast path), run alternately. Goal: < 100 ms at 200
snapshots. Then `qsnap ui`'s time to first paint with 200 snapshots (process start to the tree
drawn, headless at 80x24) and to the space bars, and the peak memory (max RSS) of each.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
RUNS = 15

FIRST_PAINT = r"""
import time, sys
t0 = time.perf_counter()
import asyncio, resource
from pathlib import Path
from qsnap.cli.ui.app import SnapshotApp

async def main():
    app = SnapshotApp(Path(sys.argv[1]))
    async with app.run_test(size=(80, 24)) as pilot:
        while not app.loaded:
            await pilot.pause()
        await pilot.pause()  # one more refresh: the tree is on the screen
        painted = time.perf_counter() - t0
        while not app.space:
            await pilot.pause(0.01)
        await pilot.pause()
        spaced = time.perf_counter() - t0
        await app.workers.wait_for_complete()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{painted * 1000:.0f} {spaced * 1000:.0f} {rss}")

asyncio.run(main())
"""


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(median ms, max RSS KiB of the runs)."""
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def paired(first: list[str], second: list[str], env: dict[str, str]) -> tuple[float, float, float, float]:
    """Median wall ms of FIRST and SECOND run alternately (a busy machine slows both alike), then
    their median CPU ms (user + system: what the run costs, whatever else the machine does)."""
    walls: tuple[list[float], list[float]] = ([], [])
    cpus: tuple[list[float], list[float]] = ([], [])
    for _ in range(RUNS):
        for argv, wall, cpu in ((first, walls[0], cpus[0]), (second, walls[1], cpus[1])):
            start, start_cpu = time.perf_counter(), cpu_ms()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
            wall.append((time.perf_counter() - start) * 1000)
            cpu.append(cpu_ms() - start_cpu)
    return (statistics.median(walls[0]), statistics.median(walls[1]), statistics.median(cpus[0]),
            statistics.median(cpus[1]))


def make_image(path: Path, count: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 4M", str(path)], check=True, stdout=subprocess.DEVNULL)
    for i in range(count):
        if i % 20 == 0:
            subprocess.run(["qemu-io", "-c", f"write -P {i % 250} {i * 64}k 64k", str(path)], check=True,
                           stdout=subprocess.DEVNULL)
        subprocess.run(["qemu-img", "snapshot", "-c", f"snap-{i:04d}.v1", str(path)], check=True)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": str(Path(tmp) / "cache")}
        qsnap = str(BIN / "qsnap")
        python, _ = timed([sys.executable, "-c", "pass"], env)
        print(f"interpreter start alone: {python:.1f} ms")
        print(f"{'snapshots':>9}  {'qsnap list':>10}  {'<Tab> name':>10}  {'ratio':>6}  {'<Tab> cmd':>9}  "
              f"{'vs python':>9}  {'CPU: list':>9}  {'<Tab>':>7}")
        image200 = Path(tmp) / "s200.qcow2"
        for count in (10, 200):
            image = Path(tmp) / f"s{count}.qcow2"
            make_image(image, count)
            subprocess.run([qsnap, "__complete", "bash", "qsnap", "--", "qsnap res"], check=True, env=env,
                           stdout=subprocess.DEVNULL)  # fill the spec cache
            listed, names, listed_cpu, names_cpu = paired([qsnap, "-i", str(image), "list"],
                                   [qsnap, "__complete", "bash", "qsnap", "--", f"qsnap -i {image} restore snap-01"],
                                   env)
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            commands, _ = timed([qsnap, "__complete", "bash", "qsnap", "--", "qsnap res"], env)
            print(f"{count:>9}  {listed:>8.1f}ms  {names:>8.1f}ms  {names / listed:>6.2f}  {commands:>7.1f}ms  "
                  f"{names / python:>9.2f}  {listed_cpu:>7.1f}ms  {names_cpu:>5.1f}ms")
        print(f"completion peak memory (max RSS of the runs): {rss / 1024:.1f} MiB")
        cold = []
        for _ in range(3):
            (Path(tmp) / "cache" / "qsnap" / "completion-spec.marshal").unlink(missing_ok=True)
            start = time.perf_counter()
            subprocess.run([qsnap, "__complete", "bash", "qsnap", "--", "qsnap res"], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            cold.append((time.perf_counter() - start) * 1000)
        print(f"first <Tab> after an upgrade (spec rebuilt from argparse): {statistics.median(cold):.1f} ms")
        runs = []
        for _ in range(3):
            out = subprocess.run([sys.executable, "-c", FIRST_PAINT, str(image200)], check=True, env=env,
                                 capture_output=True, text=True).stdout.split()
            runs.append(tuple(int(x) for x in out))
        painted = statistics.median(r[0] for r in runs)
        spaced = statistics.median(r[1] for r in runs)
        ui_rss = max(r[2] for r in runs)
        print(f"qsnap ui, 200 snapshots: first paint {painted:.0f} ms, space bars {spaced:.0f} ms, "
              f"peak memory {ui_rss / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
