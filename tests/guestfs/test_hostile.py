"""Hostile filesystems and destinations: every command ends with a clean error (exit 10, 13, 14 or 15,
one line on stderr, no traceback) or succeeds, in bounded time (pytest-timeout), and extract never
writes outside DEST.

Hostile images are made with debugfs, then bytes no tool would write are put in place by hand
(:func:`guestfs.fsbuild.patch_dirent_name`: a '/' or NUL inside a name, control characters, a stray
'..'), or by random byte changes (hypothesis, a bounded number of examples) in the superblock, the
inode table and directory blocks of small filesystems.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qsnap_testlib import Run, has_traceback

from .fsbuild import debugfs_r, debugfs_w, dir_blocks, e2fsck, fs_block_size, mkfs, patch_dirent_name, sh, to_qcow2

CLEAN_EXITS = (0, 10, 14, 15)


def assert_clean(result: Run, allowed: Sequence[int] = CLEAN_EXITS) -> None:
    """RESULT exited with an allowed code; a failure is one 'qsnap: error:' line (warnings aside)."""
    assert not has_traceback(result.err), result.err
    assert result.rc in allowed, result
    if result.rc:
        lines = [ln for ln in result.err.splitlines() if ln.strip() and not ln.startswith("warning: ")]
        assert len(lines) == 1 and lines[0].startswith("qsnap: error: "), result.err
        assert "unexpected error" not in result.err


def outside_untouched(parent: Path, dest_name: str) -> None:
    """PARENT (DEST's parent, made for the test) holds nothing but DEST (no partial or stray files)."""
    assert sorted(os.listdir(parent)) in ([], [dest_name]), os.listdir(parent)


# ------------------------------------------------------------------ hand-made hostile images

@dataclass(frozen=True)
class Hostile:
    qcow2: Path
    fs: Path


def _hostile(tmp_path: Path, commands: list[str], patches: Sequence[tuple[str, bytes, bytes]] = (),
             options: Sequence[str] = ("-t", "ext2", "-b", "4096")) -> Hostile:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "f").write_bytes(b"data\n")
    (src / "plain").write_bytes(b"plain\n")
    fs = mkfs(tmp_path / "fs.img", options, "8M", src)
    debugfs_w(fs, [c.replace("PLAIN", str(src / "plain")) for c in commands])
    for directory, old, new in patches:
        patch_dirent_name(fs, directory, old, new)
    return Hostile(to_qcow2(fs, tmp_path / "disk.qcow2", ["s1"]), fs)


@pytest.mark.timeout(120)
def test_directory_loop_is_exit_10_for_ls_extract_and_fsck(tmp_path: Path, qsnap_main: Callable[..., Run]) -> None:
    host = _hostile(tmp_path, ["link /a /a/b/loop"])  # /a/b/loop is /a again
    out = tmp_path / "x"
    out.mkdir()
    for argv in (["ls", "s1:/", "-R"], ["ls", "s1:/", "-R", "--json"], ["extract", "s1:/", out / "dest"],
                 ["extract", "s1:/a", out / "dest"], ["fsck", "s1"]):
        result = qsnap_main(["-i", host.qcow2, *argv])
        assert_clean(result, (10,))
    outside_untouched(out, "dest")
    assert not (out / "dest").exists()
    # a finite path through the loop is still an ordinary lookup
    result = qsnap_main(["-i", host.qcow2, "ls", "s1:/a/b/loop/b/loop/f"])
    assert (result.rc, result.out) == (0, "/a/b/loop/b/loop/f\n") or result.out.strip().endswith("f")


