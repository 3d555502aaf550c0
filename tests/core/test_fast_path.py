"""`qsnap list` has a lean start-up path (src/qsnap/cli/fast.py): it must print exactly what
the full command prints, and hand over to the full CLI whenever it is not sure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qsnap_testlib import QSNAP, make_image, run_qsnap

FULL = {"QSNAP_NO_FAST_PATH": "1"}


def described_image(tmp_path: Path) -> Path:
    image = make_image(tmp_path, snapshots=["base"])
    assert run_qsnap("-i", image, "create", "with-text", "-m", "a description, with words").rc == 0
    return image


def test_fast_list_prints_exactly_what_the_full_command_prints(tmp_path: Path) -> None:
    image = described_image(tmp_path)
    for argv in (["-i", image, "list"], ["list", "-i", image], ["-i", image, "list", "--json"],
                 [f"--image={image}", "list", "--json"]):
        fast = run_qsnap(*argv)
        full = run_qsnap(*argv, env=FULL)
        assert fast.rc == full.rc == 0
        assert fast.out == full.out, argv
        assert "a description, with words" in fast.out


def test_fast_list_hands_errors_to_the_full_cli(tmp_path: Path) -> None:
    missing = tmp_path / "missing.qcow2"
    fast = run_qsnap("-i", missing, "list")
    full = run_qsnap("-i", missing, "list", env=FULL)
    assert fast.rc == full.rc == 7
    assert fast.err == full.err


def test_fast_list_imports_no_heavy_module(tmp_path: Path) -> None:
    """The start-up promise: no argparse, typing, pathlib, dataclasses, subprocess or QMP code
    for a plain `qsnap list` of an image with no sidecar."""
    image = make_image(tmp_path, snapshots=["a", "b"])
    code = (
        "import sys\n"
        f"sys.argv = ['qsnap', '-i', {str(image)!r}, 'list']\n"
        "from qsnap.cli.fast import run\n"
        "try:\n    run()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('argparse', 'typing', 'pathlib', 'dataclasses', 'subprocess', 'asyncio',\n"
        "         'qemu.qmp', 'rich', 'zstandard', 'qsnap.cli.main') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "b" in done.stdout
    assert "HEAVY []" in done.stderr, done.stderr


def test_console_script_is_the_fast_entry_point() -> None:
    assert "qsnap.cli.fast" in Path(QSNAP).read_text()
