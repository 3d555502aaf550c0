"""Fixtures for the backup tests: small real qcow2 images with known patterns (qemu-img/qemu-io)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qsnap.engines import qemu_img


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def write(image: Path, pattern: int, offset: str, length: str) -> None:
    run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {length}", str(image))


def reads(image: Path, pattern: int, offset: str, length: str, fmt: str = "qcow2") -> bool:
    out = subprocess.run(["qemu-io", "-r", "-f", fmt, "-c", f"read -P {pattern:#x} {offset} {length}", str(image)],
                         capture_output=True, text=True)
    return out.returncode == 0 and "Pattern verification failed" not in out.stdout + out.stderr


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """64 MiB image: snapshot 'base' holds 0x11 in [0,1M) and random data in [8M,10M);
    snapshot 'later' additionally has 0x22 at [1M,1.5M); the current state has 0x33 at [0,64k)."""
    path = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M")
    write(path, 0x11, "0", "1M")
    rnd = tmp_path / "rnd.bin"
    rnd.write_bytes(__import__("os").urandom(2 << 20))
    run("qemu-io", "-f", "qcow2", "-c", "write -s " + str(rnd) + " 8M 2M", str(path))
    run("qemu-img", "snapshot", "-c", "base", str(path))
    write(path, 0x22, "1M", "512k")
    run("qemu-img", "snapshot", "-c", "later", str(path))
    write(path, 0x33, "0", "64k")
    return path


def snap(image: Path, name: str):  # type: ignore[no-untyped-def]
    return next(s for s in qemu_img.list_snapshots(image) if s.name == name)
