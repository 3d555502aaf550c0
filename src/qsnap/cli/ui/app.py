"""`qsnap ui`: the snapshot tree, space, changes and files of one image, with the CLI's actions.

Everything it shows comes from :mod:`qsnap.service` (the tree from the sidecar through
``history.build_tree``, space from ``inspection.space``, block changes from ``inspection.diff``,
file changes from ``filediff.diff_files``, the guest files from ``guestfiles``) and every action
calls the same service function the CLI calls (same locks, audit log, safety snapshot, routing
of a running VM through its monitor). Work that reads much runs in thread workers: the screen
never waits for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Header,
    Input,
    Label,
    ProgressBar,
    Static,
    TabbedContent,
    TabPane,
    Tree,
)
from textual.widgets.tree import TreeNode as UiNode

from qsnap.cli.render import human_size
from qsnap.cli.ui.view import bar, compact_date, file_change_line, format_range, short_date, strip
from qsnap.core.errors import QsnapError
from qsnap.core.models import Snapshot
from qsnap.service.history import Tree as History
from qsnap.service.history import TreeNode
from qsnap.service.snapshots import Context

CURRENT = "@current"
STRIP_WIDTH = 32
FILE_VIEW_LIMIT = 256 * 1024


@dataclass
class Selection:
    """What the details/changes/files panes show."""

    node: TreeNode | None = None
    marked: TreeNode | None = None


# ------------------------------------------------------------------ dialogs

class Confirm(ModalScreen[bool]):
    """A yes/no question. Escape and 'n' answer no."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,n", "answer(False)", "No"),
                                             Binding("y", "answer(True)", "Yes")]
    DEFAULT_CSS = """
    Confirm { align: center middle; }
    Confirm > Vertical { width: 70; height: auto; border: thick $warning; background: $surface; padding: 1 2; }
    Confirm Horizontal { height: auto; margin-top: 1; }
    Confirm Button { margin-right: 2; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(self.question), id="question")
            with Horizontal():
                yield Button("Yes", id="yes", variant="warning")
                yield Button("No", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class Ask(ModalScreen[str | None]):
    """One line of input (a name, a description, a path). Escape cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = """
    Ask { align: center middle; }
    Ask > Vertical { width: 70; height: auto; border: thick $accent; background: $surface; padding: 1 2; }
    Ask Horizontal { height: auto; margin-top: 1; }
    Ask Button { margin-right: 2; }
    """

    def __init__(self, prompt: str, value: str = "", placeholder: str = "") -> None:
        super().__init__()
        self.prompt, self.value, self.placeholder = prompt, value, placeholder

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(self.prompt))
            yield Input(self.value, placeholder=self.placeholder, id="value")
            with Horizontal():
                yield Button("OK", id="ok", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted)
    def submitted(self) -> None:
        self.dismiss(self.query_one(Input).value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.query_one(Input).value if event.button.id == "ok" else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class TextView(ModalScreen[None]):
    """A text file of the guest, read-only."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "close", "Close")]
    DEFAULT_CSS = """
    TextView > Vertical { border: thick $accent; background: $surface; }
    TextView #title { background: $accent; width: 100%; }
    """

    def __init__(self, title: str, body: str) -> None:
        super().__init__()
        self.title_text, self.body = title, body

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(self.title_text + "  (Esc closes)"), id="title")
            with VerticalScroll():
                yield Static(Text(self.body), id="body")

    def action_close(self) -> None:
        self.dismiss(None)


# ------------------------------------------------------------------ the application

class SnapshotApp(App[int]):
    """The snapshot tree of one image (left), details / changes / files of the selection (right)."""

    TITLE = "qsnap"
    CSS = """
    #main { height: 1fr; }
    #tree { width: 46; border: round $primary; overflow-x: hidden; }
    #side { width: 1fr; }
    #status { height: 1; background: $boost; }
    #progress { height: 1; display: none; }
    #progress.busy { display: block; }
    TabbedContent { height: 1fr; }
    #files-path { height: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("m", "mark", "Mark"),
        Binding("n", "create", "New"),
        Binding("r", "restore", "Restore"),
        Binding("d", "delete", "Delete"),
        Binding("e", "describe", "Describe"),
        Binding("b", "backup", "Backup"),
        Binding("x", "extract", "Extract", show=False),
        Binding("u", "undo", "Undo", show=False),
        Binding("f5,ctrl+r", "refresh", "Refresh", show=False),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, image: Path, ctx: Context | None = None) -> None:
        super().__init__()
        self.image = Path(image)
        self.ctx = ctx or Context(command="qsnap ui")
        self.history: History | None = None
        self.space: dict[tuple[str, str], int] = {}
        self.selection = Selection()
        self.last_diff: Any = None  # the DiffReport shown in Changes
        self.last_files: Any = None  # the FileDiffReport shown, when the filesystem was readable
        self.last_undo: Snapshot | None = None  # the safety snapshot of the last restore
        self.files_dir = "/"
        self.files_entries: list[Any] = []
        self.vm_running = False
        self.messages: list[str] = []  # what the status line said, in order (tests read it)
        self.loaded = False
        self.name_width = 16
        self.pending_result: str | None = None
        self.diff_pair: tuple[str, str] | None = None  # (base key, selected key) Changes is computing
        self.changes_for: tuple[str | None, str | None] | None = None  # what Changes shows (node, mark)
        self.files_for: tuple[str | None, str | None] | None = None

    # -------------------------------------------------------------- layout

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal(id="main"):
            tree: Tree[str] = Tree("snapshots", id="tree")
            tree.show_root = False
            tree.guide_depth = 2
            yield tree
            with TabbedContent(id="side"):
                with TabPane("Details", id="tab-details"), VerticalScroll():
                    yield Static("Loading…", id="details")
                with TabPane("Changes", id="tab-changes"), VerticalScroll():
                    yield Static("", id="changes")
                    yield Static("", id="file-changes")
                with TabPane("Files", id="tab-files"):
                    yield Label("", id="files-path")
                    table: DataTable[str] = DataTable(id="files", cursor_type="row")
                    yield table
        yield ProgressBar(id="progress", show_eta=False)
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = str(self.image)
        table = self.query_one("#files", DataTable)
        table.add_columns("name", "type", "size")
        self.call_after_refresh(self.preload_then_load)

    def preload_then_load(self) -> None:
        """Import, on this (the main) thread, what the workers will use, before any worker starts.

        Importing runs compile() for dataclasses and named tuples; CPython 3.11 can fail with
        "AST constructor recursion depth mismatch" when two threads compile at once, so no worker
        may be the first to import a module another thread is importing too."""
        import importlib

        from qsnap.service.image import image_held

        modules = ["qsnap.service.inspection", "qsnap.service.space", "qsnap.service.diff",
                   "qsnap.service.filediff", "qsnap.service.guestfiles", "qsnap.service.audit",
                   "qsnap.service.lock", "qsnap.service.routing", "qsnap.service.backups", "qsnap.backup",
                   "qsnap.engines.qemu_img"]
        if self.ctx.monitor or image_held(self.image):  # a running VM: the monitor stack too
            modules += ["qsnap.engines.monitor", "qsnap.monitor", "qsnap.vm"]
        for name in modules:
            importlib.import_module(name)
        self.refresh_all()

    def say(self, text: str) -> None:
        self.messages.append(text)
        self.query_one("#status", Static).update(Text(text))

    # -------------------------------------------------------------- loading

    def refresh_all(self) -> None:
        self.say("Reading the snapshot list…")
        self.load_tree()

    @work(thread=True, exclusive=True, group="tree")
    def load_tree(self) -> None:
        from qsnap.service.history import build_tree
        from qsnap.service.image import image_held

        try:
            history = build_tree(self.image, self.ctx)
            running = image_held(self.image)
        except QsnapError as exc:
            self.call_from_thread(self.say, f"error: {exc}")
            return
        self.call_from_thread(self.show_tree, history, running)

    def show_tree(self, history: History, running: bool) -> None:
        keep = self.selection.node.key if self.selection.node else (history.current or None)
        marked = self.selection.marked.key if self.selection.marked else None
        self.history, self.vm_running = history, running
        self.title = f"qsnap — {self.image.name} — " + ("VM RUNNING (actions go through its monitor)"
                                                        if running else "VM not running")
        tree: Tree[str] = self.query_one("#tree", Tree)
        tree.clear()
        self.name_width = min(14, max((len(n.snapshot.name) for n in history.nodes.values()), default=4))
        by_key: dict[str, UiNode[str]] = {}
        for _, node in history.walk():
            parent = by_key[node.parent] if node.parent is not None and node.parent in by_key else tree.root
            ui = parent.add(self.label(node), data=node.key, expand=True,
                            allow_expand=bool(node.children) or node.current)
            by_key[node.key] = ui
        if history.current in by_key:  # like `qsnap list --tree`: a leaf under the current position
            by_key[history.current].add_leaf(Text("● you are here", style="bold magenta"), data=None)
        self.selection.marked = history.nodes.get(marked) if marked else None
        self.loaded = True
        count = len(history.nodes)
        self.say(f"{count} snapshot{'s' if count != 1 else ''}. Computing space in the background…"
                 if count else "No snapshots yet: press n to create one.")
        target = by_key.get(keep or "") or (next(iter(by_key.values())) if by_key else None)
        if self.pending_result and not count:
            self.say(self.pending_result)
            self.pending_result = None
        if target is not None:
            self.select(history.nodes[str(target.data)])
            self.call_after_refresh(self._move_cursor, target)
        else:
            self.select(None)
        tree.focus()
        if count:
            self.load_space()

    def _move_cursor(self, target: UiNode[str]) -> None:
        """After the tree is laid out (earlier, its first line would take the highlight back)."""
        self.query_one("#tree", Tree).move_cursor(target)

    def label(self, node: TreeNode) -> Text:
        snap = node.snapshot
        width = self.name_width
        name = snap.name if len(snap.name) <= width else snap.name[: width - 1] + "…"
        marked = self.selection.marked is not None and self.selection.marked.key == node.key
        style = "yellow" if node.safety else ""
        text = Text(f"{name:<{width}}", style=style + (" bold" if node.current else "") + (" reverse" if marked
                                                                                            else ""))
        text.append(f" {compact_date(snap.date)}", style="dim")
        text.append(" VM" if snap.has_vm_state else "   ", style="cyan")
        exclusive = self.space.get((snap.id, snap.name))
        if self.space:
            top = max(self.space.values()) or 1
            text.append(f" {bar(exclusive or 0, top, 5)}", style="green")
        if node.description:
            text.append(f" {node.description}", style="italic dim")
        return text

    def relabel(self) -> None:
        if self.history is None:
            return
        tree: Tree[str] = self.query_one("#tree", Tree)

        def visit(ui: UiNode[str]) -> None:
            for child in ui.children:
                node = self.history.nodes.get(str(child.data)) if self.history else None
                if node is not None:
                    child.set_label(self.label(node))
                visit(child)

        visit(tree.root)

    @work(thread=True, exclusive=True, group="space")
    def load_space(self) -> None:
        from qsnap.service.inspection import space

        try:
            report = space(self.image)
        except QsnapError as exc:
            self.call_from_thread(self.say, f"space: {exc}")
            return
        values = {(r.id or "", r.name): r.exclusive_bytes for r in report.snapshots}
        self.call_from_thread(self.show_space, values)

    def show_space(self, values: dict[tuple[str, str], int]) -> None:
        self.space = values
        self.relabel()
        self.show_details()
        total = sum(values.values())
        self.say(f"{len(values)} snapshots hold {human_size(total)} on their own "
                 "(the bars: what deleting each frees).")
        if self.pending_result:  # the last action's outcome stays on the status line
            self.say(self.pending_result)
            self.pending_result = None

    # -------------------------------------------------------------- selection

    @on(Tree.NodeHighlighted, "#tree")
    def highlighted(self, event: Tree.NodeHighlighted[str]) -> None:
        if self.history is None or event.node.data is None:
            return
        node = self.history.nodes.get(str(event.node.data))
        if node is not None and node is not self.selection.node:
            self.select(node)

    def select(self, node: TreeNode | None) -> None:
        self.selection.node = node
        self.show_details()
        self.changes_for = self.files_for = None
        self.files_dir = "/"
        self.load_visible_tab()

    def load_visible_tab(self) -> None:
        """Diffs and guest listings cost reads: only the visible tab is filled, when it is shown."""
        node = self.selection.node
        key = (node.key if node else None, self.selection.marked.key if self.selection.marked else None)
        active = self.query_one(TabbedContent).active
        if active == "tab-changes" and self.changes_for != key:
            self.changes_for = key
            self.load_changes()
        elif active == "tab-files" and self.files_for != key:
            self.files_for = key
            self.load_files()

    @on(TabbedContent.TabActivated)
    def tab_shown(self) -> None:
        self.load_visible_tab()

    def show_details(self) -> None:
        node = self.selection.node
        widget = self.query_one("#details", Static)
        if node is None:
            widget.update("No snapshot selected.")
            return
        snap = node.snapshot
        parent = self.history.nodes.get(node.parent) if self.history and node.parent else None
        exclusive = self.space.get((snap.id, snap.name))
        rows = [
            ("name", snap.name), ("ID", snap.id), ("date", short_date(snap.date)),
            ("VM state", f"{human_size(snap.vm_state_size)} (a running VM's RAM)" if snap.has_vm_state
             else "none (disk only)"),
            ("disk size", human_size(snap.disk_size) if snap.disk_size else "?"),
            ("description", node.description or "—"),
            ("parent", parent.snapshot.name if parent else f"— ({node.root_reason or 'root'})"),
            ("exclusive", human_size(exclusive) + " (freed by deleting it)" if exclusive is not None
             else "computing…"),
            ("safety", "yes (taken before a restore)" if node.safety else "no"),
            ("current", "yes ● you are here (last created / restored)" if node.current else "no"),
        ]
        if self.selection.marked is not None:
            rows.append(("marked", self.selection.marked.snapshot.name + " (Changes compare with it)"))
        text = Text()
        for key, value in rows:
            text.append(f"{key:<12}", style="bold")
            text.append(f"{value}\n")
        widget.update(text)

    def base_of(self, node: TreeNode) -> TreeNode | None:
        marked = self.selection.marked
        if marked is not None and marked.key != node.key:
            return marked
        if node.parent is not None and self.history is not None:
            return self.history.nodes.get(node.parent)
        return None

    def load_changes(self) -> None:
        node = self.selection.node
        changes = self.query_one("#changes", Static)
        self.query_one("#file-changes", Static).update("")
        self.last_diff = self.last_files = None
        self.diff_pair = None
        if node is None:
            changes.update("")
            return
        base = self.base_of(node)
        if base is None:
            changes.update(Text(f"{node.snapshot.name} has no parent; mark another snapshot (m) to compare."))
            return
        changes.update(Text(f"Comparing {base.snapshot.name} → {node.snapshot.name}…"))
        self.diff_pair = (base.key, node.key)
        self.compute_diff(base.snapshot, node.snapshot, self.diff_pair)

    @work(thread=True, exclusive=True, group="diff")
    def compute_diff(self, a: Snapshot, b: Snapshot, pair: tuple[str, str]) -> None:
        """Block ranges, then (slower) the file-level diff. A result for a pair that is no longer
        selected (the user moved on while it ran) is dropped."""
        from qsnap.service.filediff import diff_files
        from qsnap.service.inspection import diff

        try:
            report = diff(self.image, a.name, b.name, a_id=a.id, b_id=b.id)
        except QsnapError as exc:
            self.call_from_thread(self.if_current, pair, self.show_changes_text, "#changes", Text(f"diff: {exc}"))
            return
        self.call_from_thread(self.if_current, pair, self.show_diff, report)
        self.call_from_thread(self.if_current, pair, self.show_changes_text, "#file-changes",
                              Text("Files: reading the guest filesystems…", style="dim"))
        try:
            files = diff_files(self.image, a.name, b.name, "/", a_id=a.id, b_id=b.id)
        except QsnapError as exc:
            self.call_from_thread(self.if_current, pair, self.show_changes_text, "#file-changes",
                                  Text(f"Files: not readable: {exc.message}", style="dim"))
            return
        self.call_from_thread(self.if_current, pair, self.show_file_diff, files)

    def if_current(self, pair: tuple[str, str], show: Any, *args: Any) -> None:
        if pair == self.diff_pair:
            show(*args)

    def show_changes_text(self, selector: str, text: Text) -> None:
        self.query_one(selector, Static).update(text)

    def show_diff(self, report: Any) -> None:
        self.last_diff = report
        size = max(report.a_disk_size, report.b_disk_size)
        text = Text()
        text.append(f"{report.a} → {report.b}\n", style="bold")
        text.append(report.summary + "\n")
        text.append(strip(report.ranges, size, STRIP_WIDTH) + "\n", style="red")
        text.append(f"0{'':<{STRIP_WIDTH - 2 - len(human_size(size))}}{human_size(size)}\n", style="dim")
        for offset, length in report.ranges:
            text.append(format_range(offset, length) + "\n")
        self.query_one("#changes", Static).update(text)

    def show_file_diff(self, files: Any) -> None:
        self.last_files = files
        text = Text()
        text.append("Files: " + files.summary + "\n", style="bold")
        for change in files.changes:
            text.append(file_change_line(change) + "\n")
        self.query_one("#file-changes", Static).update(text)

    # -------------------------------------------------------------- files

    def load_files(self) -> None:
        table = self.query_one("#files", DataTable)
        table.clear()
        node = self.selection.node
        if node is None:
            self.query_one("#files-path", Label).update("")
            return
        self.query_one("#files-path", Label).update(Text(f"{node.snapshot.name}:{self.files_dir} (reading…)"))
        self.list_files(node.snapshot, self.files_dir)

    @work(thread=True, exclusive=True, group="files")
    def list_files(self, snap: Snapshot, directory: str) -> None:
        from qsnap.service import guestfiles

        try:
            state, _ = guestfiles.open_state(self.image, snap.name, snapshot_id=snap.id)
            with state:
                entries = list(guestfiles.list_dir(state, directory))
        except QsnapError as exc:
            self.call_from_thread(self.show_files_error, snap, f"{snap.name}: not readable: {exc.message}")
            return
        self.call_from_thread(self.show_files, snap, directory, entries)

    def show_files_error(self, snap: Snapshot, message: str) -> None:
        node = self.selection.node
        if node is not None and node.snapshot == snap:
            self.query_one("#files-path", Label).update(Text(message))

    def show_files(self, snap: Snapshot, directory: str, entries: list[Any]) -> None:
        node = self.selection.node
        if node is None or node.snapshot != snap:
            return
        self.files_dir, self.files_entries = directory, entries
        table = self.query_one("#files", DataTable)
        table.clear()
        if directory != "/":
            table.add_row("..", "dir", "")
        for info in entries:
            table.add_row(info.name, info.type, human_size(info.size) if info.type == "file" else "")
        self.query_one("#files-path", Label).update(
            Text(f"{snap.name}:{directory}  (Enter opens, x extracts)"))

    def selected_file(self) -> Any:
        table = self.query_one("#files", DataTable)
        row = table.cursor_row
        offset = 1 if self.files_dir != "/" else 0
        if row < offset:
            return None
        index = row - offset
        return self.files_entries[index] if 0 <= index < len(self.files_entries) else None

    @on(DataTable.RowSelected, "#files")
    def open_file(self, event: DataTable.RowSelected) -> None:
        node = self.selection.node
        if node is None:
            return
        info = self.selected_file()
        if info is None:  # ".."
            parent = self.files_dir.rstrip("/").rsplit("/", 1)[0] or "/"
            self.list_files(node.snapshot, parent)
            return
        if info.type == "dir":
            self.list_files(node.snapshot, info.path)
        elif info.type == "file":
            self.read_file(node.snapshot, info.path)

    @work(thread=True, group="view")
    def read_file(self, snap: Snapshot, path: str) -> None:
        from qsnap.service import guestfiles

        data = bytearray()
        try:
            state, _ = guestfiles.open_state(self.image, snap.name, snapshot_id=snap.id)
            with state:
                for chunk in guestfiles.cat(state, path):
                    data += chunk
                    if len(data) >= FILE_VIEW_LIMIT:
                        break
        except QsnapError as exc:
            self.call_from_thread(self.say, f"{path}: {exc}")
            return
        if b"\0" in data[:8192]:
            body = f"(binary file, {human_size(len(data))}+ — extract it with x)"
        else:
            body = data[:FILE_VIEW_LIMIT].decode("utf-8", "replace")
        self.call_from_thread(self.push_screen, TextView(f"{snap.name}:{path}", body))

    def action_extract(self) -> None:
        node = self.selection.node
        info = self.selected_file()
        if node is None or info is None or self.query_one(TabbedContent).active != "tab-files":
            self.say("Open the Files tab and pick a file or directory to extract.")
            return

        def chosen(dest: str | None) -> None:
            if dest:
                self.extract(node.snapshot, info.path, os.path.expanduser(dest))

        self.push_screen(Ask(f"Extract {node.snapshot.name}:{info.path} into directory:", os.getcwd()), chosen)

    @work(thread=True, group="extract")
    def extract(self, snap: Snapshot, path: str, dest: str) -> None:
        from qsnap.service import guestfiles

        try:
            state, _ = guestfiles.open_state(self.image, snap.name, snapshot_id=snap.id)
            with state:
                result = guestfiles.extract(state, path, dest)
        except QsnapError as exc:
            self.call_from_thread(self.say, f"extract: {exc}")
            return
        self.call_from_thread(self.say, f"Extracted {snap.name}:{path} to {result.destination} "
                                        f"({result.files} files, {result.bytes} bytes).")

    # -------------------------------------------------------------- actions

    def action_mark(self) -> None:
        node = self.selection.node
        if node is None:
            return
        same = self.selection.marked is not None and self.selection.marked.key == node.key
        self.selection.marked = None if same else node
        self.say("Mark cleared: Changes compare with the parent." if same else
                 f"Marked {node.snapshot.name}: Changes compare the selection with it.")
        self.relabel()
        self.show_details()
        self.changes_for = None
        self.load_visible_tab()

    def action_refresh(self) -> None:
        self.refresh_all()

    def start_action(self, title: str, job: Any) -> None:
        """Run JOB (a callable returning a message) in a worker; refresh the view afterwards."""
        self.say(f"{title}…")
        self._action_worker(title, job)

    @work(thread=True, exclusive=True, group="action")
    def _action_worker(self, title: str, job: Any) -> None:
        try:
            message = job()
        except QsnapError as exc:
            message = f"{title} failed: {exc}"
        self.call_from_thread(self.action_done, message)

    def action_done(self, message: str) -> None:
        self.query_one("#progress", ProgressBar).remove_class("busy")
        self.say(message)
        self.pending_result = message
        self.refresh_all()
        self.notify(message, timeout=8)

    def action_create(self) -> None:
        def named(name: str | None) -> None:
            if not name:
                self.say("Nothing was changed.")
                return
            self.push_screen(Ask(f"Description of {name!r} (optional):"), lambda d: described(name, d))

        def described(name: str, description: str | None) -> None:
            if description is None:
                self.say("Nothing was changed.")
                return
            from qsnap import service
            from qsnap.core.names import validate_name

            try:
                validate_name(name)
            except QsnapError as exc:
                self.say(str(exc))
                return

            def job() -> str:
                result = service.create(self.image, name, description=description or None, ctx=self.ctx)
                return f"Snapshot {result.snapshot.name!r} created (ID {result.snapshot.id}) via {result.engine}."

            self.start_action(f"Creating {name}", job)

        self.push_screen(Ask("Name of the new snapshot (of the current state):", placeholder="before-upgrade"),
                         named)

    def action_restore(self, node: TreeNode | None = None) -> None:
        node = node or self.selection.node
        if node is None:
            return
        snap = node.snapshot
        question = (f"Restore {self.image.name} to snapshot {snap.name!r} (ID {snap.id})? The current state "
                    "is kept as a safety snapshot." + (" The VM is running: its monitor does the restore."
                                                       if self.vm_running else ""))

        def answered(yes: bool | None) -> None:
            if not yes:
                self.say("Nothing was changed.")
                return
            from qsnap import service

            def job() -> str:
                result = service.restore(self.image, snap.name, snapshot_id=snap.id, safety=True, ctx=self.ctx)
                message = f"Snapshot {result.snapshot.name!r} (ID {result.snapshot.id}) restored via {result.engine}."
                if result.safety_snapshot is not None:
                    self.last_undo = result.safety_snapshot
                    message += (f" Safety snapshot {result.safety_snapshot.name!r} holds the state before it; "
                                f"undo: press u, or qsnap -i {self.image} restore {result.safety_snapshot.name}")
                return message

            self.start_action(f"Restoring {snap.name}", job)

        self.push_screen(Confirm(question), answered)

    def action_undo(self) -> None:
        if self.last_undo is None or self.history is None:
            self.say("Nothing to undo: no restore was made in this session.")
            return
        for node in self.history.nodes.values():
            if node.snapshot.id == self.last_undo.id and node.snapshot.name == self.last_undo.name:
                self.action_restore(node)
                return
        self.say(f"The safety snapshot {self.last_undo.name!r} is gone.")

    def action_delete(self) -> None:
        node = self.selection.node
        if node is None:
            return
        snap = node.snapshot
        exclusive = self.space.get((snap.id, snap.name))
        frees = f" It frees {human_size(exclusive)}." if exclusive is not None else ""

        def answered(yes: bool | None) -> None:
            if not yes:
                self.say("Nothing was changed.")
                return
            from qsnap import service

            def job() -> str:
                result = service.delete(self.image, snap.name, snapshot_id=snap.id, ctx=self.ctx)
                return f"Snapshot {result.snapshot.name!r} (ID {result.snapshot.id}) deleted via {result.engine}."

            self.selection.node = None
            self.start_action(f"Deleting {snap.name}", job)

        self.push_screen(Confirm(f"Delete snapshot {snap.name!r} (ID {snap.id}, {short_date(snap.date)}) from "
                                 f"{self.image.name}? This cannot be undone.{frees}"), answered)

    def action_describe(self) -> None:
        node = self.selection.node
        if node is None:
            return
        snap = node.snapshot

        def answered(text: str | None) -> None:
            if text is None:
                self.say("Nothing was changed.")
                return
            from qsnap.service.history import describe

            def job() -> str:
                result = describe(self.image, snap.name, text, snapshot_id=snap.id, ctx=self.ctx)
                return (f"Description of {snap.name!r} set." if result.description
                        else f"Description of {snap.name!r} cleared.")

            self.start_action(f"Describing {snap.name}", job)

        self.push_screen(Ask(f"Description of {snap.name!r} (empty clears it):", node.description or ""), answered)

    def action_backup(self) -> None:
        node = self.selection.node
        if node is None:
            return
        snap = node.snapshot
        default = os.path.join(os.getcwd(), f"{self.image.stem}-{snap.name.replace(':', '_')}.qcow2.zst")

        def chosen(output: str | None) -> None:
            if not output:
                self.say("Nothing was changed.")
                return
            target = os.path.expanduser(output)
            self.push_screen(Confirm(f"Back up {snap.name!r} (ID {snap.id}) to {target}?"),
                             lambda yes: confirmed(target, yes))

        def confirmed(target: str, yes: bool | None) -> None:
            if not yes:
                self.say("Nothing was changed.")
                return
            from qsnap import service

            bar_widget = self.query_one("#progress", ProgressBar)
            bar_widget.add_class("busy")
            bar_widget.update(total=None, progress=0)

            def progress(done: int, total: int) -> None:
                self.call_from_thread(bar_widget.update, total=total or None, progress=done)

            def job() -> str:
                result = service.backup(self.image, snap.name, target, snapshot_id=snap.id, ctx=self.ctx,
                                        progress=progress)
                return f"Backed up {snap.name!r} to {target} ({result.size} bytes, sha256 {result.sha256[:16]}…)."

            self.start_action(f"Backing up {snap.name}", job)

        self.push_screen(Ask(f"Back up {snap.name!r} to (.qcow2, .qcow2.gz, .qcow2.zst):", default), chosen)
