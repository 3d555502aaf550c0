"""Shell completion: the candidates behind `qsnap completion bash|zsh|fish`.

The shell scripts (:mod:`qsnap.cli.commands.completion`) call back into
``qsnap __complete SHELL PROG -- WORD...`` (the last word is the one being completed, bash
sends its command line up to the cursor instead) and offer what is printed, one per line.
This runs on every <Tab>, so it imports almost nothing: the console entry point
(:mod:`qsnap.cli.fast`) hands ``__complete`` straight here, before argparse is imported.

What the commands and options are is read from the argparse tree once and cached as JSON
(``~/.cache/qsnap/completion-spec.marshal``), keyed by qsnap's version and the modification
times of the modules that build the parsers; snapshot names come from the chosen image's
snapshot table through the qcow2 reader; ``SNAP:PATH`` arguments list the guest directory
through :mod:`qsnap.service.guestfiles`.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping
    from typing import Any

    Spec = dict[str, Any]

SHELLS = ("bash", "zsh", "fish")
PROGS = ("qsnap", "manage-snapshots")
CURRENT = "@current"

# Argument kinds: what a value is completed with.
SNAPSHOT = "snapshot"
SNAPSHOT_OR_CURRENT = "snapshot+current"
SNAPSHOT_ID = "snapshot-id"
GUEST_PATH = "guest-path"  # SNAP[:PATH]
GUEST_PATH_OF_A = "guest-path-of-a"  # a guest path inside the command's first snapshot (diff A B PATH)
IMAGE = "image"
FILE = "file"
DIR = "dir"
NONE = "none"

_POSITIONAL_KINDS = {
    "NAME": SNAPSHOT, "snapshot-name": SNAPSHOT, "SNAP": SNAPSHOT_OR_CURRENT,
    "SNAP[:PATH]": GUEST_PATH, "SNAP:PATH": GUEST_PATH,
    "OUTPUT": FILE, "output-file": FILE, "BACKUP": FILE, "DEST": DIR, "DIR": DIR, "FILE": FILE,
}
_OPTION_KINDS = {
    "--image": IMAGE, "--id": SNAPSHOT_ID, "--a-id": SNAPSHOT_ID, "--b-id": SNAPSHOT_ID,
    "--against": IMAGE, "--passphrase-file": FILE, "--to": DIR, "--content": GUEST_PATH_OF_A,
}
_IMAGE_SUFFIXES = (".qcow2", ".qcow", ".img")
_BASH_SPECIAL = frozenset(" \t\n'\"\\$`&;|<>()*?[]{}!#")


# ------------------------------------------------------------------ the spec (from argparse, cached)

def _kind_of_positional(action: argparse.Action) -> list[str]:
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest
    if metavar in _POSITIONAL_KINDS:
        return [_POSITIONAL_KINDS[metavar]]
    if action.help and "guest path" in action.help:
        return [GUEST_PATH_OF_A]
    if action.help and "@current" in action.help:
        return [SNAPSHOT_OR_CURRENT]
    return [_POSITIONAL_KINDS.get(part, NONE) for part in metavar.split()]


def spec_of(parser: argparse.ArgumentParser) -> Spec:
    """{"options": {option: kind|null|[choices]}, "positionals": [[kinds, nargs]], "commands": {...}}."""
    import argparse

    options: dict[str, Any] = {}
    positionals: list[list[Any]] = []
    commands: dict[str, Any] = {}
    helps: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                helps[choice.dest] = choice.help or ""
            for name, sub in action.choices.items():
                if name.startswith("__"):
                    continue
                commands[name] = {**spec_of(sub), "help": helps.get(name, "")}
            continue
        if action.help == argparse.SUPPRESS and not action.option_strings:
            continue
        if action.option_strings:
            long_name = max(action.option_strings, key=len)
            value: Any
            if action.nargs == 0:
                value = None  # a flag
            elif action.choices:
                value = [str(c) for c in action.choices]
            else:
                value = _OPTION_KINDS.get(long_name, NONE)
            hidden = action.help == argparse.SUPPRESS
            for option in action.option_strings:
                options[option] = value
                if hidden:
                    options.setdefault("__hidden__", []).append(option)
        else:
            kinds: Any = [str(c) for c in action.choices] if action.choices else _kind_of_positional(action)
            positionals.append([kinds, action.nargs])
    return {"options": options, "positionals": positionals, "commands": commands}


def build_specs() -> Spec:
    """The completion spec of both programs, from their argparse trees."""
    from qsnap.cli import guide, main

    return {"qsnap": spec_of(main.build_parser()), "manage-snapshots": spec_of(guide.build_parser())}


def _cache_key() -> str:
    from qsnap import __version__

    here = os.path.dirname(os.path.abspath(__file__))
    stamps = [__version__, here]
    for folder in (here, os.path.join(here, "commands")):
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".py"):
                    stamps.append(f"{entry.name}:{entry.stat().st_mtime_ns}")
    return "|".join(sorted(stamps))


def cache_path(environ: Mapping[str, str]) -> str:
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qsnap", "completion-spec.marshal")


def load_specs(environ: Mapping[str, str]) -> Spec:
    """The cached spec when its key still matches, else a fresh one (written back, best effort).

    marshal, not json: json imports `re`, which costs more start-up than the whole lookup."""
    import marshal

    key = _cache_key()
    path = cache_path(environ)
    try:
        with open(path, "rb") as f:
            cached = marshal.loads(f.read())  # marshal.load(f) reads in small pieces: 15x slower
        if isinstance(cached, dict) and cached.get("key") == key:
            specs: Spec = cached["specs"]
            return specs
    except (OSError, ValueError, EOFError, TypeError, KeyError):
        pass
    specs = build_specs()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            marshal.dump({"key": key, "specs": specs}, f)
        os.replace(tmp, path)
    except OSError:
        pass
    return specs


# ------------------------------------------------------------------ the command line

def split_line(line: str) -> list[str]:
    """Words of a (partial) shell command line, quotes removed; an open quote is closed at the end;
    a trailing unquoted space starts an empty last word (the one being completed)."""
    return split_line_quoted(line)[0]


def split_line_quoted(line: str) -> tuple[list[str], bool]:
    """:func:`split_line`, and whether the last word holds quotes (then bash must not escape)."""
    words: list[str] = []
    word: list[str] = []
    in_word = False
    quote = ""
    quoted = False
    i = 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == quote:
                quote = ""
            elif ch == "\\" and quote == '"' and i + 1 < len(line) and line[i + 1] in '"\\$`':
                i += 1
                word.append(line[i])
            else:
                word.append(ch)
        elif ch in "'\"":
            quote, in_word, quoted = ch, True, True
        elif ch == "\\" and i + 1 < len(line):
            i += 1
            word.append(line[i])
            in_word = True
        elif ch in " \t\n":
            if in_word:
                words.append("".join(word))
                word, in_word, quoted = [], False, False
        else:
            word.append(ch)
            in_word = True
        i += 1
    words.append("".join(word))  # the word under the cursor ("" after a space)
    return words, quoted


class Parsed:
    """Where the cursor is: the command path, option values seen, positionals given so far."""

    def __init__(self) -> None:
        self.spec: Spec = {}
        self.path: list[str] = []
        self.values: dict[str, str] = {}
        self.positionals: list[str] = []
        self.pending_option: str | None = None  # the option whose value is being completed


def walk(spec: Spec, words: list[str]) -> Parsed:
    """Follow WORDS (those before the cursor) through SPEC."""
    parsed = Parsed()
    parsed.spec = spec
    only_positionals = False
    i = 0
    while i < len(words):
        word = words[i]
        options: dict[str, Any] = parsed.spec["options"]
        if not only_positionals and word == "--":
            only_positionals = True
        elif not only_positionals and word.startswith("-") and word != "-":
            name, eq, value = word.partition("=")
            if name in options and options[name] is not None:
                if eq:
                    parsed.values[name] = value
                elif i + 1 < len(words):
                    parsed.values[name] = words[i + 1]
                    i += 1
                else:
                    parsed.pending_option = name
        elif word in parsed.spec["commands"] and not parsed.positionals:
            parsed.path.append(word)
            parsed.spec = parsed.spec["commands"][word]
        else:
            parsed.positionals.append(word)
        i += 1
    return parsed


def positional_kinds(spec: Spec, index: int) -> list[str] | None:
    """The kind(s) of the INDEX-th positional word of a command, None past its last one."""
    position = 0
    for kinds, nargs in spec["positionals"]:
        repeat = nargs in ("+", "*", "...", "A...")
        if not isinstance(kinds, list):
            kinds = [kinds]
        is_choices = kinds and kinds[0] not in (SNAPSHOT, SNAPSHOT_OR_CURRENT, GUEST_PATH, GUEST_PATH_OF_A, FILE,
                                                DIR, NONE)
        if is_choices:
            if index == position:
                return list(kinds)
            position += 1
            if repeat:
                return None
            continue
        for kind in kinds:
            if index == position:
                return [kind]
            position += 1
        if repeat:
            return [NONE]
    return None


# ------------------------------------------------------------------ candidates

class Candidates:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []  # (word, description)

    def add(self, word: str, description: str = "") -> None:
        self.items.append((word, description))


def _image(parsed: Parsed, environ: Mapping[str, str], cwd: str) -> str | None:
    from qsnap.core.config import resolve_image_path
    from qsnap.core.errors import QsnapError

    explicit = parsed.values.get("--image") or parsed.values.get("-i")
    try:
        return resolve_image_path(os.path.expanduser(explicit) if explicit else None, environ, cwd)
    except QsnapError:
        return None


def _snapshots(image: str | None) -> tuple[Any, ...]:
    if image is None:
        return ()
    from qsnap.core.errors import QsnapError
    from qsnap.qcow2 import open_image

    try:
        with open_image(image) as reader:
            return tuple(reader.snapshots())
    except (QsnapError, OSError, ValueError):
        return ()


def _snapshot_words(out: Candidates, image: str | None, cur: str, *, ids: bool = False,
                    current: bool = False) -> None:
    for snap in _snapshots(image):
        word = snap.id if ids else snap.name
        if word.startswith(cur):
            date = snap.date.strftime("%Y-%m-%d %H:%M") if hasattr(snap.date, "strftime") else ""
            out.add(word, f"{snap.name} {date}" if ids else f"ID {snap.id} {date}")
    if current and CURRENT.startswith(cur):
        out.add(CURRENT, "the current state")


def _paths(out: Candidates, cur: str, cwd: str, *, dirs_only: bool = False, images: bool = False) -> None:
    """Files under CUR's directory, relative like CUR; directories end in '/'."""
    head, _, tail = cur.rpartition("/")
    prefix = head + "/" if _ else ""
    folder = os.path.expanduser(prefix) if prefix else "."
    if not os.path.isabs(folder):
        folder = os.path.join(cwd, folder)
    found: list[tuple[str, bool]] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.startswith(tail) or (entry.name.startswith(".") and not tail.startswith(".")):
                    continue
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                found.append((entry.name, is_dir))
    except OSError:
        return
    wanted = [(n, d) for n, d in found if d or not dirs_only]
    if images:
        matching = [(n, d) for n, d in wanted if d or n.endswith(_IMAGE_SUFFIXES)]
        if any(not d for _, d in matching):  # no image here: offer every file
            wanted = matching
    for name, is_dir in sorted(wanted):
        out.add(prefix + name + ("/" if is_dir else ""), "directory" if is_dir else "")


