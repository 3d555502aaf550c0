"""Bench: `qsnap compact` against `qemu-img convert -O qcow2` (which keeps no snapshot), one run.

    .venv/bin/python bench/bench_compact.py [--virtual-gib 20] [--data-mib 4096] [--snapshots 10]
                                            [--change-pct 5] [--deleted 2]

The image: DATA_MIB of 1 MiB writes spread over the virtual disk, then SNAPSHOTS snapshots, each
after rewriting CHANGE_PCT % of the data with a new pattern, then DELETED of them deleted (their
exclusive clusters are freed inside the file). Printed: compact time / convert time (goal
<= 1.5), compacted size / (unique data + 1 %) (goal <= 1), peak RSS of qsnap and the QEMU tools it
ran (goal < 300 MiB), and the dry run's prediction against the real size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QSNAP = ROOT / ".venv" / "bin" / "qsnap"


def qemu_io(img: Path, cmds: list[str]) -> None:
    for k in range(0, len(cmds), 256):
        argv = ["qemu-io", "-f", "qcow2"]
        for c in cmds[k : k + 256]:
            argv += ["-c", c]
        subprocess.run([*argv, str(img)], check=True, capture_output=True)


def unique_data(img: Path) -> int:
    """Bytes of distinct host data clusters some snapshot or the current state reaches."""
    from qsnap.qcow2 import format as fmt
    from qsnap.qcow2 import open_image

    with open_image(img) as image:
        tables = set()
        for layer in [image.layer(e) for e in image.snapshot_entries()] + [image.active]:
            tables.update(o for o in (x & fmt.L1E_OFFSET_MASK for x in layer.l1) if o)
        clusters: set[int] = set()
        for t in tables:
            clusters.update(image.l2_host_clusters(t))
        return len(clusters) * image.cluster_size


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--virtual-gib", type=int, default=20)
    p.add_argument("--data-mib", type=int, default=4096)
    p.add_argument("--snapshots", type=int, default=10)
    p.add_argument("--change-pct", type=float, default=5.0)
    p.add_argument("--deleted", type=int, default=2)
    p.add_argument("--dir", default="/tmp")
    a = p.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        img = Path(tmp) / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), f"{a.virtual_gib}G"], check=True)
        stride = a.virtual_gib * 1024 // a.data_mib
        slots = list(range(a.data_mib))
        t = time.perf_counter()
        qemu_io(img, [f"write -P {0x10 + i % 200} {i * stride}M 1M" for i in slots])
        changes = max(1, int(a.data_mib * a.change_pct / 100))
        for s in range(a.snapshots):
            picked = rng.sample(slots, changes)
            qemu_io(img, [f"write -P {(s * 37 + i) % 250 + 1} {i * stride}M 1M" for i in sorted(picked)])
            subprocess.run(["qemu-img", "snapshot", "-c", f"s{s}", str(img)], check=True)
        for s in rng.sample(range(a.snapshots), a.deleted):
            subprocess.run(["qemu-img", "snapshot", "-d", f"s{s}", str(img)], check=True)
        qemu_io(img, [f"write -P 0xee {i * stride}M 1M" for i in sorted(rng.sample(slots, changes))])
        built = time.perf_counter() - t
        size_before = img.stat().st_size
        unique = unique_data(img)

        subprocess.run(["sync"], check=True)
        t = time.perf_counter()
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(img), str(Path(tmp) / "converted.qcow2")],
                       check=True)
        convert_s = time.perf_counter() - t
        subprocess.run(["sync", str(Path(tmp) / "converted.qcow2")], check=True)  # compact ends with an fsync
        convert_sync_s = time.perf_counter() - t
        converted = (Path(tmp) / "converted.qcow2").stat().st_size
        (Path(tmp) / "converted.qcow2").unlink()

        # the floor of any compaction that keeps the snapshots: writing the unique data durably
        # (cp of the image, synced, scaled to the unique data), and the guide's whole procedure
        # (convert, sync, mv over the original: the mv frees the old file's blocks)
        floor = Path(tmp) / "floor.bin"
        subprocess.run(["sync"], check=True)
        t = time.perf_counter()
        subprocess.run(["cp", str(img), str(floor)], check=True)
        subprocess.run(["sync"], check=True)
        floor_s = (time.perf_counter() - t) * (unique / size_before)
        guide = Path(tmp) / "guide.qcow2"
        os.replace(floor, guide)
        subprocess.run(["sync"], check=True)
        t = time.perf_counter()
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(guide), str(guide) + ".new"], check=True)
        subprocess.run(["sync", str(guide) + ".new"], check=True)
        os.replace(str(guide) + ".new", guide)
        guide_s = time.perf_counter() - t
        guide.unlink()

        subprocess.run(["sync"], check=True)
        t = time.perf_counter()
        dry = subprocess.run([str(QSNAP), "-i", str(img), "compact", "--dry-run", "--json"], check=True,
                             capture_output=True, text=True)
        dry_s = time.perf_counter() - t
        predicted = json.loads(dry.stdout)["predicted_size"]

        subprocess.run(["sync"], check=True)
        before_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = time.perf_counter()
        done = subprocess.run([str(QSNAP), "-i", str(img), "compact", "--json"], capture_output=True, text=True)
        compact_s = time.perf_counter() - t
        if done.returncode != 0:
            sys.exit(f"compact failed: {done.stderr}")
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        after = img.stat().st_size
        print(f"image: {a.virtual_gib} GiB virtual, {a.data_mib} MiB data, {a.snapshots} snapshots changing "
              f"{a.change_pct:g}% each, {a.deleted} deleted; built in {built:.1f} s; "
              f"file {size_before / 2**30:.2f} GiB")
        print(f"qemu-img convert -O qcow2: {convert_s:.1f} s -> {converted / 2**30:.2f} GiB (no snapshots kept)")
        print(f"qsnap compact:             {compact_s:.1f} s -> {after / 2**30:.2f} GiB "
              f"({a.snapshots - a.deleted} snapshots kept, verified)")
        print(f"  time ratio compact/convert: {compact_s / convert_s:.2f} (goal <= 1.5); against convert + "
              f"sync of its output ({convert_sync_s:.1f} s): {compact_s / convert_sync_s:.2f}")
        print(f"  against the guide's convert + sync + mv ({guide_s:.1f} s): {compact_s / guide_s:.2f}; against "
              f"the floor, copying the unique data and syncing it ({floor_s:.1f} s): {compact_s / floor_s:.2f}")
        print(f"  method: {json.loads(done.stdout).get('method')}")
        print(f"  size / (unique data {unique / 2**30:.2f} GiB + 1%): {after / (unique * 1.01):.3f} (goal <= 1)")
        print(f"  dry run {dry_s:.1f} s, predicted {predicted / 2**30:.3f} GiB, real/predicted "
              f"{after / predicted:.4f} (goal within 2%)")
        print(f"  load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"  peak RSS of qsnap and the QEMU tools it ran: {max(rss, before_rss) / 1024:.0f} MiB (goal < 300)")


if __name__ == "__main__":
    main()
