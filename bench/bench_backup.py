"""Backup benchmark: qsnap's formats against the guide's pipeline (qemu-img convert, then gzip -6).

Scaled down from the issue's 20 GiB image / 4 GiB of data to SIZE (default 4 GiB virtual,
DATA default 1 GiB of mixed data: 1/4 random, 1/4 text, 1/4 binaries, 1/4 zeros written
explicitly). Prints times, sizes and ratios from one run; peak memory is the max RSS of this
process (qsnap runs in-process). Usage: .venv/bin/python bench/bench_backup.py [DATA_MIB]
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qsnap.backup import export_snapshot, verify_backup
from qsnap.engines import qemu_img


def sh(*argv: str, **kw: object) -> None:
    subprocess.run(argv, check=True, **kw)  # type: ignore[call-overload]


def make_image(path: Path, data_mib: int) -> None:
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{max(4096, data_mib * 4)}M")
    quarter = data_mib // 4
    blob = path.with_suffix(".fill")
    rnd = random.Random(1)
    words = ["".join(rnd.choices("abcdefghijklmnopqrstuvwxyz", k=rnd.randint(2, 10))).encode() for _ in range(5000)]
    progs = ("/usr/bin/qemu-img", "/usr/bin/python3", "/bin/bash")
    binaries = [Path(p).read_bytes() for p in progs if Path(p).exists()]
    with open(blob, "wb") as out:
        out.write(os.urandom(quarter << 20))
        text = bytearray()
        while len(text) < quarter << 20:
            text += b" ".join(rnd.choices(words, k=200)) + b"\n"
        out.write(text[: quarter << 20])
        binary = bytearray()
        while len(binary) < quarter << 20:
            binary += rnd.choice(binaries)
        out.write(binary[: quarter << 20])
        out.write(bytes(quarter << 20))
    sh("qemu-io", "-f", "qcow2", "-c", f"write -s {blob} 0 {data_mib}M", str(path), stdout=subprocess.DEVNULL)
    blob.unlink()
    sh("qemu-img", "snapshot", "-c", "bench", str(path))


def timed(fn):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def main() -> None:
    data_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    work = Path(tempfile.mkdtemp(prefix="qsnap-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    try:
        image = work / "disk.qcow2"
        make_image(image, data_mib)
        snap = qemu_img.list_snapshots(image)[0]
        print(f"image: {data_mib} MiB of mixed data (scaled down from 4 GiB), cores={os.cpu_count()}")
        # baseline: the guide's pipeline
        t_conv, _ = timed(lambda: sh("qemu-img", "convert", "-U", "-l", f"snapshot.id={snap.id}", "-O", "qcow2",
                                     str(image), str(work / "guide.qcow2")))
        t_gzip, _ = timed(lambda: sh("gzip", "-6", "-k", str(work / "guide.qcow2")))
        guide_size = (work / "guide.qcow2.gz").stat().st_size
        base = t_conv + t_gzip
        print(f"guide: convert {t_conv:.2f}s + gzip -6 {t_gzip:.2f}s = {base:.2f}s, {guide_size >> 20} MiB")
        payload = data_mib << 20
        for name in ("b.qcow2.gz", "b.qcow2.zst", "b.qcow2"):
            t, r = timed(lambda name=name: export_snapshot(image, snap, work / name))
            note = ""
            if name == "b.qcow2":
                note = f", {t_conv / t:.2f}x of qemu-img convert throughput"
            print(f"{name:12s} {t:7.2f}s  speed-up vs guide {base / t:5.1f}x  size {r.size >> 20} MiB "
                  f"({r.size / guide_size:.3f} of guide's){note}")
            tv, _ = timed(lambda name=name: verify_backup(work / name))
            print(f"   verify    {tv:7.2f}s  {payload / tv / 2**20:7.0f} MiB/s of data")
        # incremental after 1% change
        full_t, full = timed(lambda: export_snapshot(image, snap, work / "full.qcow2"))
        sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {max(1, data_mib // 100)}M", str(image),
           stdout=subprocess.DEVNULL)
        sh("qemu-img", "snapshot", "-c", "bench2", str(image))
        snap2 = next(s for s in qemu_img.list_snapshots(image) if s.name == "bench2")
        inc_t, inc = timed(lambda: export_snapshot(image, snap2, work / "inc.qcow2", incremental=True))
        print(f"incremental (1% changed): {inc_t:.2f}s = {inc_t / full_t:.1%} of full time, "
              f"{inc.size / full.size:.1%} of full size")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak memory (max RSS of this process): {peak:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
