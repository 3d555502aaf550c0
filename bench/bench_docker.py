"""Benchmark the guide's Docker setup (docker/, scripts/build-image) on a Docker daemon of its own.
Not a test: it prints numbers measured in one run.

    .venv/bin/python bench/bench_docker.py [--rounds 5] [--skip-cold]

1. Image build: cold (an empty cache: mmdebstrap, pip download, docker import, both builds,
   docker save), then cached in a daemon that has nothing (docker load of the base, qsnap's
   layer built on it), then with the image already present.
2. Container start to "guest ready": `docker-compose up -d` + `qsnap vm wait` against the guide's
   `sleep 120` (the ratio is wait_time / 120 s; nothing sleeps).
3. Live create: `qsnap create` through the container's published HMP port (docker-proxy, telnet
   monitor in the container) against the same command on the same guest started by `qsnap vm
   start` (its QMP socket, and its HMP telnet port through MONITOR_PORT).

The daemon, its containers and QEMUs are stopped by PID / removed by id on every path (the
fixtures of tests/docker and tests/e2e are reused for that).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

import conftest  # noqa: E402,F401  (registers qsnap_testlib)
from docker import conftest as dockertest  # noqa: E402
from e2e.conftest import CliGuests, qsnap_ok, vm_start_argv  # noqa: E402
from guest.builder import build_guest  # noqa: E402

QSNAP = ROOT / ".venv" / "bin" / "qsnap"


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def run_ok(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
    return done.stdout


def build_numbers(daemon: dockertest.Daemon, skip_cold: bool) -> dict[str, object]:
    script = dockertest.build_script
    os.environ["DOCKER_HOST"] = daemon.host
    numbers: dict[str, object] = {}
    if not skip_cold:
        with tempfile.TemporaryDirectory(prefix="qsnap-bench-cache-") as cold_cache:
            report = script.build_image(Path(cold_cache))
            numbers["cold"] = report
        for image in daemon.docker("images", "--quiet", "--no-trunc").out.split():
            daemon.docker("rmi", "--force", image, check=False)
    report = script.build_image()  # the user's cache (filled by the cold build's twin, or earlier)
    if report["done"] == "built from scratch":
        numbers["filled cache"] = report
        for image in daemon.docker("images", "--quiet", "--no-trunc").out.split():
            daemon.docker("rmi", "--force", image, check=False)
        report = script.build_image()
    numbers["cached"] = report
    numbers["present"] = script.build_image()
    return numbers


def container_numbers(daemon: dockertest.Daemon, tag: str, rounds: int, work: Path) -> dict[str, object]:
    build = build_guest()
    project = dockertest.make_project(daemon, tag, build, work / "vm")
    try:
        up = timed(lambda: project.compose("up", "--detach"))
        wait = timed(project.wait_ready)
        creates = []
        for i in range(rounds):
            creates.append(timed(lambda i=i: project.qsnap_ok("create", f"bench-{i}")))
        for i in range(rounds):
            project.qsnap_ok("delete", f"bench-{i}", "--yes")
    finally:
        project.remove()
    return {"up_s": round(up, 2), "vm_wait_s": round(wait, 2), "start_to_ready_s": round(up + wait, 2),
            "ratio_vs_sleep_120": round((up + wait) / 120, 3),
            "create_hmp_via_container_s": [round(c, 3) for c in creates]}


def vm_start_numbers(rounds: int, work: Path) -> dict[str, object]:
    build = build_guest()
    image = work / "plain" / "debian-hurd-amd64.qcow2"
    image.parent.mkdir()
    shutil.copyfile(build.disk_hurd, image)
    guests = CliGuests(build)
    try:
        started = json.loads(qsnap_ok(*vm_start_argv(build, image)))
        guests.pids.add(int(started["pid"]))
        guests.images.append(image)
        qsnap_ok("-i", image, "vm", "wait", "--serial", "QSNAP-GUEST-READY", "--timeout", "240")
        qmp, hmp = [], []
        for i in range(rounds):
            qmp.append(timed(lambda i=i: qsnap_ok("-i", image, "create", f"q-{i}")))
        env = {"MONITOR_PORT": str(started["monitor_port"])}
        for i in range(rounds):
            hmp.append(timed(lambda i=i: qsnap_ok("-i", image, "create", f"h-{i}", env=env)))
    finally:
        guests.kill_all()
    return {"create_qmp_vm_start_s": [round(c, 3) for c in qmp], "create_hmp_vm_start_s": [round(c, 3) for c in hmp]}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-cold", action="store_true", help="do not measure a build from an empty cache")
    args = parser.parse_args()
    daemon = dockertest.start_daemon()
    results: dict[str, object] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="qsnap-bench-docker-") as tmp:
            builds = build_numbers(daemon, args.skip_cold)
            results["build"] = builds
            tag = str(builds["present"]["tag"])  # type: ignore[index]
            results["container"] = container_numbers(daemon, tag, args.rounds, Path(tmp))
            results["vm_start"] = vm_start_numbers(args.rounds, Path(tmp))
    finally:
        dockertest.stop_daemon(daemon)
    container = results["container"]
    plain = results["vm_start"]
    hmp_container = statistics.median(container["create_hmp_via_container_s"])  # type: ignore[index]
    qmp_plain = statistics.median(plain["create_qmp_vm_start_s"])  # type: ignore[index]
    hmp_plain = statistics.median(plain["create_hmp_vm_start_s"])  # type: ignore[index]
    results["summary"] = {
        "build_cold_s": results["build"].get("cold", {}).get("seconds"),  # type: ignore[union-attr]
        "build_cached_s": results["build"]["cached"]["seconds"],  # type: ignore[index]
        "build_present_s": results["build"]["present"]["seconds"],  # type: ignore[index]
        "start_to_ready_s": container["start_to_ready_s"],  # type: ignore[index]
        "ready_ratio_vs_sleep_120": container["ratio_vs_sleep_120"],  # type: ignore[index]
        "create_median_container_hmp_s": round(hmp_container, 3),
        "create_median_vm_start_qmp_s": round(qmp_plain, 3),
        "create_median_vm_start_hmp_s": round(hmp_plain, 3),
        "ratio_container_hmp_vs_vm_start_qmp": round(hmp_container / qmp_plain, 2),
        "ratio_container_hmp_vs_vm_start_hmp": round(hmp_container / hmp_plain, 2),
    }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