def _guest_paths(out: Candidates, image: str | None, cur: str) -> None:
    """``SNAP`` names (ending in ':'), then ``SNAP:/dir/entries`` once a snapshot is named."""
    snapshots = _snapshots(image)
    names = [s.name for s in snapshots] + [CURRENT]
    split: tuple[str, str] | None = None
    for i, ch in enumerate(cur):
        if ch == ":" and cur[:i] in names:
            split = (cur[:i], cur[i + 1:])
            break
    if split is None:
        for name in names:
            if name.startswith(cur):
                out.add(name + ":", "snapshot" if name != CURRENT else "the current state")
        return
    snap, path = split
    if image is None:
        return
    directory, _, tail = path.rpartition("/")
    directory = directory or "/"
    if not path.startswith("/"):
        directory, tail = "/", path.lstrip("/")
    from qsnap.core.errors import QsnapError
    from qsnap.service import guestfiles

    try:
        state, _ = guestfiles.open_state(image, f"{snap}:{directory}")
    except (QsnapError, OSError, ValueError):
        return
    try:
        base = "" if directory == "/" else directory
        for info in guestfiles.list_dir(state, directory, details=False):
            if info.name.startswith(tail):
                suffix = "/" if info.type == "dir" else ""
                out.add(f"{snap}:{base}/{info.name}{suffix}", info.type)
    except (QsnapError, OSError, ValueError):
        return
    finally:
        state.close()