@pytest.mark.timeout(120)
def test_directory_loop_made_between_two_snapshots_ends_diff_cleanly(tmp_path: Path,
                                                                      qsnap_main: Callable[..., Run]) -> None:
    host = _hostile(tmp_path, [])
    raw = tmp_path / "loop.raw"
    shutil.copyfile(host.fs, raw)
    sh("qemu-img", "snapshot", "-c", "s0", host.qcow2)
    debugfs_w(raw, ["link /a /a/b/loop"])
    sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", raw, host.qcow2)
    sh("qemu-img", "snapshot", "-c", "s2", host.qcow2)
    result = qsnap_main(["-i", host.qcow2, "diff", "s0", "s2", "--files"])
    assert_clean(result, (0, 10))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("case", "commands", "patches", "message"), [
    ("slash", ["write PLAIN /AAAAxBBB"], [("/", b"AAAAxBBB", b"AAAA/BBB")], "invalid name"),
    ("nul", ["write PLAIN /NUL"], [("/", b"NUL", b"N\0L")], "invalid name"),
    ("stray-dotdot", ["mkdir /dots", "mkdir /dots/XX", "write PLAIN /dots/XX/pwned"], [("/dots", b"XX", b"..")],
     "second '.' or '..'"),
    ("stray-dot", ["mkdir /dots", "write PLAIN /dots/X"], [("/dots", b"X", b".")], "second '.' or '..'"),
])
def test_names_with_slash_nul_or_extra_dots_are_exit_10(case: str, commands: list[str],
                                                        patches: list[tuple[str, bytes, bytes]], message: str,
                                                        tmp_path: Path, qsnap_main: Callable[..., Run]) -> None:
    host = _hostile(tmp_path, commands, patches)
    out = tmp_path / "x"
    out.mkdir()
    before = sorted(os.listdir("/etc"))
    for argv in (["ls", "s1:/", "-R"], ["ls", "s1:/", "-R", "--json"], ["extract", "s1:/", out / "dest"],
                 ["fsck", "s1"]):
        result = qsnap_main(["-i", host.qcow2, *argv])
        assert_clean(result, (10,))
        if argv[0] != "fsck":
            assert message in result.err
    outside_untouched(out, "dest")
    assert not (out / "dest").exists()
    assert sorted(os.listdir("/etc")) == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("case", "commands", "patches"), [
    ("symlink-to-etc-then-a-dir", ["symlink /esc /etc", "mkdir /esX", "write PLAIN /esX/pwned"],
     [("/", b"esX", b"esc")]),
    ("symlink-to-etc-then-a-file", ["symlink /esc /etc", "write PLAIN /esX"], [("/", b"esX", b"esc")]),
    ("symlink-upwards-then-a-dir", ["mkdir /d", "symlink /d/up ../../../../../../../../OUTSIDE", "mkdir /d/uX",
                                    "write PLAIN /d/uX/pwned"], [("/d", b"uX", b"up")]),
])
def test_a_symlink_followed_by_an_entry_of_the_same_name_writes_nothing(
        case: str, commands: list[str], patches: list[tuple[str, bytes, bytes]], tmp_path: Path,
        qsnap_main: Callable[..., Run]) -> None:
    host = _hostile(tmp_path, commands, patches)
    out = tmp_path / "x"
    out.mkdir()
    before = sorted(os.listdir("/etc"))
    for target in ("s1:/", "s1:/d"):
        result = qsnap_main(["-i", host.qcow2, "extract", target, out / "dest"])
        if target == "s1:/d" and not case.startswith("symlink-upwards"):
            assert_clean(result, (15,))
            continue
        assert_clean(result, (10,))
        assert "holds two entries named" in result.err
    outside_untouched(out, "dest")
    assert not (out / "dest").exists()
    assert sorted(os.listdir("/etc")) == before and not Path("/etc/pwned").exists()
    assert not (tmp_path / "OUTSIDE").exists() and not Path("/OUTSIDE").exists()
    assert_clean(qsnap_main(["-i", host.qcow2, "ls", "s1:/", "-R", "--json"]), (0, 10))
    assert_clean(qsnap_main(["-i", host.qcow2, "fsck", "s1"]), (10,))


@pytest.mark.timeout(120)
def test_root_inode_that_is_not_a_directory_is_exit_10(tmp_path: Path, qsnap_main: Callable[..., Run]) -> None:
    host = _hostile(tmp_path, ["clri <2>"])
    out = tmp_path / "x"
    out.mkdir()
    for argv in (["ls", "s1:/"], ["ls", "s1:/", "-R", "--json"], ["extract", "s1:/", out / "dest"],
                 ["cat", "s1:/plain"]):
        result = qsnap_main(["-i", host.qcow2, *argv])
        assert_clean(result, (10,))
        assert "root inode (2) is not a directory" in result.err
    outside_untouched(out, "dest")


