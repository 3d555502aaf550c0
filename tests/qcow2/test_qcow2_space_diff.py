"""Space accounting against real `qemu-img snapshot -d`, and block diff against known writes."""

from __future__ import annotations

import io as textio
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qcow2_oracle import (
    create,
    io,
    qemu_check,
    qemu_sha256,
    qemu_snapshots,
    reader_sha256,
    run,
    snapshot,
    without_disk_size,
)

from qsnap.cli.render_space import render_diff, render_space
from qsnap.qcow2 import open_image
from qsnap.service.diff import diff
from qsnap.service.space import account

CLUSTER = 65536


def data_clusters(path: Path, cluster_size: int) -> set[int]:
    """Indices of clusters holding any allocated file block (SEEK_DATA / SEEK_HOLE)."""
    found: set[int] = set()
    for start, end in data_extents(path):
        found.update(range(start // cluster_size, (end - 1) // cluster_size + 1))
    return found


def allocated_in(extents: list[tuple[int, int]], clusters: set[int], cluster_size: int) -> int:
    """Bytes the filesystem has allocated inside CLUSTERS."""
    total = 0
    for start, end in extents:
        for c in range(start // cluster_size, (end - 1) // cluster_size + 1):
            if c in clusters:
                total += min(end, (c + 1) * cluster_size) - max(start, c * cluster_size)
    return total


def data_extents(path: Path) -> list[tuple[int, int]]:
    found: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            found.append((start, -(-end // 4096) * 4096))  # the tail block is allocated whole
            pos = end
    finally:
        os.close(fd)
    return found


def snapshot_table_clusters(path: Path, cluster_size: int) -> set[int]:
    """Where the header says the snapshot table is (header bytes 60-71), read with struct."""
    with open(path, "rb") as f:
        head = f.read(72)
    count = int.from_bytes(head[60:64], "big")
    offset = int.from_bytes(head[64:72], "big")
    if not count:
        return set()
    size = 0
    with open(path, "rb") as f:
        for _ in range(count):
            size = (size + 7) & ~7
            f.seek(offset + size)
            entry = f.read(40)
            id_len, name_len = int.from_bytes(entry[12:14], "big"), int.from_bytes(entry[14:16], "big")
            size += 40 + int.from_bytes(entry[36:40], "big") + id_len + name_len
    return set(range(offset // cluster_size, (offset + size - 1) // cluster_size + 1))


def build(path: Path) -> None:
    """Three snapshots with data that only each holds, data they share, and the current state."""
    if path.exists():
        path.unlink()
    create(path, "64M")
    io(path, "write -P 0x10 0 4M", "write -P 0x11 40M 1M")
    snapshot(path, "base")
    io(path, "write -P 0x20 0 1M", "write -P 0x21 20M 2M")  # 20M: only 'middle' and later
    snapshot(path, "middle")
    io(path, "write -P 0x30 20M 512k", "write -P 0x31 1M 64k", "discard 40M 1M")
    snapshot(path, "late")
    io(path, "write -P 0x40 21M 1M", "write -P 0x41 0 64k")


def test_deleting_a_snapshot_frees_exactly_what_was_promised(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    build(path)
    report = account(path)
    assert report.leaked_clusters == 0
    assert [s.name for s in report.snapshots] == ["base", "middle", "late"]
    assert all(s.exclusive_bytes > 0 for s in report.snapshots)
    for promised in report.snapshots:
        build(path)
        before_blocks = os.stat(path).st_blocks * 512
        before_map = data_extents(path)
        before = data_clusters(path, CLUSTER)
        old_table = snapshot_table_clusters(path, CLUSTER)
        run("qemu-img", "snapshot", "-d", promised.name, path)
        after_blocks = os.stat(path).st_blocks * 512
        after_map = data_extents(path)
        after = data_clusters(path, CLUSTER)
        new_table = snapshot_table_clusters(path, CLUSTER)
        freed = before - after - old_table
        assert len(freed) * CLUSTER == promised.exclusive_bytes, promised
        assert after - before <= new_table  # the only new allocation: the rewritten snapshot table
        # st_blocks counts filesystem blocks: a freed cluster gives back what was written in
        # it (a snapshot's 8-byte L1 table occupies one 4 KiB block of its cluster).
        gone = before - after
        expected_drop = allocated_in(before_map, gone, CLUSTER) - allocated_in(after_map, after - before, CLUSTER)
        assert before_blocks - after_blocks == expected_drop
        assert expected_drop <= promised.exclusive_bytes + len(old_table) * CLUSTER
        check = qemu_check(path)
        assert check.get("leaks", 0) == 0 and check.get("corruptions", 0) == 0
        remaining = account(path)
        assert remaining.leaked_clusters == 0


def test_space_report_renders_as_table_and_bar_chart(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    build(path)
    report = account(path)
    plain = textio.StringIO()
    render_space(report, plain, tty=False, width=80)
    assert "middle" in plain.getvalue() and "█" not in plain.getvalue()
    tty = textio.StringIO()
    render_space(report, tty, tty=True, width=80)
    bars = [line for line in tty.getvalue().splitlines() if "█" in line]
    assert len(bars) == 3
    assert json.loads(json.dumps(report.to_json()))["snapshots"][1]["name"] == "middle"


def test_diff_reports_exactly_the_written_ranges(tmp_path: Path) -> None:
    path = create(tmp_path / "disk.qcow2", "32M")
    io(path, "write -P 0x11 0 8M")
    snapshot(path, "before")
    io(path, "write -P 0x22 4096 8192", "write -P 0x23 1M 100k", "write -P 0x24 12M 3M", "write -P 0x25 31M 512")
    snapshot(path, "after")
    with open_image(path) as image:
        before, after = image.snapshots()
    report = diff(path, before, after)
    assert report.ranges == ((4096, 8192), (1 << 20, 100 << 10), (12 << 20, 3 << 20), (31 << 20, 512))
    assert report.changed_bytes == 8192 + (100 << 10) + (3 << 20) + 512
    assert diff(path, after, None).identical
    assert diff(path, before, None).ranges == report.ranges
    out = textio.StringIO()
    render_diff(report, out)
    assert "0x1000" in out.getvalue() and "4 ranges" in out.getvalue()
    assert report.to_json()["ranges"][0] == {"offset": 4096, "length": 8192}


def test_identical_snapshots_and_same_content_rewrites_report_nothing(tmp_path: Path) -> None:
    path = create(tmp_path / "disk.qcow2", "16M")
    io(path, "write -P 0x11 0 4M")
    snapshot(path, "one")
    snapshot(path, "two")
    io(path, "write -P 0x11 0 4M")  # rewrites every cluster with the same bytes
    snapshot(path, "three")
    with open_image(path) as image:
        one, two, three = image.snapshots()
    same = diff(path, one, two)
    assert same.identical and same.tables_compared == 0
    rewrite = diff(path, one, three)
    assert rewrite.identical and rewrite.clusters_compared > 0  # pointers differ, bytes do not


def test_diff_of_compressed_and_zeroed_clusters(tmp_path: Path) -> None:
    source = create(tmp_path / "source.qcow2", "8M")
    io(source, "write -P 0x51 0 2M")
    path = tmp_path / "disk.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", source, path)
    snapshot(path, "packed")
    io(path, "write -P 0x51 0 64k", "write -z 1M 64k", "write -z 4M 64k")  # same, zeroed, already zero
    with open_image(path) as image:
        (packed,) = image.snapshots()
    assert diff(path, packed, None).ranges == ((1 << 20, 65536),)


# ---------------------------------------------------------------- a snapshot with VM state


def _accel() -> str:
    return "tcg" if os.path.exists("/sys/module/kvm_pvm") or not os.path.exists("/dev/kvm") else "kvm:tcg"


def _qmp(sock: socket.socket, command: str, **arguments: object) -> dict[str, object]:
    sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
    buffer = b""
    while True:
        chunk = sock.recv(65536)
        assert chunk, "QEMU closed the monitor"
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            reply: dict[str, object] = json.loads(line)
            if "return" in reply or "error" in reply:
                return reply


@pytest.fixture
def vm_snapshot_image(tmp_path: Path) -> Iterator[Path]:
    """An image holding a live `savevm` snapshot (with VM state), taken by a short-lived QEMU."""
    path = create(tmp_path / "vm.qcow2", "16M")
    io(path, "write -P 0x61 0 2M")
    sock_path = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64", "-machine", f"pc,accel={_accel()}", "-m", "64", "-nodefaults",
            "-display", "none", "-S", "-qmp", f"unix:{sock_path},server=on,wait=off",
            "-drive", f"file={path},if=virtio,format=qcow2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock_path.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "QEMU did not create its QMP socket"
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(60)
            sock.connect(str(sock_path))
            sock.recv(65536)  # greeting
            assert "return" in _qmp(sock, "qmp_capabilities")
            reply = _qmp(sock, "human-monitor-command", **{"command-line": "savevm live1"})
            assert reply.get("return") == "", reply
            _qmp(sock, "quit")
        proc.wait(timeout=30)
        yield path
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.vm
def test_snapshot_with_vm_state_lists_reads_and_accounts_like_qemu(vm_snapshot_image: Path, tmp_path: Path) -> None:
    path = vm_snapshot_image
    io(path, "write -P 0x62 0 1M")
    snapshot(path, "disk-only")
    with open_image(path) as image:
        snaps = image.snapshots()
        assert without_disk_size(snaps) == qemu_snapshots(path)
        live = snaps[0]
        assert live.vm_state_size > 0 and snaps[1].vm_state_size == 0
        assert reader_sha256(image, live) == qemu_sha256(path, live.id, tmp_path)
    report = account(path)
    live_space = report.snapshots[0]
    assert live_space.vm_state_size == live.vm_state_size
    before = data_clusters(path, CLUSTER)
    old_table = snapshot_table_clusters(path, CLUSTER)
    run("qemu-img", "snapshot", "-d", "live1", path)
    freed = data_clusters(path, CLUSTER)
    assert len(before - freed - old_table) * CLUSTER == live_space.exclusive_bytes
    assert live_space.exclusive_bytes >= 1 << 20  # its own 1 MiB of disk plus its VM state
    assert qemu_check(path).get("leaks", 0) == 0
