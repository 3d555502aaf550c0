"""Hostile images: mutate real images; the reader raises a qsnap error or agrees with qemu-img."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qcow2_oracle import create, io, run, snapshot

from qsnap.core.errors import CorruptImage, ImageError
from qsnap.qcow2 import open_image

TIME_BOUND = 10.0  # seconds per image, generous for a shared 2-core machine


class Pristine:
    """The pristine image bytes (kept out of hypothesis' failure reports)."""

    def __init__(self, data: bytes, regions: dict[str, tuple[int, int]]) -> None:
        self.data = data
        self.regions = regions

    def __repr__(self) -> str:
        return f"Pristine({len(self.data)} bytes, {self.regions})"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    """A small real image and where its structures are (found with struct from the header)."""
    path = tmp_path_factory.mktemp("fuzz") / "disk.qcow2"
    create(path, "2M", "cluster_size=4k")
    io(path, "write -P 0x11 0 256k", "write -P 0x12 1M 8k")
    snapshot(path, "one")
    io(path, "write -P 0x13 64k 4k", "write -z 1M 4k")
    snapshot(path, "two")
    io(path, "write -P 0x14 128k 4k")
    data = path.read_bytes()
    head = lambda a, b: int.from_bytes(data[a:b], "big")  # noqa: E731
    l1_offset, l1_size = head(40, 48), head(36, 40)
    snap_offset = head(64, 72)
    l2_offset = int.from_bytes(data[l1_offset : l1_offset + 8], "big") & 0x00FFFFFFFFFFFE00
    regions = {
        "header": (0, 112),
        "snapshot table": (snap_offset, snap_offset + 160),
        "active L1": (l1_offset, l1_offset + 8 * l1_size),
        "L2 table": (l2_offset, l2_offset + 4096),
        "refcount table": (head(48, 56), head(48, 56) + 64),
    }
    return Pristine(data, regions)


def qemu_view(path: Path, ids: list[str], size: int) -> dict[str, object] | None:
    """What qemu-img says: listing and sha256 of the current state and each snapshot, or None."""
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True)
    if info.returncode:
        return None
    out: dict[str, object] = {"info": json.loads(info.stdout)}
    for ident in [None, *ids]:
        raw = path.with_suffix(".raw")
        argv = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw"]
        if ident is not None:
            argv += ["-l", f"snapshot.id={ident}"]
        done = subprocess.run([*argv, str(path), str(raw)], capture_output=True, timeout=60)
        if done.returncode:
            out[f"data:{ident}"] = None
            continue
        with open(raw, "rb") as f:
            out[f"data:{ident}"] = hashlib.sha256(f.read(size)).hexdigest()
        raw.unlink()
    return out


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)
@given(
    region=st.sampled_from(["header", "snapshot table", "active L1", "L2 table", "refcount table"]),
    position=st.integers(min_value=0, max_value=4095),
    kind=st.sampled_from(["byte", "u32", "u64", "bit"]),
    value=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_mutated_images_raise_or_agree_with_qemu_img(
    pristine: Pristine,
    tmp_path: Path,
    region: str,
    position: int,
    kind: str,
    value: int,
) -> None:
    data, regions = pristine.data, pristine.regions
    start, end = regions[region]
    at = start + position % max(1, end - start)
    image = bytearray(data)
    if kind == "byte":
        image[at] = value & 0xFF
    elif kind == "bit":
        image[at] ^= 1 << (value % 8)
    else:
        width = 4 if kind == "u32" else 8
        at -= at % width
        image[at : at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
    path = tmp_path / "mutant.qcow2"
    path.write_bytes(bytes(image))

    began = time.monotonic()
    try:
        with open_image(path) as reader:
            snaps = reader.snapshots()
            size = reader.virtual_size
            ours: dict[str, object] = {"ids": [(s.id, s.name, s.vm_state_size, s.date_iso) for s in snaps]}
            for snap in [None, *snaps]:
                n = size if snap is None else min(size, reader.layer(snap).disk_size)
                digest = hashlib.sha256(reader.read(0, n, snap)).hexdigest()
                ours[f"data:{snap.id if snap else None}"] = (n, digest)
    except (CorruptImage, ImageError):
        assert time.monotonic() - began < TIME_BOUND
        return
    assert time.monotonic() - began < TIME_BOUND

    theirs = qemu_view(path, [s.id for s in snaps], size)
    assert theirs is not None, "the reader accepted an image qemu-img cannot open"
    listed = theirs["info"].get("snapshots", [])  # type: ignore[attr-defined]
    assert [(str(s["id"]), s["name"]) for s in listed] == [(i, n) for i, n, _, _ in ours["ids"]]  # type: ignore[attr-defined]
    for key, (n, digest) in ((k, v) for k, v in ours.items() if k.startswith("data:")):  # type: ignore[misc]
        if "\ufffd" in key:
            continue  # an ID that is not UTF-8 cannot be passed to qemu-img -l; the listing was compared
        qemu_digest = theirs[key]
        assert qemu_digest is not None, f"the reader read {key} but qemu-img could not"
        if n == size:
            assert digest == qemu_digest, key
        else:  # a snapshot smaller than the image: compare what both cover
            ident = key.split(":", 1)[1]
            raw = tmp_path / "prefix.raw"
            run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", "-l", f"snapshot.id={ident}", path, raw)
            assert hashlib.sha256(raw.read_bytes()[:n]).hexdigest() == digest, key
