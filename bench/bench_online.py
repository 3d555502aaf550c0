"""Benchmark online create / restore / delete through the ``qsnap`` command (a new process each
time, as a user runs it) against the same QMP job issued directly from Python with qemu.qmp.
Not a test: it prints numbers and ratios measured in the same run.

    .venv/bin/python bench/bench_online.py [--mem 256 1024] [--rounds 5]

One QEMU per guest size (no guest OS; RAM size drives the VM-state size), with two QMP
sockets: one for qsnap (``--monitor unix:...``), one for the direct client. Each round does
save → load → delete of a fresh tag both ways, alternating who goes first. Goal (issue 3):
qsnap wall time <= 1.2 x direct + 40 ms, process start included.

- create  = ``qsnap create T``              vs  snapshot-save job
- restore = ``qsnap restore T -y --no-safety`` vs snapshot-load job (like for like)
- restore+safety = ``qsnap restore T -y``  vs  snapshot-save + snapshot-load jobs (what the
  default restore does: a safety snapshot first); informational
- delete  = ``qsnap delete T -y``           vs  snapshot-delete job
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QSNAP = ROOT / ".venv" / "bin" / "qsnap"
SCRUB = ("QCOW2_IMAGE", "IMAGE_PATH", "MONITOR_PORT", "QSNAP_MONITOR", "QSNAP_LOCK_TIMEOUT", "QSNAP_VM",
         "QSNAP_PATH_MAP")


class DirectQmp:
    """The baseline: the bare qemu.qmp job (no existence checks, no listing)."""

    def __init__(self, path: str) -> None:
        from qemu.qmp import EventListener, QMPClient

        self.loop = asyncio.new_event_loop()
        self.client = QMPClient("bench")
        self.listener = EventListener(("JOB_STATUS_CHANGE",))
        self.client.register_listener(self.listener)
        self.loop.run_until_complete(self.client.connect(path))
        nodes = self.run(self.client.execute("query-named-block-nodes"))
        self.node = next(n["node-name"] for n in nodes if n["drv"] == "qcow2")
        self.n = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def job(self, command: str, tag: str) -> None:
        self.n += 1
        job_id = f"bench-{self.n}"
        args: dict[str, Any] = {"job-id": job_id, "tag": tag, "devices": [self.node]}
        if command != "snapshot-delete":
            args["vmstate"] = self.node

        async def go() -> None:
            self.listener.clear()
            await self.client.execute(command, args)
            while True:
                event: dict[str, Any] = dict(await self.listener.get())
                if event["data"]["id"] == job_id and event["data"]["status"] == "concluded":
                    break
            jobs: list[dict[str, Any]] = await self.client.execute("query-jobs")  # type: ignore[assignment]
            error = next((j.get("error") for j in jobs if j["id"] == job_id), None)
            await self.client.execute("job-dismiss", {"id": job_id})
            if error:
                raise SystemExit(f"direct {command} {tag} failed: {error}")

        self.run(go())

    def snapshot_names(self) -> list[str]:
        nodes = self.run(self.client.execute("query-named-block-nodes"))
        node = next(n for n in nodes if n["node-name"] == self.node)
        return [s["name"] for s in node["image"].get("snapshots", [])]

    def close(self) -> None:
        self.run(self.client.disconnect())
        self.loop.close()


def qsnap(image: Path, monitor: str, *args: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    start = time.perf_counter()
    result = subprocess.run([str(QSNAP), "-i", str(image), "--monitor", monitor, *args], env=env,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"qsnap {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    if "via qmp" not in result.stdout:
        raise SystemExit(f"qsnap {' '.join(args)} did not go through QMP: {result.stdout.strip()}")
    return elapsed


def process_start() -> float:
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run([str(QSNAP), "--version"], capture_output=True, check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("QEMU did not start")
        time.sleep(0.02)
    time.sleep(0.2)


def bench_guest(mem: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    work = Path(tempfile.mkdtemp(prefix="qsbo", dir="/tmp"))
    image = work / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
    accel = "tcg" if Path("/sys/module/kvm_pvm").exists() else "kvm:tcg"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", f"pc,accel={accel}", "-m", str(mem), "-nodefaults",
         "-display", "none", "-drive", f"file={image},if=virtio,format=qcow2",
         "-qmp", f"unix:{work}/q.sock,server=on,wait=off", "-qmp", f"unix:{work}/d.sock,server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    results: dict[str, dict[str, list[float]]] = {
        v: {"qsnap": [], "direct": []} for v in ("create", "restore", "restore+safety", "delete")}
    try:
        wait_for(work / "d.sock", proc)
        mon = f"unix:{work}/q.sock"
        direct = DirectQmp(str(work / "d.sock"))
        # warm-up, untimed: the first save of a VM allocates the image's VM-state area
        direct.job("snapshot-save", "warm")
        direct.job("snapshot-delete", "warm")
        qsnap(image, mon, "create", "warm")
        qsnap(image, mon, "delete", "warm", "-y")
        for r in range(rounds):
            order = ("direct", "qsnap") if r % 2 == 0 else ("qsnap", "direct")
            for who in order:
                tag = f"{who}-{r}"
                if who == "direct":
                    t = time.perf_counter()
                    direct.job("snapshot-save", tag)
                    results["create"]["direct"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    direct.job("snapshot-load", tag)
                    results["restore"]["direct"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    direct.job("snapshot-save", f"{tag}-s")
                    direct.job("snapshot-load", tag)
                    results["restore+safety"]["direct"].append(time.perf_counter() - t)
                    direct.job("snapshot-delete", f"{tag}-s")
                    t = time.perf_counter()
                    direct.job("snapshot-delete", tag)
                    results["delete"]["direct"].append(time.perf_counter() - t)
                else:
                    results["create"]["qsnap"].append(qsnap(image, mon, "create", tag))
                    results["restore"]["qsnap"].append(qsnap(image, mon, "restore", tag, "-y", "--no-safety"))
                    results["restore+safety"]["qsnap"].append(qsnap(image, mon, "restore", tag, "-y"))
                    results["delete"]["qsnap"].append(qsnap(image, mon, "delete", tag, "-y"))
            for name in direct.snapshot_names():  # drop the safety snapshots, untimed
                if name.startswith("pre-restore-"):
                    direct.job("snapshot-delete", name)
        direct.close()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mem", type=int, nargs="+", default=[256, 1024], help="guest RAM sizes in MiB")
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    if not QSNAP.exists():
        print(f"{QSNAP} not found: install the project into .venv first", file=sys.stderr)
        return 1
    start_ms = process_start() * 1000
    print(f"qsnap process start (qsnap --version): median {start_ms:.1f} ms; 'beyond start' = qsnap - that")
    missed = 0
    for mem in opts.mem:
        results = bench_guest(mem, opts.rounds)
        print(f"\nguest RAM {mem} MiB, image 1 GiB, median of {opts.rounds} "
              f"(goal: qsnap <= 1.2 x direct + 40 ms)")
        print(f"{'operation':<16} {'direct ms':>10} {'qsnap ms':>10} {'limit ms':>10} {'beyond start':>13}  verdict")
        for verb, res in results.items():
            d = statistics.median(res["direct"]) * 1000
            q = statistics.median(res["qsnap"]) * 1000
            limit = 1.2 * d + 40
            ok = q <= limit
            missed += not ok and verb != "restore+safety"
            note = " (informational)" if verb == "restore+safety" else ""
            print(f"{verb:<16} {d:>10.1f} {q:>10.1f} {limit:>10.1f} {q - start_ms:>13.1f}  "
                  f"{'ok' if ok else 'MISSED'}{note}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
