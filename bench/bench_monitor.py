"""Benchmark the monitor layer against a real QEMU (not a test; prints numbers and ratios).

    .venv/bin/python bench/bench_monitor.py [--mem 256] [--rounds 5] [--hmp-commands 300]

1. HMP command round trip (``info status`` over TCP, through qsnap's HmpMonitor); goal <= 5 ms.
2. QMP snapshot-save / snapshot-load / snapshot-delete through qsnap's QmpMonitor (with its
   existence checks, stale-job cleanup and job wait) against the same job issued directly
   with qemu.qmp, measured alternately in the same run. Goal (issue 3): <= 1.2 x direct + 40 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from qsnap.monitor import connect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("QEMU did not start")
        time.sleep(0.02)
    time.sleep(0.1)


class DirectQmp:
    """The baseline: the bare qemu.qmp job, no checks."""

    def __init__(self, path: str) -> None:
        from qemu.qmp import EventListener, QMPClient

        self.loop = asyncio.new_event_loop()
        self.client = QMPClient("bench")
        self.listener = EventListener(("JOB_STATUS_CHANGE",))
        self.client.register_listener(self.listener)
        self.loop.run_until_complete(self.client.connect(path))
        self.node = next(
            n["node-name"] for n in self.run(self.client.execute("query-named-block-nodes")) if n["drv"] == "qcow2"
        )
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
                event = await self.listener.get()
                if event["data"]["id"] == job_id and event["data"]["status"] == "concluded":
                    break
            await self.client.execute("job-dismiss", {"id": job_id})

        self.run(go())

    def close(self) -> None:
        self.run(self.client.disconnect())
        self.loop.close()


def ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mem", type=int, default=256, help="guest RAM in MiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hmp-commands", type=int, default=300)
    opts = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qsb", dir="/tmp"))
    image = work / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
    port = free_port()
    accel = "tcg" if Path("/sys/module/kvm_pvm").exists() else "kvm:tcg"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", f"pc,accel={accel}", "-m", str(opts.mem), "-nodefaults",
         "-display", "none", "-drive", f"file={image},if=virtio,format=qcow2",
         "-qmp", f"unix:{work}/a.sock,server=on,wait=off", "-qmp", f"unix:{work}/b.sock,server=on,wait=off",
         "-monitor", f"tcp:127.0.0.1:{port},server=on,wait=off"],
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for(work / "b.sock", proc)
        print(f"QEMU {accel}, guest RAM {opts.mem} MiB, image 1 GiB")

        with connect(f"tcp:127.0.0.1:{port}") as hmp:
            samples = []
            for _ in range(opts.hmp_commands):
                start = time.perf_counter()
                hmp.status()
                samples.append(time.perf_counter() - start)
        rt = ms(samples)
        print(f"HMP round trip (info status, TCP): median {rt:.3f} ms, p95 "
              f"{sorted(samples)[int(len(samples) * 0.95)] * 1000:.3f} ms  (goal <= 5 ms: "
              f"{'ok' if rt <= 5 else 'MISSED'})")

        direct = DirectQmp(f"{work}/b.sock")
        ours = connect(f"unix:{work}/a.sock")
        results: dict[str, dict[str, list[float]]] = {
            v: {"qsnap": [], "direct": []} for v in ("save", "load", "delete")
        }
        for r in range(opts.rounds):
            for who in ("direct", "qsnap"):
                tag = f"{who}-{r}"
                for verb in ("save", "load", "delete"):
                    start = time.perf_counter()
                    if who == "direct":
                        direct.job({"save": "snapshot-save", "load": "snapshot-load",
                                    "delete": "snapshot-delete"}[verb], tag)
                    else:
                        {"save": ours.save, "load": ours.load, "delete": ours.delete}[verb](tag)
                    results[verb][who].append(time.perf_counter() - start)
        ours.close()
        direct.close()
        print(f"{'operation':<10} {'direct ms':>10} {'qsnap ms':>10} {'ratio':>7} {'+ms':>7}  goal <= 1.2x + 40 ms")
        for verb, res in results.items():
            d, q = ms(res["direct"]), ms(res["qsnap"])
            ok = q <= 1.2 * d + 40
            print(f"{verb:<10} {d:>10.2f} {q:>10.2f} {q / d:>7.2f} {q - d:>7.2f}  {'ok' if ok else 'MISSED'}")
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
