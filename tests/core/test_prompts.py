"""Prompts only on a TTY (restore, delete; --yes skips them). Without a TTY nothing prompts and
stdin is never read."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from qsnap_testlib import fingerprint, has_pattern, make_image, qsnap_main, run_qsnap, snapshot_names

from qsnap.cli.env import Environment


def tty_env(image_dir: Path, answer: str) -> Environment:
    return Environment(stdin=io.StringIO(answer), stdout=io.StringIO(), stderr=io.StringIO(),
                       stdin_isatty=True, stdout_isatty=True, stderr_isatty=True, cwd=image_dir)


@pytest.mark.parametrize("answer", ["n\n", "\n", "no\n", "", "maybe\n"])
@pytest.mark.parametrize("command", ["restore", "delete"])
def test_anything_but_yes_on_a_tty_changes_nothing(tmp_path: Path, command: str, answer: str) -> None:
    image = make_image(tmp_path, snapshots=["A"], patterns={"A": 0x11, None: 0x22})
    before = fingerprint(image)
    env = tty_env(tmp_path, answer)
    rc, _out, err = qsnap_main(["-i", image, command, "A"], env)
    assert rc != 0
    assert "[y/N]" in err, "the question goes to stderr"
    assert "A" in err
    assert fingerprint(image) == before
    assert snapshot_names(image) == ["A"]


@pytest.mark.parametrize("command", ["restore", "delete"])
def test_yes_on_a_tty_proceeds(tmp_path: Path, command: str) -> None:
    image = make_image(tmp_path, snapshots=["A"], patterns={"A": 0x11, None: 0x22})
    rc, _, err = qsnap_main(["-i", image, command, "A"], tty_env(tmp_path, "y\n"))
    assert rc == 0, err
    if command == "restore":
        assert has_pattern(image, 0x11)
    else:
        assert snapshot_names(image) == []


@pytest.mark.parametrize("command", ["restore", "delete"])
def test_dash_dash_yes_skips_the_prompt_on_a_tty(tmp_path: Path, command: str) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    stdin = io.StringIO("n\n")
    env = tty_env(tmp_path, "")
    env.stdin = stdin
    rc, _, err = qsnap_main(["-i", image, command, "A", "--yes"], env)
    assert rc == 0, err
    assert "[y/N]" not in err
    assert stdin.read() == "n\n", "stdin must not be read with --yes"


def test_restore_prompt_says_whether_the_current_state_is_kept(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    _, _, err = qsnap_main(["-i", image, "restore", "A", "--no-safety"], tty_env(tmp_path, "n\n"))
    assert "LOST" in err or "lost" in err
    assert snapshot_names(image) == ["A"]


@pytest.mark.parametrize("command", ["restore", "delete"])
def test_without_a_tty_nothing_prompts_and_stdin_is_not_read(tmp_path: Path, command: str) -> None:
    image = make_image(tmp_path, snapshots=["A", "B"], patterns={"A": 0x11, None: 0x22})
    stdin = io.StringIO("n\nB\n")
    rc, _, err = qsnap_main(["-i", image, command, "A"], stdin=stdin, tty=False)
    assert rc == 0, err
    assert "[y/N]" not in err
    assert stdin.read() == "n\nB\n"


def test_piped_stdin_with_a_terminal_on_stderr_does_not_prompt(tmp_path: Path) -> None:
    """`... | qsnap delete X` from a terminal: stdin is a pipe, so no prompt reads it."""
    image = make_image(tmp_path, snapshots=["A"])
    stdin = io.StringIO("n\n")
    env = Environment(stdin=stdin, stdout=io.StringIO(), stderr=io.StringIO(), stdin_isatty=False,
                      stdout_isatty=True, stderr_isatty=True, cwd=tmp_path)
    rc, _, err = qsnap_main(["-i", image, "delete", "A"], env)
    assert rc == 0, err
    assert stdin.read() == "n\n"


def test_subprocess_with_piped_answer_is_not_asked(tmp_path: Path) -> None:
    image = make_image(tmp_path, snapshots=["A", "B"])
    rc, out, err = run_qsnap("-i", image, "delete", "A", input="n\n")
    assert rc == 0, err
    assert "[y/N]" not in out + err
    assert snapshot_names(image) == ["B"]
