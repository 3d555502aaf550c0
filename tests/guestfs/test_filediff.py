"""`qsnap diff A B --files` and `--content` between snapshots of a real qcow2, against an oracle
built from debugfs (``ls -p`` and ``rdump``) on the two filesystem images.

Each scenario: snapshot s1 of a filled filesystem; then, on a raw copy, debugfs adds, removes,
renames, truncates, chmods, chowns, retargets a symlink, turns a file into a directory, moves an
mtime (and on GNU/Hurd's ext2 sets a passive translator), and ``dd`` rewrites bytes inside two
files' data blocks without touching their inodes; ``qemu-img convert -n`` writes that back and s2
is taken, then s3 (identical). Last, qemu-io writes into a file's data block straight into the
qcow2 (no inode change) and s4 is taken.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from qsnap_testlib import Run, one_error_line, qemu_io

from .fsbuild import (
    VARIANTS,
    Layout,
    debugfs_tree,
    debugfs_w,
    fill_tree,
    first_block,
    fs_block_size,
    host_tree,
    make_disk,
    mkfs,
    put_fs,
    rdump,
    set_translator,
    sh,
    to_qcow2,
    update_qcow2,
)

pytestmark = pytest.mark.timeout(180)

SCENARIO_VARIANTS = ["ext4-4k", "hurd-1k"]
LAYOUT = {"ext4-4k": "mbr", "hurd-1k": "gpt"}
TRANSLATOR = b"/hurd/symlink\0/hurd/null\0"


@dataclass(frozen=True)
class Scenario:
    variant: str
    work: Path
    qcow2: Path
    layout: Layout
    fs_a: Path  # the filesystem of s1
    fs_b: Path  # of s2 (= s3)
    fs_c: Path  # of s4


def poke(fs: Path, guest_path: str, offset: int, data: bytes) -> None:
    """Overwrite bytes inside GUEST_PATH's first data block (its inode is not touched)."""
    block = first_block(fs, guest_path)
    with open(fs, "r+b") as f:
        f.seek(block * fs_block_size(fs) + offset)
        f.write(data)