@pytest.mark.timeout(120)
def test_control_characters_are_escaped_in_text_and_raw_in_json(tmp_path: Path,
                                                                qsnap_main: Callable[..., Run]) -> None:
    host = _hostile(tmp_path, ["write PLAIN /ctrl"], [("/", b"ctrl", b"\x1b[1m")])
    text = qsnap_main(["-i", host.qcow2, "ls", "s1:/", "-l"])
    assert text.rc == 0 and "\x1b" not in text.out
    assert any(line.endswith("\\x1b[1m") for line in text.out.splitlines()), text.out
    listing = json.loads(qsnap_main(["-i", host.qcow2, "ls", "s1:/", "--json"]).out)
    assert "\x1b[1m" in [e["name"] for e in listing["entries"]]
    out = tmp_path / "x"
    out.mkdir()
    result = qsnap_main(["-i", host.qcow2, "extract", "s1:/", out / "dest"])
    assert result.rc == 0 and "\x1b" not in result.out + result.err
    assert (out / "dest" / "\x1b[1m").read_bytes() == b"plain\n"  # a legal name: made, inside DEST
    outside_untouched(out, "dest")


@pytest.mark.timeout(120)
def test_absolute_and_upward_symlinks_are_made_never_followed(tmp_path: Path, qsnap_main: Callable[..., Run]) -> None:
    host = _hostile(tmp_path, ["symlink /etclink /etc", "symlink /up ../../../../../../../../..",
                               "symlink /a/b/passwd ../../../../etc/passwd"])
    out = tmp_path / "x"
    out.mkdir()
    before = sorted(os.listdir("/etc"))
    result = qsnap_main(["-i", host.qcow2, "extract", "s1:/", out / "dest"])
    assert result.rc == 0, result.err
    outside_untouched(out, "dest")
    assert sorted(os.listdir("/etc")) == before
    assert os.readlink(out / "dest" / "etclink") == "/etc"  # a link is made, never followed
    assert os.readlink(out / "dest" / "a" / "b" / "passwd") == "../../../../etc/passwd"
    for dirpath, _dirs, files in os.walk(out / "dest"):  # os.walk does not follow symlinks
        for name in files:
            full = Path(dirpath) / name
            if not full.is_symlink():
                assert full.resolve().is_relative_to((out / "dest").resolve()), full
    # lookups resolve symlinks inside the guest filesystem, never on the host
    for target in ("s1:/etclink/passwd", "s1:/a/b/passwd"):
        result = qsnap_main(["-i", host.qcow2, "cat", target])
        assert (result.rc, result.out) == (15, ""), result
    result = qsnap_main(["-i", host.qcow2, "cat", "s1:/up/plain"])  # '..' above / is / itself
    assert (result.rc, result.out) == (0, "plain\n")


