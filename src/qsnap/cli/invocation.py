"""What a command handler receives: parsed arguments, the environment, and helpers."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsnap.cli.env import Environment
from qsnap.core.config import resolve_image

if TYPE_CHECKING:
    from qsnap.service.snapshots import Context


class Invocation:
    """One command run: parsed arguments, its environment, and helpers for handlers."""

    def __init__(
        self, args: argparse.Namespace, env: Environment, prog: str = "qsnap", argv: list[str] | None = None
    ) -> None:
        self.args = args
        self.env = env
        self.prog = prog
        self.argv: list[str] = list(argv) if argv is not None else []

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    def image(self) -> Path:
        return resolve_image(getattr(self.args, "image", None), self.env.environ, self.env.cwd)

    def context(self) -> Context:
        from qsnap.service.snapshots import Context

        timeout = self.env.environ.get("QSNAP_LOCK_TIMEOUT")
        return Context(
            monitor=getattr(self.args, "monitor", None),
            vm=getattr(self.args, "vm", None) or self.env.environ.get("QSNAP_VM") or None,
            lock_timeout=float(timeout) if timeout else None,
            environ=self.env.environ,
            command=shlex.join([self.prog, *self.argv]),
        )

    def confirm(self, question: str) -> bool:
        """Ask on a TTY; never prompts (and never reads stdin) otherwise."""
        if getattr(self.args, "yes", False) or not self.env.interactive:
            return True
        self.env.stderr.write(f"{question} [y/N] ")
        self.env.stderr.flush()
        answer = self.env.stdin.readline().strip().lower()
        return answer in ("y", "yes")

    def out(self, text: str = "") -> None:
        self.env.out(text)

    def note(self, text: str) -> None:
        """Messages about what happened that are not the result: on stderr."""
        self.env.err(text)

    def emit_json(self, payload: Any) -> None:
        from qsnap.cli.render import write_json

        write_json(self.env.stdout, payload)
