"""Concurrent qsnap invocations on one image serialize on a lock file; every mutating operation
appends one JSON line to `<image>.qsnap-audit.log` (mode 0600)."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qsnap_testlib import (
    QSNAP,
    clean_environ,
    fingerprint,
    make_image,
    one_error_line,
    qemu_img,
    qsnap_main,
    run_qsnap,
    snapshot_names,
)

from qsnap.service.lock import lock_path


@contextmanager
def holding_lock(image: Path, holder: str = "pid 4242: test holds the lock") -> Iterator[None]:
    fd = os.open(lock_path(image), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
        yield
    finally:
        os.close(fd)


def audit_records(image: Path) -> list[dict]:
    log = image.with_name(image.name + ".qsnap-audit.log")
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_a_second_invocation_waits_for_the_first(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    with holding_lock(image):
        waiting = subprocess.Popen([str(QSNAP), "-i", str(image), "create", "X"], env=clean_environ(),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        try:
            time.sleep(1.0)
            assert waiting.poll() is None, "qsnap must wait while another holds the image lock"
            assert snapshot_names(image) == ["A"]
        except BaseException:
            waiting.kill()
            waiting.wait()
            raise
    _out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert snapshot_names(image) == ["A", "X"]


def test_concurrent_creates_both_succeed(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    procs = [subprocess.Popen([str(QSNAP), "-i", str(image), "create", name, "-m", f"by {name}"],
                              env=clean_environ(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for name in ("left", "right", "middle")]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert sorted(snapshot_names(image)) == ["left", "middle", "right"]
    assert qemu_img("check", str(image), check=False).returncode == 0
    listed = json.loads(qsnap_main(["-i", image, "list", "--json"]).out)["snapshots"]
    assert {s["name"]: s["description"] for s in listed} == {
        "left": "by left", "right": "by right", "middle": "by middle"}


def test_lock_timeout_exits_8_naming_the_holder(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    before = fingerprint(image)
    with holding_lock(image):
        rc, _, err = run_qsnap("-i", image, "create", "X", env={"QSNAP_LOCK_TIMEOUT": "0.5"})
    assert rc == 8
    line = one_error_line(err)
    assert "pid 4242" in line
    assert fingerprint(image) == before


def test_the_lock_is_not_the_image_and_reading_does_not_wait(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    assert lock_path(image) != image
    with holding_lock(image):
        rc, out, _ = run_qsnap("-i", image, "list", env={"QSNAP_LOCK_TIMEOUT": "0.5"})
    assert rc == 0 and "A" in out


def test_audit_log_has_one_json_line_per_mutation(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    assert qsnap_main(["-i", image, "create", "A"]).rc == 0
    assert qsnap_main(["-i", image, "create", "B"]).rc == 0
    assert qsnap_main(["-i", image, "restore", "A"]).rc == 0
    assert qsnap_main(["-i", image, "delete", "B"]).rc == 0
    for argv in (["list"], ["list", "--json"], ["info"], ["check"]):
        assert qsnap_main(["-i", image, *argv]).rc == 0
    log = image.with_name(image.name + ".qsnap-audit.log")
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    records = audit_records(image)
    assert [(r["operation"], r["snapshot"], r["result"]) for r in records] == [
        ("create", "A", "ok"), ("create", "B", "ok"), ("restore", "A", "ok"), ("delete", "B", "ok")]
    for record in records:
        assert record["image"] == str(image)
        assert record["engine"] == "qemu-img"
        assert record["time"] and record["user"]
    assert records[2].get("safety_snapshot", "").startswith("pre-restore-")


def test_audit_log_records_failed_mutations(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    assert qsnap_main(["-i", image, "create", "A"]).rc == 4
    records = audit_records(image)
    assert len(records) == 1
    assert records[0]["operation"] == "create" and records[0]["result"] == "error"
    assert "already exists" in records[0]["error"]


def test_audit_log_through_the_guide_cli(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    assert run_qsnap("-i", image, "create", "A").rc == 0
    from qsnap_testlib import run_guide

    assert run_guide("-i", image, "create", "B").rc == 0
    assert [r["snapshot"] for r in audit_records(image)] == ["A", "B"]
