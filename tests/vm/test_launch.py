"""The qemu-system-x86_64 command line (pure: no QEMU started) and port resolution."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from qsnap import vm
from qsnap.core.errors import UsageError

SOCKETS = vm.Sockets(qmp=Path("/run/q/qmp.sock"), serial=Path("/run/q/serial.sock"), serial_log=Path("/r/s.log"))


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


def test_accel_is_kvm_only_on_real_hardware_virtualization(tmp_path: Path) -> None:
    kvm, pvm = tmp_path / "kvm", tmp_path / "kvm_pvm"
    assert vm.choose_accel(kvm, pvm) == "tcg"  # no /dev/kvm
    kvm.touch()
    assert vm.choose_accel(kvm, pvm) == "kvm:tcg"  # hardware KVM
    pvm.mkdir()
    assert vm.choose_accel(kvm, pvm) == "tcg"  # the software PVM module: stock kernels crawl


def test_accel_choice_picks_the_cpu_model() -> None:
    spec = vm.VMSpec(image=Path("/img/disk.qcow2"))
    tcg = vm.qemu_argv(spec, SOCKETS, accel="tcg")
    assert option_values(tcg, "-machine") == ["pc,accel=tcg"]
    assert option_values(tcg, "-cpu") == ["max"]
    kvm = vm.qemu_argv(spec, SOCKETS, accel="kvm:tcg")
    assert option_values(kvm, "-machine") == ["pc,accel=kvm:tcg"]
    assert option_values(kvm, "-cpu") == ["host"]


def test_default_argv_follows_the_guide_but_binds_the_monitor_to_localhost() -> None:
    spec = vm.VMSpec(image=Path("/img/debian-hurd-amd64.qcow2"))
    argv = vm.qemu_argv(spec, SOCKETS, accel="tcg")
    assert argv[0] == "qemu-system-x86_64"
    assert option_values(argv, "-m") == ["2048"]
    assert option_values(argv, "-smp") == ["2"]
    assert option_values(argv, "-drive") == ["file=/img/debian-hurd-amd64.qcow2,if=ide,format=qcow2"]
    assert option_values(argv, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22"]
    chardevs = option_values(argv, "-chardev")
    assert "socket,id=serial0,host=127.0.0.1,port=5555,telnet=on,server=on,wait=off,logfile=/r/s.log" in chardevs
    assert "socket,id=hmp0,host=127.0.0.1,port=9999,telnet=on,server=on,wait=off" in chardevs
    assert "socket,id=qmp0,path=/run/q/qmp.sock,server=on,wait=off" in chardevs
    assert option_values(argv, "-mon") == ["chardev=hmp0,mode=readline", "chardev=qmp0,mode=control"]
    assert option_values(argv, "-serial") == ["chardev:serial0"]
    assert not any("0.0.0.0" in arg for arg in argv)  # an HMP monitor has no authentication
    assert "-loadvm" not in argv and "-kernel" not in argv


def test_every_port_and_bind_address_is_an_option() -> None:
    spec = vm.VMSpec(
        image=Path("/img/d.qcow2"), ssh_port=2022, serial_port=5022, monitor_port=9022,
        monitor_host="::1", listen_host="0.0.0.0", disk_interface="virtio", memory_mb=512, smp=4,
    )  # fmt: skip
    argv = vm.qemu_argv(spec, SOCKETS, accel="tcg")
    assert option_values(argv, "-netdev") == ["user,id=net0,hostfwd=tcp:0.0.0.0:2022-:22"]
    chardevs = " ".join(option_values(argv, "-chardev"))
    assert "host=0.0.0.0,port=5022,telnet=on" in chardevs
    assert "id=hmp0,host=::1,port=9022,telnet=on" in chardevs
    assert option_values(argv, "-drive") == ["file=/img/d.qcow2,if=virtio,format=qcow2"]
    assert option_values(argv, "-m") == ["512"] and option_values(argv, "-smp") == ["4"]


def test_disabled_endpoints_and_the_test_guest_options() -> None:
    spec = vm.VMSpec(
        image=Path("/img/d.qcow2"), ssh_port=None, serial_port=None, monitor_port=None,
        kernel=Path("/k/vmlinux"), initrd=Path("/k/initrd.gz"), append="console=ttyS0 quiet",
        loadvm="booted", no_reboot=True,
    )  # fmt: skip
    argv = vm.qemu_argv(spec, SOCKETS, accel="tcg")
    assert "-netdev" not in argv
    assert option_values(argv, "-chardev")[0] == (
        "socket,id=serial0,path=/run/q/serial.sock,server=on,wait=off,logfile=/r/s.log"
    )
    assert not any("hmp0" in arg for arg in argv)
    assert option_values(argv, "-kernel") == ["/k/vmlinux"]
    assert option_values(argv, "-initrd") == ["/k/initrd.gz"]
    assert option_values(argv, "-append") == ["console=ttyS0 quiet"]
    assert option_values(argv, "-loadvm") == ["booted"]
    assert "-no-reboot" in argv


def test_a_comma_in_the_image_path_is_escaped_for_qemu() -> None:
    argv = vm.qemu_argv(vm.VMSpec(image=Path("/img/a,b.qcow2")), SOCKETS, accel="tcg")
    assert option_values(argv, "-drive") == ["file=/img/a,,b.qcow2,if=ide,format=qcow2"]


def test_argv_refuses_unresolved_ports() -> None:
    with pytest.raises(UsageError, match="resolve"):
        vm.qemu_argv(vm.VMSpec(image=Path("/img/d.qcow2"), monitor_port=0), SOCKETS, accel="tcg")


def test_spec_survives_a_json_round_trip() -> None:
    spec = vm.VMSpec(image=Path("/img/d.qcow2"), kernel=Path("/k"), extra_args=("-s",), monitor_port=0)
    assert vm.VMSpec.from_json(spec.to_json()) == spec


def test_invalid_specs_are_refused() -> None:
    with pytest.raises(UsageError):
        vm.VMSpec(image=Path("/d.qcow2"), ssh_port=70000)
    with pytest.raises(UsageError):
        vm.VMSpec(image=Path("/d.qcow2"), disk_interface="scsi")  # type: ignore[arg-type]


def test_port_zero_picks_distinct_free_ports() -> None:
    spec = vm.resolve_ports(vm.VMSpec(image=Path("/d.qcow2"), ssh_port=0, serial_port=0, monitor_port=0))
    ports = {spec.ssh_port, spec.serial_port, spec.monitor_port}
    assert len(ports) == 3 and all(isinstance(p, int) and p > 0 for p in ports)


def test_a_busy_port_is_a_clear_error_naming_the_option() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(vm.PortBusy) as raised:
            vm.resolve_ports(vm.VMSpec(image=Path("/d.qcow2"), ssh_port=None, serial_port=None, monitor_port=port))
    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message and "monitor" in message and "--monitor-port" in message
    assert raised.value.exit_code == 2


def test_long_run_directories_put_sockets_in_a_short_directory(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="q", dir="/tmp") as near:  # tmp_path may be long (xdist)
        short = vm.socket_paths(Path(near) / "d.qcow2")
        assert short.qmp == Path(near) / "d.qcow2.qsnap-run" / "qmp.sock"
    deep = tmp_path / ("x" * 120) / "d.qcow2"
    sockets = vm.socket_paths(deep)
    assert len(str(sockets.qmp)) < 100
    assert sockets.serial_log == deep.parent / "d.qcow2.qsnap-run" / "serial.log"
