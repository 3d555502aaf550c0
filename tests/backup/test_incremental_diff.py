"""The incremental backup's diff of two snapshots (L2 entries compared directly) agrees with a
cluster-by-cluster comparison of both states' full mappings, on images that real qemu-io
changed with data writes, zero writes (the zero flag) and discards."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from qsnap.backup.source import DATA, SourceReader

from .conftest import run


def expected_diff(reader: SourceReader, old_id: str) -> tuple[list[int], list[int]]:
    old = next(e for e in reader.snapshot_entries() if e.id == old_id)
    cur, before = reader.map_state(reader.state), reader.map_state(old)
    changed, zeros = [], []
    for i in range(cur.cluster_count):
        if cur.kinds[i] == before.kinds[i] and cur.entries[i] == before.entries[i]:
            continue
        if cur.kinds[i] >= DATA:
            changed.append(i)
        elif before.kinds[i] >= DATA:
            zeros.append(i)
    return changed, zeros


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_l2_diff_matches_full_mappings(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    image = tmp_path / "disk.qcow2"
    # 4 KiB clusters: 512 entries per L2 table, so 8 MiB spans several tables
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(image), "8M")
    ops = []
    for _ in range(40):
        start = rnd.randrange(0, 8 << 20, 4096)
        length = min(rnd.randint(1, 64) * 4096, (8 << 20) - start)
        ops.append(f"write -P {rnd.randint(1, 255)} {start} {length}")
    run("qemu-io", "-f", "qcow2", *[a for op in ops for a in ("-c", op)], str(image))
    run("qemu-img", "snapshot", "-c", "old", str(image))
    ops = []
    for _ in range(30):
        start = rnd.randrange(0, 8 << 20, 4096)
        length = min(rnd.randint(1, 64) * 4096, (8 << 20) - start)
        kind = rnd.choice(["write -P 7", "write -z", "discard", "write -P 0"])
        ops.append(f"{kind} {start} {length}")
    run("qemu-io", "-f", "qcow2", *[a for op in ops for a in ("-c", op)], str(image))
    run("qemu-img", "snapshot", "-c", "new", str(image))
    ids = {line.split()[1]: line.split()[0] for line in run("qemu-img", "snapshot", "-l", str(image)).splitlines()[2:]}
    with SourceReader(image, ids["new"]) as reader:
        old = next(e for e in reader.snapshot_entries() if e.id == ids["old"])
        got = reader.diff_state(old)
        assert got == expected_diff(reader, ids["old"])
        assert got[0]  # the random changes did change something
