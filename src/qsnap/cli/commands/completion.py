"""completion (the shell scripts), ui (the terminal view), and the hidden __complete callback."""

from __future__ import annotations

import argparse

from qsnap.cli.invocation import Invocation

BASH = r"""# qsnap and manage-snapshots completion for bash.  Load it with:
#   eval "$(qsnap completion bash)"        (in ~/.bashrc)
# It asks `qsnap __complete` for commands, options, image paths, snapshot names and guest paths.
_qsnap_complete() {
    local -a reply
    mapfile -t reply < <(QSNAP_COMP_WORDBREAKS="$COMP_WORDBREAKS" \
        command qsnap __complete bash "${1##*/}" -- "${COMP_LINE:0:COMP_POINT}" 2>/dev/null)
    if [[ ${reply[0]-} == nospace ]]; then
        compopt -o nospace 2>/dev/null
    fi
    COMPREPLY=("${reply[@]:1}")
}
complete -F _qsnap_complete qsnap manage-snapshots
"""

ZSH = r"""#compdef qsnap manage-snapshots
# qsnap and manage-snapshots completion for zsh.  Load it with (after compinit):
#   eval "$(qsnap completion zsh)"         (in ~/.zshrc)
# or save it as _qsnap in a directory of $fpath.
_qsnap() {
    local -a reply space nospace
    local word
    reply=("${(@f)$(command qsnap __complete zsh ${words[1]:t} -- "${(@Q)words[2,CURRENT]}" 2>/dev/null)}")
    for word in "${(@)reply[2,-1]}"; do
        [[ -z $word ]] && continue
        if [[ $word == */ || $word == *: ]]; then nospace+=("$word"); else space+=("$word"); fi
    done
    (( ${#nospace} )) && compadd -S '' -- "${(@)nospace}"
    (( ${#space} )) && compadd -- "${(@)space}"
    return 0
}
if (( $+functions[compdef] )); then
    compdef _qsnap qsnap manage-snapshots
fi
"""

FISH = r"""# qsnap and manage-snapshots completion for fish.  Load it with:
#   qsnap completion fish | source         (in ~/.config/fish/config.fish)
# or save it as ~/.config/fish/completions/qsnap.fish (and manage-snapshots.fish).
function __qsnap_complete
    set -l tokens (commandline -opc)
    set -l prog (string replace -r '.*/' '' -- $tokens[1])
    set -l reply (command qsnap __complete fish $prog -- $tokens[2..-1] (commandline -ct) 2>/dev/null)
    printf '%s\n' $reply[2..-1]
end
complete -c qsnap -f -a '(__qsnap_complete)'
complete -c manage-snapshots -f -a '(__qsnap_complete)'
"""

SCRIPTS = {"bash": BASH, "zsh": ZSH, "fish": FISH}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from qsnap.cli.options import add_common

    p = sub.add_parser("completion", help="print the shell completion script (bash, zsh or fish)")
    p.add_argument("shell", choices=sorted(SCRIPTS), help="the shell")
    p.set_defaults(handler=cmd_completion)

    p = sub.add_parser("ui", help="full-screen terminal view: snapshot tree, space, changes, files, actions")
    add_common(p)
    p.set_defaults(handler=cmd_ui)

    # The shells' callback. The console entry point runs it before argparse (see cli/fast.py);
    # this parser is the path for `python -m`-style runs and QSNAP_NO_FAST_PATH.
    p = sub.add_parser("__complete", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(handler=cmd_complete)


def cmd_completion(inv: Invocation) -> int:
    inv.env.stdout.write(SCRIPTS[inv.args.shell])
    return 0


def cmd_complete(inv: Invocation) -> int:
    import contextlib

    from qsnap.cli.complete import main

    with contextlib.redirect_stdout(inv.env.stdout), contextlib.redirect_stderr(inv.env.stderr):
        return main(list(inv.args.rest), inv.env.environ, str(inv.env.cwd))


def cmd_ui(inv: Invocation) -> int:
    from qsnap.core.errors import UsageError

    image = inv.image()
    if not (inv.env.stdout_isatty and inv.env.stdin_isatty):
        raise UsageError("qsnap ui needs a terminal (stdin and stdout); use qsnap list --tree in scripts.")
    try:
        from qsnap.cli.ui.app import SnapshotApp
    except ImportError as exc:
        raise UsageError(f"qsnap ui needs the 'textual' package ({exc}).",
                         hint="pip install 'qsnap[ui]'") from None
    app = SnapshotApp(image, inv.context())
    app.run()
    return app.return_code or 0
