"""Shell completion (issue 15): the scripts `qsnap completion bash|zsh|fish` print, run by the real
shells against the installed console scripts, on an image whose snapshot names hold dashes, dots,
digits and a colon. bash: its completion function called as readline would (COMP_LINE/COMP_POINT);
zsh: the function with `words`/`CURRENT` set and `compadd` shadowed by a recorder (zsh's own
completion system needs a terminal); fish: its own `complete -C`, the real completion machinery."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from qsnap_testlib import VENV_BIN, clean_environ, run_qsnap

from .conftest import GUEST_FILES, NAMES, make_ext_image, shell


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PATH finds the venv's qsnap; a private cache directory for the completion spec."""
    cache = tmp_path_factory.mktemp("cache")
    return clean_environ({"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "XDG_CACHE_HOME": str(cache)})


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("scripts")
    out = {}
    for name in ("bash", "zsh", "fish"):
        result = run_qsnap("completion", name, env=env)
        assert result.rc == 0, result.err
        out[name] = folder / f"qsnap.{name}"
        out[name].write_text(result.out)
    return out


def bash_complete_all(scripts: dict[str, Path], env: dict[str, str], lines: list[str], cwd: Path) -> list[list[str]]:
    """What bash offers for each of LINES (cursor at the end): the completion function run as readline
    runs it, all in one bash process."""
    script = [f"source {scripts['bash']}"]
    for line in lines:
        prog = line.split()[0]
        script += [f"COMP_LINE={_sh_quote(line)}", "COMP_POINT=${#COMP_LINE}",
                   f"complete -p {prog} >/dev/null || exit 3", f"_qsnap_complete {prog}",
                   'printf \'%s\\n\' "${COMPREPLY[@]}"', "echo ---END---"]
    result = subprocess.run([shell("bash"), "--norc", "--noprofile", "-c", "\n".join(script)], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.split("---END---\n")[:-1]
    return [[w for w in block.splitlines() if w] for block in blocks]


def bash_complete(scripts: dict[str, Path], env: dict[str, str], line: str, cwd: Path) -> list[str]:
    return bash_complete_all(scripts, env, [line], cwd)[0]


def check_bash(scripts: dict[str, Path], env: dict[str, str], cwd: Path, cases: dict[str, list[str]]) -> None:
    got = bash_complete_all(scripts, env, list(cases), cwd)
    assert dict(zip(cases, got, strict=True)) == cases


def zsh_complete(scripts: dict[str, Path], env: dict[str, str], words: list[str], cwd: Path) -> list[str]:
    """What the zsh function hands to compadd for WORDS (the last one being completed)."""
    script = f"""
compadd() {{ while [[ $# -gt 0 && $1 != -- ]]; do shift; done; shift; print -rl -- "$@"; }}
source {scripts['zsh']}
words=({' '.join(_sh_quote(w) for w in words)})
CURRENT={len(words)}
_qsnap
"""
    result = subprocess.run([shell("zsh"), "-f", "-c", script], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return [w for w in result.stdout.splitlines() if w]


def fish_complete(scripts: dict[str, Path], env: dict[str, str], line: str, cwd: Path) -> list[str]:
    """fish's own `complete -C LINE`: candidates without their descriptions."""
    script = f"source {scripts['fish']}; complete -C {_sh_quote(line)}"
    result = subprocess.run([shell("fish"), "--no-config", "-c", script], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return [w.split("\t")[0] for w in result.stdout.splitlines() if w]


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def test_bash_completes_snapshot_names_from_the_image(scripts, env, named_image):
    check_bash(scripts, env, named_image.parent, {
        "qsnap -i disk.qcow2 restore ": list(NAMES),
        "qsnap -i disk.qcow2 restore pre-": ["pre-upgrade.2"],
        "qsnap restore --image disk.qcow2 v2.": ["v2.3-rc1"],
        "qsnap -i disk.qcow2 delete 2024": ["2024.01.31-nightly"],
        # bash splits words at ':' and replaces only the part after it
        "qsnap -i disk.qcow2 delete x:": ["y"],
        # diff takes @current too; --id takes IDs
        "qsnap -i disk.qcow2 diff base-1.0 @": ["@current"],
        "qsnap -i disk.qcow2 restore --id ": [str(i) for i in range(1, len(NAMES) + 1)],
        "manage-snapshots -i disk.qcow2 restore base": ["base-1.0"],
    })


def test_bash_without_colon_in_its_word_breaks_gets_whole_words(scripts, env, named_image):
    """Users who take ':' out of COMP_WORDBREAKS (a common tip) complete whole SNAP:PATH words."""
    script = f"""
source {scripts['bash']}
COMP_WORDBREAKS=${{COMP_WORDBREAKS//:}}
COMP_LINE='qsnap -i disk.qcow2 delete x:'
COMP_POINT=${{#COMP_LINE}}
_qsnap_complete qsnap
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    result = subprocess.run([shell("bash"), "--norc", "--noprofile", "-c", script], env=env, cwd=named_image.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["x:y"], result.stderr


def test_bash_image_choice_follows_the_environment(scripts, env, named_image, tmp_path):
    for variable in ("QCOW2_IMAGE", "IMAGE_PATH"):
        assert bash_complete(scripts, {**env, variable: str(named_image)}, "qsnap restore d", tmp_path) == [
            "daily-20240131"]
    # no image at all: nothing offered, no error
    assert bash_complete(scripts, env, "qsnap restore ", tmp_path) == []
    # the guide's default: ./debian-hurd-amd64.qcow2
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "debian-hurd-amd64.qcow2"), "1M"],
                   check=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "hurd-0.9", str(tmp_path / "debian-hurd-amd64.qcow2")], check=True)
    check_bash(scripts, env, tmp_path, {"manage-snapshots restore h": ["hurd-0.9"],
                                        # -i wins over the default
                                        f"qsnap restore -i {named_image} x": ["x:y"]})


def test_bash_completes_commands_options_and_paths(scripts, env, named_image):
    cwd = named_image.parent
    assert {"create", "list", "restore", "delete", "diff", "ui", "completion"} <= set(
        bash_complete(scripts, env, "qsnap ", cwd))
    check_bash(scripts, env, cwd, {
        "qsnap res": ["restore"],
        "qsnap _": [],
        "qsnap restore --n": ["--no-safety"],
        "qsnap completion ": ["bash", "fish", "zsh"],
        "qsnap vm st": ["start", "stop", "status"],
        "qsnap -i ": ["disk.qcow2", "other.qcow2", "sub/"],
        "qsnap -i di": ["disk.qcow2"],
        "qsnap --image=o": ["other.qcow2"],
        "manage-snapshots ": ["create", "list", "restore", "delete", "backup"],
        "manage-snapshots -i disk.qcow2 backup base-1.0 su": ["sub/"],
    })


def test_bash_completes_guest_paths_after_a_snapshot_name(scripts, env, tmp_path):
    _raw, image = make_ext_image(tmp_path, GUEST_FILES)
    subprocess.run(["qemu-img", "snapshot", "-c", "s-1.0", str(image)], check=True)
    check_bash(scripts, env, tmp_path, {
        "qsnap -i guest.qcow2 ls s-": ["s-1.0:"],
        "qsnap -i guest.qcow2 ls s-1.0:/e": ["/etc/"],
        "qsnap -i guest.qcow2 cat s-1.0:/etc/": ["/etc/hostname", "/etc/motd", "/etc/network/"],
        "qsnap -i guest.qcow2 cat @current:/home/user/n": ["/home/user/notes.txt"],
        # diff A B PATH and --content: paths inside A
        "qsnap -i guest.qcow2 diff s-1.0 @current /e": ["/etc/"],
        "qsnap -i guest.qcow2 diff s-1.0 @current --files --content /etc/h": ["/etc/hostname"],
    })


def test_zsh_offers_the_same(scripts, env, named_image, tmp_path):
    cwd = named_image.parent
    assert zsh_complete(scripts, env, ["qsnap", "-i", "disk.qcow2", "restore", "pre"], cwd) == ["pre-upgrade.2"]
    assert zsh_complete(scripts, env, ["qsnap", "-i", "disk.qcow2", "delete", "x"], cwd) == ["x:y"]
    assert zsh_complete(scripts, env, ["manage-snapshots", "-i", "disk.qcow2", "restore", ""], cwd) == list(NAMES)
    assert zsh_complete(scripts, env, ["qsnap", "li"], cwd) == ["list"]
    spaced = tmp_path / "sp ace" / "my disk.qcow2"  # quoted on the line: zsh's words keep the quotes
    spaced.parent.mkdir()
    spaced.write_bytes(named_image.read_bytes())
    assert zsh_complete(scripts, env, ["qsnap", "-i", "'sp ace/my disk.qcow2'", "restore", "v"], tmp_path) == [
        "v2.3-rc1"]
    assert bash_complete(scripts, env, "qsnap -i 'sp ace/my disk.qcow2' restore v", tmp_path) == ["v2.3-rc1"]
    assert bash_complete(scripts, env, "qsnap -i sp\\ ace/my\\ disk.qcow2 restore v", tmp_path) == ["v2.3-rc1"]
    # bash inserts candidates as they are: escaped, unless the word opened a quote
    check_bash(scripts, env, tmp_path, {"qsnap -i sp": ["sp\\ ace/"], "qsnap -i 'sp": ["sp ace/"],
                                        "qsnap -i sp\\ ace/": ["sp\\ ace/my\\ disk.qcow2"]})
    _raw, image = make_ext_image(tmp_path, GUEST_FILES)
    subprocess.run(["qemu-img", "snapshot", "-c", "s-1.0", str(image)], check=True)
    assert zsh_complete(scripts, env, ["qsnap", "-i", str(image), "ls", "s-1.0:/etc/n"], cwd) == [
        "s-1.0:/etc/network/"]


def test_fish_offers_the_same(scripts, env, named_image):
    cwd = named_image.parent
    assert fish_complete(scripts, env, "qsnap -i disk.qcow2 restore pre", cwd) == ["pre-upgrade.2"]
    assert fish_complete(scripts, env, "qsnap -i disk.qcow2 restore v2.3", cwd) == ["v2.3-rc1"]
    assert fish_complete(scripts, env, "manage-snapshots -i disk.qcow2 delete daily-", cwd) == ["daily-20240131"]
    assert fish_complete(scripts, env, "qsnap -i disk.qcow2 ls x:", cwd) == ["x:y:"]
    assert "restore" in fish_complete(scripts, env, "qsnap re", cwd)


def test_the_callback_skips_argparse_once_the_spec_is_cached(env, named_image, tmp_path):
    """A warm <Tab> imports neither argparse nor rich; the cached spec equals a fresh introspection."""
    from qsnap.cli import complete

    specs = complete.build_specs()
    probe = """
import sys
from qsnap.cli import complete
complete.main(["bash", "qsnap", "--", "qsnap -i disk.qcow2 restore p"])
heavy = sorted(m for m in ("argparse", "rich", "textual", "qsnap.cli.main", "qsnap.service.snapshots")
               if m in sys.modules)
print("HEAVY", heavy)
"""
    first = subprocess.run([sys.executable, "-c", probe], env=env, cwd=named_image.parent,
                           capture_output=True, text=True, timeout=60)
    second = subprocess.run([sys.executable, "-c", probe], env=env, cwd=named_image.parent,
                            capture_output=True, text=True, timeout=60)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "pre-upgrade.2" in first.stdout and "pre-upgrade.2" in second.stdout
    assert "HEAVY []" in second.stdout, second.stdout
    assert complete.load_specs(env) == specs


def test_the_argparse_path_answers_like_the_fast_path(env, named_image, qsnap_main):
    fast = run_qsnap("__complete", "bash", "qsnap", "--", "qsnap -i disk.qcow2 restore b", env=env,
                     cwd=named_image.parent)
    slow = run_qsnap("__complete", "bash", "qsnap", "--", "qsnap -i disk.qcow2 restore b",
                     env={**env, "QSNAP_NO_FAST_PATH": "1"}, cwd=named_image.parent)
    in_process = qsnap_main(["__complete", "bash", "qsnap", "--", "qsnap -i disk.qcow2 restore b"],
                            environ=env, cwd=named_image.parent)
    assert fast.out == slow.out == in_process.out == "space\nbase-1.0\n"
    assert run_qsnap("__complete", "tcsh", env=env).rc == 2
