"""The environment a CLI run sees, injected so tests can run `main(argv, env)` in-process."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO


class Environment:
    """Streams, TTY flags, environment variables and working directory of one CLI run.

    A plain class rather than a dataclass: every `qsnap` run builds one, and importing
    `dataclasses` costs start-up time.
    """

    def __init__(
        self,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        stdin_isatty: bool | None = None,
        stdout_isatty: bool | None = None,
        stderr_isatty: bool | None = None,
        environ: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.stdin: TextIO = stdin if stdin is not None else sys.stdin
        self.stdout: TextIO = stdout if stdout is not None else sys.stdout
        self.stderr: TextIO = stderr if stderr is not None else sys.stderr
        self.stdin_isatty = stdin_isatty
        self.stdout_isatty = stdout_isatty
        self.stderr_isatty = stderr_isatty
        self.environ: dict[str, str] = dict(os.environ) if environ is None else environ
        self.cwd: Path = Path.cwd() if cwd is None else cwd
        self.__post_init__()

    def __post_init__(self) -> None:
        if self.stdin_isatty is None:
            self.stdin_isatty = _isatty(self.stdin)
        if self.stdout_isatty is None:
            self.stdout_isatty = _isatty(self.stdout)
        if self.stderr_isatty is None:
            self.stderr_isatty = _isatty(self.stderr)

    @property
    def interactive(self) -> bool:
        """Prompts are allowed only when both stdin and stderr are terminals."""
        return bool(self.stdin_isatty and self.stderr_isatty)

    def out(self, text: str = "") -> None:
        self.stdout.write(text + "\n")

    def err(self, text: str = "") -> None:
        self.stderr.write(text + "\n")


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
