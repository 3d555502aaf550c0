"""Fixtures for issue 15 (completion and `qsnap ui`): images made with the real qemu-img (and mkfs.ext4
for a guest filesystem), the qsnap console scripts run as the shells run them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from qsnap_testlib import QSNAP, qemu_img

#: Snapshot names with dashes, dots, digits (and one with a colon, which bash splits words at).
NAMES = ("base-1.0", "pre-upgrade.2", "v2.3-rc1", "daily-20240131", "2024.01.31-nightly", "x:y")


@pytest.fixture(scope="session")
def named_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 image holding NAMES (made by qemu-img: no sidecar)."""
    folder = tmp_path_factory.mktemp("named")
    image = folder / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "16M")
    for name in NAMES:
        qemu_img("snapshot", "-c", name, str(image))
    (folder / "other.qcow2").write_bytes(image.read_bytes()[:0])  # an empty second file for path completion
    (folder / "sub").mkdir()
    return image


def make_ext_image(folder: Path, files: dict[str, bytes]) -> tuple[Path, Path]:
    """A bare ext4 filesystem (mkfs.ext4 -d) holding FILES, as a raw file and a qcow2 copy."""
    src = folder / "src"
    for rel, data in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    raw = folder / "fs.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", str(src), str(raw), "8M"],
                   check=True, capture_output=True)
    qcow2 = folder / "guest.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    return raw, qcow2


def write_guest_file(raw: Path, qcow2: Path, guest_path: str, data: bytes) -> None:
    """Replace GUEST_PATH in the raw filesystem (debugfs), then copy it over the qcow2's current state."""
    host = raw.parent / "debugfs-input"
    host.write_bytes(data)
    subprocess.run(["debugfs", "-w", "-R", f"rm {guest_path}", str(raw)], check=True, capture_output=True)
    subprocess.run(["debugfs", "-w", "-R", f"write {host} {guest_path}", str(raw)], check=True,
                   capture_output=True)
    qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))


GUEST_FILES = {
    "etc/hostname": b"hurd-box\n",
    "etc/motd": b"Welcome to the guest.\n",
    "etc/network/interfaces": b"auto lo\n",
    "home/user/notes.txt": b"line one\nline two\n",
}


def shell(program: str) -> str:
    path = shutil.which(program)
    assert path, f"{program} is not installed (scripts/test installs it)"
    return path


def qsnap_bin() -> Path:
    return QSNAP


# A real QEMU with a QMP monitor for the running-VM test: the routing tests' fixture (stopped by PID).
from routing.conftest import sockdir, start_vm  # noqa: E402, F401
