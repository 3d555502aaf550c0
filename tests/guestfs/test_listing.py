"""`qsnap ls`, `cat` and `extract` against debugfs (``ls -p``, ``rdump``) on every filesystem variant
the issue names: GNU/Hurd's ext2 (``mke2fs -o hurd``), ext2, ext3, ext4 with and without a journal,
1 KiB and 4 KiB blocks, inline data, 64bit + metadata_csum; bare, MBR, logical and GPT layouts."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from qsnap_testlib import Run, one_error_line

from .conftest import HTREE_VARIANTS, Built, qsnap_bytes
from .fsbuild import VARIANTS, HostEntry, debugfs_r, debugfs_tree, host_tree, rdump

pytestmark = pytest.mark.timeout(120)

ALL = sorted(VARIANTS)
HARDLINKS = ("/page.bin", "/page-again.bin", "/links/page-hardlink")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory,
           built_fs: Callable[[str], Built]) -> Callable[[str], dict[str, HostEntry]]:
    """``debugfs rdump /`` of a variant, walked (once per variant).

    debugfs 1.47.0 dumps an inline-data file as its whole 60-byte i_block area whatever its
    size: such files are cut to the size ``ls -p`` gives before they are compared."""
    trees: dict[str, dict[str, HostEntry]] = {}

    def get(variant: str) -> dict[str, HostEntry]:
        if variant not in trees:
            built = built_fs(variant)
            out = rdump(built.fs, tmp_path_factory.mktemp(f"rdump-{variant}") / "out")
            sizes = debugfs_tree(built.fs)
            for path, host in host_tree(out).items():
                size = sizes[path].size
                if host.type == "file" and size is not None and host.size is not None and host.size > size:
                    os.truncate(out / path.lstrip("/"), size)
            trees[variant] = host_tree(out)
        return trees[variant]

    return get


def ls_json(qsnap_main: Callable[..., Run], image: Path, target: str, *args: str) -> dict[str, object]:
    result = qsnap_main(["-i", image, "ls", target, "--json", *args])
    assert result.rc == 0, result.err
    return dict(json.loads(result.out))


@pytest.mark.parametrize("variant", ALL)
def test_ls_recursive_json_matches_debugfs(variant: str, built_fs: Callable[[str], Built],
                                           oracle: Callable[[str], dict[str, HostEntry]],
                                           qsnap_main: Callable[..., Run]) -> None:
    built = built_fs(variant)
    listing = ls_json(qsnap_main, built.qcow2, "s1:/", "-R")
    got = {e["path"]: e for e in listing["entries"]}  # type: ignore[attr-defined]
    want = debugfs_tree(built.fs)
    assert sorted(got) == sorted(want)
    for path, entry in want.items():
        mine = got[path]
        assert (mine["inode"], mine["type"], int(mine["mode"], 8), mine["uid"], mine["gid"]) == (
            entry.ino, entry.type, entry.mode, entry.uid, entry.gid), path
        if entry.size is not None:
            assert mine["size"] == entry.size, path
    dumped = oracle(variant)
    for path, host in dumped.items():
        if host.type == "symlink":
            assert got[path]["target"] == host.target, path
        else:
            assert "target" not in got[path]
    fs = listing["filesystem"]
    assert fs["creator_os"] == ("Hurd" if variant.startswith("hurd") else "Linux")  # type: ignore[index]
    assert listing["partition"] == built.layout.number  # 0: a bare filesystem disk


@pytest.mark.parametrize("variant", ALL)
def test_extract_matches_rdump(variant: str, built_fs: Callable[[str], Built],
                               oracle: Callable[[str], dict[str, HostEntry]],
                               qsnap_main: Callable[..., Run], tmp_path: Path) -> None:
    built = built_fs(variant)
    dest = tmp_path / "out"
    result = qsnap_main(["-i", built.qcow2, "extract", "s1:/", dest, "--json"])
    assert result.rc == 0, result.err
    report = json.loads(result.out)
    assert report["destination"] == str(dest)
    assert sorted(report["skipped"]) == ["/blockdev (block)", "/chardev (char)"]
    mine = host_tree(dest)
    theirs = oracle(variant)
    # rdump leaves out fifos and devices; qsnap makes the fifo and never a device node
    assert sorted(mine) == sorted([*theirs, "/fifo"])
    assert mine["/fifo"].type == "fifo"
    modes = debugfs_tree(built.fs)  # rdump's chown after its chmod drops set-uid bits: modes from ls -p
    for path, want in theirs.items():
        got = mine[path]
        assert (got.type, got.size, got.sha256, got.target) == (want.type, want.size, want.sha256, want.target), path
        if got.type != "symlink":
            assert got.mode == modes[path].mode, path
    assert len({mine[p].ino for p in HARDLINKS}) == 1, "hard links must share one inode after extract"
    assert report["hardlinks"] == 2
    assert mine["/sparse.img"].size == 3 << 20
    assert mine["/sparse.img"].blocks * 512 <= 64 << 10, "the sparse file's holes must stay holes"
    owned = (dest / "owned").stat()
    if os.geteuid() == 0:
        assert (owned.st_uid, owned.st_gid) == (1000, 100)
        assert report["owners"] is True
    times = {e["path"]: e["mtime"] for e in ls_json(qsnap_main, built.qcow2, "s1:/", "-R")["entries"]}  # type: ignore[attr-defined]
    for path in ("/small.txt", "/links/long", "/emptydir", "/links", "/deep/level00"):  # dirs: set after their children
        assert os.lstat(dest / path.lstrip("/")).st_mtime_ns // 1_000_000_000 == times[path], path
    if variant in HTREE_VARIANTS:
        assert len(os.listdir(dest / "htree")) == HTREE_VARIANTS[variant]


@pytest.mark.parametrize("variant", ALL)
def test_cat_prints_the_bytes(variant: str, built_fs: Callable[[str], Built],
                              run_qsnap: Callable[..., Run]) -> None:
    built = built_fs(variant)
    for guest, host in [("/big.bin", "big.bin"), ("/sparse.img", "sparse.img"), ("/links/short", "links/target.txt"),
                        ("/fifty.bin", "fifty.bin"), ("/empty", "empty"), ("/ünïcødé.txt", "ünïcødé.txt")]:
        rc, data, err = qsnap_bytes("-i", built.qcow2, "cat", f"s1:{guest}")
        assert rc == 0, err
        assert data == (built.src / host).read_bytes(), guest
    rc, data, err = qsnap_bytes("-i", built.qcow2, "cat", "s1:/links")
    assert (rc, data) == (14, b"") and "directory" in err
    rc, data, err = qsnap_bytes("-i", built.qcow2, "cat", "s1:/no/such/file")
    assert (rc, data) == (15, b"")
    if variant == "ext4-4k":  # once through the console script: bytes reach a real stdout unchanged
        import subprocess

        from qsnap_testlib import QSNAP

        result = subprocess.run([QSNAP, "-i", built.qcow2, "cat", "s1:/big.bin"], capture_output=True, timeout=60,
                                stdin=subprocess.DEVNULL)
        assert (result.returncode, result.stdout) == (0, (built.src / "big.bin").read_bytes())


@pytest.mark.parametrize("variant", sorted(HTREE_VARIANTS))
def test_htree_directory_is_listed_and_looked_up(variant: str, built_fs: Callable[[str], Built],
                                                 qsnap_main: Callable[..., Run]) -> None:
    built = built_fs(variant)
    assert "Root node dump" in debugfs_r(built.fs, "htree /htree"), "the oracle's directory must be an htree"
    names = [e["name"] for e in ls_json(qsnap_main, built.qcow2, "s1:/htree")["entries"]]  # type: ignore[attr-defined]
    count = HTREE_VARIANTS[variant]
    assert len(names) == count
    assert names == sorted(names)
    last = f"entry-{count - 1:05d}-{'x' * ((count - 1) % 23)}"
    entries = ls_json(qsnap_main, built.qcow2, f"s1:/htree/{last}")["entries"]
    assert [e["name"] for e in entries] == [last]  # type: ignore[attr-defined]
    result = qsnap_main(["-i", built.qcow2, "ls", "s1:/htree/entry-99999"])
    assert result.rc == 15


@pytest.mark.parametrize("variant", ["hurd-1k", "ext4-4k"])
def test_ls_long_shows_mode_links_owner_size_and_targets(variant: str, built_fs: Callable[[str], Built],
                                                         qsnap_main: Callable[..., Run]) -> None:
    built = built_fs(variant)
    result = qsnap_main(["-i", built.qcow2, "ls", "s1:/", "-l"])
    assert result.rc == 0, result.err
    lines = {line.split()[-1]: line.split() for line in result.out.splitlines() if " -> " not in line}
    tree = debugfs_tree(built.fs)
    for name in ("mode0600", "setuid", "owned", "page.bin", "emptydir", "fifo", "sparse.img", "blockdev"):
        fields = lines[name]
        want = tree["/" + name]
        kind = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "fifo": stat.S_IFIFO, "block": stat.S_IFBLK}[want.type]
        assert fields[0] == stat.filemode(kind | want.mode), name
        assert (int(fields[2]), int(fields[3])) == (want.uid, want.gid), name
        if want.size is not None:
            assert int(fields[4]) == want.size, name
    assert lines["page.bin"][1] == "3"  # three names share the inode
    assert lines["setuid"][0] == "-rwsr-xr-x"
    assert lines["mode0600"][0] == "-rw-------"
    links = qsnap_main(["-i", built.qcow2, "ls", "s1:/links", "-l"]).out.splitlines()
    short = [line for line in links if line.split()[-3:-1] == ["short", "->"]]
    assert len(short) == 1 and short[0].startswith("lrwxrwxrwx") and short[0].endswith("-> target.txt")
    long_target = "/" + "/".join(["long-component-name"] * 6) + "/end"
    assert any(line.endswith(f"long -> {long_target}") for line in links)
    recursive = qsnap_main(["-i", built.qcow2, "ls", "s1:/deep", "-R"]).out.splitlines()
    assert recursive[-1].endswith("/level24/bottom.txt") and recursive[-1].startswith("/deep/level00/")


def test_ls_of_the_partition_given_by_number(built_fs: Callable[[str], Built], qsnap_main: Callable[..., Run]) -> None:
    built = built_fs("ext2-1k")  # logical partition 6 behind a Linux logical partition 5 that holds no fs
    assert built.layout.number == 6
    listing = ls_json(qsnap_main, built.qcow2, "s1:/links", "--partition", "6")
    assert listing["partition"] == 6
    result = qsnap_main(["-i", built.qcow2, "ls", "s1:/", "--partition", "5"])
    assert result.rc == 14, result.err
    result = qsnap_main(["-i", built.qcow2, "ls", "s1:/", "--partition", "9"])
    assert result.rc == 14, result.err
    assert "no partition 9" in one_error_line(result.err)
