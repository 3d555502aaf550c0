"""`qsnap compact` against the real qemu-img/qemu-io/QEMU: every snapshot kept (metadata, guest
data, VM state), qemu-img check clean, never larger, the dry run's prediction within 2%."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from compact_helpers import (
    assert_same_images,
    check_clean,
    copy,
    history,
    info,
    qcow2_node,
    snapshot_records,
    wait_job,
)
from qsnap_testlib import QemuProcesses, Run, qemu_img, qemu_io

from qsnap.compact.build import REPLAY_ENV
from qsnap.qcow2 import open_image

Main = Callable[..., Run]


@pytest.fixture
def qemus() -> Iterator[QemuProcesses]:
    procs = QemuProcesses()
    try:
        yield procs
    finally:
        procs.stop_all()


def compact_json(qsnap_main: Main, image: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    rc, out, err = qsnap_main(["-i", image, "compact", "--json", *args])
    return rc, (json.loads(out) if out.strip() else {}), err


def compact_and_check(qsnap_main: Main, image: Path, tmp_path: Path, *args: str) -> dict[str, Any]:
    """Dry run, compact, then compare everything with a copy of the original."""
    original = copy(image, tmp_path / "original.qcow2")
    rc, dry, err = compact_json(qsnap_main, image, "--dry-run", *args)
    assert rc == 0, err
    assert image.stat().st_size == original.stat().st_size  # the dry run changed nothing
    rc, done, err = compact_json(qsnap_main, image, *args)
    assert rc == 0, err
    check_clean(image)
    assert_same_images(original, image, tmp_path / "raw")
    size = image.stat().st_size
    assert done["new_size"] == size
    assert size <= original.stat().st_size
    assert abs(size - dry["predicted_size"]) <= 0.02 * size, (size, dry)
    assert not list(tmp_path.glob("*.partial*"))
    assert not list(image.parent.glob(image.name + ".old-*"))
    return done


def test_compact_keeps_every_snapshot_and_reclaims_freed_clusters(qsnap_main: Main, tmp_path: Path) -> None:
    image = history(tmp_path / "disk.qcow2")
    with open_image(image) as img:
        assert len(img.snapshot_entries()) == 4
    before = image.stat().st_size
    done = compact_and_check(qsnap_main, image, tmp_path)
    assert done["snapshots"] == 4 and done["method"] == "copy"
    assert image.stat().st_size < before  # the deleted snapshot's clusters and the zero data are gone
    assert done["savings"]["zero_clusters"] >= 1 << 20
    # shared clusters stay shared: the new file is far smaller than one copy per snapshot
    assert image.stat().st_size < 2 * int(info(image)["actual-size"]) + (1 << 20)


_FORMATS = {
    "512-byte-clusters": ("cluster_size=512", False),
    "2M-clusters": ("cluster_size=2M", False),
    "extended-l2": ("cluster_size=64k,extended_l2=on", False),
    "compat-0.10": ("compat=0.10", False),
    "zstd-compressed": ("compression_type=zstd", True),
    "zlib-compressed": ("compression_type=zlib", True),
    "4-bit-refcounts": ("refcount_bits=4", False),
    "64-bit-lazy-refcounts": ("refcount_bits=64,lazy_refcounts=on", False),
}
# the copy writes every structure itself: every format; the replay leaves them to QEMU: the
# formats where its own steps differ (cluster sizes, extended L2, version 2, compressed clusters)
_REPLAYED = ("512-byte-clusters", "extended-l2", "compat-0.10", "zstd-compressed")


@pytest.mark.parametrize(("options", "compressed", "method"), [
    *((*_FORMATS[name], "copy") for name in _FORMATS),
    *((*_FORMATS[name], "replay") for name in _REPLAYED),
], ids=[*(f"copy-{name}" for name in _FORMATS), *(f"replay-{name}" for name in _REPLAYED)])
def test_compact_formats(qsnap_main: Main, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: str,
                         compressed: bool, method: str) -> None:
    """Both ways of building the new image: copying the reachable clusters (the default) and
    replaying the states through qemu-io/qemu-img (what --compress and --sparsify use)."""
    if method == "replay":
        monkeypatch.setenv(REPLAY_ENV, "1")
    image = history(tmp_path / "disk.qcow2", options=options, compressed=compressed)
    done = compact_and_check(qsnap_main, image, tmp_path)
    assert done["method"] == method
    if compressed:
        assert "compressed" in qemu_img("check", "-f", "qcow2", str(image)).stdout  # still compressed


def test_compact_compress_stores_compressed_clusters(qsnap_main: Main, tmp_path: Path) -> None:
    image = history(tmp_path / "disk.qcow2", options="compression_type=zstd")
    before = image.stat().st_size
    original = copy(image, tmp_path / "original.qcow2")
    rc, done, err = compact_json(qsnap_main, image, "--compress")
    assert rc == 0, err
    check_clean(image)
    assert_same_images(original, image, tmp_path / "raw")
    assert image.stat().st_size < before // 4  # pattern data compresses very well
    assert done["prediction"]["compressed_clusters"] > 0
    assert done["method"] == "replay"  # QEMU compresses


def test_compact_keeps_the_backing_file(qsnap_main: Main, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    qemu_io(base, "write -P 0x77 0 32M")
    image = history(tmp_path / "disk.qcow2", backing=base)
    done = compact_and_check(qsnap_main, image, tmp_path)
    assert info(image)["backing-filename"] == str(base)
    assert done["snapshots"] == 4


def test_compact_v2_over_a_backing_file_keeps_zeros_that_hide_the_backing(qsnap_main: Main, tmp_path: Path) -> None:
    """compat 0.10 has no zero flag: a data cluster of zeros over backing data must stay data
    (unallocated would show the backing file's bytes)."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    qemu_io(base, "write -P 0x77 0 32M")
    image = history(tmp_path / "disk.qcow2", options="compat=0.10", backing=base)
    done = compact_and_check(qsnap_main, image, tmp_path)
    assert done["method"] == "copy" and done["savings"]["zero_clusters"] == 0
    assert qemu_io(image, "read -P 0 12M 1M").returncode == 0


def test_compact_copies_without_copy_file_range(qsnap_main: Main, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel cannot copy between the files (EXDEV: other filesystems, old kernels),
    the copy reads and writes the clusters itself."""
    import errno

    calls: list[int] = []

    def refuse(*args: object) -> int:
        calls.append(1)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    image = history(tmp_path / "disk.qcow2", compressed=True)
    done = compact_and_check(qsnap_main, image, tmp_path)
    assert done["method"] == "copy" and calls


def test_compact_keeps_sharing_between_snapshots_that_are_not_neighbours(qsnap_main: Main, tmp_path: Path) -> None:
    """s3 is taken after going back to s1: it shares s1's clusters, not s2's. The copy keeps
    that (each cluster once); replaying the states in table order would store s1's data twice."""
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "64M")
    qemu_io(image, "write -P 0x11 0 8M")
    qemu_img("snapshot", "-c", "s1", str(image))
    qemu_io(image, "write -P 0x22 0 8M")
    qemu_img("snapshot", "-c", "s2", str(image))
    qemu_img("snapshot", "-a", "s1", str(image))
    qemu_img("snapshot", "-c", "s3", str(image))
    qemu_io(image, "write -P 0x33 0 8M")
    done = compact_and_check(qsnap_main, image, tmp_path)
    assert done["method"] == "copy"
    assert image.stat().st_size < 24 * 2**20 + 2**20  # three 8 MiB versions and the metadata


def test_compact_200_snapshots(qsnap_main: Main, tmp_path: Path, qemus: QemuProcesses) -> None:
    """200 snapshots taken by one QEMU (HMP qemu-io writes, QMP blockdev-snapshot-internal-sync:
    a process per snapshot would take most of a minute), 29 of them deleted."""
    image = tmp_path / "many.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(image), "8M")
    drive = ["-drive", f"file={image},if=virtio,format=qcow2,cache.no-flush=on"]  # no fsync per snapshot
    proc, side = qemus.start([], drive, tmp_path / "side.sock", tmp_path / "qemu.log")
    for k in range(200):
        write = f'qemu-io virtio0 "write -P {k % 250 + 1} {k * 32768} 4k"'
        side.cmd("human-monitor-command", **{"command-line": write})
        side.cmd("blockdev-snapshot-internal-sync", device="virtio0", name=f"s{k}")
    for k in range(0, 200, 7):
        side.cmd("blockdev-snapshot-delete-internal-sync", device="virtio0", name=f"s{k}")
    side.cmd("quit")
    proc.wait(timeout=30)
    original = copy(image, tmp_path / "original.qcow2")
    rc, done, err = compact_json(qsnap_main, image)
    assert rc == 0, err
    assert done["snapshots"] == 171
    check_clean(image)
    assert snapshot_records(image) == snapshot_records(original)
    assert image.stat().st_size <= original.stat().st_size
    # guest data of a sample of snapshots through qemu-img itself (the reader compared them all)
    records = snapshot_records(original)
    sample = [records[0], records[len(records) // 2], records[-1]]
    for snap in sample:
        outs = []
        for src, tag in ((original, "a"), (image, "b")):
            out = tmp_path / f"{tag}.raw"
            qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", f"snapshot.id={snap['id']}", str(src), str(out))
            outs.append(out.read_bytes())
        assert outs[0] == outs[1], snap["id"]


def test_compact_keeps_a_live_snapshot_loadable(qsnap_main: Main, tmp_path: Path, qemus: QemuProcesses) -> None:
    """VM state saved through QMP on a running QEMU; after compact, the same bytes, and a real
    QEMU loads it (snapshot-load job concludes, the VM runs on)."""
    image = tmp_path / "live.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "64M")
    qemu_io(image, "write -P 0x11 0 2M")
    qemu_img("snapshot", "-c", "disk-only", str(image))
    proc, side = qemus.start([image], [], tmp_path / "side.sock", tmp_path / "qemu.log", memory=64)
    node = qcow2_node(side)
    side.cmd("snapshot-save", **{"job-id": "save1", "tag": "live-1", "vmstate": node, "devices": [node]})
    wait_job(side, "save1")
    side.cmd("quit")
    proc.wait(timeout=30)
    qemu_io(image, "write -P 0x22 1M 2M")
    qemu_img("snapshot", "-c", "after", str(image))
    proc, side = qemus.start([image], [], tmp_path / "side2.sock", tmp_path / "qemu2.log", memory=64)
    node = qcow2_node(side)
    side.cmd("snapshot-save", **{"job-id": "save2", "tag": "live-2", "vmstate": node, "devices": [node]})
    wait_job(side, "save2")
    side.cmd("quit")
    proc.wait(timeout=30)
    qemu_io(image, "write -P 0x33 8M 1M")
    qemu_img("snapshot", "-d", "after", str(image))

    records = snapshot_records(image)
    assert [r["vm-state-size"] > 0 for r in records] == [False, True, True]
    done = compact_and_check(qsnap_main, image, tmp_path)
    assert done["vm_state_snapshots"] == 2

    proc, side = qemus.start([image], [], tmp_path / "side3.sock", tmp_path / "qemu3.log", memory=64)
    node = qcow2_node(side)
    side.cmd("snapshot-load", **{"job-id": "load1", "tag": "live-1", "vmstate": node, "devices": [node]})
    wait_job(side, "load1")
    side.cmd("cont")
    assert side.cmd("query-status")["status"] == "running"


def test_compact_refuses_an_image_in_use(qsnap_main: Main, tmp_path: Path, qemus: QemuProcesses) -> None:
    image = history(tmp_path / "disk.qcow2")
    before = image.read_bytes()
    qemus.start([image], [], tmp_path / "side.sock", tmp_path / "qemu.log")
    rc, _out, err = qsnap_main(["-i", image, "compact"], environ={"QSNAP_VM": "none"})
    assert rc == 8, err
    assert "in use by a running VM" in err and "--vm compose:SERVICE" in err
    assert image.read_bytes() == before
    assert not list(tmp_path.glob("*.partial*"))


def _fs_image_with_deleted_file(tmp_path: Path, options: str = "") -> tuple[Path, Path]:
    """An MBR disk with an ext4 partition; snapshot s1 holds a 6 MiB file that the current state has
    deleted (its blocks still hold data but are free in the bitmap), plus a kept file."""
    import subprocess

    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(6 << 20))
    (src / "kept.txt").write_bytes(b"keep me\n" * 1000)
    fs = tmp_path / "fs.raw"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(src), str(fs), "24M"], check=True)
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], input=b"label: dos\nstart=2048, type=83\n", check=True)
    data = fs.read_bytes()
    with open(disk, "r+b") as f:
        f.seek(1 << 20)
        f.write(data)
    image = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *(["-o", options] if options else []), str(disk), str(image))
    qemu_img("snapshot", "-c", "s1", str(image))
    subprocess.run(["debugfs", "-w", "-R", "rm /big.bin", str(fs)], check=True, capture_output=True)
    with open(disk, "r+b") as f:
        f.seek(1 << 20)
        f.write(fs.read_bytes())
    qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(disk), str(image))
    return image, fs


