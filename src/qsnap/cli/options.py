"""Parser pieces every command module shares (kept apart from main.py, which imports the commands)."""

from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() can return the exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageExit(f"{self.prog}: error: {message}\n{self.format_usage().rstrip()}")


class UsageExit(Exception):
    """A usage error: main() prints it and exits 2."""


def add_common(parser: argparse.ArgumentParser, *, json: bool = False) -> None:
    """Options accepted both before and after the subcommand."""
    parser.add_argument("-i", "--image", default=argparse.SUPPRESS, help="qcow2 image to work on")
    parser.add_argument("--monitor", default=argparse.SUPPRESS,
                        help="QEMU monitor address of the VM (unix:PATH, tcp:HOST:PORT, telnet:HOST:PORT, PORT)")
    parser.add_argument("--vm", default=argparse.SUPPRESS,
                        help="how to stop/start the VM when needed: qsnap (default) or compose:SERVICE[@FILE]")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the commands run and tracebacks")
    if json:
        parser.add_argument("--json", action="store_true", help="print JSON")
