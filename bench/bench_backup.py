"""Backup benchmark: qsnap's formats against the guide's pipeline (qemu-img convert, then gzip -6).

Scaled down from the issue's 20 GiB image / 4 GiB of data: DATA MiB (default 1024) of mixed
data (1/4 random, 1/4 text, 1/4 binaries, 1/4 zeros written explicitly) in a virtual disk of
max(4 GiB, 4 x DATA). Every qsnap run is a separate `qsnap backup` / `qsnap verify` process
(what a user runs, start-up included); its peak memory is that process's max RSS (os.wait4),
not this script's. Prints times, sizes and each ratio next to the issue's goal, from one run.

Usage: .venv/bin/python bench/bench_backup.py [DATA_MIB]     (BENCH_DIR picks the work directory)
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

QSNAP = str(Path(sys.executable).parent / "qsnap")
CHUNK = 4 << 20
PIECE = 1 << 30


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def _text_chunks(total: int, rnd: random.Random) -> Iterator[bytes]:
    words = ["".join(rnd.choices("abcdefghijklmnopqrstuvwxyz", k=rnd.randint(2, 10))).encode()
             for _ in range(5000)]
    while total > 0:
        lines = []
        size = 0
        while size < min(CHUNK, total):
            line = b" ".join(rnd.choices(words, k=200)) + b"\n"
            lines.append(line)
            size += len(line)
        block = b"".join(lines)[: min(CHUNK, total)]
        total -= len(block)
        yield block


def _binary_chunks(total: int, rnd: random.Random) -> Iterator[bytes]:
    progs = [Path(p) for p in ("/usr/bin/qemu-img", "/usr/bin/python3", "/bin/bash") if Path(p).exists()]
    while total > 0:
        with open(rnd.choice(progs), "rb") as handle:
            while total > 0 and (block := handle.read(min(CHUNK, total))):
                total -= len(block)
                yield block


def make_image(path: Path, data_mib: int) -> None:
    """The mixed-data snapshot, written through a fill file in 4 MiB pieces (no big buffers)."""
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{max(4096, data_mib * 4)}M")
    quarter = (data_mib // 4) << 20
    blob = path.with_suffix(".fill")
    rnd = random.Random(1)
    zeros = bytes(CHUNK)
    blocks = itertools.chain((os.urandom(CHUNK) for _ in range(quarter // CHUNK)), _text_chunks(quarter, rnd),
                             _binary_chunks(quarter, rnd), (zeros for _ in range(quarter // CHUNK)))
    offset = 0
    while offset < 4 * quarter:  # qemu-io writes at most 2 GiB - 512 bytes at once: 1 GiB pieces
        with open(blob, "wb") as out:
            while out.tell() < PIECE and (block := next(blocks, b"")):
                out.write(block)
            length = out.tell()
        if not length:
            break
        sh("qemu-io", "-f", "qcow2", "-c", f"write -s {blob} {offset} {length}", str(path))
        offset += length
    blob.unlink()
    sh("qemu-img", "snapshot", "-c", "bench", str(path))


def run_qsnap(*args: str) -> tuple[float, float]:
    """Run qsnap ARGS as its own process: (wall seconds, peak RSS in MiB of it and its children)."""
    os.sync()  # as timed(): no dirty pages of an earlier step slow this one down
    started = time.perf_counter()
    child = subprocess.Popen([QSNAP, *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"qsnap {' '.join(args)} failed with exit code {child.returncode}")
    return elapsed, usage.ru_maxrss / 1024


def timed(fn):  # type: ignore[no-untyped-def]
    os.sync()  # start every timed step with no dirty pages left by the previous one
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def main() -> None:
    data_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    work = Path(tempfile.mkdtemp(prefix="qsnap-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    peaks: list[float] = []
    try:
        image = work / "disk.qcow2"
        make_image(image, data_mib)
        print(f"image: {data_mib} MiB of mixed data (the issue's 4 GiB scaled down), cores={os.cpu_count()}, "
              f"load {os.getloadavg()[0]:.1f}")
        guide = work / "guide.qcow2"
        t_conv = timed(lambda: sh("qemu-img", "convert", "-U", "-l", "snapshot.id=1", "-O", "qcow2",
                                  str(image), str(guide)))
        t_gzip = timed(lambda: sh("gzip", "-6", "-k", str(guide)))
        guide_size = (work / "guide.qcow2.gz").stat().st_size
        base = t_conv + t_gzip

        def hash_and_sync() -> None:
            digest = hashlib.sha256()
            with open(guide, "rb") as handle:
                while block := handle.read(CHUNK):
                    digest.update(block)
                os.fsync(handle.fileno())

        t_hash = timed(hash_and_sync)
        (work / "guide.qcow2").unlink()
        t_conv_sync = timed(lambda: (sh("qemu-img", "convert", "-U", "-l", "snapshot.id=1", "-O", "qcow2",
                                        str(image), str(guide)), os.sync()))
        print(f"guide: convert {t_conv:.2f}s + gzip -6 {t_gzip:.2f}s = {base:.2f}s, {guide_size / 2**20:.1f} MiB"
              f" (convert's .qcow2: {guide.stat().st_size / 2**20:.1f} MiB)")
        print(f"       convert then sync (its output on disk): {t_conv_sync:.2f}s; convert + sha256 + fsync of "
              f"its output, what a checked durable .qcow2 needs: {t_conv + t_hash:.2f}s")
        for name in ("b.qcow2.gz", "b.qcow2.zst", "b.qcow2"):
            out = work / name
            t, rss = run_qsnap("-i", str(image), "backup", "bench", str(out))
            peaks.append(rss)
            size = out.stat().st_size
            if name == "b.qcow2.gz":
                goal = (f"speed-up {base / t:5.1f}x (goal >= 2x: {verdict(base / t >= 2)}), "
                        f"size {size / guide_size:.3f} of guide's (goal <= 1.03: {verdict(size <= 1.03 * guide_size)})")
            elif name == "b.qcow2.zst":
                goal = (f"speed-up {base / t:5.1f}x (goal >= 10x: {verdict(base / t >= 10)}), "
                        f"size {size / guide_size:.3f} of guide's (goal <= 1: {verdict(size <= guide_size)})")
            else:
                goal = (f"{t_conv / t:.2f} of qemu-img convert throughput (goal >= 0.80: "
                        f"{verdict(t_conv / t >= 0.8)}); {t_conv_sync / t:.2f} of convert+sync, "
                        f"{(t_conv + t_hash) / t:.2f} of convert+sha256+fsync; size "
                        f"{size / guide.stat().st_size:.3f} of convert's")
            print(f"{name:12s} {t:6.2f}s {size / 2**20:7.1f} MiB  {goal}  [max RSS {rss:.0f} MiB]")
            tv, rss = run_qsnap("verify", str(out))
            peaks.append(rss)
            rate = data_mib / tv
            print(f"   verify    {tv:6.2f}s  {rate:5.0f} MiB/s of data (goal >= 500: {verdict(rate >= 500)})"
                  f"  [max RSS {rss:.0f} MiB]")
        # incremental after 1% change
        full_t, rss = run_qsnap("-i", str(image), "backup", "bench", str(work / "full.qcow2"))
        peaks.append(rss)
        sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {max(1, data_mib // 100)}M", str(image))
        sh("qemu-img", "snapshot", "-c", "bench2", str(image))
        inc_t, rss = run_qsnap("-i", str(image), "backup", "--incremental", "bench2", str(work / "inc.qcow2"))
        peaks.append(rss)
        t_ratio = inc_t / full_t
        s_ratio = (work / "inc.qcow2").stat().st_size / (work / "full.qcow2").stat().st_size
        print(f"incremental (1% changed): {inc_t:.2f}s = {t_ratio:.1%} of full time (goal < 5%: "
              f"{verdict(t_ratio < 0.05)}), {s_ratio:.1%} of full size (goal < 5%: {verdict(s_ratio < 0.05)})")
        peak = max(peaks)
        print(f"peak memory of qsnap (max RSS over its runs, children included): {peak:.0f} MiB "
              f"(goal < 300: {verdict(peak < 300)}); this script: "
              f"{__import__('resource').getrusage(__import__('resource').RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