@pytest.mark.parametrize(("method", "options"), [("copy", ""), ("replay", ""), ("copy", "extended_l2=on")],
                         ids=["copy", "replay", "copy-extended-l2"])
def test_sparsify_zeroes_free_guest_blocks_of_the_current_state_only(qsnap_main: Main, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     method: str, options: str) -> None:
    import subprocess

    if method == "replay":
        monkeypatch.setenv(REPLAY_ENV, "1")
    image, fs = _fs_image_with_deleted_file(tmp_path, options)
    plain = copy(image, tmp_path / "plain.qcow2")
    original = copy(image, tmp_path / "original.qcow2")
    rc, dry, err = compact_json(qsnap_main, image, "--dry-run", "--sparsify")
    assert rc == 0, err
    assert dry["savings"]["free_guest_blocks"] >= 5 << 20  # the deleted file's blocks
    rc, done, err = compact_json(qsnap_main, image, "--sparsify")
    assert rc == 0, err
    assert done["savings"]["free_guest_blocks"] == dry["savings"]["free_guest_blocks"]
    assert done["method"] == method
    check_clean(image)
    rc, _, err = compact_json(qsnap_main, plain)
    assert rc == 0, err
    size = image.stat().st_size
    assert size <= plain.stat().st_size - (5 << 20)  # the free blocks' data is gone, not just moved
    assert abs(size - dry["predicted_size"]) <= 0.02 * size, (size, dry["predicted_size"])
    # the snapshot is untouched, byte for byte (qemu-img's view)
    work = tmp_path / "raw"
    work.mkdir()
    for src, tag in ((original, "a"), (image, "b")):
        qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=s1", str(src), str(work / f"{tag}.raw"))
    assert qemu_img("compare", "-f", "raw", "-F", "raw", str(work / "a.raw"), str(work / "b.raw"),
                    check=False).returncode == 0
    # the current state: every file the same, the filesystem clean (the real e2fsck), free blocks now zeros
    rc, listing_new, _ = qsnap_main(["-i", image, "ls", "-R", "--json", "@current:/"])
    rc2, listing_old, _ = qsnap_main(["-i", original, "ls", "-R", "--json", "@current:/"])
    assert rc == rc2 == 0
    assert json.loads(listing_new)["entries"] == json.loads(listing_old)["entries"]
    rc, out, _ = qsnap_main(["-i", image, "cat", "@current:/kept.txt"])
    assert rc == 0 and out == "keep me\n" * 1000
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(image), str(work / "cur.raw"))
    part = (work / "cur.raw").read_bytes()[1 << 20 : (1 << 20) + (24 << 20)]
    (work / "cur-fs.raw").write_bytes(part)
    assert subprocess.run(["e2fsck", "-fn", str(work / "cur-fs.raw")], capture_output=True).returncode == 0
    assert (work / "cur-fs.raw").read_bytes() != fs.read_bytes()  # the deleted file's data is gone ...
    rc, out, _ = qsnap_main(["-i", image, "diff", "--files", "@current", "s1"])
    assert rc == 0 and "A  /big.bin" in out  # ... and s1 still has the file


