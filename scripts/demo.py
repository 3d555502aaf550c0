"""The README's demo: every step printed as the user would type it, with qsnap's real output."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}# {text}{RESET}", flush=True)


def sh(*argv: str, cwd: Path, check: bool = True, show: bool = True) -> subprocess.CompletedProcess[str]:
    shown = [Path(a).name if a.startswith(str(BIN)) else a for a in argv]
    if show:
        print(f"$ {shlex.join(shown)}", flush=True)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    result = subprocess.run(argv, cwd=cwd, env=env, text=True, capture_output=True)
    out = (result.stdout + result.stderr).rstrip()
    if show and out:
        print(out, flush=True)
    if check and result.returncode != 0:
        print(f"demo step failed with exit code {result.returncode}", file=sys.stderr)
        sys.exit(result.returncode)
    return result


def offline_demo(work: Path) -> None:
    image = "debian-hurd-amd64.qcow2"
    qsnap = str(BIN / "qsnap")
    say("A demo disk: a 256 MiB qcow2 image (qsnap finds ./debian-hurd-amd64.qcow2 by itself, like the guide)")
    sh("qemu-img", "create", "-q", "-f", "qcow2", image, "256M", cwd=work)
    sh("qemu-io", "-c", "write -P 0x11 0 4M", image, cwd=work)
    say("Snapshot the current state (the VM is stopped, so qsnap uses qemu-img)")
    sh(qsnap, "create", "initial-setup", "-m", "fresh install, pattern 0x11", cwd=work)
    say("A name that would confuse QEMU or its monitor is refused before anything runs")
    sh(qsnap, "create", "a\nquit", cwd=work, check=False)
    sh(qsnap, "create", "42", cwd=work, check=False)
    say("An existing name is never silently replaced")
    sh(qsnap, "create", "initial-setup", cwd=work, check=False)
    say("Change the disk (as an upgrade would), then snapshot again")
    sh("qemu-io", "-c", "write -P 0x22 0 4M", image, cwd=work)
    sh(qsnap, "create", "after-upgrade", "-m", "pattern 0x22", cwd=work)
    sh(qsnap, "list", cwd=work)
    say("Restore: qsnap first keeps the current state as a safety snapshot")
    sh(qsnap, "restore", "initial-setup", cwd=work)
    sh("qemu-io", "-c", "read -P 0x11 0 4M", image, cwd=work)
    say("Back it up: written to a .partial file, fsynced, checked, renamed, with a manifest")
    sh(qsnap, "backup", "initial-setup", "backups/initial-setup.qcow2.gz", cwd=work)
    sh("ls", "-l", "backups", cwd=work)
    say("The guide's own commands work unchanged")
    sh(str(BIN / "manage-snapshots"), "list", cwd=work)
    sh(qsnap, "list", "--json", cwd=work)
    sh(qsnap, "check", cwd=work)


def main() -> int:
    started = time.monotonic()
    keep = os.environ.get("QSNAP_DEMO_DIR")
    if keep:
        work = Path(keep)
        work.mkdir(parents=True, exist_ok=True)
        offline_demo(work)
    else:
        with tempfile.TemporaryDirectory(prefix="qsnap-demo-") as tmp:
            offline_demo(Path(tmp))
    print(f"\n{DIM}demo finished in {time.monotonic() - started:.1f} s; nothing left running{RESET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