@pytest.mark.timeout(120)
def test_symlink_loop_is_a_clean_error(tmp_path: Path, qsnap_main: Callable[..., Run]) -> None:
    host = _hostile(tmp_path, ["symlink /sl1 sl2", "symlink /sl2 sl1", "symlink /self self"])
    for target in ("s1:/sl1", "s1:/self", "s1:/sl1/x"):
        result = qsnap_main(["-i", host.qcow2, "cat", target])
        assert_clean(result, (14, 15))
        assert result.rc != 0
    assert qsnap_main(["-i", host.qcow2, "ls", "s1:/", "-l"]).rc == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("options", "field", "value"), [
    (("-t", "ext4", "-b", "4096"), "block[5]", "4000000"),  # the first extent's start (ee_start_lo)
    (("-t", "ext4", "-O", "64bit,metadata_csum", "-b", "1024"), "block[5]", "4000000"),
    (("-t", "ext2", "-b", "1024"), "block[IND]", "99999999"),  # an indirect block past the end
    (("-t", "ext2", "-o", "hurd", "-b", "1024"), "block[DIND]", "99999999"),
])
def test_block_map_pointing_past_the_disk_is_exit_10(options: tuple[str, ...], field: str, value: str,
                                                     tmp_path: Path, qsnap_main: Callable[..., Run]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(300_000))  # past the direct blocks and the first indirect one at 1 KiB
    (src / "ok").write_bytes(b"fine\n")
    fs = mkfs(tmp_path / "fs.img", options, "8M", src)
    debugfs_w(fs, [f"sif /big {field} {value}"])
    image = to_qcow2(fs, tmp_path / "disk.qcow2", ["s1"])
    out = tmp_path / "x"
    out.mkdir()
    for argv in (["cat", "s1:/big"], ["extract", "s1:/", out / "dest"], ["extract", "s1:/big", out / "dest"]):
        assert_clean(qsnap_main(["-i", image, *argv]), (10,))
    full = e2fsck(fs, "-fn").returncode  # 4: errors found; 12: e2fsck itself gave up on them
    assert full & 4
    # e2fsck's 12 (it gave up on the damage) is still damage: exit 10 either way
    assert_clean(qsnap_main(["-i", image, "fsck", "s1"]), (10,))
    outside_untouched(out, "dest")
    assert not (out / "dest").exists()  # nothing half-extracted is left behind
    listing = qsnap_main(["-i", image, "ls", "s1:/", "--json"])  # the inode itself is fine
    assert listing.rc == 0
    assert {e["name"] for e in json.loads(listing.out)["entries"]} >= {"big", "ok"}
    assert qsnap_main(["-i", image, "cat", "s1:/ok"]).out == "fine\n"


# ------------------------------------------------------------------ destinations

@pytest.mark.timeout(120)
def test_existing_dest_is_exit_13_and_force_replaces_it(tmp_path: Path, qsnap_main: Callable[..., Run]) -> None:
    host = _hostile(tmp_path, ["symlink /etclink /etc", "mknod dev0 b 8 0"])
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a").mkdir()
    (dest / "a" / "keep").write_text("mine")
    result = qsnap_main(["-i", host.qcow2, "extract", "s1:/a", dest])  # an existing directory receives 'a'
    assert result.rc == 13, result
    assert (dest / "a" / "keep").read_text() == "mine"
    assert_clean(result, (13,))
    file_dest = tmp_path / "file"
    file_dest.write_text("mine")
    assert qsnap_main(["-i", host.qcow2, "extract", "s1:/plain", file_dest]).rc == 13
    assert file_dest.read_text() == "mine"
    link_dest = tmp_path / "link"
    link_dest.symlink_to("/etc")  # a DEST that is a symlink is never followed into
    result = qsnap_main(["-i", host.qcow2, "extract", "s1:/plain", link_dest])
    assert result.rc == 13 and not Path("/etc/plain").exists()
    result = qsnap_main(["-i", host.qcow2, "extract", "s1:/a", dest, "--force"])
    assert result.rc == 0, result.err
    assert sorted(os.listdir(dest / "a")) == ["b", "f"]
    assert qsnap_main(["-i", host.qcow2, "extract", "s1:/plain", file_dest, "--force"]).rc == 0
    assert file_dest.read_text() == "plain\n"
    result = qsnap_main(["-i", host.qcow2, "extract", "s1:/plain", link_dest, "--force"])
    assert result.rc == 0 and not link_dest.is_symlink() and link_dest.read_text() == "plain\n"
    assert not Path("/etc/plain").exists()
    # a device node is never created
    result = qsnap_main(["-i", host.qcow2, "extract", "s1:/", tmp_path / "all", "--json"])
    assert result.rc == 0, result.err
    assert json.loads(result.out)["skipped"] == ["/dev0 (block)"]
    assert not (tmp_path / "all" / "dev0").exists()
    assert os.readlink(tmp_path / "all" / "etclink") == "/etc"
    result = qsnap_main(["-i", host.qcow2, "extract", "s1:/nope", tmp_path / "none"])
    assert_clean(result, (15,))
    assert not (tmp_path / "none").exists()


# ------------------------------------------------------------------ fuzzing