def test_sparsify_refuses_a_disk_without_an_ext_filesystem(qsnap_main: Main, tmp_path: Path) -> None:
    image = history(tmp_path / "disk.qcow2")
    before = image.read_bytes()
    rc, _out, err = qsnap_main(["-i", image, "compact", "--sparsify"])
    assert rc == 14 and "no ext2/ext3/ext4 filesystem" in err, err
    assert image.read_bytes() == before


def test_keep_old_keeps_the_original(qsnap_main: Main, tmp_path: Path) -> None:
    image = history(tmp_path / "disk.qcow2")
    original = image.read_bytes()
    rc, out, err = qsnap_main(["-i", image, "compact", "--keep-old"])
    assert rc == 0, err
    olds = list(tmp_path.glob("disk.qcow2.old-*"))
    assert len(olds) == 1 and olds[0].read_bytes() == original
    assert "The original is kept as" in out and "snapshots kept" in out
    rc, out, err = qsnap_main(["-i", image, "compact", "--dry-run"])
    assert rc == 0 and "holds the image as it was before an earlier compact" in err


def _leak_a_cluster(image: Path) -> None:
    """Give one free cluster inside the file a refcount of 1 (what a crash between the refcount
    and the L2 update leaves): a leak qemu-img check reports."""
    with open_image(image) as img:
        counts = img.refcounts()
        free = next(i for i, c in enumerate(counts) if c == 0 and i > 0)
        header = img.header
        assert header.refcount_bits == 16
        reftable = struct.unpack(">Q", os.pread(img._fd, 8, header.refcount_table_offset))[0]
        assert free < img.cluster_size // 2
    with open(image, "r+b") as f:
        f.seek(reftable + 2 * free)
        f.write(struct.pack(">H", 1))


