"""`qsnap parts` against sfdisk's and sgdisk's view of the same disk (MBR with an extended partition
and logical partitions, GPT, a bare filesystem), choosing partitions, and disks qsnap cannot read
(FAT, random bytes, zeros): exit 14 with one clear sentence."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from qsnap_testlib import Run, one_error_line

from .fsbuild import MIB, SECTOR, debugfs_w, make_disk, mkfs, sh, to_qcow2

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def small_fs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("parts-fs")
    fs = mkfs(work / "fs.img", ["-t", "ext4"], "8M")
    debugfs_w(fs, ["mkdir marker-one"])
    return fs


def parts_json(qsnap_main: Callable[..., Run], image: Path) -> list[dict[str, object]]:
    result = qsnap_main(["-i", image, "parts", "s1", "--json"])
    assert result.rc == 0, result.err
    return list(json.loads(result.out)["partitions"])


def sfdisk_view(raw: Path) -> list[dict[str, object]]:
    table = json.loads(sh("sfdisk", "--json", raw).stdout)["partitiontable"]
    assert table["sectorsize"] == SECTOR
    out = []
    for p in table["partitions"]:
        number = int(re.search(r"(\d+)$", p["node"]).group(1))  # type: ignore[union-attr]
        out.append({"number": number, "start": p["start"] * SECTOR, "size": p["size"] * SECTOR,
                    "type": p["type"].lower(), "name": p.get("name", ""), "bootable": bool(p.get("bootable"))})
    return out


@pytest.mark.parametrize("layout", ["mbr", "logical", "gpt"])
def test_parts_matches_sfdisk(layout: str, small_fs: Path, tmp_path: Path, qsnap_main: Callable[..., Run]) -> None:
    raw = tmp_path / "disk.raw"
    placed = make_disk(small_fs, raw, layout)
    image = to_qcow2(raw, tmp_path / "disk.qcow2", ["s1"])
    mine = parts_json(qsnap_main, image)
    theirs = sfdisk_view(raw)
    assert [p["number"] for p in mine] == [p["number"] for p in theirs]
    for got, want in zip(mine, theirs, strict=True):
        assert (got["start"], got["size"], got["bootable"]) == (want["start"], want["size"], want["bootable"])
        if layout == "gpt":
            assert (got["scheme"], got["type"], got["name"]) == ("gpt", want["type"], want["name"])
        else:
            assert got["scheme"] == "mbr"
            assert int(str(got["type"]), 16) == int(str(want["type"]), 16)
        assert got["filesystem"] == ("ext" if got["number"] == placed.number else None)
    text = qsnap_main(["-i", image, "parts", "s1"]).out
    assert text.splitlines()[0].split() == ["N", "SCHEME", "START", "SIZE", "TYPE", "FS", "NAME"]
    if layout == "logical":
        assert any(line.split()[:2] == ["2", "mbr"] and "Extended" in line for line in text.splitlines())


def test_parts_gpt_names_and_types_match_sgdisk(small_fs: Path, tmp_path: Path,
                                                qsnap_main: Callable[..., Run]) -> None:
    raw = tmp_path / "disk.raw"
    make_disk(small_fs, raw, "gpt")
    image = to_qcow2(raw, tmp_path / "disk.qcow2", ["s1"])
    mine = {p["number"]: p for p in parts_json(qsnap_main, image)}
    rows = [line.split() for line in sh("sgdisk", "-p", raw).stdout.decode().splitlines()
            if re.match(r"\s+\d+\s+\d+\s+\d+", line)]
    assert sorted(mine) == [int(r[0]) for r in rows]
    for number, start, end, *_size, code, name in rows:
        p = mine[int(number)]
        assert (p["start"], p["size"], p["name"]) == (int(start) * SECTOR, (int(end) - int(start) + 1) * SECTOR, name)
        info = sh("sgdisk", "-i", number, raw).stdout.decode()
        guid = re.search(r"Partition GUID code: (\S+)", info).group(1).lower()  # type: ignore[union-attr]
        assert p["type"] == guid, code


def test_bare_filesystem_disk_is_partition_zero(small_fs: Path, tmp_path: Path, qsnap_main: Callable[..., Run]) -> None:
    make_disk(small_fs, tmp_path / "disk.raw", "bare")
    image = to_qcow2(tmp_path / "disk.raw", tmp_path / "disk.qcow2", ["s1"])
    (part,) = parts_json(qsnap_main, image)
    assert (part["number"], part["scheme"], part["start"], part["size"], part["filesystem"]) == (
        0, "none", 0, small_fs.stat().st_size, "ext")
    result = qsnap_main(["-i", image, "ls", "s1:/"])
    assert result.rc == 0 and "marker-one" in result.out.split()


def test_second_gpt_filesystem_is_chosen_with_partition(tmp_path: Path, qsnap_main: Callable[..., Run]) -> None:
    first = mkfs(tmp_path / "a.img", ["-t", "ext4"], "4M")
    second = mkfs(tmp_path / "b.img", ["-t", "ext2", "-o", "hurd"], "4M")
    debugfs_w(first, ["mkdir in-first"])
    debugfs_w(second, ["mkdir in-second"])
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(16 * MIB)
    sh("sgdisk", "-n", "1:2048:+1M", "-t", "1:0700", "-n", "2:4096:+4M", "-t", "2:8300",
       "-n", "3:14336:+4M", "-t", "3:8302", "-c", "3:home", raw)
    for img, sector in ((first, 4096), (second, 14336)):
        with open(img, "rb") as src, open(raw, "r+b") as dst:
            dst.seek(sector * SECTOR)
            dst.write(src.read())
    image = to_qcow2(raw, tmp_path / "disk.qcow2", ["s1"])
    default = qsnap_main(["-i", image, "ls", "s1:/", "--json"])
    assert json.loads(default.out)["partition"] == 2
    assert "in-first" in [e["name"] for e in json.loads(default.out)["entries"]]
    chosen = json.loads(qsnap_main(["-i", image, "ls", "s1:/", "--json", "--partition", "3"]).out)
    assert "in-second" in [e["name"] for e in chosen["entries"]]
    assert chosen["filesystem"]["creator_os"] == "Hurd"
    not_ext = qsnap_main(["-i", image, "ls", "s1:/", "--partition", "1"])
    assert not_ext.rc == 14
    one_error_line(not_ext.err)


def _unsupported_disk(kind: str, raw: Path) -> None:
    if kind == "fat":
        sh("mkfs.vfat", "-C", raw, str(16 * 1024))
    elif kind == "random":
        import hashlib

        block = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(256))
        raw.write_bytes(block * (8 * MIB // len(block)))
    elif kind == "zeros":
        with open(raw, "wb") as f:
            f.truncate(8 * MIB)
    elif kind == "mbr-fat":  # an MBR whose only partition holds FAT
        with open(raw, "wb") as f:
            f.truncate(16 * MIB)
        sh("sfdisk", "-q", raw, input=b"label: dos\nstart=2048, type=c\n")
        fat = raw.with_suffix(".fat")
        sh("mkfs.vfat", "-C", fat, str(15 * 1024 - 1024))
        with open(fat, "rb") as src, open(raw, "r+b") as dst:
            dst.seek(2048 * SECTOR)
            dst.write(src.read())


@pytest.mark.parametrize("kind", ["fat", "random", "zeros", "mbr-fat"])
def test_unsupported_disk_is_exit_14_with_one_sentence(kind: str, tmp_path: Path,
                                                       qsnap_main: Callable[..., Run]) -> None:
    raw = tmp_path / "disk.raw"
    _unsupported_disk(kind, raw)
    image = to_qcow2(raw, tmp_path / "disk.qcow2", ["s1"])
    for argv in (["ls", "s1:/"], ["ls", "s1:/", "-R", "--json"], ["cat", "s1:/x"],
                 ["extract", "s1:/", tmp_path / "out"], ["fsck", "s1"],
                 ["ls", "s1:/", "--partition", "0" if kind != "mbr-fat" else "1"]):
        result = qsnap_main(["-i", image, *argv])
        assert (result.rc, result.out) == (14, ""), (argv, result)
        line = one_error_line(result.err)
        assert "ext2/ext3/ext4" in line, line
        if kind in ("fat", "mbr-fat"):
            assert "FAT" in line, line  # it says what it found
    assert not (tmp_path / "out").exists()
    parts = parts_json(qsnap_main, image)
    assert [p["filesystem"] for p in parts] == (["FAT"] if kind in ("fat", "mbr-fat") else [None])