FUZZ_KINDS = {
    "ext4": ("-t", "ext4", "-b", "1024"),
    "ext2": ("-t", "ext2", "-b", "1024"),
    "hurd": ("-t", "ext2", "-o", "hurd"),
    "csum": ("-t", "ext4", "-O", "64bit,metadata_csum,inline_data", "-b", "4096"),
}
#: Where bytes are changed.
FUZZ_REGIONS = ("superblock", "group_descriptors", "inode_table", "root_dir", "subdir")


@dataclass(frozen=True)
class FuzzBase:
    qcow2: bytes  # the image file's bytes (snapshot s1 taken)
    host_offset: Callable[[int], int]  # guest byte offset -> offset in the qcow2 file
    regions: dict[str, tuple[int, int]]  # name -> (guest offset, length)


def _fuzz_base(work: Path, kind: str) -> FuzzBase:
    src = work / "src"
    (src / "d" / "e").mkdir(parents=True)
    for i in range(30):
        (src / "d" / f"f{i:02d}").write_bytes(bytes([i]) * (i * 300))
    (src / "d" / "e" / "x").write_bytes(b"x" * 5000)
    (src / "tiny").write_bytes(b"tiny")
    os.symlink("d/e/x", src / "ln")
    fs = mkfs(work / "fs.img", FUZZ_KINDS[kind], "4M", src)
    bs = fs_block_size(fs)
    table = int(debugfs_r(fs, "stats").split("inode table at ")[1].split()[0].rstrip(","))
    regions = {
        "superblock": (1024, 1024),
        "group_descriptors": ((2 if bs == 1024 else 1) * bs, 64),
        "inode_table": (table * bs, 32 * 128),
        "root_dir": (dir_blocks(fs, "/")[0] * bs, bs) if dir_blocks(fs, "/") else (table * bs, 256),
        "subdir": (dir_blocks(fs, "/d")[0] * bs, bs),
    }
    image = to_qcow2(fs, work / "disk.qcow2", ["s1"])
    mapping = json.loads(sh("qemu-img", "map", "--output=json", "-f", "qcow2", image).stdout)
    runs = [(m["start"], m["length"], m["offset"]) for m in mapping if m.get("data") and "offset" in m]

    def host_offset(guest: int) -> int:
        for start, length, offset in runs:
            if start <= guest < start + length:
                return int(offset + guest - start)
        raise AssertionError(f"guest offset {guest} is not allocated in the image")

    return FuzzBase(image.read_bytes(), host_offset, regions)


@pytest.fixture(scope="module")
def fuzz_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FuzzBase]:
    return {kind: _fuzz_base(tmp_path_factory.mktemp(f"fuzz-{kind}"), kind) for kind in FUZZ_KINDS}


@pytest.mark.timeout(600)
@settings(max_examples=24, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(FUZZ_KINDS)), region=st.sampled_from(FUZZ_REGIONS),
       changes=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=16))
def test_fuzzed_filesystem_ends_cleanly(kind: str, region: str, changes: list[tuple[int, int]],
                                        fuzz_bases: dict[str, FuzzBase], tmp_path_factory: pytest.TempPathFactory,
                                        qsnap_main: Callable[..., Run]) -> None:
    base = fuzz_bases[kind]
    start, length = base.regions[region]
    data = bytearray(base.qcow2)
    for where, value in changes:  # in the qcow2's data cluster: s1 and the current state share it
        data[base.host_offset(start + where % length)] = value
    work = tmp_path_factory.mktemp("fuzzed")
    image = work / "disk.qcow2"
    image.write_bytes(data)
    out = work / "x"
    out.mkdir()
    for argv in (["ls", "s1:/", "-R", "--json"], ["ls", "s1:/d", "-l"], ["extract", "s1:/", out / "dest"],
                 ["extract", "s1:/d", out / "dest2"], ["cat", "s1:/d/e/x"], ["cat", "s1:/ln"], ["fsck", "s1"],
                 ["parts", "s1"]):
        assert_clean(qsnap_main(["-i", image, *argv]))
    assert sorted(os.listdir(out)) in ([], ["dest"], ["dest2"], ["dest", "dest2"]), os.listdir(out)
    shutil.rmtree(work)
