"""Who runs the VM: a QEMU that qsnap launched, a docker compose service, or nobody.

    from qsnap import vm
    running = vm.start(vm.VMSpec(image=Path("disk.qcow2"), monitor_port=0))
    vm.find_running("disk.qcow2").qmp_socket   # later, from any qsnap command
    vm.status("disk.qcow2").to_json()
    vm.stop("disk.qcow2", timeout=30)          # powerdown → quit → SIGKILL
    with running.open_console() as console:    # a shell on the serial console
        console.check("sync")

qemu.qmp is imported lazily (inside the functions that talk to QEMU).
"""

from qsnap.vm.console import CommandResult, ConsoleError, SerialConsole, wait_for_text
from qsnap.vm.controllers import (
    COMPOSE_V1,
    COMPOSE_V2,
    ComposeService,
    ContainerState,
    Controller,
    NoController,
    QsnapVM,
    compose_argv,
    compose_command,
    controller_for,
)
from qsnap.vm.launch import (
    DEFAULT_MONITOR_PORT,
    DEFAULT_SERIAL_PORT,
    DEFAULT_SSH_PORT,
    PortBusy,
    Sockets,
    VMSpec,
    choose_accel,
    qemu_argv,
    resolve_ports,
    run_dir,
    socket_paths,
)
from qsnap.vm.lifecycle import (
    RunningVM,
    StopResult,
    VMStatus,
    find_running,
    is_qemu_process,
    recorded_spec,
    start,
    status,
    stop,
)

__all__ = [
    "COMPOSE_V1",
    "COMPOSE_V2",
    "DEFAULT_MONITOR_PORT",
    "DEFAULT_SERIAL_PORT",
    "DEFAULT_SSH_PORT",
    "CommandResult",
    "ComposeService",
    "ConsoleError",
    "ContainerState",
    "Controller",
    "NoController",
    "PortBusy",
    "QsnapVM",
    "RunningVM",
    "SerialConsole",
    "Sockets",
    "StopResult",
    "VMSpec",
    "VMStatus",
    "choose_accel",
    "compose_argv",
    "compose_command",
    "controller_for",
    "find_running",
    "is_qemu_process",
    "qemu_argv",
    "recorded_spec",
    "resolve_ports",
    "run_dir",
    "socket_paths",
    "start",
    "status",
    "stop",
    "wait_for_text",
]
