"""GNU/Hurd's ext2 (``mke2fs -o hurd``): creator OS, 128-byte inodes without the filetype feature,
passive translators (set with debugfs: the inode's translator block holds a 2-byte little-endian
length and the argz vector) and the author field, as `ls -l` and `ls --json` show them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from qsnap_testlib import Run

from .conftest import Built
from .fsbuild import debugfs_r, debugfs_w, make_disk, set_translator, to_qcow2

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("variant", ["hurd-1k", "hurd-4k"])
def test_translators_and_authors_are_shown(variant: str, built_fs: Callable[[str], Built], tmp_path: Path,
                                           qsnap_main: Callable[..., Run]) -> None:
    built = built_fs(variant)
    fs = tmp_path / "fs.img"
    shutil.copyfile(built.fs, fs)
    stats = debugfs_r(fs, "stats")
    assert "Filesystem OS type:       Hurd" in stats and "filetype" not in stats.split("features:")[1].split("\n")[0]
    set_translator(fs, "/links/target.txt", b"/hurd/symlink\0/hurd/null\0")
    set_translator(fs, "/emptydir", b"/hurd/ext2fs\0--readonly\0/dev/hd0s1\0")
    debugfs_w(fs, ["sif /small.txt author 4242"])
    assert "Translator: " in debugfs_r(fs, "stat /emptydir")
    make_disk(fs, tmp_path / "disk.raw", "mbr")
    image = to_qcow2(tmp_path / "disk.raw", tmp_path / "disk.qcow2", ["s1"])

    listing = json.loads(qsnap_main(["-i", image, "ls", "s1:/", "-R", "--json"]).out)
    fs_info = listing["filesystem"]
    assert (fs_info["creator_os"], fs_info["inode_size"], fs_info["kind"]) == ("Hurd", 128, "ext2")
    entries = {e["path"]: e for e in listing["entries"]}
    assert entries["/links/target.txt"]["translator"] == "/hurd/symlink /hurd/null"
    assert entries["/emptydir"]["translator"] == "/hurd/ext2fs --readonly /dev/hd0s1"
    assert entries["/small.txt"]["author"] == 4242
    assert all("author" in e for e in entries.values())  # a Hurd inode always has one
    assert sum("translator" in e for e in entries.values()) == 2

    long = qsnap_main(["-i", image, "ls", "s1:/links", "-l"]).out.splitlines()
    (line,) = [ln for ln in long if " target.txt" in ln and " -> " not in ln]
    assert line.split()[0] == "-rw-r--r--t"
    assert line.endswith("target.txt  [translator: /hurd/symlink /hurd/null]")
    root = qsnap_main(["-i", image, "ls", "s1:/", "-l"]).out.splitlines()
    (line,) = [ln for ln in root if " emptydir" in ln]
    assert line.split()[0] == "drwxr-x---t" and line.endswith("[translator: /hurd/ext2fs --readonly /dev/hd0s1]")

    # the translator is the node's own: its content is untouched
    assert qsnap_main(["-i", image, "cat", "s1:/links/target.txt"]).out == "target\n"


def test_linux_ext2_has_no_hurd_fields(built_fs: Callable[[str], Built], qsnap_main: Callable[..., Run]) -> None:
    listing = json.loads(qsnap_main(["-i", built_fs("ext2-1k").qcow2, "ls", "s1:/", "--json"]).out)
    assert listing["filesystem"]["creator_os"] == "Linux"
    assert not any("author" in e or "translator" in e for e in listing["entries"])