def complete(prog: str, words: list[str], environ: Mapping[str, str], cwd: str,
             specs: Spec | None = None) -> list[tuple[str, str]]:
    """Candidates (word, description) for the last of WORDS (the words after PROG)."""
    if specs is None:
        specs = load_specs(environ)
    spec = specs.get(prog) or specs["qsnap"]
    *before, cur = words or [""]
    parsed = walk(spec, before)  # options before the command name land in parsed.values too
    out = Candidates()

    def image() -> str | None:  # read on demand: most completions need no image
        return _image(parsed, environ, cwd)

    first = parsed.positionals[0] if parsed.positionals else None
    if parsed.pending_option is not None:
        _option_value(out, parsed.spec["options"][parsed.pending_option], cur, image, cwd, first)
        return out.items
    if cur.startswith("-") and "=" in cur:
        name, _, value = cur.partition("=")
        kind = parsed.spec["options"].get(name)
        if kind is not None:
            inner = Candidates()
            _option_value(inner, kind, value, image, cwd, first)
            return [(f"{name}={w}", d) for w, d in inner.items]
    if cur.startswith("-"):
        hidden = set(parsed.spec["options"].get("__hidden__", []))
        for option in sorted(parsed.spec["options"]):
            if option.startswith(cur) and option != "__hidden__" and option not in hidden:
                out.add(option)
        return out.items
    if parsed.spec["commands"] and not parsed.positionals:
        for name, sub in parsed.spec["commands"].items():
            if name.startswith(cur):
                out.add(name, sub.get("help", ""))
        return out.items
    kinds = positional_kinds(parsed.spec, len(parsed.positionals))
    for kind in kinds or []:
        _value(out, kind, cur, image, cwd, first)
    return out.items


