"""Backups into restic repositories with the real restic program: a local repository and one
served over HTTP by ``rclone serve restic``; import through ``restic dump``, verify with
``restic check`` + the stream's sha256 (and ``--against`` the source snapshot), and the faults:
a repository locked by another restic, a wrong password, a missing repository, restic not
installed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from offsite_testlib import random_image, restic
from qsnap_testlib import fingerprint, kill_popen, one_error_line, qemu_img, qemu_io, qsnap_main


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return random_image(tmp_path, size="24M", data_mib=8)


def same_disk(image: Path, source: Path, snapshot: str, tmp_path: Path) -> bool:
    raw = tmp_path / f"ref-{snapshot}.raw"
    qemu_img("convert", "-U", "-l", f"snapshot.name={snapshot}", "-O", "raw", str(source), str(raw))
    return qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", str(image), str(raw), check=False).returncode == 0


def test_backup_list_verify_import_local_repository(
    tmp_path: Path, disk: Path, restic_repo: str, restic_env: dict[str, str]
) -> None:
    target = f"restic:{restic_repo}"
    rc, out, err = qsnap_main(["-i", disk, "backup", "base", target, "--json"], environ=restic_env)
    assert rc == 0, err
    assert json.loads(out)["output"] == target
    snapshots = json.loads(restic(restic_repo, "snapshots", "--json", env=restic_env).stdout)
    assert len(snapshots) == 1
    tags = set(snapshots[0]["tags"])
    assert "qsnap" in tags and "qsnap-snapshot=base" in tags and f"qsnap-image={disk.resolve()}" in tags
    assert any(t.startswith("qsnap-sha256=") for t in tags) and any(t.startswith("qsnap-date=") for t in tags)

    rc, out, err = qsnap_main(["backups", "list", target, "--json"], environ=restic_env)
    assert rc == 0, err
    [entry] = json.loads(out)["backups"]
    assert entry["complete"] and entry["snapshot"] == "base" and entry["size"] == 24 << 20

    rc, out, err = qsnap_main(["verify", target, "--snapshot", "base", "--json"], environ=restic_env)
    assert rc == 0, err
    checks = {c["name"]: c["ok"] for c in json.loads(out)["checks"]}
    assert checks == {"manifest": True, "restic check": True, "size": True, "sha256": True}

    restored = tmp_path / "restored.qcow2"
    rc, out, err = qsnap_main(["-i", restored, "import", target, "--snapshot", entry["short_id"], "--yes"],
                              environ=restic_env)
    assert rc == 0, err
    assert same_disk(restored, disk, "base", tmp_path)
    assert qemu_img("check", str(restored), check=False).returncode == 0
    # zero clusters are left out: the restored image is compact
    assert restored.stat().st_size < (16 << 20)

    rc, _, err = qsnap_main(["-i", disk, "backup", "base", target], environ=restic_env)
    assert rc == 13 and "already holds snapshot 'base'" in one_error_line(err)
    assert qsnap_main(["-i", disk, "backup", "base", target, "--force"], environ=restic_env).rc == 0


def test_restic_deduplicates_a_second_snapshot(
    tmp_path: Path, restic_repo: str, restic_env: dict[str, str]
) -> None:
    # 48 MiB of random data: restic's content-defined chunks average 1 MiB but may reach 8 MiB, so
    # the one or two chunks around a change must be small against the whole (8 MiB was flaky)
    disk = random_image(tmp_path, size="64M", data_mib=48)
    target = f"restic:{restic_repo}"
    assert qsnap_main(["-i", disk, "backup", "base", target], environ=restic_env).rc == 0
    first = json.loads(restic(restic_repo, "stats", "--json", "--mode", "raw-data", env=restic_env).stdout)
    qemu_io(disk, "write -P 0x11 0 64k")  # undo the current state's 0x22: 'next' differs from 'base' only below
    qemu_io(disk, "write -P 0x5a 8M 256k")  # inside the random data: chunk boundaries are content-defined there
    qemu_img("snapshot", "-c", "next", str(disk))
    assert qsnap_main(["-i", disk, "backup", "next", target], environ=restic_env).rc == 0
    second = json.loads(restic(restic_repo, "stats", "--json", "--mode", "raw-data", env=restic_env).stdout)
    # a few ~1 MiB chunks around the change, not a second copy of the disk's data
    assert second["total_size"] - first["total_size"] < first["total_size"] // 2


def test_rest_server_roundtrip(tmp_path: Path, disk: Path, rest_server: str, restic_env: dict[str, str]) -> None:
    target = f"restic:{rest_server}"
    rc, _, err = qsnap_main(["-i", disk, "backup", "base", target], environ=restic_env)
    assert rc == 0, err
    restored = tmp_path / "restored.qcow2"
    rc, _, err = qsnap_main(["-i", restored, "import", target, "--snapshot", "base", "--yes"], environ=restic_env)
    assert rc == 0, err
    assert same_disk(restored, disk, "base", tmp_path)
    rc, out, err = qsnap_main(["verify", target, "--snapshot", "qsnap-snapshot=base"], environ=restic_env)
    assert rc == 0 and "is OK" in out, err


def flip_snapshot_byte(image: Path, guest_offset: int) -> None:
    """Flip one byte of the data cluster the current state shares with its snapshot (written in
    the file itself: the snapshot keeps its ID, name and date, only its content changes)."""
    mapping = json.loads(qemu_img("map", "--output=json", "-U", str(image)).stdout)
    [extent] = [e for e in mapping if e["data"] and e["start"] <= guest_offset < e["start"] + e["length"]]
    host = extent["offset"] + guest_offset - extent["start"]
    with open(image, "r+b") as handle:
        handle.seek(host)
        byte = handle.read(1)[0]
        handle.seek(host)
        handle.write(bytes((byte ^ 0xFF,)))


def test_verify_against_compares_the_dump_with_the_source_snapshot(
    disk: Path, restic_repo: str, restic_env: dict[str, str]
) -> None:
    target = f"restic:{restic_repo}"
    assert qsnap_main(["-i", disk, "backup", "base", target], environ=restic_env).rc == 0
    rc, out, err = qsnap_main(["verify", target, "--snapshot", "base", "--against", disk, "--json"],
                              environ=restic_env)
    assert rc == 0, err
    checks = {c["name"]: c["ok"] for c in json.loads(out)["checks"]}
    assert checks == {"manifest": True, "restic check": True, "size": True, "sha256": True, "content": True}

    # the source snapshot's data changes under the same ID, name and date: exit 11 naming the byte
    at = (8 << 20) + 12345  # inside the random data (4-12 MiB), shared by 'base' and the current state
    flip_snapshot_byte(disk, at)
    before = fingerprint(disk), restic(restic_repo, "snapshots", "--json", env=restic_env).stdout
    rc, _, err = qsnap_main(["verify", target, "--snapshot", "base", "--against", disk], environ=restic_env)
    assert rc == 11 and one_error_line(err).endswith(f"content: content differs from the source at byte {at}.")
    rc, out, err = qsnap_main(["verify", target, "--snapshot", "base", "--against", disk, "--json"],
                              environ=restic_env)
    assert rc == 11, err
    failed = [c for c in json.loads(out)["checks"] if not c["ok"]]
    assert failed == [{"name": "content", "ok": False, "detail": f"content differs from the source at byte {at}"}]
    assert (fingerprint(disk), restic(restic_repo, "snapshots", "--json", env=restic_env).stdout) == before


def test_verify_against_an_image_without_the_snapshot(
    tmp_path: Path, disk: Path, restic_repo: str, restic_env: dict[str, str]
) -> None:
    target = f"restic:{restic_repo}"
    assert qsnap_main(["-i", disk, "backup", "base", target], environ=restic_env).rc == 0
    other = tmp_path / "other.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(other), "24M")
    before = fingerprint(other)
    # the same error and exit code as for a local backup (cli.commands.backup.against_snapshot)
    rc, _, err = qsnap_main(["verify", target, "--snapshot", "base", "--against", other], environ=restic_env)
    assert rc == 3 and one_error_line(err).endswith(f"Snapshot 'base' (ID 1) of the backup is not in {other}.")
    assert fingerprint(other) == before
    rc, _, err = qsnap_main(["verify", target, "--snapshot", "base", "--against", tmp_path / "missing.qcow2"],
                            environ=restic_env)
    local = tmp_path / "local.raw"
    assert qsnap_main(["-i", disk, "backup", "base", local], environ=restic_env).rc == 0
    rc_local, _, err_local = qsnap_main(["verify", local, "--against", tmp_path / "missing.qcow2"])
    assert (rc, one_error_line(err)) == (rc_local, one_error_line(err_local)) and rc != 0


def test_locked_repository_exits_8_and_changes_nothing(
    disk: Path, restic_repo: str, restic_env: dict[str, str]
) -> None:
    target = f"restic:{restic_repo}"
    assert qsnap_main(["-i", disk, "backup", "base", target], environ=restic_env).rc == 0
    # another restic holds a lock: a backup from stdin that waits for its data
    holder = subprocess.Popen(["restic", "-r", restic_repo, "backup", "--stdin", "--stdin-filename", "x"],
                              env={**os.environ, **restic_env}, stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        locks = Path(restic_repo) / "locks"
        deadline = time.monotonic() + 30
        while not any(locks.iterdir()):
            assert time.monotonic() < deadline and holder.poll() is None, "restic took no lock"
            time.sleep(0.05)
        rc, _, err = qsnap_main(["verify", target, "--snapshot", "base"], environ=restic_env)
        assert rc == 8 and "is locked by another process" in one_error_line(err)
    finally:
        kill_popen(holder)


def test_wrong_password_missing_repository_and_missing_restic(
    tmp_path: Path, disk: Path, restic_repo: str, restic_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = f"restic:{restic_repo}"
    monkeypatch.setenv("RESTIC_PASSWORD", "wrong")
    rc, _, err = qsnap_main(["-i", disk, "backup", "base", target], environ={**restic_env, "RESTIC_PASSWORD": "wrong"})
    assert rc == 7 and "Wrong password" in one_error_line(err)
    monkeypatch.setenv("RESTIC_PASSWORD", restic_env["RESTIC_PASSWORD"])
    rc, _, err = qsnap_main(["-i", disk, "backup", "base", f"restic:{tmp_path / 'nothing'}"], environ=restic_env)
    assert rc == 7 and "There is no restic repository" in one_error_line(err)
    monkeypatch.delenv("RESTIC_PASSWORD")
    rc, _, err = qsnap_main(["-i", disk, "backup", "base", target], environ={})
    assert rc == 7 and "No password" in one_error_line(err)
    monkeypatch.setenv("RESTIC_PASSWORD", restic_env["RESTIC_PASSWORD"])
    before = fingerprint(disk)
    bin_dir = tmp_path / "bin"  # qemu-img but no restic
    bin_dir.mkdir()
    os.symlink(subprocess.run(["which", "qemu-img"], capture_output=True, text=True).stdout.strip(),
               bin_dir / "qemu-img")
    monkeypatch.setenv("PATH", str(bin_dir))
    rc, _, err = qsnap_main(["-i", disk, "backup", "base", target], environ={**restic_env, "PATH": str(bin_dir)})
    assert rc == 9 and "'restic' was not found" in one_error_line(err)
    assert fingerprint(disk) == before
