"""`qsnap prune --dry-run` on an image with 1,000 snapshots (goal: under 1 s).

The image is built once with qemu-img (1,000 `snapshot -c`, then dates spread one per 6 hours
by rewriting the snapshot table) and cached in $QSNAP_BENCH_DIR (default /tmp/qsnap-bench).
Baselines measured in the same run: Python start-up with `import qsnap`, and one
`qemu-img info -U --output=json` of the image (the floor: prune must read the list once).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ops_common import cache_dir, qsnap_argv, run, set_snapshot_dates, timed

COUNT = 1000
GOAL_S = 1.0


def build_image() -> Path:
    image = cache_dir() / f"prune-{COUNT}.qcow2"
    if image.exists():
        return image
    tmp = image.with_suffix(".building")
    tmp.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), "64M"], check=True)
    start = time.perf_counter()
    names = [f"auto-{n:04d}" for n in range(COUNT)]
    for name in names:
        subprocess.run(["qemu-img", "snapshot", "-c", name, str(tmp)], check=True)
    origin = datetime(2024, 1, 1, tzinfo=UTC)
    set_snapshot_dates(tmp, {name: origin + timedelta(hours=6 * n) for n, name in enumerate(names)})
    os.replace(tmp, image)
    print(f"built {image} with {COUNT} snapshots in {time.perf_counter() - start:.1f} s")
    return image


def main() -> None:
    image = build_image()
    env = {**os.environ, "TZ": "Europe/Berlin"}
    argv = qsnap_argv("-i", str(image), "prune", "--dry-run", "--keep-daily", "7", "--keep-weekly", "5",
                      "--keep-monthly", "12", "--keep-within", "2d")
    python = timed(lambda: run([sys.executable, "-c", "import qsnap"]))
    info = timed(lambda: run(["qemu-img", "info", "-U", "--output=json", str(image)]))
    prune_cli = timed(lambda: run(argv, env))

    from qsnap.service.prune import prune
    from qsnap.service.retention import Policy, parse_duration

    policy = Policy(daily=7, weekly=5, monthly=12, within=parse_duration("2d"))
    in_process = timed(lambda: prune(image, policy=policy, dry_run=True))
    print(f"prune --dry-run, {COUNT} snapshots: {prune_cli:.3f} s (goal < {GOAL_S} s) "
          f"{'OK' if prune_cli < GOAL_S else 'SLOW'}")
    print(f"  in-process service call:   {in_process:.3f} s")
    print(f"  baseline python+import:    {python:.3f} s  (prune / baseline = {prune_cli / python:.1f}x)")
    print(f"  baseline qemu-img info -U: {info:.3f} s  (prune / info = {prune_cli / info:.1f}x)")


if __name__ == "__main__":
    main()
