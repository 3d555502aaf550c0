"""The `qsnap` console entry point, with a lean path for `qsnap [-i IMAGE] list [--json]`.

Scripts run `qsnap list` in loops, so its start-up matters more than any other command's
(issue goals: faster than `qemu-img snapshot -l`). This path imports only the qcow2 reader,
the image-choice rules and the renderer — no argparse, logging, dataclasses, subprocess or
monitor code — and prints exactly what the full command prints. Anything it is not sure
about (another option, an error, an image a running VM holds) goes to the full CLI
(:mod:`qsnap.cli.main`), which then does the work and reports errors properly.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from qsnap.core.models import Snapshot


def parse_list(argv: list[str]) -> tuple[str | None, bool] | None:
    """(image option, --json) when ARGV is exactly a plain `list`, else None."""
    image: str | None = None
    as_json = False
    seen_list = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-i", "--image") and i + 1 < len(argv):
            image = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--image="):
            image = arg.split("=", 1)[1]
        elif arg == "list" and not seen_list:
            seen_list = True
        elif arg == "--json" and seen_list:
            as_json = True
        else:
            return None
        i += 1
    return (image, as_json) if seen_list else None


def fast_list(image_option: str | None, as_json: bool) -> int | None:
    """Print the listing and return 0, or None to let the full CLI handle this run."""
    from qsnap.core.config import resolve_image_path
    from qsnap.core.errors import QsnapError

    try:
        image = resolve_image_path(image_option)
        from qsnap.service.image import check_image_file, image_held

        check_image_file(image)  # type: ignore[arg-type]  # str works: os.stat and open
        if image_held(image):
            return None  # a running VM has it: the full path asks its monitor
        from qsnap.qcow2 import open_image

        with open_image(image) as reader:
            snapshots = reader.snapshots()
        entries: list[tuple[Snapshot, str | None]] = [(s, None) for s in snapshots]
        if os.path.exists(image + ".qsnap.json"):
            from pathlib import Path

            from qsnap.service.sidecar import Sidecar

            sidecar = Sidecar.load(Path(image))
            entries = [(s, sidecar.description(s)) for s in snapshots]
    except (QsnapError, OSError, ValueError):
        return None
    from qsnap.cli import render

    if as_json:
        render.write_json(sys.stdout, render.list_json(image, "reader", entries))
    else:
        sys.stdout.write("".join(line + "\n" for line in render.list_lines(image, entries)))
    return 0


def run() -> None:
    if sys.argv[1:2] == ["__complete"]:  # the shells' completion callback: every <Tab>, keep it lean
        from qsnap.cli.complete import main as complete_main

        sys.exit(complete_main(sys.argv[2:]))
    parsed = parse_list(sys.argv[1:]) if not os.environ.get("QSNAP_NO_FAST_PATH") else None
    if parsed is not None:
        code = fast_list(*parsed)
        if code is not None:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                code = 1
            sys.exit(code)
    from qsnap.cli.main import run as full_run

    full_run()
