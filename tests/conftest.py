"""Shared fixtures for the whole suite: images made with the real qemu-img, patterns written
and read with the real qemu-io, and three ways to run the CLIs.

- ``make_image(tmp_path, size='64M', snapshots=[...], patterns={...})``: a qcow2 image.
- ``qemu_io(image, cmd)``: run one qemu-io command on an image.
- ``run_qsnap(*args, env=..., cwd=..., input=...)`` / ``run_guide(...)``: the installed
  console scripts as subprocesses; return ``(returncode, stdout, stderr)``.
- ``qsnap_main(argv, ...)`` / ``guide_main(argv, ...)``: the same CLIs in-process with an
  injected :class:`qsnap.cli.env.Environment` (StringIO streams); much faster.

The plain functions are also importable as ``from qsnap_testlib import ...`` (an alias of
this module registered below: ``import conftest`` is ambiguous once several directories have a
conftest.py). Environment variables that choose an image (QCOW2_IMAGE, IMAGE_PATH, ...) are
removed from every run unless a test passes them, so a developer's shell cannot leak in.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest

sys.modules.setdefault("qsnap_testlib", sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
QSNAP = VENV_BIN / "qsnap"
GUIDE = VENV_BIN / "manage-snapshots"

#: Variables that change which image or monitor qsnap uses: never inherited by tests.
SCRUBBED_ENV = ("QCOW2_IMAGE", "IMAGE_PATH", "MONITOR_PORT", "QSNAP_MONITOR", "QSNAP_LOCK_TIMEOUT",
                "QSNAP_VM")


class Run(NamedTuple):
    """What a CLI run did. Unpacks as ``rc, out, err``."""

    rc: int
    out: str
    err: str


# ------------------------------------------------------------------ images and qemu-io

def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real qemu-img."""
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=check,
                          stdin=subprocess.DEVNULL)


