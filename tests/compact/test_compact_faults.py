"""Faults: kill -9 at every step of `qsnap compact` leaves the old or the new image in place (and
the next run says what it found), a full disk before and during the run, no partial file left."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from compact_helpers import assert_same_images, check_clean, copy, history, snapshot_records
from qsnap_testlib import QSNAP, Run, clean_environ

from qsnap.backup.partial import InsufficientSpace
from qsnap.compact.build import REPLAY_ENV


def run_killed_at(image: Path, point: str) -> int:
    """`qsnap compact` in a subprocess that SIGKILLs itself at checkpoint POINT (the test hook);
    the points inside the build name their way of building it (copy: data, written; replay:
    snapshot-N)."""
    env = clean_environ({"QSNAP_COMPACT_KILL_AT": point, REPLAY_ENV: "1" if point.startswith("snapshot-") else ""})
    done = subprocess.run([str(QSNAP), "-i", str(image), "compact"], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    return done.returncode


@pytest.mark.parametrize("point", ["data", "snapshot-2", "verified", "linked", "swapped"])
def test_kill_9_leaves_the_old_or_the_new_image(qsnap_main: object, tmp_path: Path, point: str) -> None:
    image = history(tmp_path / "disk.qcow2")
    original = copy(image, tmp_path / "original.qcow2")
    assert run_killed_at(image, point) == -9
    # whatever the moment, IMAGE is a whole image holding exactly the original's snapshots and data
    check_clean(image)
    assert_same_images(original, image, tmp_path / "raw")
    new_in_place = image.read_bytes() != original.read_bytes()
    assert new_in_place == (point == "swapped")
    # the next run says what it found, cleans up what is safe to remove, and compacts
    rc, _out, err = qsnap_main(["-i", image, "compact"])  # type: ignore[operator]
    assert rc == 0, err
    if point in ("swapped",):
        assert "holds the image as it was before an earlier compact" in err
    elif point == "linked":
        assert "a second name of disk.qcow2 left by an interrupted compact" in err
    else:
        assert "removed disk.qcow2.partial, left by an interrupted compact" in err
    assert not (tmp_path / "disk.qcow2.partial").exists() and not (tmp_path / "disk.qcow2.partial.d").exists()
    check_clean(image)
    assert_same_images(original, image, tmp_path / "raw")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (needs root): {done.stderr.decode()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_refused_before_starting(qsnap_main: object, small_fs: Path) -> None:
    image = history(small_fs / "disk.qcow2")
    before = image.read_bytes()
    r: Run = qsnap_main(["-i", image, "compact"])  # type: ignore[operator]
    assert r.rc == 1 and "Not enough free space" in r.err and "nothing was written" in r.err
    assert image.read_bytes() == before
    assert not [p for p in small_fs.iterdir() if "partial" in p.name]


def test_disk_filling_up_midway_is_a_clear_error(qsnap_main: object, small_fs: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import qsnap.backup.partial as partial

    image = history(small_fs / "disk.qcow2")
    original = copy(image, tmp_path / "original.qcow2")
    # let it start (the free-space check is skipped: a real tmpfs then fills up under qemu-io)
    monkeypatch.setattr(partial, "check_space", lambda *a, **k: None)
    r: Run = qsnap_main(["-i", image, "compact"])  # type: ignore[operator]
    assert r.rc == InsufficientSpace.exit_code and "filled up while compacting" in r.err, r.err
    assert image.read_bytes() == original.read_bytes()
    assert not [p for p in small_fs.iterdir() if "partial" in p.name]
    assert snapshot_records(image) == snapshot_records(original)
    assert os.statvfs(small_fs).f_bfree > 0


def test_a_wrong_copy_is_caught_and_the_image_kept(qsnap_main: object, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Verification is real: a copy that puts one run of clusters one cluster off (injected
    here: a bug cannot be made to happen on demand) makes compact fail with exit 11 and change
    nothing."""
    from qsnap.compact import remap

    image = history(tmp_path / "disk.qcow2")
    original = image.read_bytes()
    real = remap._Copier.copy
    shifted: list[int] = []

    def off_by_one(self: remap._Copier, src_off: int, dst_off: int, length: int) -> None:
        if not shifted and length > 65536:
            shifted.append(src_off)
            src_off, length = src_off + 65536, length - 65536
        real(self, src_off, dst_off, length)

    monkeypatch.setattr(remap._Copier, "copy", off_by_one)
    r: Run = qsnap_main(["-i", image, "compact"])  # type: ignore[operator]
    assert shifted
    assert r.rc == 11 and "differs" in r.err, r.err
    assert image.read_bytes() == original
    assert not (tmp_path / "disk.qcow2.partial").exists() and not list(tmp_path.glob("disk.qcow2.old-*"))


def test_a_lost_write_in_the_replay_is_caught_and_the_image_kept(qsnap_main: object, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for the replay path: a planner that loses one write makes compact fail with
    exit 11 and change nothing."""
    from qsnap.compact import plan

    monkeypatch.setenv(REPLAY_ENV, "1")

    image = history(tmp_path / "disk.qcow2")
    original = image.read_bytes()
    real = plan.Planner.materialize
    dropped: list[int] = []

    def lossy(self: plan.Planner, ops: Iterator[plan.Op], *args: object, **kwargs: object) -> Iterator[plan.Op]:
        for op in real(self, ops, *args, **kwargs):  # type: ignore[arg-type]
            if op.kind == plan.OP_DATA and not dropped:
                dropped.append(op.offset)
                continue
            yield op

    monkeypatch.setattr(plan.Planner, "materialize", lossy)
    r: Run = qsnap_main(["-i", image, "compact"])  # type: ignore[operator]
    assert dropped
    assert r.rc == 11 and "guest data differs" in r.err, r.err
    assert image.read_bytes() == original
    assert not (tmp_path / "disk.qcow2.partial").exists() and not list(tmp_path.glob("disk.qcow2.old-*"))
