"""The reader lists and reads exactly what qemu-img lists and exports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from qcow2_oracle import create, io, qemu_sha256, qemu_snapshots, reader_sha256, run, snapshot, without_disk_size

from qsnap.core.errors import CorruptImage, ImageError
from qsnap.engines import qemu_img
from qsnap.qcow2 import open_image

HISTORY = (
    ("write -P 0x11 0 300k", "write -P 0x22 1M 64k", "write -P 0x33 5M 1k"),
    ("write -P 0x44 100k 8k", "write -z 1M 32k", "discard 5M 64k", "write -P 0x66 6M 512"),
    ("write -P 0x55 2M 1M", "write -P 0x11 0 64k", "write -z 7M 1M"),
)


def make_history(path: Path, *, snapshots: bool = True) -> None:
    """Writes, zeroes and discards between two snapshots, then more writes."""
    io(path, *HISTORY[0])
    if snapshots:
        snapshot(path, "s1")
    io(path, *HISTORY[1])
    if snapshots:
        snapshot(path, "s2")
    io(path, *HISTORY[2])


def assert_matches_qemu(path: Path, scratch: Path) -> None:
    with open_image(path) as image:
        assert without_disk_size(image.snapshots()) == qemu_snapshots(path)
        ours = image.info()
        theirs = qemu_img.info(path)
        assert dataclasses_fields(ours) == dataclasses_fields(theirs)
        for snap in (None, *image.snapshots()):
            assert reader_sha256(image, snap) == qemu_sha256(path, snap.id if snap else None, scratch), snap


def dataclasses_fields(info: object) -> dict[str, object]:
    data = dict(info._asdict())  # type: ignore[attr-defined]
    data.pop("snapshots")
    data.pop("actual_size")  # qemu-img rounds differently for sparse files; st_blocks is checked below
    return data


CONFIGS = {
    "v2-compat-0.10": ("compat=0.10",),
    "v3-64k": (),
    "cluster-512": ("cluster_size=512",),
    "cluster-2M": ("cluster_size=2M",),
    "refcount-1": ("refcount_bits=1",),
    "refcount-64": ("refcount_bits=64",),
    "extended-l2": ("extended_l2=on",),
    "extended-l2-32k": ("extended_l2=on", "cluster_size=32k"),
    "lazy-refcounts": ("lazy_refcounts=on",),
}


@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_every_snapshot_reads_like_qemu_img_convert(tmp_path: Path, scratch: Path, options: tuple[str, ...]) -> None:
    path = create(tmp_path / "disk.qcow2", "8M", *options)
    # 1-bit refcounts cannot count to 2: QEMU refuses snapshots there ("Invalid argument")
    make_history(path, snapshots="refcount_bits=1" not in options)
    assert_matches_qemu(path, scratch)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_images_read_like_qemu_img(tmp_path: Path, scratch: Path, compression: str) -> None:
    source = create(tmp_path / "source.qcow2", "8M")
    io(source, *HISTORY[0], "write -P 0x77 3M 2M")
    path = tmp_path / "disk.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression}", source, path)
    snapshot(path, "compressed")
    io(path, *HISTORY[1])
    snapshot(path, "mixed")
    io(path, *HISTORY[2])
    with open_image(path) as image:
        assert image.info().compression_type == compression
        assert any(e.kind == "compressed" for e in image.iter_extents(image.snapshots()[0]))
    assert_matches_qemu(path, scratch)


def test_snapshot_taken_before_resize_keeps_its_own_size(tmp_path: Path, scratch: Path) -> None:
    path = create(tmp_path / "disk.qcow2", "4M")
    io(path, "write -P 0x21 0 1M", "write -P 0x22 3M 1M")
    snapshot(path, "small")
    run("qemu-img", "resize", "-f", "qcow2", path, "12M")
    io(path, "write -P 0x23 3M 2M", "write -P 0x24 10M 1M")
    snapshot(path, "big")
    with open_image(path) as image:
        small, big = image.snapshots()
        assert small.disk_size == 4 << 20 and big.disk_size == 12 << 20
        assert without_disk_size(image.snapshots()) == qemu_snapshots(path)
        assert image.layer(small).disk_size == 4 << 20
        # qemu-img convert -l exports a snapshot at the image's *current* size, zeros past
        # the snapshot's own disk: the reader stops at the snapshot's size.
        assert reader_sha256(image, small, pad_to=12 << 20) == qemu_sha256(path, small.id, scratch)
        assert reader_sha256(image, big) == qemu_sha256(path, big.id, scratch)
        assert reader_sha256(image, None) == qemu_sha256(path, None, scratch)


@pytest.mark.parametrize("backing_format", ["qcow2", "raw"])
def test_backing_file_fall_through(tmp_path: Path, scratch: Path, backing_format: str) -> None:
    base = tmp_path / f"base.{backing_format}"
    if backing_format == "qcow2":
        create(base, "6M")
        io(base, "write -P 0x31 0 4M")
    else:
        run("qemu-img", "create", "-q", "-f", "raw", base, "3M")  # shorter than the overlay
        run("qemu-io", "-f", "raw", "-c", "write -P 0x31 0 3M", base)
    path = create(tmp_path / "overlay.qcow2", "6M", backing=base, fmt=backing_format)
    io(path, "write -P 0x32 1M 64k", "write -z 2M 64k")
    snapshot(path, "s1")
    io(path, "write -P 0x33 0 4k", "discard 1M 64k")
    assert_matches_qemu(path, scratch)
    with open_image(path) as image:
        assert image.info().backing_file == str(base)


def test_listing_matches_qemu_img_for_many_snapshots_and_odd_names(tmp_path: Path) -> None:
    path = create(tmp_path / "disk.qcow2", "1M")
    for i, name in enumerate(["a", "b b", "dup", "dup", "ünïcode", "x" * 200, "1"]):
        io(path, f"write -P {i} 0 512")
        snapshot(path, name)
    run("qemu-img", "snapshot", "-d", "b b", path)
    with open_image(path) as image:
        assert without_disk_size(image.snapshots()) == qemu_snapshots(path)
        assert [s.name for s in image.snapshots()][:3] == ["a", "dup", "dup"]


def test_missing_directory_empty_and_foreign_files_are_image_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "raw").write_bytes(b"\0" * 4096)
    (tmp_path / "text").write_text("QFI")
    for target in ("missing", "empty", "raw", "text", "."):
        with pytest.raises(ImageError) as info:
            open_image(tmp_path / target)
        assert info.value.exit_code == 7
        assert not isinstance(info.value, CorruptImage)


def test_truncated_header_is_corrupt(tmp_path: Path) -> None:
    path = create(tmp_path / "disk.qcow2", "1M")
    data = path.read_bytes()
    (tmp_path / "cut").write_bytes(data[:50])
    with pytest.raises(CorruptImage) as info:
        open_image(tmp_path / "cut")
    assert info.value.exit_code == 10 and "header" in str(info.value)


def test_encrypted_image_lists_but_refuses_data(tmp_path: Path) -> None:
    path = tmp_path / "secret.qcow2"
    run(
        "qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=hunter2",
        "-o", "encrypt.format=luks,encrypt.key-secret=sec0", path, "1M",
    )
    run(
        "qemu-img", "snapshot", "--object", "secret,id=sec0,data=hunter2", "--image-opts", "-c", "s1",
        f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0",
    )
    with open_image(path) as image:
        assert image.info().encrypted
        assert without_disk_size(image.snapshots()) == qemu_snapshots(path)
        assert [s.name for s in image.snapshots()] == ["s1"]
        with pytest.raises(ImageError, match="encrypted"):
            image.read(0, 512)


def test_external_data_file_is_refused_clearly(tmp_path: Path) -> None:
    path = create(tmp_path / "disk.qcow2", "1M", f"data_file={tmp_path / 'data.raw'}")
    with open_image(path) as image:
        assert image.header.data_file == str(tmp_path / "data.raw")
        with pytest.raises(ImageError, match="external data file"):
            image.read(0, 512)


def test_reader_opens_read_only_and_leaves_the_file_unchanged(tmp_path: Path) -> None:
    path = create(tmp_path / "disk.qcow2", "8M")
    make_history(path)
    before = path.read_bytes()
    os.chmod(path, 0o444)
    with open_image(path) as image:
        image.read(0, 1 << 20, image.snapshots()[0])
    assert path.read_bytes() == before


def test_import_is_lean() -> None:
    code = (
        "import sys, qsnap.qcow2; "
        "heavy = {'zstandard', 'rich', 'qemu', 'subprocess'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
