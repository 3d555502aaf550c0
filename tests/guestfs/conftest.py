"""Fixtures for the guest-filesystem tests (issue 11): real filesystems made with mke2fs and
debugfs, inside real qcow2 images, built once per session (they are small: 24 MiB).

- ``source_tree`` (session): the host tree given to ``mke2fs -d`` (see
  :func:`guestfs.fsbuild.fill_tree`); the htree variants get the same plus a 10,000-entry directory.
- ``built_fs(variant)`` (session factory): a :class:`Built` for a name of
  :data:`guestfs.fsbuild.VARIANTS`: the filesystem image (the oracles read it), a qcow2 disk
  holding it (bare, MBR, logical or GPT partition, see :data:`LAYOUTS`) with snapshot ``s1``.
  Filesystem images are cached in ``~/.cache/qsnap-test-guestfs`` (or $QSNAP_GUESTFS_CACHE),
  keyed by the recipe (these files, the variant, the mke2fs version).
  Each variant also gets, through debugfs: a block and a character device node and extended
  attributes (short ones in the inode, a long one in a block); ``e2fsck -fyD`` indexes the big
  directory (an htree) where the variant has one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .fsbuild import VARIANTS, Layout, debugfs_w, e2fsck, fill_tree, make_disk, mkfs, sh, to_qcow2

#: The partition layout each variant is put in: every scheme is exercised by several variants.
LAYOUTS = {
    "hurd-1k": "mbr", "hurd-4k": "bare", "ext2-1k": "logical", "ext3-4k": "gpt", "ext4-1k": "mbr",
    "ext4-4k": "gpt", "ext4-nojournal": "bare", "ext4-inline": "logical", "ext4-64bit-csum": "gpt",
}
#: Variants that also hold a big directory /htree (indexed by e2fsck -D), and its number of entries:
#: 10,000 with 1 KiB blocks (a two-level index), fewer where 4 KiB blocks and checksums are tested.
HTREE_VARIANTS = {"ext2-1k": 10_000, "ext4-64bit-csum": 3_000}

#: debugfs commands run on every variant after mke2fs -d.
EXTRAS = [
    "mknod blockdev b 8 1",
    "mknod chardev c 1 3",
    "sif blockdev mode 060640",
    "sif chardev mode 020666",
    "ea_set /small.txt user.comment hello",
    "ea_set /small.txt trusted.x 1",
    "ea_set -f /EAFILE /big.bin user.long",
]


@dataclass(frozen=True)
class Built:
    variant: str
    fs: Path  # the filesystem image (the oracles' input)
    disk: Path  # the raw disk holding it
    qcow2: Path  # the qcow2 holding the disk, snapshot s1 taken
    layout: Layout
    src: Path  # the mke2fs -d source tree


@pytest.fixture(scope="session")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fill_tree(tmp_path_factory.mktemp("src") / "tree")


def cache_dir() -> Path:
    return Path(os.environ.get("QSNAP_GUESTFS_CACHE", Path.home() / ".cache" / "qsnap-test-guestfs"))


def _recipe_key(variant: str) -> str:
    """Anything that changes a variant's image changes this key: the recipe files, the variant's
    options and the mke2fs version."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in ("conftest.py", "fsbuild.py"):
        digest.update((here / name).read_bytes())
    digest.update(repr((variant, VARIANTS[variant])).encode())
    digest.update(sh("mke2fs", "-V").stderr)
    return digest.hexdigest()[:16]


def build_fs_image(variant: str, out: Path, src: Callable[[], Path]) -> Path:
    """The filesystem image of VARIANT at OUT: mke2fs -d SRC(), the debugfs EXTRAS, e2fsck -fyD."""
    htree = variant in HTREE_VARIANTS
    fs = mkfs(out, VARIANTS[variant], "24M", src(), extra=["-N", "12288"] if htree else [])
    ea_file = out.parent / f"{out.name}.ea-value"
    ea_file.write_bytes(b"v" * 700)  # too big for the inode: an xattr block
    debugfs_w(fs, [c.replace("/EAFILE", str(ea_file)) for c in EXTRAS])
    ea_file.unlink()
    if htree:  # mke2fs -d leaves directories linear: e2fsck -D indexes the big one
        result = e2fsck(fs, "-fyD")
        assert result.returncode in (0, 1), result.stdout.decode(errors="replace")
    return fs


@pytest.fixture(scope="session")
def built_fs(tmp_path_factory: pytest.TempPathFactory, source_tree: Path) -> Callable[[str], Built]:
    built: dict[str, Built] = {}

    def htree_source(entries: int) -> Callable[[], Path]:  # made only when the image is not cached
        return lambda: fill_tree(tmp_path_factory.mktemp("src-htree") / "tree", htree_entries=entries)

    def build(variant: str) -> Built:
        """Build VARIANT's filesystem (or take it from the cache: the htree ones take ~10 s)."""
        if variant in built:
            return built[variant]
        work = tmp_path_factory.mktemp(f"fs-{variant}")
        fs = work / "fs.img"
        cached = cache_dir() / f"{variant}-{_recipe_key(variant)}.img"
        try:
            shutil.copyfile(cached, fs)
            hit = True
        except FileNotFoundError:  # not built yet (or replaced by another worker just now)
            hit = False
        if not hit:
            entries = HTREE_VARIANTS.get(variant, 0)
            build_fs_image(variant, fs, htree_source(entries) if entries else lambda: source_tree)
            with contextlib.suppress(OSError):
                cached.parent.mkdir(parents=True, exist_ok=True)
                for stale in cached.parent.glob(f"{variant}-*.img"):  # older recipes of this variant
                    if stale != cached:
                        stale.unlink()
                partial = cached.with_name(f".{cached.name}.{os.getpid()}")
                shutil.copyfile(fs, partial)
                os.replace(partial, cached)
        layout = make_disk(fs, work / "disk.raw", LAYOUTS[variant])
        qcow2 = to_qcow2(work / "disk.raw", work / "disk.qcow2", ["s1"])
        built[variant] = Built(variant, fs, work / "disk.raw", qcow2, layout, source_tree)
        return built[variant]

    return build


def copy_of(built: Built, directory: Path) -> Built:
    """A private copy of BUILT's files in DIRECTORY (for tests that change them)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in ("fs", "disk", "qcow2"):
        source: Path = getattr(built, name)
        files[name] = directory / source.name
        shutil.copyfile(source, files[name])
    return Built(built.variant, files["fs"], files["disk"], files["qcow2"], built.layout, built.src)


class _BinaryStdout(io.TextIOWrapper):
    """A text stdout with a binary ``.buffer`` (what `qsnap cat` writes to), readable afterwards."""

    def __init__(self) -> None:
        self.raw_bytes = io.BytesIO()
        super().__init__(self.raw_bytes, encoding="utf-8", errors="surrogateescape")

    def getvalue(self) -> str:
        self.flush()
        return self.raw_bytes.getvalue().decode("utf-8", "surrogateescape")


def qsnap_bytes(*argv: object) -> tuple[int, bytes, str]:
    """``qsnap ARGV`` in-process with a binary stdout: (exit code, stdout bytes, stderr)."""
    from qsnap_testlib import clean_environ, qsnap_main

    from qsnap.cli.env import Environment

    out = _BinaryStdout()
    env = Environment(stdin=io.StringIO(), stdout=out, stderr=io.StringIO(), stdin_isatty=False,
                      stdout_isatty=False, stderr_isatty=False, environ=clean_environ(), cwd=Path.cwd())
    rc, _, err = qsnap_main(list(argv), env)
    out.flush()
    return rc, out.raw_bytes.getvalue(), err
