"""Re-capture the HMP byte streams in fixtures/ from the installed QEMU (not a test).

    .venv/bin/python tests/monitor/capture_hmp.py

Starts qemu-system-x86_64 (no guest OS) with two qcow2 disks and an HMP monitor on TCP and
telnet, runs a fixed script of commands and writes, for each step, exactly the bytes the
monitor sent (from just after the previous prompt to the end of the next one).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent / "fixtures"
SCRIPT = [
    ("info_status_running", "info status"),
    ("savevm_ok", "savevm snapA"),
    ("savevm_second", "savevm snapB"),
    ("info_snapshots", "info snapshots"),
    ("info_block_v", "info block -v"),
    ("loadvm_missing", "loadvm nosuch"),
    ("info_status_paused", "info status"),
    ("cont", "cont"),
    ("delvm_missing", "delvm nosuch"),
    ("delvm_ok", "delvm snapA"),
    ("unknown_command", "nosuchcmd"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_until_prompt(sock: socket.socket, telnet_first: bool = False) -> bytes:
    data = b""
    sock.settimeout(10)
    while not data.endswith(b"\r\n(qemu) "):
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError
        data += chunk
    return data


def capture(kind: str, workdir: Path) -> dict[str, str]:
    for name, size in (("d.qcow2", "64M"), ("e.qcow2", "32M")):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(workdir / name), size], check=True)
    port = free_port()
    accel = "tcg" if Path("/sys/module/kvm_pvm").exists() else "kvm:tcg"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", f"pc,accel={accel}", "-m", "64", "-nodefaults",
         "-display", "none",
         "-drive", f"file={workdir / 'd.qcow2'},if=virtio,format=qcow2",
         "-drive", f"file={workdir / 'e.qcow2'},if=virtio,format=qcow2",
         "-monitor", f"{kind}:127.0.0.1:{port},server=on,wait=off"]
    )
    out: dict[str, str] = {}
    try:
        for _ in range(200):
            try:
                sock = socket.create_connection(("127.0.0.1", port), 1)
                break
            except OSError:
                time.sleep(0.05)
        out["greeting"] = read_until_prompt(sock).decode("latin-1")
        for key, line in SCRIPT:
            sock.sendall(line.encode() + b"\n")
            out[key] = read_until_prompt(sock).decode("latin-1")
        sock.sendall(b"quit\n")
        sock.close()
    finally:
        proc.kill()
        proc.wait()
    return out


def main() -> int:
    for kind in ("tcp", "telnet"):
        with tempfile.TemporaryDirectory() as tmp:
            data = capture(kind, Path(tmp))
        data = {k: v.replace(tmp, "/TMP") for k, v in data.items()}
        (HERE / f"hmp_{kind}_7.2.json").write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