def test_compact_drops_leaked_clusters(qsnap_main: Main, tmp_path: Path) -> None:
    image = history(tmp_path / "disk.qcow2")
    _leak_a_cluster(image)
    report = json.loads(qemu_img("check", "-f", "qcow2", "--output=json", str(image), check=False).stdout)
    assert report["leaks"] == 1
    rc, dry, _err = compact_json(qsnap_main, image, "--dry-run")
    assert rc == 0 and dry["savings"]["leaked"] == 65536
    compact_and_check(qsnap_main, image, tmp_path)


def test_doctor_and_info_point_to_compact(qsnap_main: Main, tmp_path: Path) -> None:
    """20 MiB freed inside a 40 MiB file by a deleted snapshot: doctor and info name compact;
    after it, they do not."""
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "64M")
    qemu_io(image, "write -P 0x11 0 20M")
    qemu_img("snapshot", "-c", "old", str(image))
    qemu_io(image, "write -P 0x22 0 20M")
    qemu_img("snapshot", "-c", "keep", str(image))
    qemu_img("snapshot", "-d", "old", str(image))

    def doctor_accounting() -> dict[str, Any]:
        _rc, out, _err = qsnap_main(["-i", image, "doctor", "--json"])
        return next(c for c in json.loads(out)["checks"] if c["check"] == "accounting")

    accounting = doctor_accounting()
    assert accounting["status"] == "warn" and "qsnap compact" in accounting["fix"]
    rc, out, _err = qsnap_main(["-i", image, "info"])
    assert rc == 0 and "'qsnap compact' would reclaim at least 20." in out
    done = compact_and_check(qsnap_main, image, tmp_path)
    assert done["reclaimed_bytes"] >= 20 << 20
    assert doctor_accounting()["status"] == "ok"
    rc, out, _err = qsnap_main(["-i", image, "info"])
    assert "qsnap compact" not in out


