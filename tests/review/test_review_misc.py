"""Review findings beyond path spelling: expected errors reported as bugs, and a VM that
`qsnap vm start` launched not found through a symlink to its image."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qsnap_testlib import make_image, run_qsnap


def test_describe_with_unwritable_sidecar_is_an_expected_error(tmp_path: Path) -> None:
    """create/restore/delete turn a sidecar they cannot write into a warning; `describe`
    lets the OSError escape (history.describe -> atomic_write_bytes): exit 1 'unexpected
    error ... IsADirectoryError', i.e. 'a bug, please report it'. It should be a
    one-sentence expected error with a documented code."""
    image = make_image(tmp_path, snapshots=["a"])
    (tmp_path / "disk.qcow2.qsnap.json").mkdir()  # the sidecar path cannot be written
    rc, out, err = run_qsnap("-i", image, "describe", "a", "hello")
    assert "unexpected error" not in err, err
    assert rc not in (0, 1), (rc, out, err)


def _kill_run_record(image: Path) -> None:
    record = image.with_name(image.name + ".qsnap-run") / "vm.json"
    try:
        pid = int(json.loads(record.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


@pytest.fixture
def launched_vm(tmp_path: Path) -> Iterator[Path]:
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    image = make_image(real_dir)
    try:
        rc, _out, err = run_qsnap("-i", image, "vm", "start", "--memory", "64", "--smp", "1", "--accel", "tcg",
                                 "--ssh-port", "0", "--serial-port", "0", "--monitor-port", "0", "--json")
        assert rc == 0, err
        yield image
    finally:
        _kill_run_record(image)


@pytest.mark.vm
def test_create_through_symlink_finds_the_vm_qsnap_started(launched_vm: Path, tmp_path: Path) -> None:
    """'One command, whatever the VM is doing': through the real path `create` goes via qmp;
    through a symlink to the same image, routing.monitor_address looks for
    `<link>.qsnap-run/` beside the link, finds none, and the command fails with exit 8
    ('in use by a running VM')."""
    link = tmp_path / "link.qcow2"
    link.symlink_to(launched_vm)
    rc, out, err = run_qsnap("-i", link, "create", "vialink")
    assert rc == 0, (rc, out, err)
    assert "via qmp" in out
    rc, out, err = run_qsnap("-i", launched_vm, "list", "--json")
    assert [s["name"] for s in json.loads(out)["snapshots"]] == ["vialink"]
