"""The one place where qsnap starts programs.

argv lists only, never a shell; each command is logged at debug level; failures become
:class:`ProcessError` carrying argv, exit status, stdout and stderr; a missing program
becomes :class:`ProgramMissing` with the package that provides it.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
    "restic": "restic",
    "e2fsck": "e2fsprogs",
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


def _drain(stream: IO[bytes], into: list[bytes]) -> threading.Thread:
    """Read STREAM to its end on a thread (a full pipe must never block the child)."""

    def run() -> None:
        with contextlib.suppress(OSError, ValueError):
            for block in iter(lambda: stream.read(65536), b""):
                into.append(block)

    thread = threading.Thread(target=run, name="qsnap-proc-drain", daemon=True)
    thread.start()
    return thread


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop PROC (by its PID, through Popen) if it still runs: SIGTERM so that it can clean up
    (restic removes its repository lock), SIGKILL after 5 s; reap it."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.kill()
    with contextlib.suppress(Exception):
        proc.wait(timeout=30)


def feed(
    argv: Sequence[str],
    chunks: Iterable[bytes | bytearray | memoryview],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> Result:
    """Run ARGV with CHUNKS written to its stdin (streamed, bounded memory); capture its output.

    If the program exits early (a closed pipe), the rest of CHUNKS is not consumed and its exit
    status tells what went wrong. Any exception from CHUNKS (or Ctrl-C) kills the program first.
    """
    argv = [str(a) for a in argv]
    proc = spawn(argv, stdin=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [_drain(proc.stdout, out), _drain(proc.stderr, err)]
    try:
        try:
            for chunk in chunks:
                proc.stdin.write(chunk)
        except BrokenPipeError:
            pass
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        proc.wait()
    except KeyboardInterrupt as exc:
        _stop(proc)
        raise Interrupted(f"Interrupted while running {argv[0]}.") from exc
    except BaseException:
        _stop(proc)
        raise
    finally:
        for thread in readers:
            thread.join(timeout=30)
    result = Result(tuple(argv), proc.returncode, b"".join(out).decode(errors="replace"),
                    b"".join(err).decode(errors="replace"))
    if proc.returncode != 0:
        _debug("exit %d: %s", proc.returncode, result.stderr.strip())
        if check:
            raise ProcessError(argv, proc.returncode, result.stdout, result.stderr)
    return result


@contextlib.contextmanager
def reading(argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> Iterator[IO[bytes]]:
    """Run ARGV and yield its stdout to read as a stream; on leaving, wait for it and raise
    :class:`ProcessError` if it failed (or kill it, when the reader stopped early)."""
    argv = [str(a) for a in argv]
    proc = spawn(argv, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    err: list[bytes] = []
    reader = _drain(proc.stderr, err)
    try:
        yield proc.stdout
    except KeyboardInterrupt as exc:
        _stop(proc)
        raise Interrupted(f"Interrupted while running {argv[0]}.") from exc
    except BaseException:
        _stop(proc)
        raise
    finally:
        with contextlib.suppress(OSError):
            proc.stdout.close()
    proc.wait()
    reader.join(timeout=30)
    if proc.returncode != 0:
        stderr = b"".join(err).decode(errors="replace")
        _debug("exit %d: %s", proc.returncode, stderr.strip())
        raise ProcessError(argv, proc.returncode, "", stderr)