def test_compact_keeps_odd_names_ids_and_descriptions(qsnap_main: Main, tmp_path: Path) -> None:
    """Duplicate names, a name equal to another snapshot's ID, a 255-byte name, IDs with gaps
    (deleted snapshots), made by other tools; and the sidecar's descriptions."""
    image = tmp_path / "odd.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "64M")
    names = ["dup", "gone-1", "dup", "3", "n" * 255, "gone-2", "last"]
    for k, name in enumerate(names):
        qemu_io(image, f"write -P {k + 1} {k}M 1M")
        qemu_img("snapshot", "-c", name, str(image))
    qemu_img("snapshot", "-d", "gone-1", str(image))
    qemu_img("snapshot", "-d", "gone-2", str(image))
    rc, _out, err = qsnap_main(["-i", image, "describe", "last", "the last one"])
    assert rc == 0, err
    records = snapshot_records(image)
    assert [r["id"] for r in records] == ["1", "3", "4", "5", "7"]
    compact_and_check(qsnap_main, image, tmp_path)
    rc, out, err = qsnap_main(["-i", image, "list", "--json"])
    listed = json.loads(out)["snapshots"]
    assert [(s["id"], s["name"]) for s in listed] == [(r["id"], r["name"]) for r in records]
    assert listed[-1]["description"] == "the last one"
