"""Backups against the real qemu-img/qemu-io: formats, safety rules, verify, import, archive."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pyrage
import pytest

from qsnap.backup import EncryptionSpec, archive, export_snapshot, import_backup, verify_backup
from qsnap.backup.model import utc_now
from qsnap.backup.partial import InsufficientSpace
from qsnap.core.errors import LockBusy, OutputExists, UsageError, VerificationFailed

from .conftest import reads, run, snap, write


def restored_qcow2(backup: Path, tmp_path: Path) -> Path:
    """Turn a backup into a plain qcow2 with the user's own tools (gunzip, zstd)."""
    out = tmp_path / "restored.qcow2"
    if backup.name.endswith(".gz"):
        out.write_bytes(subprocess.run(["gunzip", "-c", str(backup)], check=True, capture_output=True).stdout)
    elif backup.name.endswith(".zst"):
        run("zstd", "-q", "-d", str(backup), "-o", str(out))
    else:
        return backup
    return out


@pytest.mark.parametrize("name,compress", [("b.qcow2", False), ("b.qcow2", True), ("b.qcow2.gz", False),
                                           ("b.qcow2.zst", False), ("b.raw", False), ("b.img", False)])
def test_every_format_restores_the_snapshot(image: Path, tmp_path: Path, name: str, compress: bool) -> None:
    out = tmp_path / "out" / "nested" / name
    result = export_snapshot(image, snap(image, "later"), out, compress=compress)
    assert out.is_file() and result.size == out.stat().st_size
    disk = restored_qcow2(out, tmp_path)
    fmt = "raw" if name.endswith((".raw", ".img")) else "qcow2"
    if fmt == "qcow2":
        assert subprocess.run(["qemu-img", "check", "-q", str(disk)]).returncode == 0
    assert reads(disk, 0x11, "0", "1M", fmt) and reads(disk, 0x22, "1M", "512k", fmt)
    assert reads(disk, 0x00, "2M", "6M", fmt)
    # the snapshot, not the current state (0x33)
    assert not reads(disk, 0x33, "0", "64k", fmt)
    verify_backup(out, against=(image, snap(image, "later")))


def test_compress_uses_qcow2_compressed_clusters(image: Path, tmp_path: Path) -> None:
    plain = export_snapshot(image, snap(image, "base"), tmp_path / "p.qcow2")
    packed = export_snapshot(image, snap(image, "base"), tmp_path / "c.qcow2", compress=True)
    assert packed.size < plain.size
    assert packed.manifest["compression"].startswith("qcow2-")


def test_gzip_output_is_multi_member_and_gunzips(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.qcow2.gz"
    export_snapshot(image, snap(image, "base"), out)
    data = gzip.decompress(out.read_bytes())
    assert data[:4] == b"QFI\xfb"


def test_current_state_when_snapshot_is_none(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "cur.qcow2.zst"
    result = export_snapshot(image, None, out)
    assert reads(restored_qcow2(out, tmp_path), 0x33, "0", "64k")
    assert result.manifest["source"]["snapshot"] is None


def test_manifest_fields_and_private_modes(image: Path, tmp_path: Path) -> None:
    os.umask(0o022)
    out = tmp_path / "b.qcow2.zst"
    result = export_snapshot(image, snap(image, "base"), out, level=5)
    manifest = json.loads((tmp_path / "b.qcow2.zst.json").read_text())
    assert manifest == result.manifest
    for key in ("format_version", "qsnap_version", "created_at", "size", "sha256", "format", "compression",
                "level", "duration_s", "sizes", "payload", "source", "incremental", "encryption"):
        assert key in manifest
    assert manifest["source"]["image"] == str(image.resolve())
    assert manifest["source"]["snapshot"]["name"] == "base" and manifest["source"]["snapshot"]["id"] == "1"
    assert manifest["format"] == "qcow2.zst" and manifest["compression"] == "zstd" and manifest["level"] == 5
    import hashlib
    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert manifest["size"] == out.stat().st_size
    assert out.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "b.qcow2.zst.json").stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("*.partial"))


