"""The guest builder: cached, complete, and loud when it cannot build."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from .builder import MODULES, GuestBuild, GuestBuildError, build_guest, decompress_vmlinux
from .fixtures import build_or_fail


def newc_names(archive: bytes) -> list[str]:
    """File names in a newc cpio archive (header: 6-byte magic, 13 8-hex-digit fields)."""
    names, offset = [], 0
    while archive[offset : offset + 6] == b"070701":
        filesize = int(archive[offset + 54 : offset + 62], 16)
        namesize = int(archive[offset + 94 : offset + 102], 16)
        name = archive[offset + 110 : offset + 110 + namesize - 1].decode()
        offset = (offset + 110 + namesize + 3) & ~3
        offset = (offset + filesize + 3) & ~3
        if name == "TRAILER!!!":
            break
        names.append(name)
    return names


def test_build_is_complete_and_cached(guest_build: GuestBuild) -> None:
    assert guest_build.kernel.read_bytes()[:4] == b"\x7fELF"  # decompressed for PVH boot
    names = newc_names(gzip.decompress(guest_build.initrd.read_bytes()))
    assert {"init", "bin/busybox"} <= set(names)
    assert {f"lib/modules/{Path(m).name}" for m in MODULES} <= set(names)
    for disk in (guest_build.disk, guest_build.disk_hurd):
        assert disk.read_bytes()[:4] == b"QFI\xfb"
    before = guest_build.kernel.stat().st_mtime_ns
    again = build_guest(guest_build.directory.parent)
    assert again == guest_build
    assert again.kernel.stat().st_mtime_ns == before  # reused, not rebuilt


def test_a_machine_that_cannot_build_the_guest_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-cache, apt-get, dpkg-deb, mke2fs
    with pytest.raises(GuestBuildError, match="apt-cache"):
        build_guest(tmp_path / "cache")
    with pytest.raises(pytest.fail.Exception, match=r"cannot build the test guest: .*apt-cache"):
        build_or_fail(tmp_path / "cache")


def test_a_kernel_without_an_xz_vmlinux_is_refused() -> None:
    with pytest.raises(GuestBuildError, match="no xz-compressed ELF"):
        decompress_vmlinux(b"MZ" + b"\0" * 4096 + b"\xfd7zXZ\x00garbage")
