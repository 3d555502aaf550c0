"""Subcommand groups. Each module has ``register(subparsers)``; handlers import lazily."""

from __future__ import annotations

import argparse
from collections.abc import Callable

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def COMMAND_MODULES() -> list[Register]:
    from qsnap.cli.commands import backup, compact, completion, guest, offsite, ops, snapshots, vm

    return [snapshots.register, backup.register, ops.register, vm.register, offsite.register, guest.register,
            compact.register, completion.register]
