"""The name rule: 1-128 characters from letters, digits and . _ - + : @, starting with a
letter, digit or underscore, not all digits. Anything else exits 6 before anything runs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from qsnap_testlib import (
    fingerprint,
    guide_main,
    make_image,
    one_error_line,
    qsnap_main,
    run_guide,
    run_qsnap,
    snapshot_names,
)

# The rule, written out again here from the issue (not imported from qsnap): the oracle.
VALID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+:@-]{0,127}")
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+:@-"


def is_valid(name: str) -> bool:
    return bool(VALID_RE.fullmatch(name)) and not name.isdigit()


BAD_NAMES = {
    "empty": "",
    "space": "my snapshot",
    "leading-space": " lead",
    "trailing-space": "trail ",
    "tab": "a\tb",
    "newline": "a\nquit",
    "carriage-return": "a\rquit",
    "escape": "a\x1b[Ab",
    "delete": "a\x7fb",
    "nul": "a\x00b",
    "backspace": "abc\x08\x08\x08quit",
    "double-quote": 'say"hi"',
    "single-quote": "it's",
    "backslash": "a\\b",
    "slash": "a/b",
    "semicolon": "a;reboot",
    "dollar": "$HOME",
    "non-ascii": "café",
    "non-ascii-digit": "snap٣",
    "emoji": "snap🙂",
    "too-long": "a" * 129,
    "leading-dot": ".hidden",
    "leading-dash": "-rf",
    "leading-plus": "+1",
    "leading-colon": ":x",
    "leading-at": "@x",
}
# All-digit names are refused for create; for restore/delete an image may hold such names
# (made by other tools): see test_resolution.py (exit 5 with the candidates, --id N).
DIGIT_NAMES = {"all-digits": "1", "all-digits-long": "20251107", "zero": "0"}


@pytest.fixture
def no_programs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """Record (and refuse) every program qsnap would start."""
    import qsnap.core.proc as proc

    started: list[list[str]] = []

    def refuse(argv: list[str], *args: object, **kwargs: object) -> None:
        started.append([str(a) for a in argv])
        raise AssertionError(f"a program was started for an invalid name: {argv}")

    monkeypatch.setattr(proc, "run", refuse)
    monkeypatch.setattr(proc, "spawn", refuse)
    yield started


def assert_refused(rc: int, out: str, err: str, image: Path, before: tuple[str, int, int],
                   prog: str = "qsnap", debug: bool = True) -> None:
    """Exit 6, the rule in one sentence, no program run (--debug logs every 'run:'), image intact."""
    assert rc == 6, (rc, out, err)
    if debug:  # --debug adds the traceback; the last line is still the one sentence
        line = [x for x in err.splitlines() if x.strip()][-1]
        assert line.startswith(f"{prog}: error: "), err
    else:
        line = one_error_line(err, prog)
    assert "128" in line and "letters, digits" in line, "the message must say the rule"
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", err), "control bytes echoed to the terminal"
    assert "run:" not in err
    assert fingerprint(image) == before


CASES = [pytest.param(command, name, id=f"{command}-{label}")
         for command in ("create", "restore", "delete") for label, name in BAD_NAMES.items()]
CASES += [pytest.param("create", name, id=f"create-{label}") for label, name in DIGIT_NAMES.items()]


@pytest.mark.parametrize(("command", "name"), CASES)
def test_bad_name_is_refused_before_anything_runs(
    tmp_path: Path, no_programs: list[list[str]], command: str, name: str
) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    before = fingerprint(image)
    rc, out, err = qsnap_main(["--debug", "-i", image, command, "--", name])
    assert_refused(rc, out, err, image, before)
    rc, out, err = qsnap_main(["-i", image, command, "--", name])
    assert_refused(rc, out, err, image, before, debug=False)
    assert no_programs == []
    assert not image.with_name(image.name + ".qsnap.json").exists()


@pytest.mark.parametrize("name", ["a\nquit", "a\x1b[Ab", "my snapshot", "x" * 129, ""],
                         ids=["newline", "escape", "space", "too-long", "empty"])
@pytest.mark.parametrize("command", ["create", "restore", "delete"])
def test_guide_cli_refuses_bad_names_too(
    tmp_path: Path, no_programs: list[list[str]], command: str, name: str
) -> None:
    image = make_image(tmp_path, snapshots=["A"])
    before = fingerprint(image)
    rc, out, err = guide_main(["--debug", "-i", image, command, "--", name])
    assert_refused(rc, out, err, image, before, prog="manage-snapshots")
    assert no_programs == []


def test_bad_names_through_the_real_console_scripts(tmp_path: Path) -> None:
    """The same refusal from the installed scripts (argv cannot carry NUL: not tested here)."""
    image = make_image(tmp_path, snapshots=["A"])
    before = fingerprint(image)
    for name in ("a\nquit", "a\rquit", "a\x1b[Ab", "a\x7fb", "abc\x08quit", "é", "", "7"):
        rc, out, err = run_qsnap("--debug", "-i", image, "create", "--", name)
        assert_refused(rc, out, err, image, before)
        rc, out, err = run_guide("--debug", "-i", image, "create", "--", name)
        assert_refused(rc, out, err, image, before, prog="manage-snapshots")
        if not name.isdigit():
            rc, out, err = run_guide("--debug", "-i", image, "delete", "--", name)
            assert_refused(rc, out, err, image, before, prog="manage-snapshots")
    assert snapshot_names(image) == ["A"]


def test_bad_name_is_refused_even_without_an_image(tmp_path: Path) -> None:
    """The name is checked first: exit 6, not 'image not found'."""
    rc, _, err = qsnap_main(["-i", tmp_path / "missing.qcow2", "create", "a b"])
    assert rc == 6, err


@pytest.mark.parametrize("name", [
    "a", "_", "A", "0a", "a1", "_private", "a" * 128, "before-kernel-upgrade", "v1.2.3",
    "user@host:2025-11-07+fix", "1.0", "12-34", "0x10", "daily-20251107", "a.", "a-", "Z@:",
])
def test_valid_names_are_created_exactly(tmp_path: Path, name: str) -> None:
    image = make_image(tmp_path)
    rc, _, err = qsnap_main(["-i", image, "create", "--", name])
    assert rc == 0, err
    assert snapshot_names(image) == [name]


# ------------------------------------------------------------------ hypothesis

valid_names = st.from_regex(VALID_RE, fullmatch=True).filter(lambda s: not s.isdigit())
invalid_names = st.one_of(
    st.text(max_size=140),
    st.text(alphabet=st.characters(codec="ascii"), max_size=20),
    # One bad character hidden in an otherwise valid name.
    st.tuples(st.text(alphabet=ALPHABET, min_size=1, max_size=10),
              st.characters(blacklist_characters=ALPHABET),
              st.text(alphabet=ALPHABET, max_size=10)).map("".join),
    st.text(alphabet=ALPHABET, min_size=129, max_size=200),
    st.from_regex(r"[0-9]{1,20}", fullmatch=True),
).filter(lambda s: not is_valid(s))


@pytest.fixture(scope="module")
def shared_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image(tmp_path_factory.mktemp("names"), snapshots=["A"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=invalid_names, command=st.sampled_from(["create", "restore", "delete"]))
def test_no_invalid_name_ever_reaches_qemu(
    shared_image: Path, monkeypatch: pytest.MonkeyPatch, name: str, command: str
) -> None:
    import qsnap.core.proc as proc

    assume(command == "create" or not name.isdigit())  # see DIGIT_NAMES
    started: list[object] = []
    with monkeypatch.context() as patch:
        patch.setattr(proc, "run", lambda argv, *a, **k: started.append(argv))
        patch.setattr(proc, "spawn", lambda argv, *a, **k: started.append(argv))
        before = fingerprint(shared_image)
        rc, out, err = qsnap_main(["--debug", "-i", shared_image, command, "--", name])
    assert started == []
    assert_refused(rc, out, err, shared_image, before)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=valid_names)
def test_every_valid_name_can_be_created_and_listed(tmp_path_factory: pytest.TempPathFactory,
                                                     name: str) -> None:
    image = make_image(tmp_path_factory.mktemp("valid"))
    rc, _, err = qsnap_main(["-i", image, "create", "--", name])
    assert rc == 0, err
    assert snapshot_names(image) == [name]
    listed = json.loads(qsnap_main(["-i", image, "list", "--json"]).out)["snapshots"]
    assert [s["name"] for s in listed] == [name]
    rc, _, err = qsnap_main(["-i", image, "delete", "--", name])
    assert rc == 0, err
    assert snapshot_names(image) == []
