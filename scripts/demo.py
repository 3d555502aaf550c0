"""The README's demo: every step printed as the user would type it, with qsnap's real output.

On a real Linux guest (tests/guest/builder.py: a kernel + busybox from Debian packages, an ext2
disk in a qcow2 image) booted with `qsnap vm start`: show a file, snapshot, change the file,
list, diff, restore, show the file back, back up, stop. When the guest cannot be built (no
apt mirror, ...) it says why and falls back to the no-OS demo on a plain image.

Work directory: a temporary one, or $QSNAP_DEMO_DIR (kept). Nothing is left running: the VM is
stopped in a `finally`, then killed by pid if needed, and no qemu-system process whose command
line mentions the work directory may remain.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
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


GUEST_IMAGE = "debian-hurd-amd64.qcow2"  # the guide's name: qsnap finds it in the cwd by itself


def guest(text: str) -> None:
    """A command typed on the guest's serial console (shown like a root prompt)."""
    print(f"{DIM}(guest){RESET} # {text}", flush=True)


def qemu_pids_mentioning(directory: Path) -> list[int]:
    """pids of qemu-system-* processes whose command line mentions DIRECTORY."""
    found = []
    needle = str(directory).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        argv0 = cmdline.split(b"\0", 1)[0]
        if b"qemu-system" in os.path.basename(argv0) and needle in cmdline:
            found.append(int(entry.name))
    return found


def stop_everything(work: Path, image: Path) -> None:
    """Stop the demo VM (ACPI, quit, kill), then SIGKILL any QEMU still serving the work dir."""
    from qsnap import vm

    with contextlib.suppress(Exception):
        vm.stop(image, timeout=10)
    deadline = time.monotonic() + 10
    while (pids := qemu_pids_mentioning(work)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    if qemu_pids_mentioning(work):
        raise RuntimeError(f"a QEMU of the demo is still running: {qemu_pids_mentioning(work)}")


def guest_demo(work: Path, build: object) -> None:
    from qsnap import vm
    from qsnap.vm.console import wait_for_text

    kernel, initrd, disk, append = (getattr(build, k) for k in ("kernel", "initrd", "disk", "append"))
    qsnap = str(BIN / "qsnap")
    image = work / GUEST_IMAGE
    shutil.copyfile(disk, image)
    for name, source in (("vmlinux", kernel), ("initrd.gz", initrd)):
        link = work / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    try:
        say("A real guest: a Linux kernel + busybox, its disk an ext2 filesystem in a qcow2 image")
        sh("qemu-img", "info", GUEST_IMAGE, cwd=work)
        say("Boot it the way the guide's container does (free ports; qsnap records where its monitor is)")
        sh(qsnap, "vm", "start", "--memory", "256", "--smp", "1", "--disk-interface", "virtio",
           "--ssh-port", "0", "--serial-port", "0", "--monitor-port", "0",
           "--kernel", "vmlinux", "--initrd", "initrd.gz", "--append", append, cwd=work)
        running = vm.find_running(image)
        if running is None:
            raise RuntimeError("qsnap vm start succeeded but no VM is recorded")
        wait_for_text(running.serial_log, "QSNAP-GUEST-READY", timeout=90,
                      alive=lambda: vm.is_qemu_process(running.pid, running.qmp_socket))
        console = running.open_console()

        def in_guest(command: str) -> str:
            guest(command)
            output = console.check(command)
            if output:
                print(output.rstrip("\n"), flush=True)
            return output

        say("Inside the guest (its serial console): a file on the disk")
        in_guest("cat /mnt/hello.txt")
        in_guest("echo 'version=1.0 (working)' > /mnt/app.conf")
        say("Snapshot it while it runs: qsnap uses the VM's monitor (QMP) and, with --sync, flushes the guest first")
        console.close()  # QEMU serves one client per serial console: qsnap --sync needs it
        sh(qsnap, "create", "before-upgrade", "-m", "app 1.0 works", "--sync", cwd=work)
        console = running.open_console()
        say("The upgrade goes wrong")
        in_guest("echo 'version=2.0 (broken)' > /mnt/app.conf; rm /mnt/hello.txt; sync")
        in_guest("cat /mnt/app.conf")
        sh(qsnap, "list", cwd=work)
        say("What changed on the disk since the snapshot (read from the qcow2 metadata)")
        sh(qsnap, "diff", "before-upgrade", "@current", cwd=work)
        say("Restore: qsnap first keeps the present as a safety snapshot; the guest runs on from the snapshot")
        sh(qsnap, "restore", "before-upgrade", cwd=work)
        in_guest("cat /mnt/app.conf")
        in_guest("cat /mnt/hello.txt")
        console.close()
        say("Back it up (while the VM runs): a .partial file, fsynced, verified, renamed, with a manifest")
        sh(qsnap, "backup", "before-upgrade", "backups/before-upgrade.qcow2.zst", cwd=work)
        sh(qsnap, "verify", "backups/before-upgrade.qcow2.zst", cwd=work)
        sh(qsnap, "list", cwd=work)
        say("Power off (ACPI: the guest syncs and shuts down)")
        sh(qsnap, "vm", "stop", cwd=work)
        sh(qsnap, "vm", "status", cwd=work)
    finally:
        stop_everything(work, image)


def run_demo(work: Path) -> str:
    """The guest demo, or the no-OS demo when the guest cannot be built. Returns which ran."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from guest.builder import GuestBuildError, build_guest

        say("Building the demo guest from Debian packages (cached after the first time)")
        build = build_guest()
    except (ImportError, GuestBuildError) as exc:
        say(f"Cannot build the demo guest ({exc}); falling back to the demo without a guest OS")
        offline_demo(work)
        return "no-OS"
    print(f"{DIM}{build.directory}{RESET}", flush=True)
    guest_demo(work, build)
    return "guest"


def main() -> int:
    started = time.monotonic()
    keep = os.environ.get("QSNAP_DEMO_DIR")
    if keep:
        work = Path(keep).absolute()
        work.mkdir(parents=True, exist_ok=True)
        which = run_demo(work)
    else:
        with tempfile.TemporaryDirectory(prefix="qsnap-demo-") as tmp:
            which = run_demo(Path(tmp))
    print(f"\n{DIM}{which} demo finished in {time.monotonic() - started:.1f} s; nothing left running{RESET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
