"""`manage-snapshots`: the guide's messages, and its rotation and archival scripts run verbatim
(from ../shared/spec/snapshot-management-guide.md) with `./scripts/manage-snapshots.sh` being a
two-line wrapper that execs the installed console script."""

from __future__ import annotations

import gzip
import os
import re
import stat
import subprocess
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from qsnap_testlib import (
    GUIDE,
    ROOT,
    clean_environ,
    guide_main,
    has_pattern,
    make_image,
    one_error_line,
    qemu_img,
    run_guide,
    snapshot_names,
)

GUIDE_DOC = ROOT.parent / "shared" / "spec" / "snapshot-management-guide.md"
if not GUIDE_DOC.exists():  # the spec lives beside the checkout
    GUIDE_DOC = Path("/work/shared/spec/snapshot-management-guide.md")


def guide_script(heading: str) -> str:
    """The first ```bash block after HEADING in the guide, verbatim."""
    text = GUIDE_DOC.read_text()
    start = text.index(heading)
    match = re.compile(r"```bash\n(.*?)```", re.S).search(text, start)
    assert match is not None, heading
    return match.group(1)


def setup_scripts_dir(tmp_path: Path) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir(exist_ok=True)
    wrapper = scripts / "manage-snapshots.sh"
    wrapper.write_text(f'#!/bin/sh\nexec "{GUIDE}" "$@"\n')
    wrapper.chmod(0o755)


