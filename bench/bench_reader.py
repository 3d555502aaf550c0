"""Bench: listing vs `qemu-img snapshot -l`, and sequential read throughput (ratios, one run).

    .venv/bin/python bench/bench_reader.py [--alloc-mib 512]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qsnap.qcow2 import open_image


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def best(fn, repeat: int = 5) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alloc-mib", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for count in (10, 200):
            img = Path(tmp) / f"list{count}.qcow2"
            sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1G")
            for i in range(count):
                sh("qemu-img", "snapshot", "-c", f"snap-{i}", str(img))
            qemu = best(lambda: sh("qemu-img", "snapshot", "-U", "-l", str(img)))  # noqa: B023
            lib = best(lambda: open_image(img).snapshots())  # noqa: B023
            code = f"import qsnap.qcow2 as q; q.open_image({str(img)!r}).snapshots()"
            proc = best(lambda: sh(sys.executable, "-c", code))  # noqa: B023
            print(
                f"list {count:3d} snapshots: qemu-img {qemu * 1000:6.1f} ms | library {lib * 1000:6.2f} ms "
                f"| python -c process {proc * 1000:6.1f} ms | process/qemu-img ratio {proc / qemu:.2f}"
            )
        img = Path(tmp) / "read.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), f"{args.alloc_mib * 2}M")
        sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {args.alloc_mib}M", str(img))
        sh("qemu-img", "snapshot", "-c", "s", str(img))
        with open_image(img) as image:
            snap = image.snapshots()[0]
            size = args.alloc_mib << 20
            image.read(0, 64 << 20, snap)  # warm the page cache
            chunk = 64 << 20
            buf = bytearray(chunk)

            def read_all() -> None:
                for off in range(0, size, chunk):
                    image.readinto(off, buf, snap)

            read_all()
            t = best(read_all, 3)
            print(f"sequential read of {args.alloc_mib} MiB allocated data: {size / t / 2**30:.2f} GiB/s (page cache)")


if __name__ == "__main__":
    main()
