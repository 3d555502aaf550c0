"""Delete a snapshot by ID offline through qemu-storage-daemon's QMP.

`qemu-img snapshot -d` can only delete the *first* snapshot with a given name, so when an
image (made by other tools) holds duplicate names and the user picks a later one with --id,
we open the image in qemu-storage-daemon and use ``blockdev-snapshot-delete-internal-sync``,
which takes the ID and the name together. The daemon takes the same write lock qemu-img
would, so a running VM's image is still refused.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from qsnap.core import proc
from qsnap.core.errors import ImageInUse, ProcessError, QsnapError
from qsnap.core.models import Snapshot

PROGRAM = "qemu-storage-daemon"


def daemon_argv(image: Path, socket_path: Path) -> list[str]:
    return [
        PROGRAM,
        "--blockdev", f"driver=file,filename={image},node-name=qsnap-file",
        "--blockdev", "driver=qcow2,file=qsnap-file,node-name=qsnap-disk",
        "--chardev", f"socket,id=qsnap-qmp,path={socket_path},server=on,wait=off",
        "--monitor", "chardev=qsnap-qmp",
    ]


def delete_snapshot(image: Path, snapshot: Snapshot, timeout: float = 30.0) -> None:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    with tempfile.TemporaryDirectory(prefix="qsnap-qsd-") as tmp:
        sock = Path(tmp) / "qmp.sock"
        child = proc.spawn(daemon_argv(image, sock))
        try:
            deadline = time.monotonic() + timeout
            while not sock.exists():
                if child.poll() is not None:
                    stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
                    if "lock" in stderr:
                        raise ImageInUse(f"{image} is in use by a running VM ({stderr.strip()}).")
                    raise ProcessError(daemon_argv(image, sock), child.returncode or 1, "", stderr)
                if time.monotonic() > deadline:
                    raise QsnapError(f"{PROGRAM} did not start within {timeout:g} s.")
                time.sleep(0.02)
            qmp = QEMUMonitorProtocol(os.fspath(sock))
            qmp.connect()
            try:
                reply = cast(dict[str, Any], qmp.cmd(
                    "blockdev-snapshot-delete-internal-sync",
                    device="qsnap-disk", id=snapshot.id, name=snapshot.name,
                ))
                if "error" in reply:
                    raise QsnapError(
                        f"qemu-storage-daemon could not delete snapshot ID {snapshot.id} "
                        f"{snapshot.name!r}: {reply['error'].get('desc')}."
                    )
            finally:
                qmp.close()
            # SIGTERM makes the daemon close its block nodes cleanly (flushing metadata);
            # a QMP 'quit' races with the reply and shows up as EOF on our side.
            child.terminate()
            if child.wait(timeout=timeout) != 0:
                stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
                raise ProcessError(daemon_argv(image, sock), child.returncode, "", stderr)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