def run_bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = cwd / "workflow.sh"
    path.write_text(script)
    return subprocess.run(["bash", str(path)], cwd=cwd, env=clean_environ(env), capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------ the guide's messages

def test_create_prints_the_guides_messages(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    rc, out, err = run_guide("create", "initial-setup", env={"IMAGE_PATH": str(image)})
    assert rc == 0, err
    assert out.splitlines() == ["Creating snapshot: initial-setup",
                                "Snapshot 'initial-setup' created successfully"]
    assert snapshot_names(image) == ["initial-setup"]


def test_list_prints_the_guides_layout(tmp_path: Path) -> None:
    image = make_image(tmp_path, name="debian-hurd-amd64.qcow2",
                       snapshots=["initial-setup", "dev-tools-installed", "before-kernel-upgrade"])
    rc, out, err = run_guide("list", cwd=tmp_path)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "Snapshots in: debian-hurd-amd64.qcow2"
    assert lines[1] == ""
    assert lines[2] == "Snapshot list:"
    assert lines[3].split() == ["ID", "TAG", "VM", "SIZE", "DATE", "VM", "CLOCK"]
    rows = [line.split() for line in lines[4:]]
    assert [row[:2] for row in rows] == [["1", "initial-setup"], ["2", "dev-tools-installed"],
                                         ["3", "before-kernel-upgrade"]]
    assert all(row[2:4] == ["0", "B"] for row in rows)
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", row[-1]) for row in rows)
    assert image.exists()


def test_list_rows_keep_long_names_in_the_second_column(tmp_path: Path) -> None:
    long_name = "a-really-long-snapshot-name-that-overflows-the-column-" + "x" * 40
    image = make_image(tmp_path, snapshots=[long_name, "short"])
    rc, out, _ = guide_main(["-i", image, "list"])
    assert rc == 0
    rows = [line.split() for line in out.splitlines() if re.match(r"^[0-9]", line)]
    assert [row[1] for row in rows] == [long_name, "short"]


def test_restore_prints_the_guides_messages_and_the_safety_snapshot(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["initial-setup"], patterns={"initial-setup": 0x11, None: 0x22})
    rc, out, err = run_guide("restore", "initial-setup", env={"IMAGE_PATH": str(image)})
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "Restoring snapshot: initial-setup"
    assert lines[1] == "WARNING: This will discard all changes since snapshot was created!"
    assert lines[-1] == "Snapshot 'initial-setup' restored successfully"
    safety = [n for n in snapshot_names(image) if n.startswith("pre-restore-")]
    assert len(safety) == 1 and safety[0] in out
    assert has_pattern(image, 0x11)


def test_delete_prints_the_guides_messages(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["old-snapshot", "keep"])
    rc, out, err = run_guide("delete", "old-snapshot", env={"IMAGE_PATH": str(image)})
    assert rc == 0, err
    assert out.splitlines() == ["Deleting snapshot: old-snapshot",
                                "Snapshot 'old-snapshot' deleted successfully"]
    assert snapshot_names(image) == ["keep"]


def test_guide_errors_are_one_sentence(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    rc, _, err = run_guide("restore", "missing", env={"IMAGE_PATH": str(image)})
    assert rc == 3
    one_error_line(err, "manage-snapshots")


def test_guide_without_command_prints_usage(tmp_path: Path) -> None:
    rc, out, err = run_guide(cwd=tmp_path)
    assert rc == 2
    assert "usage" in (out + err).lower()


# ------------------------------------------------------------------ the guide's scripts, verbatim

def test_rotation_script_keeps_the_seven_newest_dailies(tmp_path: Path) -> None:
    """Automated Snapshot Rotation: the delete loop's stdin is the list of names still to
    delete, so manage-snapshots must not read stdin or every other name would be lost."""
    script = guide_script("### Automated Snapshot Rotation")
    assert "./scripts/manage-snapshots.sh delete \"$snapshot\"" in script
    setup_scripts_dir(tmp_path)
    today = date.today()
    older = [f"daily-{today - timedelta(days=n):%Y%m%d}" for n in range(9, 0, -1)]  # 9 days before today
    image = make_image(tmp_path, name="hurd.qcow2", snapshots=["initial-setup", *older, "weekly-1"])
    result = run_bash(script, tmp_path, {"IMAGE_PATH": str(image)})
    assert result.returncode == 0, result.stdout + result.stderr
    expected_dailies = [f"daily-{today - timedelta(days=n):%Y%m%d}" for n in range(6, -1, -1)]
    names = snapshot_names(image)
    assert sorted(n for n in names if n.startswith("daily-")) == expected_dailies
    assert "initial-setup" in names and "weekly-1" in names
    deleted = sorted(set(older) - set(expected_dailies))
    assert len(deleted) == 3
    for name in deleted:
        assert f"Deleting old snapshot: {name}" in result.stdout
        assert f"Snapshot '{name}' deleted successfully" in result.stdout
    assert f"Snapshot 'daily-{today:%Y%m%d}' created successfully" in result.stdout
    # The second run on the same day: create fails (exists), nothing else is deleted.
    result = run_bash(script, tmp_path, {"IMAGE_PATH": str(image)})
    assert sorted(n for n in snapshot_names(image) if n.startswith("daily-")) == expected_dailies
    assert "Deleting old snapshot" not in result.stdout


def test_guide_delete_in_a_pipe_does_not_read_stdin(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["a1", "a2", "a3"])
    rc, _, err = run_guide("delete", "a1", input="a2\na3\n", env={"IMAGE_PATH": str(image)})
    assert rc == 0, err
    assert snapshot_names(image) == ["a2", "a3"]
    # The same loop as the guide, in-process: the remaining names are still on stdin afterwards.
    import io

    stdin = io.StringIO("a3\n")
    rc, _, err = guide_main(["-i", image, "delete", "a2"], stdin=stdin)
    assert rc == 0, err
    assert stdin.read() == "a3\n"


def _archival(tmp_path: Path, snapshots: list[str]) -> tuple[Path, subprocess.CompletedProcess[str]]:
    script = guide_script("### Workflow 4: Snapshot Archival Strategy")
    assert "./scripts/manage-snapshots.sh backup \"$snapshot\"" in script
    setup_scripts_dir(tmp_path)
    patterns = {"production-baseline": 0x11, "production-stable": 0x22, None: 0x33}
    image = make_image(tmp_path, name="hurd.qcow2", snapshots=snapshots,
                       patterns={k: v for k, v in patterns.items() if k is None or k in snapshots})
    return image, run_bash(script, tmp_path, {"IMAGE_PATH": str(image)})


def test_archival_script_backs_up_the_production_snapshots(tmp_path: Path) -> None:
    """Workflow 4 verbatim (needs `qsnap backup`)."""
    old = tmp_path / "backups" / "2000-01" / "production-baseline-20000101.qcow2.gz"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old archive")
    forty_days_ago = time.time() - 40 * 86400
    os.utime(old, (forty_days_ago, forty_days_ago))

    image, result = _archival(tmp_path, ["production-baseline", "scratch", "production-stable"])
    assert result.returncode == 0, result.stdout + result.stderr
    now = datetime.now()
    backup_dir = tmp_path / "backups" / f"{now:%Y-%m}"
    for name, pattern in (("production-baseline", 0x11), ("production-stable", 0x22)):
        assert f"Archiving {name}..." in result.stdout
        archive = backup_dir / f"{name}-{now:%Y%m%d}.qcow2.gz"
        assert archive.exists(), result.stdout + result.stderr
        assert stat.S_IMODE(archive.stat().st_mode) == 0o600
        restored = tmp_path / f"{name}.qcow2"
        restored.write_bytes(gzip.decompress(archive.read_bytes()))
        assert qemu_img("check", str(restored), check=False).returncode == 0
        assert has_pattern(restored, pattern)
        assert (backup_dir / f"{name}-{now:%Y%m%d}.qcow2.gz.json").exists()
    assert not list(backup_dir.glob("*.partial*"))
    assert not old.exists(), "the guide's find -mtime +30 -delete must still work on our files"
    assert "Archival complete" in result.stdout
    assert has_pattern(image, 0x33), "a backup must not change the image"


def test_archival_script_skips_missing_snapshots(tmp_path: Path) -> None:
    _, result = _archival(tmp_path, ["production-baseline"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Archiving production-baseline..." in result.stdout
    assert "Archiving production-stable..." not in result.stdout
    archives = sorted(p.name for p in (tmp_path / "backups").rglob("*.qcow2.gz"))
    assert archives == [f"production-baseline-{datetime.now():%Y%m%d}.qcow2.gz"]


@pytest.mark.parametrize("command", [["create", "x"], ["delete", "x"], ["restore", "x"], ["list"]])
def test_guide_commands_never_prompt_without_a_tty(tmp_path: Path, command: list[str]) -> None:
    image = make_image(tmp_path, snapshots=["x"])
    rc, out, err = run_guide(*command, input="n\n", env={"IMAGE_PATH": str(image)}, timeout=60)
    assert rc in (0, 4), err  # create x: exists
    assert "[y/N]" not in out + err
