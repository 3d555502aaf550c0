"""`qsnap doctor`: each check's ok / warn / fail path on real images and a real QEMU."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ops_testlib import clean_environ, create_snapshots, free_port, make_image, qemu_img, run_cli

from qsnap.service.doctor import FAIL, OK, WARN, exposed_monitors, space_verdict


def doctor_json(image: Path, **env: str) -> tuple[int, dict[str, dict[str, object]]]:
    r = run_cli(["-i", str(image), "doctor", "--json"], clean_environ(**env))
    data = json.loads(r.out)
    return r.code, {c["check"]: c for c in data["checks"]}


def files_unchanged(image: Path) -> Callable[[], None]:
    """Snapshot of the image directory; calling the result asserts nothing changed."""
    def state() -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in image.parent.iterdir()}

    before = state()

    def check() -> None:
        assert state() == before

    return check


def test_healthy_image_passes_and_doctor_changes_nothing(image: Path) -> None:
    create_snapshots(image, ["a", "b"])
    unchanged = files_unchanged(image)
    code, checks = doctor_json(image)
    assert code == 0
    assert {name: c["status"] for name, c in checks.items()} == {
        "qemu-img": OK, "image": OK, "access": OK, "permissions": OK, "qemu-img check": OK,
        "free space": OK, "vm": OK, "monitor": OK, "monitor exposure": OK, "snapshots": OK, "size": OK,
        "accounting": OK, "partial files": OK, "jobs": "skip"}
    assert checks["qemu-img"]["found"].startswith("qemu-img 7.")  # type: ignore[union-attr]
    assert "not running" in checks["vm"]["found"]  # type: ignore[operator]
    unchanged()


def test_world_readable_image_is_a_warning_with_the_fix(image: Path) -> None:
    os.chmod(image, 0o644)
    r = run_cli(["-i", str(image), "doctor"], clean_environ())
    assert r.code == 0  # a warning is not a failure
    assert "WARN  permissions" in r.out
    assert f"fix: chmod 600 {image}" in r.out


def test_read_only_image_fails(image: Path) -> None:
    os.chmod(image, 0o400)
    code, checks = doctor_json(image)
    assert code == 1
    assert checks["access"]["status"] == FAIL
    assert "read-only" in checks["access"]["found"]  # type: ignore[operator]


def _corrupt_refcount_of_first_data_cluster(path: Path) -> None:
    """Zero the refcount of the cluster that holds guest offset 0 (a 'refcount=0 reference=1'
    corruption qemu-img check reports)."""
    with open(path, "r+b") as f:
        header = f.read(104)
        cluster_bits = struct.unpack(">I", header[20:24])[0]
        l1_offset = struct.unpack(">Q", header[40:48])[0]
        refcount_table = struct.unpack(">Q", header[48:56])[0]
        refcount_order = struct.unpack(">I", header[96:100])[0]
        assert refcount_order == 4  # 16-bit refcounts, the default
        f.seek(l1_offset)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2)
        data = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        assert data
        f.seek(refcount_table)
        block = struct.unpack(">Q", f.read(8))[0]
        f.seek(block + 2 * (data >> cluster_bits))
        f.write(b"\0\0")


def test_corrupted_image_fails_the_check(image: Path) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(image)], check=True,
                   capture_output=True)
    _corrupt_refcount_of_first_data_cluster(image)
    assert subprocess.run(["qemu-img", "check", str(image)], capture_output=True).returncode == 2
    code, checks = doctor_json(image)
    assert code == 1
    assert checks["qemu-img check"]["status"] == FAIL
    assert "corrupt" in checks["qemu-img check"]["found"]  # type: ignore[operator]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (needs root), unmounted in teardown."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True,
                   capture_output=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True, capture_output=True)


def test_nearly_full_filesystem_fails_free_space(small_tmpfs: Path) -> None:
    image = make_image(small_tmpfs / "disk.qcow2", "1M")
    code, checks = doctor_json(image)
    assert code == 1
    assert checks["free space"]["status"] == FAIL
    assert "at least 1.0 GiB" in checks["free space"]["found"]  # type: ignore[operator]


def test_space_verdicts() -> None:
    gib = 1024**3
    assert space_verdict(gib - 1, 0) == FAIL
    assert space_verdict(5 * gib, 6 * gib) == WARN
    assert space_verdict(5 * gib, 4 * gib) == OK


def test_not_an_image_and_missing_image_fail(tmp_path: Path) -> None:
    text = tmp_path / "notes.qcow2"
    text.write_text("hello\n")
    code, checks = doctor_json(text)
    assert code == 1 and checks["image"]["status"] == FAIL
    assert checks["qemu-img"]["status"] == OK  # the other checks still ran
    code, checks = doctor_json(tmp_path / "missing.qcow2")
    assert code == 1 and "not found" in checks["image"]["found"]  # type: ignore[operator]


def test_many_snapshots_and_stale_partials_warn(image: Path) -> None:
    create_snapshots(image, [f"s{n}" for n in range(21)])
    backups = image.parent / "backups" / "2024-05"
    backups.mkdir(parents=True)
    stale = backups / "s1.qcow2.partial"
    stale.write_bytes(b"x")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    fresh = image.parent / "s2.qcow2.partial"
    fresh.write_bytes(b"x")
    code, checks = doctor_json(image)
    assert code == 0
    assert checks["snapshots"]["status"] == WARN and "21 snapshots" in checks["snapshots"]["found"]  # type: ignore[operator]
    assert checks["partial files"]["status"] == WARN
    assert checks["partial files"]["details"] == {"stale": [str(stale)], "in_progress": [str(fresh)]}


def test_configured_monitor_of_a_stopped_vm_is_fine_a_bad_address_fails(image: Path) -> None:
    code, checks = doctor_json(image, QSNAP_MONITOR=f"tcp:127.0.0.1:{free_port()}")
    assert code == 0 and checks["monitor"]["status"] == OK
    assert "not reachable" in checks["monitor"]["found"]  # type: ignore[operator]
    code, checks = doctor_json(image, MONITOR_PORT="notaport")
    assert code == 1 and checks["monitor"]["status"] == FAIL


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"QEMU did not listen on {port}")


def _wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        time.sleep(0.05)
    assert path.exists()


def test_monitor_on_all_interfaces_is_flagged(image: Path, qemu_factory: Callable[..., subprocess.Popen[bytes]],
                                              tmp_path: Path) -> None:
    port = free_port()
    qmp = tmp_path / "qmp.sock"
    proc = qemu_factory([
        "-drive", f"file={image},format=qcow2,if=none,id=d0,node-name=disk0",
        "-monitor", f"tcp:0.0.0.0:{port},server=on,wait=off",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ])
    _wait_listening(port, proc)
    _wait_socket(qmp, proc)
    code, checks = doctor_json(image, QSNAP_MONITOR=f"tcp:0.0.0.0:{port}")
    assert code == 0
    assert checks["vm"]["status"] == OK and proc.pid in checks["vm"]["details"]["pids"]  # type: ignore[index]
    assert "running" in checks["vm"]["found"]  # type: ignore[operator]
    # The VM holds the write lock: the check had to read with force-share, and says so.
    assert checks["qemu-img check"]["found"].startswith("clean (read with -U")  # type: ignore[union-attr]
    assert checks["monitor"]["status"] == OK and "HMP" in checks["monitor"]["found"]  # type: ignore[operator]
    exposure = checks["monitor exposure"]
    assert exposure["status"] == WARN
    found = str(exposure["found"])
    assert f"configured monitor tcp:0.0.0.0:{port}" in found
    assert f"QEMU pid {proc.pid} listens with -monitor tcp:0.0.0.0:{port}" in found
    assert checks["jobs"]["status"] == "skip"

    # Through QMP, doctor lists jobs: a concluded job left by a qsnap that died is stale.
    code, checks = doctor_json(image, QSNAP_MONITOR=f"unix:{qmp}")
    assert checks["jobs"]["status"] == OK and checks["jobs"]["found"] == "no qsnap jobs"
    _leave_concluded_job(qmp, "qsnap-save-999999-1")
    code, checks = doctor_json(image, QSNAP_MONITOR=f"unix:{qmp}")
    assert code == 0
    assert checks["jobs"]["status"] == WARN and "qsnap-save-999999-1" in checks["jobs"]["found"]  # type: ignore[operator]
    assert proc.poll() is None  # doctor did not disturb the VM


def _leave_concluded_job(qmp: Path, job_id: str) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(qmp))
        reader = sock.makefile("rb")
        reader.readline()

        def cmd(name: str, **args: object) -> dict[str, object]:
            sock.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
            while True:
                message = json.loads(reader.readline())
                if "return" in message or "error" in message:
                    return dict(message)

        cmd("qmp_capabilities")
        assert "return" in cmd("snapshot-save", **{"job-id": job_id, "tag": "left-behind",
                                                  "vmstate": "disk0", "devices": ["disk0"]})
        for _ in range(200):
            jobs = cmd("query-jobs")["return"]
            if any(j["id"] == job_id and j["status"] == "concluded" for j in jobs):  # type: ignore[union-attr,index]
                return
            time.sleep(0.05)
        raise AssertionError("the job did not conclude")


def test_vm_holding_the_image_without_a_monitor_is_a_warning(
        image: Path, qemu_factory: Callable[..., subprocess.Popen[bytes]], tmp_path: Path) -> None:
    qmp = tmp_path / "q.sock"
    proc = qemu_factory(["-drive", f"file={image},format=qcow2,if=none,id=d0",
                         "-qmp", f"unix:{qmp},server=on,wait=off"])
    _wait_socket(qmp, proc)
    code, checks = doctor_json(image)
    assert checks["monitor"]["status"] == WARN and "no monitor is configured" in checks["monitor"]["found"]  # type: ignore[operator]
    assert checks["monitor exposure"]["status"] == OK
    assert code == 0


@pytest.mark.parametrize(("argv", "expected"), [
    (["qemu-system-x86_64", "-monitor", "telnet:0.0.0.0:9999,server,nowait"], 1),
    (["qemu-system-x86_64", "-monitor", "telnet:127.0.0.1:9999,server,nowait"], 0),
    (["qemu-system-x86_64", "-qmp", "tcp::4444,server=on"], 1),
    (["qemu-system-x86_64", "-qmp", "tcp:[::1]:4444,server=on"], 0),
    (["qemu-system-x86_64", "-chardev", "socket,id=m,host=192.168.1.5,port=4,server=on", "-mon", "chardev=m"], 1),
    (["qemu-system-x86_64", "-chardev", "socket,id=s,host=0.0.0.0,port=4,server=on", "-serial", "chardev:s"], 0),
    (["qemu-system-x86_64", "-monitor", "unix:/run/m.sock,server"], 0),
])
def test_exposed_monitors_in_command_lines(argv: list[str], expected: int) -> None:
    assert len(exposed_monitors(argv)) == expected


def test_doctor_healthy_image_text(image: Path) -> None:
    qemu_img("snapshot", "-c", "only", image)
    r = run_cli(["-i", str(image), "doctor"], clean_environ())
    assert r.code == 0
    assert "0 failed, 0 warnings" in r.out


def _leak_one_cluster(path: Path) -> None:
    """Append a cluster to the file and give it refcount 1 with nothing pointing at it: the
    'leaked cluster' qemu-img check reports (exit 3)."""
    with open(path, "r+b") as f:
        header = f.read(104)
        cluster_bits = struct.unpack(">I", header[20:24])[0]
        refcount_table = struct.unpack(">Q", header[48:56])[0]
        f.seek(0, os.SEEK_END)
        end = f.tell()
        cluster = 1 << cluster_bits
        index = (end + cluster - 1) // cluster
        f.truncate(index * cluster + cluster)
        f.seek(refcount_table)
        block = struct.unpack(">Q", f.read(8))[0]
        f.seek(block + 2 * index)
        f.write(struct.pack(">H", 1))


def test_reader_accounting_finds_leaked_clusters(image: Path) -> None:
    code, checks = doctor_json(image)
    assert checks["accounting"]["status"] == OK
    _leak_one_cluster(image)
    checked = subprocess.run(["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True)
    assert json.loads(checked.stdout)["leaks"] == 1  # the oracle agrees there is one leak
    code, checks = doctor_json(image)
    assert code == 0  # leaks waste space, they lose nothing: a warning, not a failure
    assert checks["accounting"]["status"] == WARN
    assert "qemu-img check -r leaks" in str(checks["accounting"]["fix"])
    assert checks["accounting"]["details"]["leaked_bytes"] == 65536  # type: ignore[index]
