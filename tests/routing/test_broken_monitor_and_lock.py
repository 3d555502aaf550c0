"""Monitors that hang or hang up, and the per-image lock, through the real ``qsnap`` command.

What a user should see (decided with the routing code):
- a configured monitor that never greets, for an image no VM holds: qsnap works offline
  (qemu-img) — nothing is at risk and the image is free;
- a configured monitor that never greets while a VM holds the image (e.g. someone's telnet
  session occupies QEMU's single HMP connection): exit 12 "sent no greeting", as
  docs/monitor.md promises — not exit 8 telling the user to configure the monitor they did;
- a monitor that greets and then never answers: exit 12 within the command timeout;
- a monitor connection that dies in the middle of a mutation: exit 12, image untouched;
- the lock: concurrent invocations on one image run one after the other; a waiter gives up
  after QSNAP_LOCK_TIMEOUT with exit 8 naming the holder.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qsnap_testlib import fingerprint, make_image

from qsnap.service.lock import lock_path

from .conftest import VM, CuttingProxy, FakeMonitor, offline_snapshots, run_qsnap

pytestmark = pytest.mark.vm

BOUND = 60  # seconds: a hang guard for the subprocess, not a timing assertion


def test_silent_monitor_for_a_free_image_falls_back_to_qemu_img(
    fake_monitor: Callable[[str], FakeMonitor], tmp_path: Path
) -> None:
    image = make_image(tmp_path)
    fake = fake_monitor("silent")
    rc, out, err = run_qsnap("-i", image, "--monitor", fake.address, "create", "A", timeout=BOUND)
    assert rc == 0, err
    assert "via qemu-img" in out
    assert [n for _, n, _ in offline_snapshots(image)] == ["A"]


@pytest.fixture
def occupied_hmp(start_vm: Callable[..., VM]) -> Iterator[VM]:
    """A VM whose single HMP telnet connection is held by another client (a user's telnet)."""
    vm = start_vm("hmp-telnet")
    assert vm.port is not None
    with socket.create_connection(("127.0.0.1", vm.port), timeout=10) as user:
        data = b""
        while b"(qemu)" not in data:
            data += user.recv(4096)
        yield vm


def test_configured_monitor_that_never_greets_while_vm_holds_image_is_exit_12(occupied_hmp: VM) -> None:
    vm = occupied_hmp
    before = vm.snapshots()
    assert vm.address is not None
    rc, _out, err = run_qsnap("-i", vm.drives[0], "--monitor", vm.address, "create", "A", timeout=BOUND)
    assert vm.snapshots() == before
    assert rc == 12, err
    assert vm.address in err and "greeting" in err


def test_hanging_monitor_is_exit_12_and_holds_the_lock_meanwhile(
    fake_monitor: Callable[[str], FakeMonitor], spawn_qsnap: Callable[..., subprocess.Popen[str]],
    tmp_path: Path,
) -> None:
    """A monitor that greets like HMP and never answers a command: the first qsnap waits for
    its command timeout, holding the image lock; a second one gives up after
    QSNAP_LOCK_TIMEOUT naming the first; the first ends with exit 12, image untouched."""
    image = make_image(tmp_path, snapshots=["A"])
    # Something must hold the image the way a running QEMU does (qsnap only asks a monitor
    # about an image that some QEMU has open): an interactive qemu-io keeps it open and locked.
    holder = subprocess.Popen(["qemu-io", str(image)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        _hanging_monitor_case(image, fake_monitor, spawn_qsnap)
    finally:
        holder.kill()
        holder.wait()


def _hanging_monitor_case(
    image: Path, fake_monitor: Callable[[str], FakeMonitor], spawn_qsnap: Callable[..., subprocess.Popen[str]]
) -> None:
    time.sleep(0.3)  # let qemu-io open and lock the image
    print_before = fingerprint(image)
    fake = fake_monitor("hmp-hang")
    first = spawn_qsnap("-i", image, "--monitor", fake.address, "create", "B")
    deadline = time.monotonic() + 10
    while not fake.received and time.monotonic() < deadline:  # it is talking to the monitor now
        time.sleep(0.02)
    assert fake.received, "qsnap never sent a command to the monitor"

    rc, _out, err = run_qsnap("-i", image, "create", "C", env={"QSNAP_LOCK_TIMEOUT": "0.5"}, timeout=BOUND)
    assert rc == 8, err
    assert f"pid {first.pid}" in err and "create B" in err  # names the holder
    assert "QSNAP_LOCK_TIMEOUT" in err

    _out, err = first.communicate(timeout=BOUND)
    assert first.returncode == 12, err
    assert fake.address in err or str(fake.port) in err
    assert "Traceback" not in err
    assert fingerprint(image) == print_before


@pytest.mark.parametrize(("kind", "verb", "trigger"), [
    ("hmp-tcp", "create", b"savevm"),
    ("hmp-tcp", "delete", b"delvm"),
    ("hmp-tcp", "restore", b"loadvm"),
    ("qmp-tcp", "create", b'"snapshot-save"'),
    ("qmp-tcp", "delete", b'"snapshot-delete"'),
])
def test_monitor_hanging_up_mid_mutation_is_exit_12_image_untouched(
    start_vm: Callable[..., VM], cutting_proxy: Callable[[int, bytes], CuttingProxy],
    kind: str, verb: str, trigger: bytes,
) -> None:
    vm = start_vm(kind)
    assert vm.address is not None and vm.port is not None
    image = vm.drives[0]
    assert run_qsnap("-i", image, "--monitor", vm.address, "create", "A").rc == 0
    vm.write_pattern(0x22)
    before = vm.snapshots()
    proxy = cutting_proxy(vm.port, trigger)
    args = {"create": ["create", "B"], "delete": ["delete", "A", "-y"], "restore": ["restore", "A", "-y"]}[verb]
    rc, _out, err = run_qsnap("-i", image, "--monitor", f"tcp:127.0.0.1:{proxy.port}", *args, timeout=BOUND)
    assert proxy.cut.is_set(), "the mutating command was never sent"
    assert rc == 12, err
    assert "Traceback" not in err and err.strip().startswith("qsnap: error:")
    after = vm.snapshots()
    if verb == "restore":  # the safety snapshot was taken before the load was cut off
        assert [s for s in after if not s[1].startswith("pre-restore-")] == before
    else:
        assert after == before
    assert vm.has_pattern(0x22)  # the disk is as it was
    assert vm.alive and vm.status() == "running"


def _hold_lock(image: Path, holder: str) -> int:
    fd = os.open(lock_path(image), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    return fd


def test_concurrent_creates_wait_for_each_other(
    start_vm: Callable[..., VM], spawn_qsnap: Callable[..., subprocess.Popen[str]]
) -> None:
    vm = start_vm("qmp")
    assert vm.address is not None
    image = vm.drives[0]
    fd = _hold_lock(image, "pid 4242: create held-by-test\n")
    try:
        procs = [spawn_qsnap("-i", image, "--monitor", vm.address, "create", name) for name in ("one", "two")]
        time.sleep(1.0)
        assert [p.poll() for p in procs] == [None, None]  # both wait for the lock...
        assert vm.names() == []  # ...without touching the VM
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    for proc in procs:
        out, err = proc.communicate(timeout=BOUND)
        assert proc.returncode == 0, err
        assert "via qmp" in out
    assert sorted(vm.names()) == ["one", "two"]
    assert vm.status() == "running"


def test_lock_timeout_names_the_holder(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    before = fingerprint(image)
    fd = _hold_lock(image, "pid 4242: restore nightly\n")
    try:
        rc, _out, err = run_qsnap("-i", image, "create", "A", env={"QSNAP_LOCK_TIMEOUT": "0.5"}, timeout=BOUND)
    finally:
        os.close(fd)
    assert rc == 8, err
    assert "pid 4242: restore nightly" in err
    assert fingerprint(image) == before
