"""`qsnap fsck SNAP`: its verdict and findings against the real ``e2fsck -fn`` run on a full raw
copy of the same filesystem, clean and after damage made with debugfs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from qsnap_testlib import Run

from .conftest import Built
from .fsbuild import debugfs_w, e2fsck, first_block, make_disk, to_qcow2

pytestmark = pytest.mark.timeout(120)

#: e2fsck's progress and summary lines: not findings.
ROUTINE = ("Pass 1:", "Pass 2:", "Pass 3:", "Pass 4:", "Pass 5:", "e2fsck ")


def e2fsck_findings(fs: Path, label: str) -> tuple[int, list[str]]:
    """``e2fsck -fn`` on the full filesystem image: its exit code and its problem lines (the image
    path replaced by LABEL, progress and the files/blocks summary left out)."""
    result = e2fsck(fs, "-fn")
    text = (result.stdout + result.stderr).decode(errors="replace").replace(str(fs), label)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(ROUTINE)
             and not (" files (" in line and "non-contiguous" in line)]
    return result.returncode, lines


def fsck_json(qsnap_main: Callable[..., Run], image: Path) -> tuple[int, dict[str, object], str]:
    result = qsnap_main(["-i", image, "fsck", "s1", "--json"])
    return result.rc, dict(json.loads(result.out)), result.err


@pytest.mark.parametrize("variant", ["ext4-4k", "hurd-1k", "ext3-4k", "ext4-64bit-csum", "ext4-inline"])
def test_clean_filesystem_is_exit_0(variant: str, built_fs: Callable[[str], Built],
                                    qsnap_main: Callable[..., Run]) -> None:
    built = built_fs(variant)
    assert e2fsck(built.fs, "-fn").returncode == 0
    rc, report, err = fsck_json(qsnap_main, built.qcow2)
    assert rc == 0, err
    assert (report["clean"], report["e2fsck_exit_code"], report["findings"]) == (True, 0, [])
    assert report["partition"] == built.layout.number
    assert 0 < report["metadata_bytes"] < built.fs.stat().st_size  # type: ignore[operator]
    text = qsnap_main(["-i", built.qcow2, "fsck", "s1"])
    assert text.rc == 0 and " is clean (e2fsck -fn" in text.out


def _damage(kind: str, fs: Path) -> list[str]:
    if kind == "links_count":
        return ["sif /small.txt links_count 7"]
    if kind == "clri_file":
        return ["clri /page.bin"]
    if kind == "clri_dir":
        return ["clri /deep/level00/level01"]
    if kind == "freeb":
        return [f"freeb {first_block(fs, '/big.bin')}"]
    if kind == "bg_free_blocks":
        return ["set_bg 0 free_blocks_count 3"]
    if kind == "unattached":
        return ["unlink /links/target.txt"]
    raise ValueError(kind)


DAMAGES = ["links_count", "clri_file", "clri_dir", "freeb", "bg_free_blocks", "unattached"]


@pytest.mark.parametrize("variant", ["ext4-4k", "hurd-1k"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_damage_is_exit_10_with_e2fsck_findings(damage: str, variant: str, built_fs: Callable[[str], Built],
                                                qsnap_main: Callable[..., Run], tmp_path: Path) -> None:
    built = built_fs(variant)
    fs = tmp_path / "fs.img"
    shutil.copyfile(built.fs, fs)
    debugfs_w(fs, _damage(damage, fs))
    layout = make_disk(fs, tmp_path / "disk.raw", "mbr" if variant.startswith("hurd") else "gpt")
    image = to_qcow2(tmp_path / "disk.raw", tmp_path / "disk.qcow2", ["s1"])
    want_rc, want = e2fsck_findings(fs, f"s1:partition{layout.number}")
    assert want_rc == 4 and want, "the damage must be one e2fsck -fn reports"
    rc, report, err = fsck_json(qsnap_main, image)
    assert rc == 10, err
    assert (report["clean"], report["e2fsck_exit_code"]) == (False, want_rc)
    assert report["findings"] == want
    text = qsnap_main(["-i", image, "fsck", "s1"])
    assert text.rc == 10
    assert "is DAMAGED (e2fsck -fn exit 4):" in text.out
    assert [line.strip() for line in text.out.splitlines()[1:]] == want
    err_lines = text.err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("qsnap: error: ") and want[0] in err_lines[0]
