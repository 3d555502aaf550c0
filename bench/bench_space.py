"""Bench: space accounting for many snapshots, time and peak memory (one run, no asserts).

    .venv/bin/python bench/bench_space.py [--virtual-gib 20] [--alloc-mib 4096] [--snapshots 200]
Sparse writes of 1 MiB every (virtual/alloc) MiB, then per snapshot a few 64 KiB writes.
"""

from __future__ import annotations

import argparse
import functools
import operator
import resource
import subprocess
import tempfile
import time
import tracemalloc
from pathlib import Path

from qsnap.service.space import account


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--virtual-gib", type=int, default=20)
    p.add_argument("--alloc-mib", type=int, default=4096)
    p.add_argument("--snapshots", type=int, default=200)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        img = Path(tmp) / "space.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), f"{a.virtual_gib}G"], check=True)
        stride = a.virtual_gib * 1024 // a.alloc_mib
        cmds = [f"write -P 0x5a {i * stride}M 1M" for i in range(a.alloc_mib)]
        for k in range(0, len(cmds), 256):
            flags = functools.reduce(operator.iadd, (["-c", c] for c in cmds[k:k + 256]), [])
            argv = ["qemu-io", "-f", "qcow2", *flags, str(img)]
            subprocess.run(argv, check=True, capture_output=True)
        for s in range(a.snapshots):
            subprocess.run(["qemu-img", "snapshot", "-c", f"s{s}", str(img)], check=True)
            off = (s * 7919) % (a.virtual_gib * 1024)
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {s % 250} {off}M 192k", str(img)],
                           check=True, capture_output=True)
        t = time.perf_counter()
        account(img)
        elapsed = time.perf_counter() - t  # timed without tracemalloc, which slows allocation-heavy code ~2x
        tracemalloc.start()
        t = time.perf_counter()
        report = account(img)
        traced = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"{a.snapshots} snapshots, {a.virtual_gib} GiB virtual, {a.alloc_mib} MiB allocated, "
              f"file {report.file_size / 2**30:.2f} GiB")
        print(f"space accounting: {elapsed:.2f} s ({traced:.2f} s under tracemalloc), "
              f"python peak {peak / 2**20:.0f} MiB, max RSS {rss / 2**20:.0f} MiB")
        print(f"largest exclusive: {max(s.exclusive_bytes for s in report.snapshots) / 2**10:.0f} KiB, "
              f"leaked clusters {report.leaked_clusters}")


if __name__ == "__main__":
    main()
