"""`qsnap`: the command line. The only layer that prints, reads argv or picks exit codes."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence

from qsnap import __version__
from qsnap.cli.env import Environment
from qsnap.cli.invocation import Invocation
from qsnap.cli.options import ArgumentParser, UsageExit, add_common
from qsnap.core.errors import Interrupted, QsnapError

EPILOG = """\
exit codes: 0 ok, 1 unexpected error, 2 usage, 3 snapshot not found, 4 snapshot exists,
5 ambiguous snapshot, 6 invalid name, 7 image missing/unreadable/not qcow2, 8 image in use,
9 program missing, 10 image corrupt, 11 verification failed, 12 monitor/VM error,
13 output exists, 14 no readable guest filesystem, 15 guest path not found,
130 interrupted.

image: -i IMAGE, else $QCOW2_IMAGE, else $IMAGE_PATH (path or glob), else
./debian-hurd-amd64-*.qcow2, then ./debian-hurd-amd64.qcow2.
"""


def build_parser() -> ArgumentParser:
    from qsnap.cli.commands import COMMAND_MODULES

    parser = ArgumentParser(
        prog="qsnap",
        description="Manage the internal snapshots of QEMU qcow2 images, safely.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qsnap {__version__}")
    add_common(parser)
    sub: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=ArgumentParser
    )
    for register in COMMAND_MODULES():
        register(sub)
    return parser


def setup_logging(debug: bool, env: Environment) -> None:
    if debug:
        import logging

        handler = logging.StreamHandler(env.stderr)
        handler.setFormatter(logging.Formatter("qsnap: debug: %(message)s"))
        root = logging.getLogger("qsnap")
        root.handlers[:] = [handler]
        root.setLevel(logging.DEBUG)


def report_error(prog: str, exc: QsnapError, env: Environment) -> None:
    env.err(f"{prog}: error: {exc}")


def dispatch(
    parser: ArgumentParser, argv: Sequence[str], env: Environment, prog: str
) -> int:
    argv = list(argv)
    debug = "--debug" in argv
    try:
        try:
            with contextlib.redirect_stdout(env.stdout), contextlib.redirect_stderr(env.stderr):
                args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0)
        debug = bool(getattr(args, "debug", False))
        setup_logging(debug, env)
        handler: Callable[[Invocation], int] | None = getattr(args, "handler", None)
        if handler is None:
            env.stderr.write(parser.format_help())
            return 2
        return handler(Invocation(args, env, prog, argv))
    except UsageExit as exc:
        env.err(str(exc))
        return 2
    except KeyboardInterrupt:
        env.err(f"{prog}: interrupted")
        return Interrupted.exit_code
    except QsnapError as exc:
        if debug:
            import traceback

            traceback.print_exc(file=env.stderr)
        report_error(prog, exc, env)
        return exc.exit_code
    except BrokenPipeError:
        return 1
    except Exception as exc:
        if debug:
            import traceback

            traceback.print_exc(file=env.stderr)
        env.err(f"{prog}: unexpected error: {type(exc).__name__}: {exc} (rerun with --debug for details)")
        return 1


def main(argv: Sequence[str] | None = None, env: Environment | None = None) -> int:
    env = env or Environment()
    argv = sys.argv[1:] if argv is None else argv
    return dispatch(build_parser(), argv, env, "qsnap")


def run() -> None:
    code = main()
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    sys.exit(code)
