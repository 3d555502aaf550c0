"""The serial-console driver the guest tests use: it lives in the library
(:mod:`qsnap.vm.console`) so that `qsnap create --sync` can use it too."""

from qsnap.vm.console import CommandResult, ConsoleError, SerialConsole, wait_for_text

__all__ = ["CommandResult", "ConsoleError", "SerialConsole", "wait_for_text"]
