"""Run one shell command in the test guest over a telnet serial console; print its output.

    python guest_exec.py PORT COMMAND

The test guest has no SSH server: the CI workflow test uses this where the guide's script
runs `ssh -p 2222 root@localhost ...` and `scp`. Exit status: the command's.
"""

from __future__ import annotations

import sys

from qsnap.vm.console import SerialConsole


def main() -> int:
    port, command = int(sys.argv[1]), sys.argv[2]
    with SerialConsole(("127.0.0.1", port), connect_timeout=30) as console:
        result = console.run(command, timeout=120)
    sys.stdout.write(result.output)
    return result.status


if __name__ == "__main__":
    sys.exit(main())
