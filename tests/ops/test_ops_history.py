"""History tree, describe, name placeholders, and the audit log (`qsnap log`, concurrent writers)."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from argparse import Namespace
from datetime import datetime
from pathlib import Path

import pytest
from ops_testlib import clean_environ, qemu_img, run_cli

from qsnap import service
from qsnap.cli.env import Environment
from qsnap.cli.invocation import Invocation
from qsnap.cli.render_tree import render_tree
from qsnap.core.errors import UsageError
from qsnap.service import audit
from qsnap.service.history import build_tree, expand_placeholders
from qsnap.service.sidecar import sidecar_path


def shape(image: Path) -> list[tuple[int, str]]:
    return [(depth, node.snapshot.name) for depth, node in build_tree(image).walk()]


def draw(image: Path, encoding: str = "utf-8") -> str:
    out = io.TextIOWrapper(io.BytesIO(), encoding=encoding, write_through=True)
    inv = Invocation(Namespace(json=False), Environment(stdout=out, stderr=io.StringIO()))
    render_tree(inv, build_tree(image))
    out.seek(0)
    return out.read()


def test_creates_and_restores_make_the_expected_tree(image: Path) -> None:
    service.create(image, "installed", description="fresh install")
    service.create(image, "tools")
    restored = service.restore(image, "installed")
    safety = restored.safety_snapshot
    assert safety is not None
    service.create(image, "experiment")
    assert shape(image) == [(0, "installed"), (1, "tools"), (2, safety.name), (1, "experiment")]
    tree = build_tree(image)
    assert tree.nodes[tree.current].snapshot.name == "experiment"  # type: ignore[index]
    assert tree.nodes[next(k for k, n in tree.nodes.items() if n.snapshot.name == safety.name)].safety

    service.restore(image, "tools")
    text = draw(image)
    lines = text.splitlines()
    assert lines[0].startswith("installed  (ID 1, ") and lines[0].endswith("fresh install")
    # "You are here" hangs under the snapshot last restored, after its children.
    tools = next(i for i, line in enumerate(lines) if "tools  (ID" in line)
    here = next(i for i, line in enumerate(lines) if "You are here" in line)
    assert here > tools and lines[here].startswith("│   └── ● You are here")
    assert "[safety]" in text


def test_snapshots_made_outside_qsnap_are_roots_with_unknown_parent(image: Path) -> None:
    service.create(image, "a")
    qemu_img("snapshot", "-c", "by-hand", image)
    service.create(image, "b")
    assert shape(image) == [(0, "a"), (1, "b"), (0, "by-hand")]
    assert "by-hand  (ID 2" in draw(image) and "[unknown parent]" in draw(image)
    ascii_text = draw(image, "ascii")
    assert "`-- * You are here" in ascii_text


def test_tree_json(image: Path) -> None:
    service.create(image, "a", description="one")
    service.create(image, "b")
    out = io.StringIO()
    render_tree(Invocation(Namespace(json=True), Environment(stdout=out, stderr=io.StringIO())), build_tree(image))
    data = json.loads(out.getvalue())
    [root] = data["roots"]
    assert (root["name"], root["description"], root["children"][0]["name"]) == ("a", "one", "b")
    assert root["children"][0]["current"] is True


def test_describe_sets_and_clears_a_description(image: Path) -> None:
    service.create(image, "base")
    r = run_cli(["-i", str(image), "describe", "base", "before", "the", "upgrade"], clean_environ())
    assert r.code == 0, r.err
    assert service.list_snapshots(image).entries[0].description == "before the upgrade"
    assert stat.S_IMODE(os.stat(sidecar_path(image)).st_mode) == 0o600
    r = run_cli(["-i", str(image), "describe", "--id", "1", ""], clean_environ())
    assert r.code == 0 and "cleared" in r.out
    assert service.list_snapshots(image).entries[0].description is None
    assert [rec["operation"] for rec in audit.read(image)][-2:] == ["describe", "describe"]
    r = run_cli(["-i", str(image), "describe", "missing", "text"], clean_environ())
    assert r.code == 3


def test_placeholders_expand_in_local_time() -> None:
    now = datetime(2024, 2, 29, 7, 5, 9)
    assert expand_placeholders("daily-{date}", now) == "daily-20240229"
    assert expand_placeholders("t-{time}", now) == "t-070509"
    assert expand_placeholders("{datetime}_x", now) == "20240229-070509_x"
    assert expand_placeholders("plain", now) == "plain"
    with pytest.raises(UsageError):
        expand_placeholders("x-{week}", now)


def test_log_shows_operations_and_filters_by_since(image: Path) -> None:
    service.create(image, "a")
    service.delete(image, "a")
    old = {"time": "2020-01-01T00:00:00Z", "user": "old", "operation": "create", "image": str(image),
           "snapshot": "ancient", "engine": "qemu-img", "result": "ok", "duration_s": 0.1, "error": None}
    lines = audit.audit_path(image).read_text().splitlines()
    audit.audit_path(image).write_text("\n".join([json.dumps(old), *lines]) + "\n")
    r = run_cli(["-i", str(image), "log"], clean_environ())
    assert r.code == 0
    assert [line.split()[3] for line in r.out.splitlines()[1:]] == ["create", "create", "delete"]
    r = run_cli(["-i", str(image), "log", "--since", "1d", "--json"], clean_environ())
    records = json.loads(r.out)["records"]
    assert [(x["operation"], x["snapshot"]) for x in records] == [("create", "a"), ("delete", "a")]
    r = run_cli(["-i", str(image), "log", "--since", "2019-12-31"], clean_environ())
    assert "ancient" in r.out
    r = run_cli(["-i", str(image), "log", "--since", "yesterday"], clean_environ())
    assert r.code == 2


WRITER = """
import sys
from pathlib import Path
from qsnap.service import audit
image, worker = Path(sys.argv[1]), int(sys.argv[2])
for n in range(int(sys.argv[3])):
    audit.append(image, {"worker": worker, "n": n, "payload": f"{worker}-{n}-" + "x" * 9000})
"""


def test_eight_concurrent_writers_never_break_a_line(image: Path) -> None:
    # Eight separate processes, each appending 40 records larger than PIPE_BUF.
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(image), str(w), "40"]) for w in range(8)]
    try:
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    raw = audit.audit_path(image).read_text().splitlines()
    assert len(raw) == 8 * 40
    records = [json.loads(line) for line in raw]  # every line is whole JSON
    assert {(r["worker"], r["n"]) for r in records} == {(w, n) for w in range(8) for n in range(40)}
    assert all(r["payload"] == f"{r['worker']}-{r['n']}-" + "x" * 9000 for r in records)
    assert stat.S_IMODE(os.stat(audit.audit_path(image)).st_mode) == 0o600
