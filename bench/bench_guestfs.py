"""Bench: inside the snapshots (issue 11), one run, ratios printed, no asserts.

    .venv/bin/python bench/bench_guestfs.py [--scale 1.0] [--keep DIR]

(--keep DIR: build there and keep it; a later run with the same --scale and DIR measures again
without rebuilding.)

At scale 1: a 4 GiB ext4 filesystem holding 100,000 files (100 directories of 1,000 files of
1-8 KiB, plus one 1 GiB file) in MBR partition 1 of a 20 GiB qcow2; snapshot s1; then 1% of the
files changed (400 rewritten, 300 added, 300 removed, with debugfs on a raw copy; only the
changed 4 KiB blocks are written into the qcow2 with qemu-io) and snapshot s2; then 10 files
rewritten and snapshot s3. --scale shrinks the file count, the filesystem and the big file.

Measured (each qsnap command is the console script as a child process; its peak RSS is that
child's ru_maxrss from wait4):
1. `qsnap diff s1 s2 --files` vs the guide's comparison script made root-free: `qemu-img convert`
   both snapshots to raw, `debugfs -R 'rdump / DIR'` both (the filesystem read in place in the raw
   disk through e2fsprogs' ``file?offset=N``), `diff -r` -- goal >= 20x;
2. `qsnap diff s2 s3 --files` (10 files changed) -- goal < 1 s;
3. `qsnap ls -R s1:/` vs debugfs on a raw copy (the copy not timed): debugfs 1.47 has no recursive
   ls, so `ls -l DIR` for every directory, one debugfs run per tree level -- goal within 3x;
4. `qsnap extract` of the 1 GiB file vs `qemu-img convert` of s1 to raw, as bytes per second
   (the convert's bytes: the data blocks of its sparse output) -- goal >= 80%;
5. peak RSS of every qsnap child -- goal < 200 MiB.

Besides wall times, CPU times (user + system, from the children's rusage) are printed: on a
machine shared with other work the wall times of a single-threaded qsnap and of the baseline
tools stretch differently.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QSNAP = ROOT / ".venv" / "bin" / "qsnap"
SECTOR = 512
PART_START = 1 << 20
BLOCK = 4096


def sh(*argv: object, quiet: bool = True) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run([str(a) for a in argv], capture_output=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, argv))} failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
    return result


def children_cpu() -> float:
    """CPU seconds (user + system) of every waited-for child so far: unlike wall time, not
    stretched when other work shares the cores."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_child(argv: Sequence[object], stdout: int | None = subprocess.DEVNULL) -> tuple[float, float, int]:
    """Run ARGV; (wall seconds, CPU seconds, peak RSS in KiB) of that child, from wait4."""
    t = time.perf_counter()
    proc = subprocess.Popen([str(a) for a in argv], stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.stderr is not None:
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if proc.returncode not in (0, 1):
            print(f"  ! {' '.join(map(str, argv))} exited {proc.returncode}: {err.strip()[:300]}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


def fill(src: Path, files: int, big_bytes: int) -> int:
    """FILES files of 1-8 KiB in directories of 1,000, and one file of BIG_BYTES; total bytes."""
    total = 0
    seed = hashlib.sha256(b"bench").digest()
    blob = b"".join(hashlib.sha256(seed + bytes([i])).digest() for i in range(256)) * 4  # 32 KiB
    for i in range(files):
        d = src / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        size = 1024 + (i * 7919) % 7168
        start = (i * 131) % (len(blob) - size)
        (d / f"f{i % 1000:04d}").write_bytes(blob[start:start + size])
        total += size
    with open(src / "big.bin", "wb") as f:
        chunk = hashlib.sha256(b"big").digest() * (1 << 15)  # 1 MiB
        written = 0
        while written < big_bytes:
            n = min(len(chunk), big_bytes - written)
            f.write(chunk[:n])
            written += n
    return total + big_bytes


def changed_ranges(before: Path, after: Path, start: int, length: int) -> list[tuple[int, int]]:
    """(offset, length) of the 4 KiB blocks that differ between two raw files, merged; both are read
    only where AFTER or BEFORE has data (SEEK_DATA)."""
    out: list[tuple[int, int]] = []
    chunk = 4 << 20
    with open(before, "rb") as fa, open(after, "rb") as fb:
        pos = start
        end = start + length
        while pos < end:
            try:
                data = min(os.lseek(fa.fileno(), pos, os.SEEK_DATA), os.lseek(fb.fileno(), pos, os.SEEK_DATA))
            except OSError:
                break
            pos = data - data % BLOCK
            if pos >= end:
                break
            fa.seek(pos)
            fb.seek(pos)
            a, b = fa.read(chunk), fb.read(chunk)
            b = b.ljust(len(a), b"\0")
            a = a.ljust(len(b), b"\0")
            if a != b:
                for k in range(0, len(a), BLOCK):
                    if a[k:k + BLOCK] != b[k:k + BLOCK]:
                        off = pos + k
                        if out and out[-1][0] + out[-1][1] == off:
                            out[-1] = (out[-1][0], out[-1][1] + BLOCK)
                        else:
                            out.append((off, BLOCK))
            pos += max(len(a), BLOCK)
    return out


def write_ranges(raw: Path, image: Path, ranges: list[tuple[int, int]], tmp: Path) -> None:
    """Write RAW's bytes at RANGES into IMAGE with qemu-io (write -s), nothing else."""
    chunks = tmp / "chunks"
    chunks.mkdir(exist_ok=True)
    with open(raw, "rb") as f:
        for k in range(0, len(ranges), 200):
            argv: list[str] = ["qemu-io", "-f", "qcow2"]
            for j, (off, n) in enumerate(ranges[k:k + 200]):
                f.seek(off)
                piece = chunks / f"{j}"
                piece.write_bytes(f.read(n))
                argv += ["-c", f"write -q -s {piece} {off} {n}"]
            sh(*argv, image)
    shutil.rmtree(chunks)


def change(raw: Path, image: Path, snapshot: str, commands: list[str], tmp: Path, fs_bytes: int) -> int:
    """Apply debugfs COMMANDS to RAW (the partition, via ?offset=), copy only what changed into
    IMAGE, snapshot it; returns the number of changed 4 KiB blocks."""
    before = tmp / "before.raw"
    sh("cp", "--sparse=always", raw, before)
    script = tmp / "debugfs.cmd"
    script.write_text("\n".join(commands) + "\n")
    sh("debugfs", "-w", "-f", script, f"{raw}?offset={PART_START}")
    ranges = changed_ranges(before, raw, PART_START, fs_bytes)
    before.unlink()
    write_ranges(raw, image, ranges, tmp)
    sh("qemu-img", "snapshot", "-c", snapshot, image)
    return sum(n for _, n in ranges) // BLOCK


def build(tmp: Path, files: int, fs_bytes: int, big: int, disk_bytes: int, t0: float) -> str:
    """Make the image (disk.qcow2 with s1, s2, s3) in TMP; a line describing it."""
    src = tmp / "src"
    data = fill(src, files, big)
    raw = tmp / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(disk_bytes)
    subprocess.run(["sfdisk", "-q", str(raw)], check=True, capture_output=True,
                   input=f"label: dos\nstart=2048, size={fs_bytes // SECTOR}, type=83\n".encode())
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={PART_START}", "-d", src, raw, f"{fs_bytes // 1024}k")
    shutil.rmtree(src)
    image = tmp / "disk.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image)
    sh("qemu-img", "snapshot", "-c", "s1", image)
    new = tmp / "new.bin"
    new.write_bytes(b"rewritten " * 300)
    ndirs = max(1, files // 1000)
    n1 = max(1, files // 100)
    rewrite, add, remove = n1 * 4 // 10, n1 * 3 // 10, n1 - n1 * 4 // 10 - n1 * 3 // 10
    cmds = []
    for i in range(rewrite):
        k = (i * 97) % files
        path = f"/d{k // 1000:03d}/f{k % 1000:04d}"
        cmds += [f"rm {path}", f"write {new} {path}"]
    for i in range(add):
        cmds.append(f"write {new} /d{i % ndirs:03d}/added{i:05d}")
    for i in range(remove):
        k = (i * 89 + 13) % files
        path = f"/d{k // 1000:03d}/f{k % 1000:04d}"
        if f"rm {path}" not in cmds:
            cmds.append(f"rm {path}")
    blocks_1pct = change(raw, image, "s2", cmds, tmp, fs_bytes)
    ten = []
    for i in range(10):
        k = (i * 7001 + 5) % files
        path = f"/d{k // 1000:03d}/f{k % 1000:04d}"
        ten += [f"rm {path}", f"write {new} {path}"]
    blocks_10 = change(raw, image, "s3", ten, tmp, fs_bytes)
    build = time.perf_counter() - t0
    alloc = int(sh("qemu-img", "info", "--output=json", image).stdout.decode().split('"actual-size": ')[1]
                .split(",")[0])
    return (f"built in {build:.0f} s: {files} files ({data / 2**20:.0f} MiB of data, a {big / 2**20:.0f} MiB file) "
            f"in a {fs_bytes / 2**30:.2f} GiB ext4 on a {disk_bytes >> 30} GiB qcow2 ({alloc / 2**20:.0f} MiB on "
            f"disk); s1->s2: {len(cmds)} debugfs commands, {blocks_1pct} blocks; s2->s3: 10 files, {blocks_10} blocks")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the full size (files, fs, big file)")
    p.add_argument("--keep", type=Path, help="work in this directory and keep it")
    a = p.parse_args()
    files = int(100_000 * a.scale)
    fs_bytes = max(256 << 20, int((4 << 30) * a.scale)) // (1 << 20) * (1 << 20)
    big = max(16 << 20, int((1 << 30) * a.scale))
    disk_bytes = 20 << 30
    tmp_ctx = tempfile.TemporaryDirectory(dir="/var/tmp") if a.keep is None else None
    tmp = Path(tmp_ctx.name) if tmp_ctx else a.keep
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall times stretch with it)")
        image = tmp / "disk.qcow2"
        recipe = tmp / "built.txt"
        key = f"{files} {fs_bytes} {big} {disk_bytes}\n"
        for leftover in ("dump-s1", "dump-s2", "s1.raw", "s2.raw", "convert.raw", "big.out"):  # of a stopped run
            if (tmp / leftover).is_dir():
                shutil.rmtree(tmp / leftover)
            (tmp / leftover).unlink(missing_ok=True)
        if a.keep is not None and recipe.is_file() and recipe.read_text().startswith(key):
            print("reusing " + recipe.read_text()[len(key):].strip())
        else:
            described = build(tmp, files, fs_bytes, big, disk_bytes, t0)
            recipe.write_text(key + described + "\n")
            print(described)
        rss: dict[str, int] = {}

        # 1. diff --files vs convert + rdump + diff -r
        ours, ours_cpu, rss["diff --files (1%)"] = timed_child([QSNAP, "-i", image, "diff", "s1", "s2", "--files"])
        out = subprocess.run([str(QSNAP), "-i", str(image), "diff", "s1", "s2", "--files", "--json"],
                             capture_output=True, text=True).stdout
        summary = out.split('"summary": "')[1].split('"')[0] if '"summary"' in out else "?"
        t, c = time.perf_counter(), children_cpu()
        for name in ("s1", "s2"):
            sh("qemu-img", "convert", "-U", "-l", f"snapshot.name={name}", "-O", "raw", image, tmp / f"{name}.raw")
            (tmp / f"dump-{name}").mkdir()
            sh("debugfs", "-R", f"rdump / {tmp / f'dump-{name}'}", f"{tmp / f'{name}.raw'}?offset={PART_START}")
        subprocess.run(["diff", "-r", "-q", str(tmp / "dump-s1"), str(tmp / "dump-s2")], capture_output=True)
        theirs, theirs_cpu = time.perf_counter() - t, children_cpu() - c
        for name in ("s1", "s2"):
            shutil.rmtree(tmp / f"dump-{name}")
        print(f"1. diff --files s1 s2 ({summary}): qsnap {ours:.2f} s | convert both + rdump both + diff -r "
              f"{theirs:.1f} s | speed-up {theirs / ours:.1f}x (goal >= 20x); CPU time {ours_cpu:.2f} s vs "
              f"{theirs_cpu:.1f} s: {theirs_cpu / ours_cpu:.1f}x")

        # 2. 10 files changed
        ten_s, ten_cpu, rss["diff --files (10 files)"] = timed_child([QSNAP, "-i", image, "diff", "s2", "s3",
                                                                      "--files"])
        print(f"2. diff --files s2 s3 (10 files rewritten): qsnap {ten_s:.2f} s, CPU {ten_cpu:.2f} s (goal < 1 s)")

        # 3. ls -R vs debugfs ls -l per directory on the raw copy (s1.raw, made above; not timed)
        ls_s, ls_cpu, rss["ls -R"] = timed_child([QSNAP, "-i", image, "ls", "-R", "-l", "s1:/"])
        fs_raw = f"{tmp / 's1.raw'}?offset={PART_START}"
        t, c = time.perf_counter(), children_cpu()
        level = ["/"]
        while level:
            script = tmp / "ls.cmd"
            script.write_text("".join(f"ls -l {d}\n" for d in level))
            out_b = subprocess.run(["debugfs", "-f", str(script), fs_raw], capture_output=True).stdout
            nxt = []
            current = ""
            for line in out_b.decode(errors="replace").splitlines():
                if line.startswith("debugfs: ls -l "):
                    current = line[len("debugfs: ls -l "):]
                    continue
                parts = line.split()
                if len(parts) >= 9 and parts[1].startswith("40") and parts[-1] not in (".", ".."):
                    nxt.append(("" if current == "/" else current) + "/" + parts[-1])
            level = nxt
        debugfs_ls, debugfs_cpu = time.perf_counter() - t, children_cpu() - c
        print(f"3. ls -R -l s1:/: qsnap {ls_s:.2f} s | debugfs ls -l of every directory {debugfs_ls:.2f} s | "
              f"ratio {ls_s / debugfs_ls:.2f}x (goal <= 3x); CPU time {ls_cpu:.2f} s vs {debugfs_cpu:.2f} s: "
              f"{ls_cpu / debugfs_cpu:.2f}x")

        # 4. extract of the big file vs qemu-img convert throughput
        t = time.perf_counter()
        sh("qemu-img", "convert", "-U", "-l", "snapshot.name=s1", "-O", "raw", image, tmp / "convert.raw")
        conv_s = time.perf_counter() - t
        conv_bytes = (tmp / "convert.raw").stat().st_blocks * 512  # the data it read and wrote (zeros skipped)
        (tmp / "convert.raw").unlink()
        ext_s, _cpu, rss["extract 1 file"] = timed_child([QSNAP, "-i", image, "extract", "s1:/big.bin",
                                                          tmp / "big.out"])
        (tmp / "big.out").unlink(missing_ok=True)
        ours_bps, conv_bps = big / ext_s, conv_bytes / conv_s
        print(f"4. extract /big.bin ({big / 2**20:.0f} MiB): {ext_s:.2f} s = {ours_bps / 2**20:.0f} MiB/s | qemu-img "
              f"convert s1 ({conv_bytes / 2**20:.0f} MiB allocated) {conv_s:.2f} s = {conv_bps / 2**20:.0f} MiB/s | "
              f"{100 * ours_bps / conv_bps:.0f}% (goal >= 80%)")
        peak = max(rss.values())
        print("5. peak RSS of the qsnap child: " + ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in rss.items())
              + f" | max {peak / 1024:.0f} MiB (goal < 200 MiB)")
        print(f"total {time.perf_counter() - t0:.0f} s")
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()


if __name__ == "__main__":
    main()
