"""`qsnap doctor` on a healthy image (goal: under 2 s).

Baselines measured in the same run: Python start-up with `import qsnap`, and
`qemu-img check` + `qemu-img info` of the same image (the two programs doctor must run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ops_common import cache_dir, qsnap_argv, run, timed

GOAL_S = 2.0


def main() -> None:
    image = cache_dir() / "doctor-healthy.qcow2"
    if not image.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
        for name in ("installed", "tools", "configured"):
            subprocess.run(["qemu-img", "snapshot", "-c", name, str(image)], check=True)
    os.chmod(image, 0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("QSNAP_MONITOR", "MONITOR_PORT")}
    python = timed(lambda: run([sys.executable, "-c", "import qsnap"]))
    programs = timed(lambda: (run(["qemu-img", "check", str(image)]),
                              run(["qemu-img", "info", "-U", "--output=json", str(image)])))
    doctor = timed(lambda: run(qsnap_argv("-i", str(image), "doctor"), env))
    print(f"doctor, healthy image: {doctor:.3f} s (goal < {GOAL_S} s) {'OK' if doctor < GOAL_S else 'SLOW'}")
    print(f"  baseline python+import:      {python:.3f} s  (doctor / baseline = {doctor / python:.1f}x)")
    print(f"  baseline qemu-img check+info: {programs:.3f} s  (doctor / programs = {doctor / programs:.1f}x)")


if __name__ == "__main__":
    main()
