"""`qsnap ui` (issue 15) driven headlessly by Textual's own pilot (`App.run_test`) at 80x24, against
real images made with qemu-img / qemu-io and histories made with the real `qsnap` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from qsnap_testlib import ROOT, one_error_line, qemu_img, qemu_io, run_qsnap
from textual.widgets import DataTable, Input, Static, TabbedContent, Tree

from qsnap.cli.ui.app import Ask, Confirm, SnapshotApp, TextView
from qsnap.cli.ui.view import format_range
from qsnap.service.snapshots import SAFETY_PREFIX, Context

from .conftest import GUEST_FILES, make_ext_image, write_guest_file

SAFETY = re.compile(re.escape(SAFETY_PREFIX) + r"\d{8}-\d{6}(-\d+)?")


def cli(image: Path, *args: str) -> Any:
    result = run_qsnap("-i", image, *args)
    assert result.rc == 0, result.err
    return json.loads(result.out) if "--json" in args else result.out


@pytest.fixture(scope="module")
def history_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_history(tmp_path_factory.mktemp("history"))


@pytest.fixture
def history(history_template: Path, tmp_path: Path) -> Path:
    """A private copy of the history below (image, sidecar, audit log)."""
    shutil.copytree(history_template.parent, tmp_path / "vm")
    return tmp_path / "vm" / history_template.name


def make_history(tmp_path: Path) -> Path:
    """a ─┬─ b            (b: first MiB 0x22 at 2M)
          ├─ safety-…    (the state before restoring a)
          └─ c ◀ here    (c: 0x33 at 4M)"""
    image = tmp_path / "vm" / "disk.qcow2"
    image.parent.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(image), "16M")
    qemu_io(image, "write -P 0x11 0 1M")
    cli(image, "create", "a", "-m", "the first state")
    qemu_io(image, "write -P 0x22 2M 1M")
    cli(image, "create", "b.2-rc1", "-m", "second")
    cli(image, "restore", "a", "--yes")
    qemu_io(image, "write -P 0x33 4M 512k")
    cli(image, "create", "c-3")
    return image


def run_app(image: Path, scenario: Callable[[SnapshotApp, Any], Coroutine[Any, Any, None]],
            size: tuple[int, int] = (80, 24), ctx: Context | None = None) -> SnapshotApp:
    app = SnapshotApp(image, ctx or Context(command="qsnap ui"))

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await settle(app, pilot)
            await scenario(app, pilot)
            await settle(app, pilot)

    asyncio.run(main())
    return app


async def settle(app: SnapshotApp, pilot: Any) -> None:
    """Until no worker runs and the screen has caught up with what they posted."""
    for _ in range(200):
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        if not any(w.is_running for w in app.workers) and app.loaded:
            return
    raise AssertionError("the UI did not settle")


def ui_tree(app: SnapshotApp) -> list[tuple[str, str | None]]:
    """(name, parent name) of every node the tree widget shows, in display order."""
    tree = app.query_one("#tree", Tree)
    assert app.history is not None
    out: list[tuple[str, str | None]] = []
    here: list[str | None] = []

    def visit(node: Any, parent: str | None) -> None:
        for child in node.children:
            if child.data is None:  # the "you are here" leaf
                here.append(parent)
                continue
            name = app.history.nodes[str(child.data)].snapshot.name
            out.append((name, parent))
            visit(child, name)

    visit(tree.root, None)
    assert here == [app.history.nodes[app.history.current].snapshot.name] if app.history.current else not here
    return out


async def select(app: SnapshotApp, pilot: Any, name: str) -> None:
    tree = app.query_one("#tree", Tree)

    def find(node: Any) -> Any:
        for child in node.children:
            if child.data is not None and app.history and app.history.nodes[str(child.data)].snapshot.name == name:
                return child
            found = find(child)
            if found is not None:
                return found
        return None

    target = find(tree.root)
    assert target is not None, name
    tree.focus()
    tree.move_cursor(target)
    await settle(app, pilot)
    assert app.selection.node is not None and app.selection.node.snapshot.name == name


def text_of(app: SnapshotApp, selector: str) -> str:
    return str(app.query_one(selector, Static).content)


def test_tree_matches_qsnap_list(history):
    listed = cli(history, "list", "--json")
    drawn = cli(history, "list", "--tree", "--json")

    seen: dict[str, Any] = {}

    async def scenario(app: SnapshotApp, pilot: Any) -> None:
        seen["nodes"] = ui_tree(app)

    app = run_app(history, scenario)
    assert app.history is not None
    nodes = seen["nodes"]
    assert sorted(n for n, _ in nodes) == sorted(s["name"] for s in listed["snapshots"])
    expected: list[tuple[str, str | None]] = []

    def visit(entry: dict[str, Any], parent: str | None) -> None:
        expected.append((entry["name"], parent))
        for child in entry["children"]:
            visit(child, entry["name"])

    for root in drawn["roots"]:
        visit(root, None)
    assert nodes == expected
    by_name = {n.snapshot.name: n for n in app.history.nodes.values()}
    for entry in listed["snapshots"]:
        node = by_name[entry["name"]]
        assert (node.snapshot.id, node.description) == (entry["id"], entry["description"])
    # "you are here", and the space bars once the background accounting is done
    assert app.history.nodes[app.history.current].snapshot.name == "c-3"
    assert app.selection.node is not None and app.selection.node.snapshot.name == "c-3"
    assert set(app.space) == {(s["id"], s["name"]) for s in listed["snapshots"]}
    space = cli(history, "info", "--json")["space"]
    assert {(s["id"], s["name"]): s["exclusive_bytes"] for s in space["snapshots"]} == app.space


def test_changes_show_the_ranges_of_qsnap_diff(history):
    seen: dict[str, Any] = {}

    async def scenario(app: SnapshotApp, pilot: Any) -> None:
        app.query_one(TabbedContent).active = "tab-changes"
        await select(app, pilot, "c-3")  # against its parent, a
        seen["parent"] = (app.last_diff.to_json()["ranges"], text_of(app, "#changes"))
        await select(app, pilot, "b.2-rc1")
        await pilot.press("m")  # mark b, then select c: b -> c
        await select(app, pilot, "c-3")
        seen["marked"] = (app.last_diff.to_json()["ranges"], text_of(app, "#changes"))
        seen["files"] = text_of(app, "#file-changes")

    run_app(history, scenario)
    for (a, b), key in ((("a", "c-3"), "parent"), (("b.2-rc1", "c-3"), "marked")):
        expected = cli(history, "diff", a, b, "--json")["ranges"]
        ranges, text = seen[key]
        assert ranges == expected and expected
        assert f"{a} → {b}" in text
        for r in expected:
            assert format_range(r["offset"], r["length"]) in text
    assert "not readable" in seen["files"]  # no filesystem on this disk: said, not hidden


def _normalized_audit(image: Path) -> list[dict[str, Any]]:
    log = image.with_name(image.name + ".qsnap-audit.log")
    out = []
    for line in log.read_text().splitlines():
        record = json.loads(line)
        for volatile in ("time", "duration_s", "image"):
            record.pop(volatile, None)
        out.append(json.loads(SAFETY.sub("safety-N", json.dumps(record, sort_keys=True))))
    return out


def _state(image: Path) -> tuple[list[str], str | None]:
    info = json.loads(qemu_img("info", "-U", "-f", "qcow2", "--output=json", str(image)).stdout)
    names = [SAFETY.sub("safety-N", s["name"]) for s in info.get("snapshots", [])]
    sidecar = json.loads(image.with_name(image.name + ".qsnap.json").read_text())
    current = sidecar.get("current")
    return names, SAFETY.sub("safety-N", current.split("|")[1]) if current else None


def _copy(image: Path, folder: Path) -> Path:
    shutil.copytree(image.parent, folder)
    return folder / image.name


def test_restore_from_the_ui_is_the_cli_restore(history, tmp_path):
    by_cli, by_ui = _copy(history, tmp_path / "cli"), _copy(history, tmp_path / "ui")
    out = cli(by_cli, "restore", "b.2-rc1", "--yes")
    assert "Safety snapshot" in out
    seen: dict[str, Any] = {}

    async def scenario(app: SnapshotApp, pilot: Any) -> None:
        await select(app, pilot, "b.2-rc1")
        await pilot.press("r")
        await pilot.pause()
        assert isinstance(app.screen, Confirm)
        seen["question"] = app.screen.question
        await pilot.click("#yes")
        await settle(app, pilot)
        seen["message"] = app.messages[-1]
        seen["nodes"] = ui_tree(app)
        await pilot.press("u")  # undo offers the safety snapshot (answered no: the comparison below)
        await pilot.pause()
        assert isinstance(app.screen, Confirm) and app.last_undo is not None
        assert f"snapshot {app.last_undo.name!r}" in app.screen.question
        await pilot.press("n")
        await settle(app, pilot)

    app = run_app(by_ui, scenario)
    assert "kept as a safety snapshot" in seen["question"]
    assert "restored via qemu-img" in seen["message"] and "undo: press u" in seen["message"]
    assert app.last_undo is not None and SAFETY.fullmatch(app.last_undo.name)
    assert _state(by_ui) == _state(by_cli)
    assert subprocess.run(["qemu-img", "compare", "-q", str(by_cli), str(by_ui)]).returncode == 0
    assert _normalized_audit(by_ui) == _normalized_audit(by_cli)
    # the tree was refreshed: the new safety snapshot is shown, "you are here" is on b
    assert app.history is not None and app.history.nodes[app.history.current].snapshot.name == "b.2-rc1"
    assert sum(bool(SAFETY.fullmatch(n)) for n, _ in seen["nodes"]) == 2 and len(seen["nodes"]) == 5


def _fingerprint(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_cancelling_a_confirmation_changes_nothing(history, tmp_path):
    before = _fingerprint(history.parent)

    async def scenario(app: SnapshotApp, pilot: Any) -> None:
        await select(app, pilot, "a")
        for key, answer in (("r", "n"), ("d", "escape")):
            await pilot.press(key)
            await pilot.pause()
            assert isinstance(app.screen, Confirm), key
            await pilot.press(answer)
            await settle(app, pilot)
            assert app.messages[-1] == "Nothing was changed."
        await pilot.press("d")
        await pilot.pause()
        await pilot.click("#no")
        await settle(app, pilot)
        for key in ("n", "e", "b"):  # the questions that ask for text: Escape
            await pilot.press(key)
            await pilot.pause()
            assert isinstance(app.screen, Ask), key
            await pilot.press("escape")
            await settle(app, pilot)
            assert app.messages[-1] == "Nothing was changed."

    run_app(history, scenario)
    assert _fingerprint(history.parent) == before


def test_create_describe_delete_and_backup_from_the_ui(history, tmp_path):
    output = tmp_path / "out" / "b.qcow2"

    async def answer(app: SnapshotApp, pilot: Any, text: str | None) -> None:
        await pilot.pause()
        if text is None:
            assert isinstance(app.screen, Confirm)
            await pilot.click("#yes")
        else:
            assert isinstance(app.screen, Ask)
            app.screen.query_one(Input).value = text
            await pilot.press("enter")
        await pilot.pause()

    async def scenario(app: SnapshotApp, pilot: Any) -> None:
        await pilot.press("n")
        await answer(app, pilot, "d-4.0")
        await answer(app, pilot, "made in the ui")
        await settle(app, pilot)
        await select(app, pilot, "a")
        await pilot.press("e")
        await answer(app, pilot, "renamed in the ui")
        await settle(app, pilot)
        await select(app, pilot, "b.2-rc1")
        await pilot.press("b")
        await answer(app, pilot, str(output))
        await answer(app, pilot, None)
        await settle(app, pilot)
        await select(app, pilot, "c-3")
        await pilot.press("d")
        await answer(app, pilot, None)
        await settle(app, pilot)

    app = run_app(history, scenario)
    listed = {s["name"]: s["description"] for s in cli(history, "list", "--json")["snapshots"]}
    assert listed["d-4.0"] == "made in the ui" and listed["a"] == "renamed in the ui"
    assert "c-3" not in listed
    assert output.is_file()
    assert run_qsnap("verify", output).rc == 0
    operations = [(r["operation"], r["snapshot"], r["result"]) for r in _normalized_audit(history)][-4:]
    assert operations == [("create", "d-4.0", "ok"), ("describe", "a", "ok"), ("backup", "b.2-rc1", "ok"),
                          ("delete", "c-3", "ok")]
    assert app.history is not None and "c-3" not in {n.snapshot.name for n in app.history.nodes.values()}


@pytest.fixture
def guest_image(tmp_path: Path) -> Path:
    """An ext4 disk with s1 and s2 (s2: /etc/motd rewritten, /etc/added.txt new), made by qsnap create."""
    raw, image = make_ext_image(tmp_path, GUEST_FILES)
    cli(image, "create", "s1")
    write_guest_file(raw, image, "/etc/motd", b"A new message of the day.\n")
    host = tmp_path / "added"
    host.write_bytes(b"added\n")
    subprocess.run(["debugfs", "-w", "-R", f"write {host} /etc/added.txt", str(raw)], check=True, capture_output=True)
    qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    cli(image, "create", "s2")
    return image


def test_files_changes_view_and_extract(guest_image, tmp_path):
    dest = tmp_path / "extracted"
    dest.mkdir()
    seen: dict[str, Any] = {}

    async def open_row(app: SnapshotApp, pilot: Any, name: str) -> None:
        table = app.query_one("#files", DataTable)
        names = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        table.focus()
        table.move_cursor(row=names.index(name))
        await pilot.press("enter")
        await settle(app, pilot)

    async def scenario(app: SnapshotApp, pilot: Any) -> None:
        await select(app, pilot, "s2")
        app.query_one(TabbedContent).active = "tab-changes"
        await settle(app, pilot)
        seen["changes"] = text_of(app, "#file-changes")
        app.query_one(TabbedContent).active = "tab-files"
        await settle(app, pilot)
        table = app.query_one("#files", DataTable)
        seen["root"] = sorted(str(table.get_row_at(i)[0]) for i in range(table.row_count))
        await open_row(app, pilot, "etc")
        await open_row(app, pilot, "motd")
        assert isinstance(app.screen, TextView)
        seen["motd"] = str(app.screen.query_one("#body", Static).content)
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("x")
        await pilot.pause()
        assert isinstance(app.screen, Ask)
        app.screen.query_one(Input).value = str(dest)
        await pilot.press("enter")
        await settle(app, pilot)

    run_app(guest_image, scenario)
    cli_lines = cli(guest_image, "diff", "s1", "s2", "--files").splitlines()
    assert "A  /etc/added.txt" in cli_lines and any(line.startswith("M  /etc/motd") for line in cli_lines)
    for line in cli_lines[:-1]:  # every change line as the CLI prints it (the last line: its summary)
        assert line in seen["changes"]
    assert {"etc", "home"} <= set(seen["root"])
    assert seen["motd"] == "A new message of the day.\n"
    assert (dest / "motd").read_bytes() == b"A new message of the day.\n"


def test_screenshot_for_the_readme(tmp_path):
    """The README's picture: the real application at 80x24, as SVG (Textual) then PNG (rsvg-convert),
    on an ext4 disk whose history the CLI made, showing a snapshot's block and file changes.
    Written to docs/ui.png only with QSNAP_UPDATE_SCREENSHOT=1 (its dates change on every run), and
    to $QSNAP_SCREENSHOT_DIR when set."""
    raw, image = make_ext_image(tmp_path, GUEST_FILES)
    cli(image, "create", "base-1.0", "-m", "fresh install")
    write_guest_file(raw, image, "/etc/motd", b"Upgraded to the next release.\n")
    write_guest_file(raw, image, "/etc/hostname", b"hurd-box-2\n")
    cli(image, "create", "upgraded-2.0", "-m", "after dist-upgrade")
    cli(image, "restore", "base-1.0", "--yes")
    write_guest_file(raw, image, "/home/user/notes.txt", b"an experiment\n")
    cli(image, "create", "experiment-3", "-m", "trying a new kernel")
    svg: dict[str, str] = {}

    async def scenario(app: SnapshotApp, pilot: Any) -> None:
        app.query_one(TabbedContent).active = "tab-changes"
        await select(app, pilot, "upgraded-2.0")
        svg["text"] = app.export_screenshot(title="qsnap ui")

    run_app(image, scenario)
    source = tmp_path / "ui.svg"
    source.write_text(svg["text"])
    png = tmp_path / "ui.png"
    converter = shutil.which("rsvg-convert")
    assert converter, "rsvg-convert is missing (Debian package librsvg2-bin; scripts/test installs it)"
    subprocess.run([converter, "-o", str(png), str(source)], check=True, timeout=60)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = svg["text"].replace("&#160;", " ")
    assert "upgraded-2.0" in text and "you are here" in text and "/etc/motd" in text
    if os.environ.get("QSNAP_SCREENSHOT_DIR"):  # to look at it
        for made in (source, png):
            shutil.copyfile(made, Path(os.environ["QSNAP_SCREENSHOT_DIR"]) / made.name)
    if os.environ.get("QSNAP_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(png, ROOT / "docs" / "ui.png")


def test_ui_needs_a_terminal_and_other_commands_never_import_textual(history, qsnap_main):
    result = qsnap_main(["-i", history, "ui"])
    assert result.rc == 2
    assert one_error_line(result.err).endswith("qsnap ui needs a terminal (stdin and stdout); "
                                               "use qsnap list --tree in scripts.")
    probe = ("import sys; from qsnap.cli.main import main; main(['--help']); "
             "print('textual' in sys.modules, 'qsnap.cli.ui.app' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stderr.strip() == "False False"


@pytest.mark.vm
def test_a_running_vm_is_shown_and_reached_through_its_monitor(start_vm):
    vm = start_vm("qmp")
    image = vm.drives[0]
    vm.write_pattern(0x11)
    seen: dict[str, Any] = {}

    async def scenario(app: SnapshotApp, pilot: Any) -> None:
        seen["title"] = app.title
        await pilot.press("n")
        await pilot.pause()
        app.screen.query_one(Input).value = "live-1.0"
        await pilot.press("enter")
        await pilot.pause()
        await pilot.press("enter")  # no description
        await settle(app, pilot)
        seen["created"] = app.pending_result or app.messages[-1]
        assert "via qmp" in seen["created"], app.messages
        await asyncio.to_thread(vm.write_pattern, 0x22)  # the side channel runs its own event loop
        await select(app, pilot, "live-1.0")
        await pilot.press("r")
        await pilot.pause()
        assert isinstance(app.screen, Confirm)
        seen["question"] = app.screen.question
        await pilot.click("#yes")
        await settle(app, pilot)
        seen["restored"] = app.messages[-1]

    run_app(image, scenario, ctx=Context(monitor=vm.address, command="qsnap ui"))
    assert "VM RUNNING" in seen["title"]
    assert "via qmp" in seen["created"], seen
    assert "The VM is running: its monitor does the restore." in seen["question"]
    assert "restored via qmp" in seen["restored"], seen
    assert vm.has_pattern(0x11) and vm.status() == "running"
    names = vm.names()
    assert names[0] == "live-1.0" and len(names) == 2 and SAFETY.fullmatch(names[1])
    engines = [(r["operation"], r["engine"]) for r in _normalized_audit(image)]
    assert engines == [("create", "qmp"), ("restore", "qmp")]
