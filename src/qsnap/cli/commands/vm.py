"""`qsnap vm start|stop|status`: run the image's VM like the guide's container does."""

from __future__ import annotations

import argparse

from qsnap.cli.invocation import Invocation


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from qsnap.cli.options import ArgumentParser, add_common

    vm = sub.add_parser("vm", help="start, stop or inspect the image's VM")
    vm_sub: argparse._SubParsersAction[argparse.ArgumentParser] = vm.add_subparsers(
        dest="vm_command", metavar="ACTION", parser_class=ArgumentParser
    )

    p = vm_sub.add_parser("start", help="start QEMU on the image (the guide's setup)")
    add_common(p, json=True)
    p.add_argument("--memory", type=int, default=2048, metavar="MiB", help="RAM in MiB (default 2048)")
    p.add_argument("--smp", type=int, default=2, help="virtual CPUs (default 2)")
    p.add_argument("--accel", default="auto", help="auto (KVM when it is real, else TCG), kvm, tcg")
    p.add_argument("--disk-interface", choices=["ide", "virtio"], default="ide")
    p.add_argument("--ssh-port", type=int, default=2222, help="host port forwarded to guest 22 (0 = free)")
    p.add_argument("--serial-port", type=int, default=5555, help="telnet serial console port (0 = free)")
    p.add_argument("--monitor-port", type=int, default=9999, help="HMP telnet monitor port (0 = free)")
    p.add_argument("--monitor-host", default="127.0.0.1",
                   help="address the HMP monitor listens on (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--loadvm", metavar="SNAPSHOT", help="start from a snapshot with VM state")
    p.add_argument("--kernel", help=argparse.SUPPRESS)
    p.add_argument("--initrd", help=argparse.SUPPRESS)
    p.add_argument("--append", help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_start)

    p = vm_sub.add_parser("stop", help="ACPI powerdown, then quit, then kill")
    add_common(p, json=True)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the guest to power off")
    p.set_defaults(handler=cmd_stop)

    p = vm_sub.add_parser("status", help="running, paused or stopped; engine and ports")
    add_common(p, json=True)
    p.set_defaults(handler=cmd_status)

    p = vm_sub.add_parser("wait", help="wait until the guest is ready (instead of a fixed sleep)")
    add_common(p, json=True)
    p.add_argument("--ssh", action="store_true", help="ready when the guest's SSH server sends its banner")
    p.add_argument("--serial", metavar="PATTERN", help="ready when the serial console prints PATTERN (a regex)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S", help="give up after S seconds (default 300)")
    p.add_argument("--host", default="127.0.0.1", help="where the ports are (default 127.0.0.1)")
    p.add_argument("--ssh-port", type=int, help="SSH port (default: the VM's, QSNAP_SSH's, else 2222)")
    p.add_argument("--serial-port", type=int, help="telnet serial console port (default: the VM's, else 5555)")
    p.add_argument("--serial-log", metavar="FILE", help="read the serial console from this log file")
    p.set_defaults(handler=cmd_wait)
    vm.set_defaults(handler=lambda inv: _vm_help(vm, inv))


def _vm_help(parser: argparse.ArgumentParser, inv: Invocation) -> int:
    inv.env.stderr.write(parser.format_help())
    return 2


def cmd_start(inv: Invocation) -> int:
    from qsnap import vm
    from qsnap.core.names import validate_name

    args = inv.args
    if args.loadvm is not None:
        validate_name(args.loadvm)
    spec = vm.VMSpec(
        image=inv.image(), memory_mb=args.memory, smp=args.smp, accel=args.accel,
        disk_interface=args.disk_interface, ssh_port=args.ssh_port, serial_port=args.serial_port,
        monitor_port=args.monitor_port, monitor_host=args.monitor_host, loadvm=args.loadvm,
        kernel=args.kernel, initrd=args.initrd, append=args.append,
    )
    if args.monitor_host not in ("127.0.0.1", "localhost", "::1"):
        inv.note(f"warning: the HMP monitor will listen on {args.monitor_host}: anyone who reaches "
                 "that port can run any QEMU command (it has no authentication)")
    running = vm.start(spec)
    if inv.json:
        inv.emit_json(running.to_json())
        return 0
    inv.out(f"VM started on {running.spec.image} (pid {running.pid}, {running.accel}).")
    if running.ssh_port:
        inv.out(f"  ssh:     ssh -p {running.ssh_port} root@localhost")
    if running.serial_port:
        inv.out(f"  serial:  telnet localhost {running.serial_port}")
    if running.monitor_port:
        inv.out(f"  monitor: telnet {running.spec.monitor_host} {running.monitor_port} (HMP)")
    inv.out(f"  qsnap uses QMP at {running.qmp_socket}")
    return 0


def cmd_stop(inv: Invocation) -> int:
    from qsnap import vm

    result = vm.stop(inv.image(), timeout=inv.args.timeout)
    if inv.json:
        inv.emit_json({"image": str(result.image), "method": result.method, "pid": result.pid})
        return 0
    words = {
        "powerdown": "the guest powered off",
        "quit": "the guest did not power off in time; QEMU was told to quit",
        "kill": "QEMU did not answer; it was killed",
        "not-running": "no qsnap-started VM was running on this image",
    }
    inv.out(f"VM stopped: {words.get(result.method, result.method)}.")
    return 0


def cmd_status(inv: Invocation) -> int:
    from qsnap import vm

    status = vm.status(inv.image())
    if inv.json:
        inv.emit_json(status.to_json())
        return 0
    inv.out(f"{status.image}: {status.state}" + (f" ({status.run_state})" if status.run_state else ""))
    if status.running:
        inv.out(f"  pid {status.pid}, {status.accel}, engine: qmp at {status.qmp_socket}")
        ports = {"ssh": status.ssh_port, "serial": status.serial_port, "monitor": status.monitor_port}
        inv.out("  ports: " + ", ".join(f"{k} {v}" for k, v in ports.items() if v))
    return 0


def cmd_wait(inv: Invocation) -> int:
    from qsnap.service.readiness import wait_for_vm

    args = inv.args
    result = wait_for_vm(
        inv.context(), image=inv.image, ssh=args.ssh, serial=args.serial,
        timeout=args.timeout, host=args.host, ssh_port=args.ssh_port, serial_port=args.serial_port,
        serial_log=args.serial_log,
    )  # fmt: skip
    if inv.json:
        inv.emit_json(result.to_json())
        return 0
    inv.out(f"VM ready after {result.seconds:.1f} s: {result.how}.")
    return 0