def test_existing_output_is_refused_unless_force(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.qcow2"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExists) as info:
        export_snapshot(image, snap(image, "base"), out)
    assert info.value.exit_code == 13 and out.read_bytes() == b"precious"
    export_snapshot(image, snap(image, "base"), out, force=True)
    assert reads(out, 0x11, "0", "1M")


def test_unknown_extension_is_a_usage_error(image: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        export_snapshot(image, snap(image, "base"), tmp_path / "b.tar")
    assert not list(tmp_path.glob("b.*"))


@pytest.mark.parametrize("name", ["b.qcow2", "b.qcow2.zst", "b.qcow2.gz"])
def test_ctrl_c_removes_the_partial_file(image: Path, tmp_path: Path, name: str) -> None:
    def interrupt(done: int, total: int) -> None:
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_snapshot(image, snap(image, "base"), tmp_path / name, progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.qcow2", "rnd.bin"]


SLOW_BACKUP = """
import sys, time
from pathlib import Path
from qsnap.backup import export_snapshot
from qsnap.engines import qemu_img
image, out = Path(sys.argv[1]), Path(sys.argv[2])
snap = qemu_img.list_snapshots(image)[0]
def slow(done, total):
    print("progress", flush=True)
    time.sleep(0.5)
export_snapshot(image, snap, out, progress=slow)
"""


def test_kill_9_leaves_no_output_and_next_run_cleans_the_stale_partial(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.qcow2.zst"
    child = subprocess.Popen([sys.executable, "-c", SLOW_BACKUP, str(image), str(out)], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        child.stdout.readline()
        partial = tmp_path / "b.qcow2.zst.partial"
        assert partial.exists()
        # while the writer lives, its flock makes a second run refuse
        with pytest.raises(LockBusy):
            export_snapshot(image, snap(image, "base"), out)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert not out.exists() and partial.exists()
    result = export_snapshot(image, snap(image, "base"), out)
    assert any("stale partial" in w for w in result.warnings)
    assert not partial.exists() and out.exists()
    verify_backup(out)


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (needs root): {done.stderr.decode()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("name", ["b.qcow2", "b.qcow2.zst", "b.raw"])
def test_full_disk_is_refused_before_starting(image: Path, small_fs: Path, name: str) -> None:
    with pytest.raises(InsufficientSpace) as info:
        export_snapshot(image, snap(image, "base"), small_fs / name)
    assert "free space" in str(info.value)
    assert list(small_fs.iterdir()) == []


@pytest.mark.parametrize("name", ["b.qcow2", "b.qcow2.zst", "b.qcow2.gz"])
def test_disk_filling_up_midway_is_a_clear_error(image: Path, small_fs: Path, name: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import qsnap.backup.export as export

    monkeypatch.setattr(export, "check_space", lambda *a, **k: None)  # let it start, then fill the disk
    with pytest.raises(InsufficientSpace) as info:
        export_snapshot(image, snap(image, "base"), small_fs / name)
    assert "filled up" in str(info.value)
    assert list(small_fs.iterdir()) == []


def test_incremental_holds_only_changes_and_verifies_the_chain(image: Path, tmp_path: Path) -> None:
    full = export_snapshot(image, snap(image, "base"), tmp_path / "full.qcow2")
    inc = export_snapshot(image, snap(image, "later"), tmp_path / "inc.qcow2", incremental=True)
    assert inc.incremental_base == tmp_path / "full.qcow2"
    assert inc.manifest["incremental"]["base_sha256"] == full.sha256
    assert inc.manifest["incremental"]["changed_clusters"] == 8  # 512 KiB / 64 KiB
    assert inc.size < full.size / 3
    assert reads(tmp_path / "inc.qcow2", 0x11, "0", "1M") and reads(tmp_path / "inc.qcow2", 0x22, "1M", "512k")
    report = verify_backup(tmp_path / "inc.qcow2", against=(image, snap(image, "later")))
    assert report.chain == (tmp_path / "inc.qcow2", tmp_path / "full.qcow2")
    # a base that is gone breaks the chain: exit 11
    (tmp_path / "full.qcow2").rename(tmp_path / "moved.qcow2")
    with pytest.raises(VerificationFailed, match="base"):
        verify_backup(tmp_path / "inc.qcow2")


def test_incremental_of_current_state_with_zeroed_region(image: Path, tmp_path: Path) -> None:
    export_snapshot(image, snap(image, "later"), tmp_path / "full.qcow2")
    run("qemu-io", "-f", "qcow2", "-c", "write -z 8M 1M", str(image))
    inc = export_snapshot(image, None, tmp_path / "inc.qcow2", incremental=True)
    assert inc.manifest["incremental"]["diff"] == "metadata"  # 'later' is still in the image
    disk = tmp_path / "inc.qcow2"
    assert reads(disk, 0x33, "0", "64k") and reads(disk, 0x00, "8M", "1M")
    verify_backup(disk, against=(image, None))
    # next: the base's source is the current state, which has no snapshot: contents are compared
    write(image, 0x44, "20M", "64k")
    inc2 = export_snapshot(image, None, tmp_path / "inc2.qcow2", incremental=True)
    assert inc2.manifest["incremental"]["diff"] == "content"
    assert inc2.manifest["incremental"]["base"] == "inc.qcow2"
    assert inc2.manifest["incremental"]["changed_clusters"] == 1
    report = verify_backup(tmp_path / "inc2.qcow2", against=(image, None))
    assert len(report.chain) == 3


def test_incremental_without_a_previous_backup_is_refused(image: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="full backup first"):
        export_snapshot(image, snap(image, "base"), tmp_path / "inc.qcow2", incremental=True)


def test_luks_encrypted_qcow2(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "e.qcow2"
    result = export_snapshot(image, snap(image, "base"), out, encrypt=EncryptionSpec("s3cret"))
    assert result.manifest["encryption"] == {"scheme": "qcow2-luks", "key": "passphrase"}
    assert "s3cret" not in json.dumps(result.manifest)
    info = json.loads(run("qemu-img", "info", "--output=json", str(out)))
    assert info["encrypted"] is True
    verify_backup(out, passphrase="s3cret")
    with pytest.raises(VerificationFailed):
        verify_backup(out, passphrase="wrong")


def test_age_encrypted_stream_is_standard_age(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "e.qcow2.zst.age"
    export_snapshot(image, snap(image, "base"), out, encrypt=EncryptionSpec("s3cret"))
    assert out.read_bytes().startswith(b"age-encryption.org/v1\n-> scrypt ")
    plain = pyrage.passphrase.decrypt(out.read_bytes(), "s3cret")  # any age tool opens it
    (tmp_path / "p.zst").write_bytes(plain)
    assert reads(restored_qcow2(tmp_path / "p.zst", tmp_path), 0x11, "0", "1M")
    verify_backup(out, passphrase="s3cret", against=(image, snap(image, "base")))
    target = tmp_path / "img.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(target), "1M")
    before = target.read_bytes()
    with pytest.raises(VerificationFailed, match="passphrase"):
        import_backup(out, target, passphrase="wrong")
    assert target.read_bytes() == before


def test_encrypted_stream_needs_age_suffix(image: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"\.age"):
        export_snapshot(image, snap(image, "base"), tmp_path / "e.qcow2.zst", encrypt=EncryptionSpec("x"))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["b.qcow2", "b.qcow2.gz", "b.qcow2.zst", "b.raw"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_backup_fails_verify_and_import_leaves_image(image: Path, tmp_path: Path, name: str,
                                                             damage: str) -> None:
    out = tmp_path / name
    export_snapshot(image, snap(image, "base"), out)
    size = out.stat().st_size
    if damage == "flip":
        _flip(out, size // 2)
    else:
        with open(out, "r+b") as handle:
            handle.truncate(size - 100)
    with pytest.raises(VerificationFailed) as info:
        verify_backup(out)
    assert info.value.exit_code == 11
    before = image.read_bytes()
    with pytest.raises(VerificationFailed):
        import_backup(out, image)
    assert image.read_bytes() == before
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.bak-*"))


def test_stream_checker_catches_damage_the_manifest_would_miss(image: Path, tmp_path: Path) -> None:
    """Rewrite the manifest's checksums after damaging the payload: the structure check still fails."""
    import zstandard

    out = tmp_path / "b.qcow2.zst"
    export_snapshot(image, snap(image, "base"), out)
    reader = zstandard.ZstdDecompressor().stream_reader(out.read_bytes(), read_across_frames=True)
    payload = bytearray(reader.read())  # every frame
    payload[65536 + 3] ^= 0x40  # the L1 table
    out.write_bytes(zstandard.ZstdCompressor().compress(bytes(payload)))
    manifest = json.loads((tmp_path / "b.qcow2.zst.json").read_text())
    import hashlib
    manifest.update(size=out.stat().st_size, sha256=hashlib.sha256(out.read_bytes()).hexdigest())
    manifest["payload"]["sha256"] = hashlib.sha256(bytes(payload)).hexdigest()
    (tmp_path / "b.qcow2.zst.json").write_text(json.dumps(manifest))
    with pytest.raises(VerificationFailed, match=r"qcow2 stream|L2|check"):
        verify_backup(out)


def test_verify_against_detects_other_content(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.qcow2.gz"
    export_snapshot(image, snap(image, "base"), out)
    with pytest.raises(VerificationFailed, match="content"):
        verify_backup(out, against=(image, snap(image, "later")))


def test_missing_manifest_fails_verify(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.qcow2"
    export_snapshot(image, snap(image, "base"), out)
    (tmp_path / "b.qcow2.json").unlink()
    with pytest.raises(VerificationFailed, match="manifest"):
        verify_backup(out)


@pytest.mark.parametrize("name", ["b.qcow2", "b.qcow2.gz", "b.qcow2.zst", "b.raw"])
def test_import_replaces_image_and_keeps_the_previous_one(image: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / "backups" / name
    export_snapshot(image, snap(image, "later"), out)
    old = image.read_bytes()
    result = import_backup(out, image)
    assert result.previous is not None and result.previous.read_bytes() == old
    assert reads(image, 0x22, "1M", "512k") and reads(image, 0x11, "0", "1M")
    assert json.loads(run("qemu-img", "info", "--output=json", str(image)))["format"] == "qcow2"
    assert not list(tmp_path.glob("*.partial"))


def test_import_of_incremental_flattens_the_chain(image: Path, tmp_path: Path) -> None:
    export_snapshot(image, snap(image, "base"), tmp_path / "full.qcow2")
    export_snapshot(image, snap(image, "later"), tmp_path / "inc.qcow2", incremental=True)
    target = tmp_path / "new.qcow2"
    import_backup(tmp_path / "inc.qcow2", target)
    info = json.loads(run("qemu-img", "info", "--output=json", str(target)))
    assert "backing-filename" not in info
    assert reads(target, 0x22, "1M", "512k") and reads(target, 0x11, "0", "1M")


def test_archive_creates_verifies_and_prunes_only_qsnap_files(image: Path, tmp_path: Path) -> None:
    dest = tmp_path / "archive"
    snaps = [snap(image, "base"), snap(image, "later")]
    first = archive(image, snaps, dest, keep_days=30)
    assert len(first.created) == 2 and not first.failures
    month = snaps[0].date.strftime("%Y-%m")
    expected = dest / month / f"base-{snaps[0].date:%Y%m%d}.qcow2.zst"
    assert expected.is_file() and (dest / month / (expected.name + ".json")).is_file()
    # a rerun finds them archived already
    again = archive(image, snaps, dest, keep_days=30)
    assert not again.created and len(again.skipped) == 2
    # a foreign file and an old qsnap archive: only the latter goes
    foreign = dest / "old-notes.qcow2.zst"
    foreign.write_bytes(b"not ours")
    os.utime(foreign, (0, 0))
    later = archive(image, [], dest, keep_days=30, now=utc_now() + timedelta(days=31))
    assert sorted(p.name for p in later.deleted) == sorted(r.output.name for r in first.created)
    assert foreign.exists() and not expected.exists()


def test_progress_reports_reach_the_total(image: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    export_snapshot(image, snap(image, "base"), tmp_path / "b.qcow2.zst", progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1]
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(calls))


def test_reading_a_snapshot_works_while_a_writer_holds_the_image(image: Path, tmp_path: Path) -> None:
    """qemu-io holding the image open read-write stands in for a running VM (it takes the same locks)."""
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(image)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        probe = subprocess.run(["qemu-img", "snapshot", "-l", str(image)], capture_output=True, text=True)
        assert "lock" in probe.stderr  # the image really is held
        for name in ("b.qcow2", "b.qcow2.zst"):
            export_snapshot(image, snap_u(image, "base"), tmp_path / name)
            assert reads(restored_qcow2(tmp_path / name, tmp_path), 0x11, "0", "1M")
    finally:
        holder.kill()
        holder.wait()


def snap_u(image: Path, name: str):  # type: ignore[no-untyped-def]
    from qsnap.engines import qemu_img

    return next(s for s in qemu_img.info(image, force_share=True).snapshots if s.name == name)
