"""Bench: diff of two snapshots vs export-both-then-`qemu-img compare` (one run, no asserts).

    .venv/bin/python bench/bench_diff.py [--virtual-gib 20] [--alloc-mib 4096] [--changed-mib 4]
"""

from __future__ import annotations

import argparse
import functools
import operator
import subprocess
import tempfile
import time
from pathlib import Path

from qsnap.qcow2 import open_image
from qsnap.service.diff import diff


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--virtual-gib", type=int, default=20)
    p.add_argument("--alloc-mib", type=int, default=4096)
    p.add_argument("--changed-mib", type=int, default=4)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        img = Path(tmp) / "diff.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), f"{a.virtual_gib}G"], check=True)
        stride = a.virtual_gib * 1024 // a.alloc_mib
        cmds = [f"write -P 0x5a {i * stride}M 1M" for i in range(a.alloc_mib)]
        for k in range(0, len(cmds), 256):
            flags = functools.reduce(operator.iadd, (["-c", c] for c in cmds[k:k + 256]), [])
            argv = ["qemu-io", "-f", "qcow2", *flags, str(img)]
            subprocess.run(argv, check=True, capture_output=True)
        subprocess.run(["qemu-img", "snapshot", "-c", "a", str(img)], check=True)
        changes = [f"write -P 0x77 {(i * 977) % (a.virtual_gib * 1024)}M 1M" for i in range(a.changed_mib)]
        flags = functools.reduce(operator.iadd, (["-c", c] for c in changes), [])
        subprocess.run(["qemu-io", "-f", "qcow2", *flags, str(img)], check=True, capture_output=True)
        subprocess.run(["qemu-img", "snapshot", "-c", "b", str(img)], check=True)
        snap_a, snap_b = open_image(img).snapshots()
        t = time.perf_counter()
        report = diff(img, snap_a, snap_b)
        ours = time.perf_counter() - t
        t = time.perf_counter()
        for name in ("a", "b"):
            subprocess.run(["qemu-img", "convert", "-U", "-l", f"snapshot.name={name}", "-O", "raw", str(img),
                            str(Path(tmp) / f"{name}.raw")], check=True)
        subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(Path(tmp) / "a.raw"),
                        str(Path(tmp) / "b.raw")], capture_output=True)
        theirs = time.perf_counter() - t
        print(f"{a.virtual_gib} GiB virtual, {a.alloc_mib} MiB allocated, {a.changed_mib} MiB changed: "
              f"{report.summary}")
        print(f"qsnap diff {ours:.3f} s | export both + qemu-img compare {theirs:.2f} s"
              f" | speed-up {theirs / ours:.0f}x")


if __name__ == "__main__":
    main()