@pytest.fixture(scope="module", params=SCENARIO_VARIANTS)
def scenario(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    variant: str = request.param
    work = tmp_path_factory.mktemp(f"diff-{variant}")
    fs = mkfs(work / "fs.img", VARIANTS[variant], "24M", fill_tree(work / "src"))
    fs_a = work / "fs-a.img"
    shutil.copyfile(fs, fs_a)
    layout = make_disk(fs, work / "disk.raw", LAYOUT[variant])
    qcow2 = to_qcow2(work / "disk.raw", work / "disk.qcow2", ["s1"])
    (work / "new.txt").write_bytes(b"a new file\n")
    debugfs_w(fs, [
        f"write {work / 'new.txt'} /added.txt", "mkdir /newdir", f"write {work / 'new.txt'} /newdir/inside.txt",
        "rm /small.txt", "rmdir /emptydir", "sif /big.bin size 1000", "sif /mode0600 mode 0100644",
        "sif /owned uid 4321", "sif /owned gid 4321", "rm /links/short", "symlink /links/short page.bin", "rm /one",
        "mkdir /one", "ln /setuid /setuid-renamed", "unlink /setuid", "sif /fifty.bin mtime 20200101",
        "rm /deep/level00/level01/level02/level03/level04/level05/level06/level07/level08/level09/level10/"
        "level11/level12/level13/level14/level15/level16/level17/level18/level19/level20/level21/level22/"
        "level23/level24/bottom.txt",
    ])
    if variant.startswith("hurd"):
        set_translator(fs, "/links/target.txt", TRANSLATOR)
    poke(fs, "/with space.txt", 0, b"SPACES")
    poke(fs, "/page.bin", 100, b"changed in place")
    fs_b = work / "fs-b.img"
    shutil.copyfile(fs, fs_b)
    put_fs(work / "disk.raw", layout, fs)
    update_qcow2(work / "disk.raw", qcow2, "s2")
    sh("qemu-img", "snapshot", "-c", "s3", qcow2)
    # s4: a raw write into /fifty.bin's data block, through qemu-io straight into the qcow2
    bs = fs_block_size(fs)
    offset = layout.offset + first_block(fs_b, "/fifty.bin") * bs + 5
    qemu_io(qcow2, f"write -P 0x41 {offset} 7")
    sh("qemu-img", "snapshot", "-c", "s4", qcow2)
    fs_c = work / "fs-c.img"
    shutil.copyfile(fs_b, fs_c)
    poke(fs_c, "/fifty.bin", 5, b"A" * 7)
    return Scenario(variant, work, qcow2, layout, fs_a, fs_b, fs_c)


def oracle_changes(a: Path, b: Path, out: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """path -> (kind, changes) from debugfs's view of the two filesystems: ``ls -p`` (inode, type,
    mode, owner, size) and ``rdump`` (content, symlink targets). A path gone from A and new in B
    with the same inode is a rename. Directory sizes and times are left out."""
    trees = []
    for name, fs in (("a", a), ("b", b)):
        meta = debugfs_tree(fs)
        dump = rdump(fs, out / name)
        for path, host in host_tree(dump).items():  # debugfs 1.47.0 dumps inline data files whole
            size = meta[path].size
            if host.type == "file" and size is not None and host.size is not None and host.size > size:
                import os

                os.truncate(dump / path.lstrip("/"), size)
        trees.append((meta, host_tree(dump)))
    (ma, ha), (mb, hb) = trees
    result: dict[str, tuple[str, frozenset[str]]] = {}
    gone = {p: ma[p].ino for p in ma if p not in mb}
    new = {p: mb[p].ino for p in mb if p not in ma}
    for old, ino in list(gone.items()):
        for path, ino_b in list(new.items()):
            if ino == ino_b and ma[old].type == mb[path].type != "dir":
                result[path] = ("renamed", frozenset({old}))
                del gone[old], new[path]
                break
    for path in gone:
        result[path] = ("removed", frozenset())
    for path in new:
        result[path] = ("added", frozenset())
    for path in ma.keys() & mb.keys():
        ea, eb = ma[path], mb[path]
        changes = set()
        if ea.type != eb.type:
            changes.add("type")
        if ea.mode != eb.mode:
            changes.add("mode")
        if (ea.uid, ea.gid) != (eb.uid, eb.gid):
            changes.add("owner")
        if ea.type == eb.type != "dir" and ea.size != eb.size:
            changes.add("size")
        xa, xb = ha.get(path), hb.get(path)
        if xa and xb and ea.type == eb.type == "file" and xa.sha256 != xb.sha256:
            changes.add("content")
        if xa and xb and ea.type == eb.type == "symlink" and xa.target != xb.target:
            changes.add("target")
        if changes:
            result[path] = ("modified", frozenset(changes))
    return result


def diff_json(qsnap_main: Callable[..., Run], image: Path, *args: object) -> dict[str, object]:
    result = qsnap_main(["-i", image, "diff", *args, "--files", "--json"])
    assert result.rc == 0, result.err
    return dict(json.loads(result.out))


def as_oracle(report: dict[str, object], ignore: frozenset[str] = frozenset({"mtime", "translator"})
              ) -> dict[str, tuple[str, frozenset[str]]]:
    out = {}
    for change in report["changes"]:  # type: ignore[attr-defined]
        if change["kind"] == "renamed":
            out[change["path"]] = ("renamed", frozenset({change["from"]}))
            continue
        changes = frozenset(change.get("changes", ())) - ignore
        if change["kind"] == "modified" and not changes:
            continue  # only an mtime or translator: checked on their own
        out[change["path"]] = (change["kind"], changes)
    return out


def test_diff_files_matches_the_debugfs_oracle(scenario: Scenario, qsnap_main: Callable[..., Run],
                                               tmp_path: Path) -> None:
    report = diff_json(qsnap_main, scenario.qcow2, "s1", "s2")
    want = oracle_changes(scenario.fs_a, scenario.fs_b, tmp_path)
    assert as_oracle(report) == want
    # every kind the issue names is in this scenario
    got = {c["path"]: c for c in report["changes"]}  # type: ignore[attr-defined]
    assert got["/added.txt"]["kind"] == "added" and got["/small.txt"]["kind"] == "removed"
    assert got["/setuid-renamed"] == {"path": "/setuid-renamed", "kind": "renamed", "type": "file", "from": "/setuid"}
    assert set(got["/big.bin"]["changes"]) >= {"content", "size"}
    assert set(got["/mode0600"]["changes"]) == {"mode"}
    assert set(got["/owned"]["changes"]) == {"owner"}
    assert "target" in got["/links/short"]["changes"]
    assert "type" in got["/one"]["changes"]
    assert set(got["/with space.txt"]["changes"]) == {"content"}  # bytes only: found by the block diff
    assert "mtime" in got["/fifty.bin"]["changes"]
    if scenario.variant.startswith("hurd"):
        assert "translator" in got["/links/target.txt"]["changes"]
    assert (report["added"], report["removed"], report["renamed"]) == (
        sum(k == "added" for k, _ in want.values()), sum(k == "removed" for k, _ in want.values()), 1)
    assert report["identical"] is False and report["changed_blocks"] > 0
    text = qsnap_main(["-i", scenario.qcow2, "diff", "s1", "s2", "--files"])
    assert text.rc == 0
    lines = text.out.splitlines()
    assert "M  /mode0600  (mode)" in lines
    assert "R  /setuid -> /setuid-renamed" in lines
    assert "D  /emptydir/" in lines
    assert lines[-1].startswith(f"{report['added']} added, {report['removed']} removed, ")


def test_diff_files_under_a_path(scenario: Scenario, qsnap_main: Callable[..., Run], tmp_path: Path) -> None:
    report = diff_json(qsnap_main, scenario.qcow2, "s1", "s2", "/links")
    want = {p: c for p, c in oracle_changes(scenario.fs_a, scenario.fs_b, tmp_path).items() if p.startswith("/links/")}
    assert want and as_oracle(report) == want
    assert report["path"] == "/links"
    deep = diff_json(qsnap_main, scenario.qcow2, "s1", "s2", "/deep/level00")
    assert [c["path"] for c in deep["changes"]] == [  # type: ignore[attr-defined]
        "/deep/level00/" + "/".join(f"level{i:02d}" for i in range(1, 25)) + "/bottom.txt"]
    missing = qsnap_main(["-i", scenario.qcow2, "diff", "s1", "s2", "/no-such-dir", "--files"])
    assert (missing.rc, missing.out) == (15, "")
    one_error_line(missing.err)


def test_content_is_a_unified_diff_like_diff_u(scenario: Scenario, qsnap_main: Callable[..., Run],
                                               tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    sh("debugfs", "-R", f'dump "/with space.txt" {a}', scenario.fs_a)
    sh("debugfs", "-R", f'dump "/with space.txt" {b}', scenario.fs_b)
    oracle = subprocess.run(["diff", "-u", a, b], capture_output=True, text=True).stdout.splitlines()
    result = qsnap_main(["-i", scenario.qcow2, "diff", "s1", "s2", "--content", "/with space.txt"])
    assert result.rc == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("--- ") and lines[1].startswith("+++ ")
    assert "s1" in lines[0] and "s2" in lines[1]
    assert lines[2:] == oracle[2:]
    same = qsnap_main(["-i", scenario.qcow2, "diff", "s2", "s3", "--content", "/with space.txt"])
    assert (same.rc, same.out.strip().count("\n")) == (0, 0)
    gone = qsnap_main(["-i", scenario.qcow2, "diff", "s1", "s2", "--content", "/no/such.txt"])
    assert gone.rc == 15


def test_identical_snapshots_have_no_file_changes(scenario: Scenario, qsnap_main: Callable[..., Run]) -> None:
    report = diff_json(qsnap_main, scenario.qcow2, "s2", "s3")
    assert (report["changes"], report["identical"], report["changed_blocks"]) == ([], True, 0)
    text = qsnap_main(["-i", scenario.qcow2, "diff", "s2", "s3", "--files"])
    assert (text.rc, text.out) == (0, "No file under / differs between s2 and s3.\n")
    again = qsnap_main(["-i", scenario.qcow2, "diff", "s1", "s1", "--files"])
    assert again.rc == 0 and again.out.startswith("No file under / differs")


def test_raw_write_into_a_data_block_is_found(scenario: Scenario, qsnap_main: Callable[..., Run],
                                              tmp_path: Path) -> None:
    report = diff_json(qsnap_main, scenario.qcow2, "s3", "s4")
    assert as_oracle(report) == oracle_changes(scenario.fs_b, scenario.fs_c, tmp_path) == {
        "/fifty.bin": ("modified", frozenset({"content"}))}
    assert report["full_scan"] is True
    both = diff_json(qsnap_main, scenario.qcow2, "s1", "s4")
    assert as_oracle(both) == oracle_changes(scenario.fs_a, scenario.fs_c, tmp_path / "2")


def test_duplicate_snapshot_names_are_chosen_by_id(scenario: Scenario, qsnap_main: Callable[..., Run],
                                                   tmp_path: Path) -> None:
    image = tmp_path / "dup.qcow2"
    shutil.copyfile(scenario.qcow2, image)
    sh("qemu-img", "snapshot", "-c", "s1", image)  # a second 's1' (ID 5): the state of s4
    ambiguous = qsnap_main(["-i", image, "cat", "s1:/with space.txt"])
    assert ambiguous.rc == 5 and "--id" in one_error_line(ambiguous.err)
    assert qsnap_main(["-i", image, "cat", "--id", "1", "s1:/with space.txt"]).out == "spaces\n"
    assert qsnap_main(["-i", image, "cat", "--id", "5", "s1:/with space.txt"]).out == "SPACES\n"
    by_id = diff_json(qsnap_main, image, "s1", "s1", "--a-id", "1", "--b-id", "5")
    by_name = diff_json(qsnap_main, scenario.qcow2, "s1", "s4")
    assert by_id["changes"] == by_name["changes"]
