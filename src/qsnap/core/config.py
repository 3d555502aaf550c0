"""Where settings come from: options, then the guide's environment variables, then defaults.

Image: ``-i/--image``, else ``QCOW2_IMAGE``, else ``IMAGE_PATH`` (a path or a glob), else the
guide's default glob ``./debian-hurd-amd64-*.qcow2``, then ``./debian-hurd-amd64.qcow2``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from qsnap.core.errors import ImageError, UsageError

DEFAULT_GLOBS = ("./debian-hurd-amd64-*.qcow2", "./debian-hurd-amd64.qcow2")
_GLOB_CHARS = set("*?[")


def _expand(pattern: str, cwd: Path) -> list[Path]:
    expanded = os.path.expanduser(pattern)
    base = expanded if os.path.isabs(expanded) else str(cwd / expanded)
    if _GLOB_CHARS & set(pattern):
        import glob

        return sorted(Path(p) for p in glob.glob(base))
    return [Path(base)] if os.path.lexists(base) else []


def resolve_image(
    explicit: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Path:
    """The image a command works on, as an absolute path (it must exist)."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    if explicit is not None and str(explicit) != "":
        candidates: list[tuple[str, str]] = [("--image", str(explicit))]
    elif environ.get("QCOW2_IMAGE"):
        candidates = [("QCOW2_IMAGE", environ["QCOW2_IMAGE"])]
    elif environ.get("IMAGE_PATH"):
        candidates = [("IMAGE_PATH", environ["IMAGE_PATH"])]
    else:
        candidates = [("default", g) for g in DEFAULT_GLOBS]
    searched = []
    for source, pattern in candidates:
        searched.append(pattern)
        matches = _expand(pattern, cwd)
        if len(matches) > 1:
            listing = ", ".join(str(m) for m in matches)
            raise UsageError(
                f"{len(matches)} images match {pattern!r} ({source}): {listing}.",
                hint="choose one with -i IMAGE or QCOW2_IMAGE",
            )
        if matches:
            return Path(os.path.abspath(matches[0]))
        if source != "default":
            raise ImageError(
                f"Image not found: {pattern!r} (from {source}) matches no file.",
                hint="pass -i IMAGE or set QCOW2_IMAGE",
            )
    raise ImageError(
        f"No image found: searched {' and '.join(repr(s) for s in searched)} in {cwd}.",
        hint="pass -i IMAGE or set QCOW2_IMAGE or IMAGE_PATH",
    )
