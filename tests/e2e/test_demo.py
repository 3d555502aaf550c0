"""The README's demo (scripts/demo.py) on the real guest: it runs, the file comes back after
the restore, and nothing is left running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from guest.builder import GuestBuild

pytestmark = [pytest.mark.guest, pytest.mark.vm]

ROOT = Path(__file__).resolve().parents[2]


def qemu_pids_mentioning(directory: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in os.path.basename(cmdline.split(b"\0", 1)[0]) and str(directory).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def test_demo_restores_the_file_and_leaves_nothing_running(guest_build: GuestBuild, tmp_path: Path) -> None:
    work = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("QCOW2_IMAGE", "IMAGE_PATH", "MONITOR_PORT")}
    env["QSNAP_DEMO_DIR"] = str(work)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    try:
        done = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "scripts" / "demo.py")],
            env=env, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        out = done.stdout
        assert done.returncode == 0, out + done.stderr
        assert "guest demo finished" in out  # not the no-OS fallback: the guest is built here
        after_restore = out[out.index("$ qsnap restore before-upgrade"):]
        assert "restored via qmp" in after_restore
        assert "version=1.0 (working)" in after_restore  # the old content, read in the guest
        assert "hello from the qsnap test guest" in after_restore
        assert "version=2.0 (broken)" in out[: out.index("$ qsnap restore")]
        assert "$ qsnap backup before-upgrade" in out and " is OK " in out
        assert qemu_pids_mentioning(work) == []
    finally:
        for pid in qemu_pids_mentioning(work):  # only if the demo failed to stop its VM
            os.kill(pid, 9)


def test_demo_falls_back_to_the_no_os_demo_and_says_why(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("QCOW2_IMAGE", "IMAGE_PATH", "MONITOR_PORT")}
    env["QSNAP_DEMO_DIR"] = str(tmp_path / "demo")
    env["QSNAP_GUEST_CACHE"] = "/proc/qsnap-no-such-cache"  # cannot be created: the build fails
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "scripts" / "demo.py")],
        env=env, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Cannot build the demo guest (creating the cache directory" in done.stdout
    assert "falling back to the demo without a guest OS" in done.stdout
    assert "no-OS demo finished" in done.stdout
    assert "Snapshot 'initial-setup' (ID 1) restored via qemu-img." in done.stdout
