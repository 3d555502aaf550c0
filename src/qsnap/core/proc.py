"""The one place where qsnap starts programs.

argv lists only, never a shell; each command is logged at debug level; failures become
:class:`ProcessError` carrying argv, exit status, stdout and stderr; a missing program
becomes :class:`ProgramMissing` with the package that provides it.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from qsnap.core.errors import Interrupted, ProcessError, ProgramMissing


def _debug(message: str, *args: object) -> None:
    """Log at debug level, importing logging only when a handler was set up (--debug)."""
    import sys

    if "logging" in sys.modules:
        sys.modules["logging"].getLogger("qsnap.proc").debug(message, *args)

#: Which Debian/Ubuntu package provides each program we call.
PACKAGES: Mapping[str, str] = {
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "qemu-storage-daemon": "qemu-system-common",
    "qemu-system-x86_64": "qemu-system-x86",
    "docker": "docker.io",
}


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def missing_program(program: str) -> ProgramMissing:
    package = PACKAGES.get(program)
    hint = f"install it with: apt-get install {package}" if package else None
    return ProgramMissing(f"Required program {program!r} was not found on PATH.", hint=hint)


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = None,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Result:
    """Run ARGV to completion and capture its output as text."""
    argv = [str(a) for a in argv]
    _debug("run: %s", shlex.join(argv))
    try:
        completed = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise missing_program(argv[0]) from exc
    except subprocess.TimeoutExpired as exc:
        raise ProcessError(argv, -1, "", "", f"{shlex.join(argv)} did not finish within {timeout} s.") from exc
    except KeyboardInterrupt as exc:
        raise Interrupted(f"Interrupted while running {argv[0]}.") from exc
    result = Result(tuple(argv), completed.returncode, completed.stdout, completed.stderr)
    if completed.returncode != 0:
        _debug("exit %d: %s", completed.returncode, completed.stderr.strip())
        if check:
            raise ProcessError(argv, completed.returncode, completed.stdout, completed.stderr)
    return result


def spawn(
    argv: Sequence[str],
    *,
    stdout: int | IO[bytes] | None = subprocess.PIPE,
    stderr: int | IO[bytes] | None = subprocess.PIPE,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ARGV without waiting (for streaming and long-lived processes such as QEMU)."""
    argv = [str(a) for a in argv]
    _debug("spawn: %s", shlex.join(argv))
    try:
        return subprocess.Popen(
            argv,
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            env=dict(env) if env is not None else None,
            start_new_session=new_session,
        )
    except FileNotFoundError as exc:
        raise missing_program(argv[0]) from exc