def qemu_io(image: Path | str, cmd: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one qemu-io command (``'write -P 0x11 0 1M'``, ``'read -P 0x11 0 1M'``) on IMAGE.

    With ``check`` a failed command (including a pattern mismatch, which qemu-io 7.2 reports
    with exit 1 and 'Pattern verification failed') raises AssertionError.
    """
    result = subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(image)], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL)
    if check and (result.returncode != 0 or "verification failed" in result.stdout + result.stderr):
        raise AssertionError(f"qemu-io -c {cmd!r} {image} failed ({result.returncode}): "
                             f"{result.stdout}{result.stderr}")
    return result


def has_pattern(image: Path | str, pattern: int, offset: str = "0", length: str = "1M") -> bool:
    """True when IMAGE's current state holds byte PATTERN over [offset, offset+length)."""
    result = qemu_io(image, f"read -P {pattern:#04x} {offset} {length}", check=False)
    return result.returncode == 0 and "verification failed" not in result.stdout + result.stderr


def make_image(
    tmp_path: Path,
    size: str = "64M",
    snapshots: Sequence[str] = (),
    patterns: Mapping[str | None, int] | None = None,
    name: str = "disk.qcow2",
) -> Path:
    """A fresh qcow2 image at ``tmp_path/name``.

    ``snapshots`` are taken in order with plain ``qemu-img snapshot -c`` (so duplicates and
    numeric names are possible, as other tools make them). ``patterns`` maps a snapshot name
    to the byte written over the first MiB just before that snapshot is taken; the key
    ``None`` is written last, into the current state.
    """
    patterns = dict(patterns or {})
    path = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", str(path), size)
    for snap in snapshots:
        if snap in patterns:
            qemu_io(path, f"write -P {patterns[snap]:#04x} 0 1M")
        qemu_img("snapshot", "-c", snap, str(path))
    if None in patterns:
        qemu_io(path, f"write -P {patterns[None]:#04x} 0 1M")
    return path


def snapshot_table(image: Path | str) -> list[tuple[str, str]]:
    """(id, name) of every snapshot, from qemu-img itself (the oracle), in table order."""
    out = qemu_img("info", "-U", "-f", "qcow2", "--output=json", str(image)).stdout
    return [(str(s["id"]), str(s["name"])) for s in json.loads(out).get("snapshots", [])]


def snapshot_names(image: Path | str) -> list[str]:
    return [name for _, name in snapshot_table(image)]


def fingerprint(path: Path | str) -> tuple[str, int, int]:
    """sha256, size and mtime (ns) of a file: equal fingerprints mean nothing touched it."""
    st = os.stat(path)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digest, st.st_size, st.st_mtime_ns


# ------------------------------------------------------------------ running the CLIs

def clean_environ(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without the image/monitor variables, then ENV on top."""
    base = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    base.update(env or {})
    return base


def _run_script(script: Path, args: Iterable[Any], env: Mapping[str, str] | None, cwd: Path | str | None,
                input: str | None, timeout: float) -> Run:
    result = subprocess.run(
        [str(script), *(str(a) for a in args)],
        env=clean_environ(env), cwd=cwd, input=input, capture_output=True, text=True, timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    return Run(result.returncode, result.stdout, result.stderr)


def run_qsnap(*args: Any, env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
              input: str | None = None, timeout: float = 120) -> Run:
    """The installed ``qsnap`` console script as a subprocess (stdin /dev/null unless INPUT)."""
    return _run_script(QSNAP, args, env, cwd, input, timeout)


def run_guide(*args: Any, env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
              input: str | None = None, timeout: float = 120) -> Run:
    """The installed ``manage-snapshots`` console script as a subprocess."""
    return _run_script(GUIDE, args, env, cwd, input, timeout)


def _in_process(main: Callable[..., int], argv: Sequence[Any], env: Any, environ: Mapping[str, str] | None,
                cwd: Path | str | None, stdin: str | io.StringIO, tty: bool) -> Run:
    from qsnap.cli.env import Environment

    if env is None:
        stdin_stream = stdin if isinstance(stdin, io.StringIO) else io.StringIO(stdin)
        env = Environment(
            stdin=stdin_stream, stdout=io.StringIO(), stderr=io.StringIO(),
            stdin_isatty=tty, stdout_isatty=tty, stderr_isatty=tty,
            environ=clean_environ(environ), cwd=Path(cwd) if cwd is not None else Path.cwd(),
        )
    logger = logging.getLogger("qsnap")
    saved = (logger.handlers[:], logger.level)
    try:
        rc = main([str(a) for a in argv], env)
    finally:
        # --debug attaches a handler to the 'qsnap' logger: do not let it outlive this run.
        logger.handlers[:], _ = saved
        logger.setLevel(saved[1])
    return Run(rc, env.stdout.getvalue(), env.stderr.getvalue())


def qsnap_main(argv: Sequence[Any], env: Any = None, *, environ: Mapping[str, str] | None = None,
               cwd: Path | str | None = None, stdin: str | io.StringIO = "", tty: bool = False) -> Run:
    """``qsnap.cli.main.main(argv, env)`` in-process.

    Pass a ready :class:`Environment` (with StringIO stdout/stderr) as ENV, or let one be
    built: ENVIRON over a clean os.environ, CWD, STDIN text, and TTY for all three isatty flags.
    """
    from qsnap.cli.main import main

    return _in_process(main, argv, env, environ, cwd, stdin, tty)


def guide_main(argv: Sequence[Any], env: Any = None, *, environ: Mapping[str, str] | None = None,
               cwd: Path | str | None = None, stdin: str | io.StringIO = "", tty: bool = False) -> Run:
    """``qsnap.cli.guide.main(argv, env)`` (manage-snapshots) in-process."""
    from qsnap.cli.guide import main

    return _in_process(main, argv, env, environ, cwd, stdin, tty)


def has_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" in text


def one_error_line(err: str, prog: str = "qsnap") -> str:
    """Assert ERR is exactly one 'PROG: error: ...' line with no traceback; return it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert not has_traceback(err), err
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------ fixtures (the helpers above)

@pytest.fixture(name="make_image", scope="session")
def _make_image_fixture() -> Callable[..., Path]:
    return make_image


@pytest.fixture(name="qemu_io", scope="session")
def _qemu_io_fixture() -> Callable[..., subprocess.CompletedProcess[str]]:
    return qemu_io


@pytest.fixture(name="run_qsnap", scope="session")
def _run_qsnap_fixture() -> Callable[..., Run]:
    return run_qsnap


@pytest.fixture(name="run_guide", scope="session")
def _run_guide_fixture() -> Callable[..., Run]:
    return run_guide


@pytest.fixture(name="qsnap_main", scope="session")
def _qsnap_main_fixture() -> Callable[..., Run]:
    return qsnap_main


@pytest.fixture(name="guide_main", scope="session")
def _guide_main_fixture() -> Callable[..., Run]:
    return guide_main


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 64 MiB image: 0x11 in snapshot A, current state 0x22."""
    return make_image(tmp_path, snapshots=["A"], patterns={"A": 0x11, None: 0x22})


# The real-guest fixtures (tests/guest/fixtures.py), available to every test folder.
from guest.fixtures import guest_booted_image, guest_build, guest_factory, running_guest  # noqa: E402, F401
