"""Flushing the guest's filesystems before a snapshot (`qsnap create --sync`).

Unsynced guest writes live in the guest's page cache: a live snapshot keeps them in its VM
state, but the snapshot's *disk* does not have them, so reverting that snapshot offline loses
them (the guide's "Snapshot restore corrupts filesystem"). ``--sync`` runs ``sync`` in the
guest first, over the serial console of a VM that ``qsnap vm start`` launched, or over SSH when
``QSNAP_SSH`` (``USER@HOST[:PORT]``, e.g. the guide's ``root@localhost:2222``) is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from qsnap.core import proc
from qsnap.core.errors import MonitorError, ProcessError, UsageError

SYNC_TIMEOUT = 60.0
PROBE_TIMEOUT = 5.0


def ssh_argv(target: str, command: str) -> list[str]:
    """``ssh`` argv for ``USER@HOST[:PORT]`` that never prompts (pure)."""
    userhost, _, port = target.rpartition(":") if target.count(":") == 1 else (target, "", "")
    if not userhost or "@" not in userhost:
        raise UsageError(f"QSNAP_SSH={target!r} is not USER@HOST[:PORT].")
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "StrictHostKeyChecking=accept-new"]
    if port:
        if not port.isdigit():
            raise UsageError(f"QSNAP_SSH={target!r}: {port!r} is not a port number.")
        argv += ["-p", port]
    return [*argv, userhost, command]


def sync_guest(image: Path, environ: Mapping[str, str]) -> str:
    """Run ``sync`` in the guest; return how ("serial console" or "ssh USER@HOST")."""
    from qsnap.vm import find_running

    running = find_running(image)
    if running is not None:
        with running.open_console(connect_timeout=10.0) as console:
            # QEMU serves one client per serial socket: with someone else on it our bytes just
            # queue. Probe with a harmless command first, so 'sync' is never left queued.
            try:
                console.run("true", timeout=PROBE_TIMEOUT)
            except MonitorError as exc:
                raise MonitorError(
                    f"The guest's serial console did not answer within {PROBE_TIMEOUT:g} s, so the "
                    "guest was not synced and no snapshot was taken.",
                    hint="QEMU serves one client per serial console: close any telnet session on it, "
                    "or use QSNAP_SSH=USER@HOST[:PORT]",
                ) from exc
            result = console.run("sync", timeout=SYNC_TIMEOUT)
        if result.status != 0:
            raise MonitorError(f"'sync' failed in the guest (exit {result.status}): {result.output.strip()}")
        return "serial console"
    target = environ.get("QSNAP_SSH", "").strip()
    if target:
        try:
            proc.run(ssh_argv(target, "sync"), timeout=SYNC_TIMEOUT)
        except ProcessError as exc:
            raise MonitorError(f"Could not run 'sync' in the guest over ssh ({target}): {exc}") from exc
        return f"ssh {target}"
    raise UsageError(
        "--sync needs a way into the guest: start the VM with 'qsnap vm start' (serial console) or "
        "set QSNAP_SSH=USER@HOST[:PORT] (e.g. root@localhost:2222).",
    )
