"""`qsnap doctor`: the guide's "Troubleshooting Snapshots", run for you.

Each check returns ok / warn / fail / skip with what it found and how to fix it. No check
changes anything: no lock file is created, no stale record is cleaned, no job is dismissed,
and ``qemu-img check`` runs read-only (``-U`` when a VM holds the image).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import socket
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsnap.core.errors import ImageInUse, QsnapError
from qsnap.core.models import CheckResult, ImageInfo

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"

GIB = 1024**3
MIN_FREE = 1 * GIB  # the guide: "Need at least 1 GB free"
MAX_SNAPSHOTS = 20  # the guide's best practice
STALE_PARTIAL_AGE = 15 * 60  # seconds without a write before a .partial counts as abandoned
CONNECT_TIMEOUT = 0.5


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn, fail, skip
    found: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status, "found": self.found, "fix": self.fix,
                "details": self.details}


@dataclass(frozen=True)
class DoctorReport:
    image: Path | None
    checks: tuple[Check, ...]

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    def by_name(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_json(self) -> dict[str, Any]:
        counts = {s: sum(c.status == s for c in self.checks) for s in (OK, WARN, FAIL, SKIP)}
        return {"image": None if self.image is None else str(self.image), "ok": not self.failed,
                "summary": counts, "checks": [c.to_json() for c in self.checks]}


# ------------------------------------------------------------------ pure verdicts

def space_verdict(free: int, estimate: int) -> str:
    """FAIL under 1 GiB free, WARN under ESTIMATE (what one more snapshot may need)."""
    if free < MIN_FREE:
        return FAIL
    if free < estimate:
        return WARN
    return OK


def snapshot_space_estimate(info: ImageInfo) -> int:
    """What one more snapshot may need: the largest VM state so far, plus an average
    snapshot's share of the allocated data (the clusters a snapshot pins once the guest
    rewrites them)."""
    largest_vm_state = max((s.vm_state_size for s in info.snapshots), default=0)
    return largest_vm_state + info.actual_size // (len(info.snapshots) + 1)


def is_loopback(host: str | None) -> bool:
    if host is None:
        return True
    name = host.strip("[]").lower()
    if name in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name other than localhost: may be anything


def exposure_of(host: str | None) -> str | None:
    """None if HOST is loopback, else why it is exposed."""
    if is_loopback(host):
        return None
    name = (host or "").strip("[]")
    if name in ("0.0.0.0", "::", ""):
        return f"{name or '*'} (every network interface)"
    return f"{name} (reachable from the network)"


_MONITOR_OPTS = ("-monitor", "-qmp", "-qmp-pretty", "-serial", "-chardev", "-mon")
_TCP_RE = re.compile(r"^(?:tcp|telnet|websocket):(\[[^\]]*\]|[^:,]*):(\d+)")


def exposed_monitors(argv: Iterable[str]) -> list[str]:
    """The non-loopback TCP monitor/QMP listeners in a QEMU command line.

    Understands ``-monitor telnet:0.0.0.0:9999,server,nowait``, ``-qmp tcp::4444,...`` and
    ``-chardev socket,id=x,host=0.0.0.0,port=N,server=on`` (when a ``-mon`` uses it).
    """
    args = list(argv)
    found: list[str] = []
    chardevs: dict[str, str] = {}
    mon_chardevs: set[str] = set()
    for option, value in itertools.pairwise(args):
        if option in ("-monitor", "-qmp", "-qmp-pretty"):
            m = _TCP_RE.match(value)
            if m and exposure_of(m.group(1)) is not None:
                found.append(f"{option} {value}")
        elif option == "-chardev" and value.startswith("socket"):
            opts = dict(kv.split("=", 1) for kv in value.split(",")[1:] if "=" in kv)
            if "port" in opts and "id" in opts and exposure_of(opts.get("host", "")) is not None:
                chardevs[opts["id"]] = f"-chardev {value}"
        elif option == "-mon":
            opts = dict(kv.split("=", 1) for kv in value.split(",") if "=" in kv)
            if "chardev" in opts:
                mon_chardevs.add(opts["chardev"])
    found += [text for cid, text in chardevs.items() if cid in mon_chardevs]
    return found


# ------------------------------------------------------------------ probes (read-only)

def qemu_processes_using(image: Path, proc_root: Path = Path("/proc")) -> list[tuple[int, list[str]]]:
    """QEMU system emulators whose command line names IMAGE (any user we can see)."""
    wanted = {str(image), os.path.realpath(image)}
    found = []
    try:
        entries = list(proc_root.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
            continue
        if any(any(w in a for w in wanted) for a in argv[1:]):
            found.append((int(entry.name), argv))
    return sorted(found)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(pid, 0).
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def read_run_record(image: Path) -> dict[str, Any] | None:
    """``<image>.qsnap-run/vm.json`` as written by ``qsnap vm start`` (read, never cleaned)."""
    path = image.with_name(image.name + ".qsnap-run") / "vm.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def probe(address: Any, timeout: float = CONNECT_TIMEOUT) -> tuple[bool, str, bytes]:
    """Connect to a monitor address; (reachable, error text, first bytes it sent)."""
    from qsnap.core.errors import MonitorError
    from qsnap.monitor.transport import open_socket

    try:
        sock = open_socket(address, timeout)
    except MonitorError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.strerror:
            return False, cause.strerror, b""
        return False, exc.message, b""
    with sock:
        sock.settimeout(timeout)
        try:
            greeting = sock.recv(4096)
        except OSError:
            greeting = b""
    return True, "", greeting


def qmp_query_jobs(address: Any, timeout: float = 2.0) -> list[dict[str, Any]]:
    """``query-jobs`` over a bare QMP connection (no library: doctor must start fast)."""
    if address.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(address.path))
    else:
        sock = socket.create_connection((str(address.host), int(address.port)), timeout=timeout)
    with sock:
        sock.settimeout(timeout)
        reader = sock.makefile("rb")

        def reply() -> dict[str, Any]:
            while True:
                line = reader.readline()
                if not line:
                    raise OSError("the monitor closed the connection")
                message = json.loads(line)
                if "return" in message or "error" in message:
                    return dict(message)

        json.loads(reader.readline())  # greeting
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        reply()
        sock.sendall(b'{"execute": "query-jobs"}\n')
        answer = reply()
        if "error" in answer:
            raise OSError(str(answer["error"].get("desc", answer["error"])))
        return list(answer["return"])


# ------------------------------------------------------------------ the checks

@dataclass
class _State:
    image: Path | None
    environ: Mapping[str, str]
    monitor_option: str | None
    info: ImageInfo | None = None
    in_use: bool | None = None  # a VM holds the write lock
    processes: list[tuple[int, list[str]]] = field(default_factory=list)
    record: dict[str, Any] | None = None
    monitor: Any = None  # MonitorAddress the user configured
    monitor_reachable: bool = False
    monitor_protocol: str | None = None


def _check_qemu_img() -> Check:
    from qsnap.core import proc
    from qsnap.core.errors import ProgramMissing

    try:
        result = proc.run(["qemu-img", "--version"], timeout=10)
    except ProgramMissing as exc:
        return Check("qemu-img", FAIL, "qemu-img is not installed", exc.hint or "apt-get install qemu-utils")
    except QsnapError as exc:
        return Check("qemu-img", FAIL, f"qemu-img --version failed: {exc}", "reinstall qemu-utils")
    first = result.stdout.splitlines()[0] if result.stdout else ""
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", first)
    if not m:
        return Check("qemu-img", WARN, f"qemu-img answered {first!r}", "check the qemu-utils install")
    version = ".".join(g for g in m.groups() if g is not None)
    details = {"version": version}
    if (int(m.group(1)), int(m.group(2))) < (6, 0):
        return Check("qemu-img", WARN, f"qemu-img {version} is older than 6.0 (no QMP snapshot jobs)",
                     "upgrade QEMU to 6.0 or later", details)
    return Check("qemu-img", OK, f"qemu-img {version}", None, details)


def _check_image(state: _State) -> list[Check]:
    from qsnap.service.image import check_image_file

    image = state.image
    if image is None:
        return [Check("image", FAIL, "no image found", "pass -i IMAGE or set QCOW2_IMAGE / IMAGE_PATH")]
    try:
        check_image_file(image)
    except QsnapError as exc:
        return [Check("image", FAIL, exc.message, exc.hint or "pass -i IMAGE")]
    checks = [Check("image", OK, f"{image} is a qcow2 image")]
    st = os.stat(image)
    readable = os.access(image, os.R_OK)
    writable = os.access(image, os.W_OK) and bool(st.st_mode & 0o222)
    mode = stat.filemode(st.st_mode)
    if not readable:
        checks.append(Check("access", FAIL, f"cannot read {image} ({mode})", f"chmod u+r {image}"))
    elif not writable:
        checks.append(Check("access", FAIL, f"{image} is read-only ({mode}): snapshots cannot be taken",
                            f"chmod u+w {image}"))
    else:
        checks.append(Check("access", OK, "readable and writable"))
    perms = st.st_mode & 0o777
    loose = []
    if perms & 0o044:
        loose.append("readable by " + " and ".join(w for w, bit in (("group", 0o040), ("others", 0o004))
                                                     if perms & bit))
    if perms & 0o022:
        loose.append("writable by " + " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002))
                                                     if perms & bit))
    details = {"mode": f"{perms:04o}"}
    if loose:
        checks.append(Check("permissions", WARN,
                            f"mode {perms:04o}: {'; '.join(loose)} (snapshots hold RAM, keys and passwords)",
                            f"chmod 600 {image}", details))
    else:
        checks.append(Check("permissions", OK, f"mode {perms:04o}", None, details))
    return checks


def _check_qemu_img_check(state: _State) -> Check:
    from qsnap.engines import qemu_img

    assert state.image is not None
    result: CheckResult
    try:
        result = qemu_img.check(state.image)
        state.in_use = False
    except ImageInUse:
        state.in_use = True
        try:
            result = qemu_img.check(state.image, force_share=True)
        except QsnapError as exc:
            return Check("qemu-img check", FAIL, str(exc), "run 'qemu-img check -r all' on a copy")
    except QsnapError as exc:
        return Check("qemu-img check", FAIL, exc.message, "restore the image from a backup, or "
                     "run 'qemu-img check -r all' on a copy")
    shared = " (read with -U while a VM runs: may show false leaks)" if state.in_use else ""
    details = result.to_json()
    if result.corruptions or result.check_errors:
        return Check("qemu-img check", FAIL,
                     f"corrupt: {result.corruptions} corruptions, {result.check_errors} check errors{shared}",
                     "stop using the image; copy it, then 'qemu-img check -r all' the copy or restore "
                     "a backup", details)
    if result.leaks:
        return Check("qemu-img check", WARN, f"{result.leaks} leaked clusters (space wasted, no data lost)"
                     f"{shared}", "with the VM stopped: qemu-img check -r leaks IMAGE", details)
    return Check("qemu-img check", OK, f"clean{shared}", None, details)


def _read_info(state: _State) -> None:
    from qsnap.engines import qemu_img

    assert state.image is not None
    with contextlib.suppress(QsnapError):
        state.info = qemu_img.info(state.image)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _check_free_space(state: _State) -> Check:
    assert state.image is not None
    try:
        vfs = os.statvfs(state.image.parent)
    except OSError as exc:
        return Check("free space", WARN, f"cannot stat the filesystem: {exc.strerror}", None)
    free = vfs.f_bavail * vfs.f_frsize
    estimate = snapshot_space_estimate(state.info) if state.info else 0
    verdict = space_verdict(free, estimate)
    details = {"free": free, "estimate": estimate, "filesystem": str(state.image.parent)}
    where = f"{_size(free)} free on {state.image.parent}"
    if verdict == FAIL:
        return Check("free space", FAIL, f"{where}; snapshots need at least {_size(MIN_FREE)}",
                     "free space (old snapshots: qsnap prune; docker system prune) or move the image",
                     details)
    if verdict == WARN:
        return Check("free space", WARN, f"{where}; the next snapshot may need about {_size(estimate)} "
                     "(largest VM state + an average snapshot's share of the data)",
                     "free space or prune old snapshots", details)
    return Check("free space", OK, where, None, details)


def _check_vm(state: _State) -> Check:
    assert state.image is not None
    state.processes = qemu_processes_using(state.image)
    state.record = read_run_record(state.image)
    details: dict[str, Any] = {"pids": [p for p, _ in state.processes]}
    parts = []
    record_pid = None
    if state.record is not None:
        try:
            record_pid = int(state.record.get("pid", 0))
        except (TypeError, ValueError):
            record_pid = 0
        details["qsnap_vm_pid"] = record_pid
        if record_pid and _pid_alive(record_pid):
            parts.append(f"qsnap-launched VM (pid {record_pid})")
        else:
            return Check("vm", WARN, f"a stale qsnap run record names pid {record_pid}, which is gone",
                         "'qsnap vm status' cleans it up", details)
    others = [p for p, _ in state.processes if p != record_pid]
    if others:
        parts.append("QEMU pid " + ", ".join(map(str, others)))
    if state.in_use and not parts:
        parts.append("a process that holds the image's write lock")
    if parts or state.in_use:
        return Check("vm", OK, "running: " + "; ".join(parts) + " (qsnap works through its monitor)",
                     None, {**details, "running": True})
    return Check("vm", OK, "not running (qsnap works offline with qemu-img)", None,
                 {**details, "running": False})


def _monitor_address(state: _State) -> tuple[Any, Check | None]:
    from qsnap.monitor.address import address_from, parse_address

    try:
        address = address_from(state.monitor_option, state.environ)
    except QsnapError as exc:
        return None, Check("monitor", FAIL, exc.message, exc.hint)
    if address is None and state.record and state.record.get("qmp_socket"):
        with contextlib.suppress(QsnapError):
            address = parse_address(f"unix:{state.record['qmp_socket']}", "qsnap vm run record")
    return address, None


def _check_monitor(state: _State) -> Check:
    address, error = _monitor_address(state)
    if error is not None:
        return error
    running = bool(state.in_use or state.processes)
    if address is None:
        if running:
            return Check("monitor", WARN, "a VM holds the image but no monitor is configured: qsnap "
                         "cannot snapshot it live", "pass --monitor ADDR or set QSNAP_MONITOR / MONITOR_PORT")
        return Check("monitor", OK, "none configured (not needed while the VM is stopped)")
    state.monitor = address
    reachable, why, greeting = probe(address)
    state.monitor_reachable = reachable
    if reachable:
        from qsnap.monitor.transport import detect_protocol

        state.monitor_protocol = detect_protocol(greeting)
        proto = (state.monitor_protocol or "unknown protocol").upper()
        return Check("monitor", OK, f"{address} ({address.source}) answers ({proto})", None,
                     {"address": str(address), "protocol": state.monitor_protocol})
    if running:
        return Check("monitor", FAIL, f"the VM runs but its monitor {address} ({address.source}) is not "
                     f"reachable: {why}", "check the address and port mapping (docker -p), or stop the VM "
                     "to work offline", {"address": str(address)})
    return Check("monitor", OK, f"{address} ({address.source}) not reachable ({why}); fine while the VM "
                 "is stopped", None, {"address": str(address)})


def _check_exposure(state: _State) -> Check:
    problems = []
    if state.monitor is not None and state.monitor.is_tcp:
        exposure = exposure_of(state.monitor.host)
        if exposure is not None:
            problems.append(f"configured monitor {state.monitor} is on {exposure}")
    argvs = list(state.processes)
    if state.record and isinstance(state.record.get("argv"), list):
        pid = state.record.get("pid")
        if not any(p == pid for p, _ in argvs):
            argvs.append((int(pid or 0), [str(a) for a in state.record["argv"]]))
    for pid, argv in argvs:
        for listener in exposed_monitors(argv):
            problems.append(f"QEMU pid {pid} listens with {listener}")
    if problems:
        return Check("monitor exposure", WARN, "; ".join(problems) + ": an unauthenticated monitor lets "
                     "anyone who reaches it run host commands (migrate exec:...)",
                     "bind the monitor to 127.0.0.1 (-monitor telnet:127.0.0.1:PORT,server,nowait) or use "
                     "a unix socket; in docker publish it as -p 127.0.0.1:PORT:PORT",
                     {"listeners": problems})
    return Check("monitor exposure", OK, "no monitor listens beyond loopback")


#: Where the guide's container (docker/entrypoint.sh) has QEMU's HMP monitor.
CONTAINER_MONITOR_PORT = 9999


def _check_container(spec: str, environ: Mapping[str, str]) -> list[Check]:
    """The compose service of ``--vm compose:SERVICE``: is its container running, and is its
    monitor port published for the host, on loopback only?"""
    from qsnap.vm.controllers import ComposeService, parse_compose

    service_name, compose_file = parse_compose(spec)
    service = ComposeService(service_name, compose_file, environ=environ)
    try:
        container = service.state()
    except QsnapError as exc:
        return [Check("container", FAIL, f"cannot ask docker about {service.name}: {exc.message}",
                      exc.hint or "check that docker runs (DOCKER_HOST) and the compose project")]
    if container is None:
        return [Check("container", WARN, f"{service.name} has no container (never created, or removed)",
                      "start it: docker-compose up -d (qsnap works offline meanwhile)")]
    details: dict[str, Any] = {"id": container.id[:12], "status": container.status, "health": container.health}
    checks = []
    if container.running:
        health = f", {container.health}" if container.health else ""
        verdict = WARN if container.health == "unhealthy" else OK
        checks.append(Check("container", verdict, f"{service.name} runs ({container.id[:12]}{health})",
                            "look at the guest: docker-compose logs; telnet to its serial port"
                            if verdict == WARN else None, details))
    else:
        checks.append(Check("container", WARN, f"{service.name} is stopped ({container.status}, exit code "
                            f"{container.exit_code}): qsnap works offline with qemu-img until it runs",
                            "start it: docker-compose up -d (or docker-compose start)", details))
    bindings = container.published(CONTAINER_MONITOR_PORT)
    details = {"monitor_bindings": [f"{h}:{p}" for h, p in bindings]}
    if not bindings:
        verdict = FAIL if container.running else WARN
        checks.append(Check("container monitor", verdict, f"the container's monitor port {CONTAINER_MONITOR_PORT} "
                            "is not published: qsnap on the host cannot reach QEMU (no live snapshots; changes "
                            "fail with exit 8 while it runs)",
                            f'publish it for the host only: ports: - "127.0.0.1:{CONTAINER_MONITOR_PORT}:'
                            f'{CONTAINER_MONITOR_PORT}" (then MONITOR_PORT={CONTAINER_MONITOR_PORT})', details))
        return checks
    exposed = [f"{h}:{p} (" + ("every network interface" if h in ("0.0.0.0", "::", "") else
                                "reachable from the network") + ")"
               for h, p in bindings if exposure_of(h) is not None]
    if exposed:
        checks.append(Check("container monitor", WARN, "the container's monitor is published on "
                            + ", ".join(exposed) + ": anyone who reaches it can run any QEMU command "
                            "(migrate exec:...) as the container's root",
                            f'publish it on loopback only: ports: - "127.0.0.1:PORT:{CONTAINER_MONITOR_PORT}"',
                            details))
        return checks
    ports = sorted({p for _, p in bindings})
    configured = environ.get("MONITOR_PORT", "").strip()
    if configured and configured.isdigit() and int(configured) not in ports:
        checks.append(Check("container monitor", WARN, f"MONITOR_PORT={configured}, but the container's monitor "
                            f"is published on port {', '.join(map(str, ports))}",
                            f"export MONITOR_PORT={ports[0]}", details))
        return checks
    checks.append(Check("container monitor", OK, "published on " + ", ".join(f"{h}:{p}" for h, p in bindings)
                        + " (host only)", None, details))
    return checks


def _check_snapshots(state: _State) -> list[Check]:
    info = state.info
    if info is None:
        return [Check("snapshots", SKIP, "qemu-img info could not read the image")]
    n = len(info.snapshots)
    checks = []
    if n > MAX_SNAPSHOTS:
        checks.append(Check("snapshots", WARN, f"{n} snapshots (more than {MAX_SNAPSHOTS} slows QEMU and "
                            "pins old data)", "qsnap prune --keep-last N (or --keep-daily 7 ...)",
                            {"count": n}))
    else:
        checks.append(Check("snapshots", OK, f"{n} snapshot{'s' if n != 1 else ''}", None, {"count": n}))
    vm_state = sum(s.vm_state_size for s in info.snapshots)
    details = {"file_size": info.file_size, "virtual_size": info.virtual_size,
               "allocated": info.actual_size, "vm_state_total": vm_state}
    found = (f"file {_size(info.file_size)}, allocated {_size(info.actual_size)}, virtual "
             f"{_size(info.virtual_size)}, VM states {_size(vm_state)}")
    # Every snapshot can pin at most one full copy of the disk; above that is growth
    # nothing accounts for (leaks, or a file grown by something else).
    ceiling = info.virtual_size * (n + 1) + vm_state + 64 * 1024**2
    if info.actual_size > ceiling:
        checks.append(Check("size", WARN, found + ": more than the disk and its snapshots can hold",
                            "run qsnap check; 'qemu-img check -r leaks' with the VM stopped", details))
    elif n and info.file_size > 2 * info.virtual_size + vm_state:
        checks.append(Check("size", WARN, found + ": snapshots pin old data",
                            "delete snapshots you no longer need (qsnap prune)", details))
    else:
        checks.append(Check("size", OK, found, None, details))
    checks.append(_check_accounting(state))
    return checks


def _check_accounting(state: _State) -> Check:
    """The file against what the qcow2 reader can account for (reachable from some L1 table)."""
    if state.image is None:
        return Check("accounting", SKIP, "no image")
    if state.in_use:
        return Check("accounting", SKIP, "a VM holds the image: its metadata on disk may lag behind QEMU's cache")
    from qsnap.core.errors import QsnapError
    from qsnap.service.space import account

    try:
        report = account(state.image)
    except QsnapError as exc:
        return Check("accounting", WARN, f"the qcow2 reader cannot account for the image: {exc}",
                     "run qsnap check")
    details = {"file_size": report.file_size, "allocated_bytes": report.allocated_bytes,
               "leaked_bytes": report.leaked_bytes, "unreferenced_bytes": report.unreferenced_bytes,
               "shared_bytes": report.shared_bytes}
    found = (f"{_size(report.allocated_bytes)} in use of a {_size(report.file_size)} file; "
             f"leaked {_size(report.leaked_bytes)}, free inside the file {_size(report.unreferenced_bytes)}")
    reclaimable = report.leaked_bytes + report.unreferenced_bytes  # service.compact.estimate_reclaimable
    details["reclaimable_bytes"] = reclaimable
    if report.leaked_bytes:
        return Check("accounting", WARN, found + ": clusters with a refcount that nothing references",
                     "with the VM stopped: qemu-img check -r leaks IMAGE, or 'qsnap compact' (reclaims "
                     "the free space inside the file too, keeping every snapshot)", details)
    if reclaimable > max(report.file_size // 10, 8 << 20):  # more than 10% (and 8 MiB)
        return Check("accounting", WARN, found + f": 'qsnap compact' would reclaim at least {_size(reclaimable)} "
                     f"({100 * reclaimable // max(1, report.file_size)}% of the file)",
                     "qsnap compact (keeps every snapshot; 'qsnap compact --dry-run' shows what it reclaims)",
                     details)
    return Check("accounting", OK, found, None, details)


def _partial_dirs(image: Path) -> list[Path]:
    base = image.parent
    dirs = [base]
    for name in ("backups", "backup"):
        top = base / name
        if top.is_dir():
            dirs.append(top)
            with contextlib.suppress(OSError):
                dirs += sorted(p for p in top.iterdir() if p.is_dir())
    return dirs


def _check_partials(state: _State) -> Check:
    assert state.image is not None
    now = time.time()
    stale: list[str] = []
    fresh: list[str] = []
    for directory in _partial_dirs(state.image):
        try:
            entries = list(directory.iterdir())
        except OSError:
            continue
        for path in entries:
            if not path.name.endswith(".partial"):
                continue
            try:
                age = now - path.stat().st_mtime
            except OSError:
                continue
            (stale if age > STALE_PARTIAL_AGE else fresh).append(str(path))
    details = {"stale": stale, "in_progress": fresh}
    if stale:
        return Check("partial files", WARN, f"{len(stale)} abandoned .partial file(s): {', '.join(stale)}",
                     "remove them (rm) once no backup is running", details)
    if fresh:
        return Check("partial files", OK, f"{len(fresh)} .partial file(s) being written now", None, details)
    return Check("partial files", OK, "no leftover .partial files", None, details)


def _check_jobs(state: _State) -> Check:
    if state.monitor is None or not state.monitor_reachable:
        return Check("jobs", SKIP, "no reachable monitor: cannot list QEMU jobs")
    if state.monitor_protocol != "qmp":
        return Check("jobs", SKIP, "the monitor speaks HMP: job listing needs QMP")
    try:
        jobs = qmp_query_jobs(state.monitor)
    except (OSError, ValueError, KeyError) as exc:
        return Check("jobs", WARN, f"query-jobs failed: {exc}", None)
    ours = [j for j in jobs if str(j.get("id", "")).startswith("qsnap-")]
    stale = []
    for job in ours:
        m = re.match(r"qsnap-[a-z]+-(\d+)-\d+$", str(job.get("id")))
        pid_gone = m is not None and not _pid_alive(int(m.group(1)))
        if pid_gone or job.get("status") in ("concluded", "null"):
            stale.append(f"{job.get('id')} ({job.get('status')})")
    details = {"jobs": ours}
    if stale:
        return Check("jobs", WARN, f"{len(stale)} stale qsnap job(s): {', '.join(stale)}",
                     "dismiss them via QMP: job-dismiss / job-cancel with the job id", details)
    return Check("jobs", OK, f"{len(ours)} qsnap job(s) running" if ours else "no qsnap jobs", None, details)


def doctor(image: str | os.PathLike[str] | None, ctx: Any = None) -> DoctorReport:
    """Run every check on IMAGE (None when no image could be found: image checks fail)."""
    from qsnap.service import snapshots as svc

    ctx = ctx or svc.DEFAULT_CONTEXT
    path = None if image is None else Path(image).absolute()
    state = _State(path, ctx.env(), ctx.monitor)
    checks = [_check_qemu_img()]
    image_checks = _check_image(state)
    checks += image_checks
    image_ok = image_checks[0].status == OK
    if image_ok and path is not None:
        checks.append(_check_qemu_img_check(state))
        _read_info(state)
        checks.append(_check_free_space(state))
        checks.append(_check_vm(state))
        checks.append(_check_monitor(state))
        checks.append(_check_exposure(state))
        if (getattr(ctx, "vm", None) or "").startswith("compose:"):
            checks += _check_container(ctx.vm, state.environ)
        checks += _check_snapshots(state)
        checks.append(_check_partials(state))
        checks.append(_check_jobs(state))
    else:
        checks.append(_check_monitor(state))
        checks.append(_check_exposure(state))
    return DoctorReport(path, tuple(checks))