def _option_value(out: Candidates, kind: Any, cur: str, image: Any, cwd: str, first: str | None) -> None:
    if isinstance(kind, list):
        for choice in kind:
            if choice.startswith(cur):
                out.add(choice)
        return
    _value(out, kind, cur, image, cwd, first)


def _value(out: Candidates, kind: str, cur: str, image: Any, cwd: str, first: str | None = None) -> None:
    if kind == SNAPSHOT:
        _snapshot_words(out, image(), cur)
    elif kind == SNAPSHOT_OR_CURRENT:
        _snapshot_words(out, image(), cur, current=True)
    elif kind == SNAPSHOT_ID:
        _snapshot_words(out, image(), cur, ids=True)
    elif kind == GUEST_PATH:
        _guest_paths(out, image(), cur)
    elif kind == GUEST_PATH_OF_A:
        if first is not None:  # the paths inside the first snapshot named on the line
            inner = Candidates()
            _guest_paths(inner, image(), f"{first}:{cur or '/'}")
            for word, description in inner.items:
                out.add(word[len(first) + 1:], description)
    elif kind == IMAGE:
        _paths(out, cur, cwd, images=True)
    elif kind == FILE:
        _paths(out, cur, cwd)
    elif kind == DIR:
        _paths(out, cur, cwd, dirs_only=True)
    elif kind != NONE and kind.startswith(cur):
        out.add(kind)  # one of a positional's choices


# ------------------------------------------------------------------ output for each shell

def render(shell: str, cur: str, items: list[tuple[str, str]], wordbreaks: str = ":=", quoted: bool = False) -> str:
    """One candidate a line. bash replaces only the text after the last of its word breaks
    (``COMP_WORDBREAKS``: ':' and '=' by default), so that prefix is cut off; fish shows
    'word<TAB>description'. A first line ``nospace`` tells bash not to add a space (a directory
    or ``SNAP:`` goes on)."""
    lines: list[str] = []
    if any(w.endswith(("/", ":")) for w, _ in items):
        lines.append("nospace")
    else:
        lines.append("space")
    cut = max((cur.rfind(c) for c in ":=" if c in wordbreaks), default=-1) + 1 if shell == "bash" else 0
    for word, description in items:
        if shell == "bash":  # bash inserts the text as it is: a space would end the word
            lines.append(word[cut:] if quoted else "".join("\\" + c if c in _BASH_SPECIAL else c
                                                           for c in word[cut:]))
        elif shell == "fish" and description:
            lines.append(f"{word}\t{description}")
        else:
            lines.append(word)
    return "".join(line + "\n" for line in lines)


def main(argv: list[str], environ: Mapping[str, str] | None = None, cwd: str | None = None) -> int:
    """``__complete SHELL PROG -- WORD...`` (bash: ``__complete bash PROG -- LINE`` up to the cursor)."""
    environ = os.environ if environ is None else environ
    cwd = os.getcwd() if cwd is None else cwd
    if len(argv) < 3 or argv[0] not in SHELLS or argv[2] != "--":
        sys.stderr.write("usage: qsnap __complete bash|zsh|fish PROG -- WORD...\n")
        return 2
    shell, prog, words = argv[0], argv[1], argv[3:]
    quoted = False
    if shell == "bash":
        words, quoted = split_line_quoted(words[0] if words else "")
        words = words[1:]  # drop the program's name
    items = complete(prog if prog in PROGS else "qsnap", words, environ, cwd)
    sys.stdout.write(render(shell, words[-1] if words else "", items,
                            environ.get("QSNAP_COMP_WORDBREAKS", ":="), quoted))
    return 0
