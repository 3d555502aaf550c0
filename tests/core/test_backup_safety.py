"""The core issue's backup safety rules, through `qsnap backup NAME OUTPUT` and
`manage-snapshots backup` (formats in depth are tested in tests/backup/):
partial file then rename, mode 0600, parent directories created, an existing OUTPUT refused
with exit 13 unless --force, a manifest OUTPUT.json, no partial file left on failure."""

from __future__ import annotations

import gzip
import hashlib
import json
import resource
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qsnap_testlib import (
    GUIDE,
    QSNAP,
    clean_environ,
    fingerprint,
    has_pattern,
    make_image,
    one_error_line,
    qemu_img,
    qemu_io,
    run_guide,
    run_qsnap,
)

import qsnap


def leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for item in value.values():
            yield from leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from leaves(item)
    else:
        yield value


def keys(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            found.add(key)
            found |= keys(item)
    elif isinstance(value, list):
        for item in value:
            found |= keys(item)
    return found


def payload(output: Path) -> Path:
    """The qcow2 inside OUTPUT (.qcow2 as is, .qcow2.gz decompressed beside it)."""
    if output.name.endswith(".gz"):
        plain = output.with_name(output.name + ".decompressed.qcow2")
        plain.write_bytes(gzip.decompress(output.read_bytes()))
        return plain
    return output


def no_partials(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if "partial" in p.name)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A (0x11), B (0x22), current 0x33."""
    return make_image(tmp_path, snapshots=["A", "B"], patterns={"A": 0x11, "B": 0x22, None: 0x33})


@pytest.mark.parametrize("suffix", [".qcow2", ".qcow2.gz"])
def test_backup_writes_the_snapshot_with_a_manifest(tmp_path: Path, source: Path, suffix: str) -> None:
    before = fingerprint(source)
    output = tmp_path / "out" / "deeper" / f"A{suffix}"  # parent directories are created
    rc, _, err = run_qsnap("-i", source, "backup", "A", output)
    assert rc == 0, err
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    qcow2 = payload(output)
    assert qemu_img("check", str(qcow2), check=False).returncode == 0
    assert has_pattern(qcow2, 0x11)
    manifest_path = output.with_name(output.name + ".json")
    manifest = json.loads(manifest_path.read_text())
    values = set(map(str, leaves(manifest)))
    assert hashlib.sha256(output.read_bytes()).hexdigest() in values
    assert str(output.stat().st_size) in values
    assert {"A", "1", str(source), qsnap.__version__} <= values
    assert any("created" in key for key in keys(manifest))
    assert any("version" in key for key in keys(manifest))
    assert no_partials(tmp_path) == []
    assert fingerprint(source) == before, "a backup must not change the image"


def test_backup_into_an_existing_file_exits_13_and_keeps_it(tmp_path: Path, source: Path) -> None:
    output = tmp_path / "A.qcow2"
    output.write_bytes(b"precious")
    rc, _, err = run_qsnap("-i", source, "backup", "A", output)
    assert rc == 13
    one_error_line(err)
    assert output.read_bytes() == b"precious"
    assert no_partials(tmp_path) == []
    rc, _, err = run_qsnap("-i", source, "backup", "A", output, "--force")
    assert rc == 0, err
    assert has_pattern(output, 0x11)


def test_guide_backup_into_an_existing_file_exits_13(tmp_path: Path, source: Path) -> None:
    output = tmp_path / "A.qcow2.gz"
    output.write_bytes(b"precious")
    rc, _, err = run_guide("-i", source, "backup", "A", output)
    assert rc == 13, err
    assert output.read_bytes() == b"precious"


def test_guide_backup_prints_and_writes(tmp_path: Path, source: Path) -> None:
    output = tmp_path / "backups" / "B.qcow2.gz"
    rc, out, err = run_guide("backup", "B", output, env={"IMAGE_PATH": str(source)})
    assert rc == 0, err
    assert "B" in out
    assert has_pattern(payload(output), 0x22)
    assert stat.S_IMODE(output.stat().st_mode) == 0o600


@pytest.mark.parametrize("script", [QSNAP, GUIDE], ids=["qsnap", "manage-snapshots"])
def test_backup_that_fails_midway_leaves_no_partial_file(tmp_path: Path, source: Path, script: Path) -> None:
    """Simulate a full disk: the process may not write files larger than 256 KiB."""
    qemu_io(source, "write -P 0x44 1M 4M")
    qemu_img("snapshot", "-c", "big", str(source))
    before = fingerprint(source)
    output = tmp_path / "out" / "big.qcow2"

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    result = subprocess.run([str(script), "-i", str(source), "backup", "big", str(output)],
                            env=clean_environ(), capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL, preexec_fn=small_disk)
    assert result.returncode not in (0, 2), result.stderr  # failed, and not as a usage error
    assert "Traceback" not in result.stderr
    assert not output.exists()
    assert no_partials(tmp_path) == []
    assert fingerprint(source) == before


def test_backup_by_id_picks_the_second_duplicate(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    for pattern in (0x11, 0x22):
        qemu_io(image, f"write -P {pattern:#04x} 0 1M")
        qemu_img("snapshot", "-c", "A", str(image))
    rc, _, err = run_qsnap("-i", image, "backup", "A", tmp_path / "x.qcow2")
    assert rc == 5, err
    assert not (tmp_path / "x.qcow2").exists()
    rc, _, err = run_qsnap("-i", image, "backup", "A", tmp_path / "second.qcow2", "--id", "2")
    assert rc == 0, err
    assert has_pattern(tmp_path / "second.qcow2", 0x22)


def test_backup_refuses_bad_names_and_unknown_snapshots(tmp_path: Path, source: Path) -> None:
    output = tmp_path / "x.qcow2"
    rc, _, err = run_qsnap("--debug", "-i", source, "backup", "--", "a\nquit", output)
    assert rc == 6, err
    assert "run:" not in err
    rc, _, err = run_qsnap("-i", source, "backup", "missing", output)
    assert rc == 3
    one_error_line(err)
    assert not output.exists() and no_partials(tmp_path) == []
