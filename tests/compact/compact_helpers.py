"""Helpers for the compact tests: images with history made by the real qemu-img/qemu-io, and
the checks that a compacted image holds exactly what the original held (QEMU as the oracle)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from qsnap_testlib import qemu_img, qemu_io

from qsnap.qcow2 import open_image


def info(path: Path) -> dict[str, Any]:
    return dict(json.loads(qemu_img("info", "-U", "-f", "qcow2", "--output=json", str(path)).stdout))


def snapshot_records(path: Path) -> list[dict[str, Any]]:
    """Every snapshot as qemu-img reports it: id, name, dates, VM clock, icount, VM state size."""
    return list(info(path).get("snapshots", []))


def check_clean(path: Path) -> dict[str, Any]:
    done = subprocess.run(["qemu-img", "check", "-f", "qcow2", "--output=json", str(path)],
                          capture_output=True, text=True)
    report = dict(json.loads(done.stdout))
    assert done.returncode == 0, report
    assert not report.get("corruptions") and not report.get("leaks"), report
    return report


def assert_same_images(original: Path, compacted: Path, work: Path) -> None:
    """Same snapshots (qemu-img's view of every field), same guest data for every snapshot (via
    `qemu-img convert -l snapshot.id=` to raw, then `qemu-img compare`) and the current state
    (`qemu-img compare`), same VM state bytes, same qcow2 settings."""
    a, b = info(original), info(compacted)
    assert snapshot_records(compacted) == snapshot_records(original)
    for key in ("virtual-size", "cluster-size"):
        assert a[key] == b[key], key
    fa, fb = a["format-specific"]["data"], b["format-specific"]["data"]
    for key in ("compat", "compression-type", "extended-l2", "refcount-bits"):
        assert fa.get(key) == fb.get(key), key
    assert a.get("backing-filename") == b.get("backing-filename")
    work.mkdir(exist_ok=True)
    for snap in a.get("snapshots", []):
        raws = []
        for src, tag in ((original, "a"), (compacted, "b")):
            out = work / f"{tag}-{snap['id']}.raw"
            qemu_img("convert", "-U", "-f", "qcow2", "-O", "raw", "-l", f"snapshot.id={snap['id']}", str(src), str(out))
            raws.append(out)
        done = qemu_img("compare", "-f", "raw", "-F", "raw", str(raws[0]), str(raws[1]), check=False)
        assert done.returncode == 0, f"snapshot {snap['id']}: {done.stdout}{done.stderr}"
        for r in raws:
            r.unlink()
    done = qemu_img("compare", "-U", "-f", "qcow2", "-F", "qcow2", str(original), str(compacted), check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    with open_image(original) as ia, open_image(compacted) as ib:
        for ea, eb in zip(ia.snapshot_entries(), ib.snapshot_entries(), strict=True):
            assert ea.vm_state_size == eb.vm_state_size
            if ea.vm_state_size:
                assert ia.read_vm_state(ea, 0, ea.vm_state_size) == ib.read_vm_state(eb, 0, eb.vm_state_size)


def history(path: Path, *, size: str = "64M", options: str = "", compressed: bool = False,
            backing: Path | None = None) -> Path:
    """An image with a history: snapshots by `qemu-img snapshot -c`, overwrites, zeroed ranges,
    data clusters holding only zeros, a deleted snapshot (freed clusters), compressed clusters."""
    args = ["create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", options]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    qemu_img(*args, str(path), size)
    io = [
        ("write -P 0x11 0 4M", "write -P 0x12 8M 1M"),
        ("write -P 0x21 1M 1M", "write -z 2M 512k", "write -P 0 12M 1M"),  # zeros stored as data
        ("write -P 0x31 16M 2M", "write -P 0x32 0 64k"),
        ("write -P 0x41 20M 1M", "discard 8M 1M"),
        ("write -P 0x51 3M 256k",),
    ]
    if compressed:
        io[2] = (*io[2], "write -c -P 0x33 24M 1M")
    for k, cmds in enumerate(io):
        for cmd in cmds:
            qemu_io(path, cmd)
        qemu_img("snapshot", "-c", f"snap-{k + 1}", str(path))
    qemu_img("snapshot", "-d", "snap-2", str(path))  # its exclusive clusters are freed
    qemu_io(path, "write -P 0x61 5M 512k")
    return path


def copy(path: Path, to: Path) -> Path:
    shutil.copy2(path, to)
    return to


def wait_job(side: Any, job_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in side.cmd("query-jobs"):
            if job["id"] == job_id and job["status"] == "concluded":
                side.cmd("job-dismiss", id=job_id)
                assert "error" not in job, job
                return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not conclude")


def qcow2_node(side: Any) -> str:
    nodes = side.cmd("query-named-block-nodes")
    return str(next(n["node-name"] for n in nodes if n["drv"] == "qcow2"))
