"""Plain .qcow2 backups leave out clusters that hold only zeros, as `qemu-img convert` does,
and `verify --against` finds a single changed byte, in every format (real qemu-img/qemu-io)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from qsnap.backup import export_snapshot, verify_backup
from qsnap.backup.qcow2stream import StreamChecker
from qsnap.core.errors import VerificationFailed

from .conftest import reads, run, snap, write


def convert_size(image: Path, snapshot: str, tmp_path: Path) -> int:
    out = tmp_path / "by-qemu-img.qcow2"
    run("qemu-img", "convert", "-U", "-l", f"snapshot.name={snapshot}", "-O", "qcow2", str(image), str(out))
    return out.stat().st_size


def identical(a: Path, b: Path, snapshot: str, tmp_path: Path) -> bool:
    """qemu-img compare of backup A with snapshot SNAPSHOT of image B (exported by qemu-img)."""
    ref = tmp_path / "ref.qcow2"
    if not ref.exists():
        run("qemu-img", "convert", "-U", "-l", f"snapshot.name={snapshot}", "-O", "qcow2", str(b), str(ref))
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(ref)]).returncode == 0


def test_written_zeros_are_not_stored(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M")
    write(image, 0x11, "0", "1M")
    write(image, 0x00, "1M", "8M")  # allocated clusters holding zeros
    write(image, 0x22, "9M", "1M")
    run("qemu-img", "snapshot", "-c", "s", str(image))
    out = tmp_path / "b.qcow2"
    result = export_snapshot(image, snap(image, "s"), out)
    # qemu-img convert skips the 8 MiB of zeros; so does qsnap (the layouts differ by a few clusters)
    assert out.stat().st_size <= convert_size(image, "s", tmp_path) + 4 * 65536
    assert out.stat().st_size < 3 << 20
    assert result.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert subprocess.run(["qemu-img", "check", "-q", str(out)]).returncode == 0
    assert reads(out, 0x11, "0", "1M") and reads(out, 0x00, "1M", "8M") and reads(out, 0x22, "9M", "1M")
    assert identical(out, image, "s", tmp_path)
    verify_backup(out, against=(image, snap(image, "s")))


def test_alternating_zero_clusters_with_small_clusters(tmp_path: Path) -> None:
    """512-byte clusters: one L2 table per 32 KiB, zero runs that empty whole L2 tables, and
    blocks of thousands of clusters alternating data and zeros (more pieces than one pwritev takes)."""
    image = tmp_path / "small.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(image), "8M")
    data = bytearray(os.urandom(6 << 20))
    for k in range(0, 2 << 20, 1024):  # first 2 MiB: every other cluster is zeros
        data[k : k + 512] = bytes(512)
    data[3 << 20 : (3 << 20) + (256 << 10)] = bytes(256 << 10)  # eight whole L2 ranges of zeros
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(data))
    run("qemu-io", "-f", "qcow2", "-c", f"write -s {blob} 0 {len(data)}", str(image))
    run("qemu-img", "snapshot", "-c", "s", str(image))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 1M", str(image))  # the current state differs
    out = tmp_path / "b.qcow2"
    export_snapshot(image, snap(image, "s"), out)
    assert subprocess.run(["qemu-img", "check", "-q", str(out)]).returncode == 0
    assert identical(out, image, "s", tmp_path)
    # the file is the canonical qsnap layout (what verify and incremental backups rely on)
    checker = StreamChecker()
    checker.feed(out.read_bytes())
    stored = checker.finish().data_clusters
    assert stored * 512 == len(data) - (1 << 20) - (256 << 10)
    verify_backup(out, against=(image, snap(image, "s")))


@pytest.mark.parametrize("name", ["b.qcow2", "b.qcow2.zst", "b.qcow2.gz", "b.raw"])
def test_verify_against_finds_one_changed_byte(tmp_path: Path, name: str) -> None:
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M")
    rnd = tmp_path / "rnd.bin"
    rnd.write_bytes(os.urandom(12 << 20))
    run("qemu-io", "-f", "qcow2", "-c", f"write -s {rnd} 2M 12M", str(image))
    run("qemu-img", "snapshot", "-c", "before", str(image))
    one = tmp_path / "one"
    one.write_bytes(bytes([rnd.read_bytes()[(9 << 20) + 12345] ^ 0xFF]))
    run("qemu-io", "-f", "qcow2", "-c", f"write -s {one} {(11 << 20) + 12345} 1", str(image))
    run("qemu-img", "snapshot", "-c", "after", str(image))
    out = tmp_path / name
    export_snapshot(image, snap(image, "before"), out)
    verify_backup(out, against=(image, snap(image, "before")))
    with pytest.raises(VerificationFailed, match="content differs") as caught:
        verify_backup(out, against=(image, snap(image, "after")))
    if name in ("b.qcow2", "b.raw"):  # whole-disk comparisons name the byte
        assert f"at byte {(11 << 20) + 12345}" in str(caught.value)
    assert json.loads(Path(f"{out}.json").read_text())["sha256"]  # the backup itself is intact


@pytest.mark.parametrize("name", ["b.qcow2", "b.raw", "b.qcow2.zst"])
def test_verify_against_a_truncated_image_compares_zeros_past_its_end(tmp_path: Path, name: str) -> None:
    """The last data clusters of the image lie past the end of its (truncated) file: QEMU and the
    reader read them as zeros; reused comparison buffers must not keep older bytes there."""
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M")
    write(image, 0x11, "0", "4M")
    write(image, 0x22, "4M", "4M")
    os.truncate(image, image.stat().st_size - (32 << 10))
    out = tmp_path / name
    export_snapshot(image, None, out)
    verify_backup(out, against=(image, None))


def test_raw_backup_of_a_snapshot_taken_before_a_resize_has_its_size(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "3M")
    write(image, 0x11, "0", "3M")
    run("qemu-img", "snapshot", "-c", "small", str(image))
    run("qemu-img", "resize", "-q", str(image), "7M")
    out = tmp_path / "b.raw"
    export_snapshot(image, snap(image, "small"), out)
    assert out.stat().st_size == 3 << 20  # qemu-img convert -l alone writes 7 MiB
    assert reads(out, 0x11, "0", "3M", "raw")
    verify_backup(out, against=(image, snap(image, "small")))
