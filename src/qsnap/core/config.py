"""Where settings come from: options, then the guide's environment variables, then defaults.

Image: ``-i/--image``, else ``QCOW2_IMAGE``, else ``IMAGE_PATH`` (a path or a glob), else the
guide's default glob ``./debian-hurd-amd64-*.qcow2``, then ``./debian-hurd-amd64.qcow2``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from qsnap.core.errors import ImageError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_GLOBS = ("./debian-hurd-amd64-*.qcow2", "./debian-hurd-amd64.qcow2")
_GLOB_CHARS = set("*?[")


def _expand(pattern: str, cwd: str) -> list[str]:
    expanded = os.path.expanduser(pattern)
    base = os.path.normpath(expanded if os.path.isabs(expanded) else os.path.join(cwd, expanded))
    if _GLOB_CHARS & set(pattern):
        import glob

        return sorted(glob.glob(base))
    return [base] if os.path.lexists(base) else []


def resolve_image_path(
    explicit: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> str:
    """:func:`resolve_image` as a plain string (no pathlib: `qsnap list`'s fast path uses it)."""
    environ = os.environ if environ is None else environ
    where = os.getcwd() if cwd is None else os.fspath(cwd)
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
        matches = _expand(pattern, where)
        if len(matches) > 1:
            listing = ", ".join(matches)
            raise UsageError(
                f"{len(matches)} images match {pattern!r} ({source}): {listing}.",
                hint="choose one with -i IMAGE or QCOW2_IMAGE",
            )
        if matches:
            return os.path.abspath(matches[0])
        if source != "default":
            raise ImageError(
                f"Image not found: {pattern!r} (from {source}) matches no file.",
                hint="pass -i IMAGE or set QCOW2_IMAGE",
            )
    raise ImageError(
        f"No image found: searched {' and '.join(repr(s) for s in searched)} in {where}.",
        hint="pass -i IMAGE or set QCOW2_IMAGE or IMAGE_PATH",
    )


def resolve_image(
    explicit: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Path:
    """The image a command works on, as an absolute path (it must exist)."""
    from pathlib import Path

    return Path(resolve_image_path(explicit, environ, cwd))
