"""Controllers that restore uses to stop and start a VM."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from qsnap import vm
from qsnap.core import proc
from qsnap.core.errors import MonitorError, ProgramMissing, UsageError
from qsnap.vm.qmp import command, qmp_session

from .conftest import no_os_spec

Launch = Callable[[vm.VMSpec], vm.RunningVM]


def test_compose_argv() -> None:
    assert vm.compose_argv("stop", "hurd-x86_64-qemu") == ["docker", "compose", "stop", "hurd-x86_64-qemu"]
    assert vm.compose_argv("start", "hurd", "/srv/docker-compose.yml", vm.COMPOSE_V1) == [
        "docker-compose", "-f", "/srv/docker-compose.yml", "start", "hurd",
    ]  # fmt: skip
    assert vm.compose_argv("stop", "hurd", None, vm.COMPOSE_V1, timeout=3.0) == [
        "docker-compose", "stop", "--timeout", "3", "hurd",
    ]  # fmt: skip
    assert vm.compose_argv("container-id", "hurd") == ["docker", "compose", "ps", "--all", "--quiet", "hurd"]
    with pytest.raises(ValueError):
        vm.compose_argv("rm", "hurd")


def test_compose_command_detection() -> None:
    # Which programs exist is injected (`which`, and a recorder for `docker compose version`):
    # the real detection against the installed docker-compose runs in tests/docker.
    def which(*present: str) -> Callable[[str], str | None]:
        return lambda name: f"/usr/bin/{name}" if name in present else None

    def plugin(rc: int) -> Callable[[Sequence[str]], proc.Result]:
        return lambda argv: proc.Result(tuple(argv), rc, "", "")

    assert vm.compose_command({}, which=which("docker-compose", "docker")) == ("docker-compose",)
    assert vm.compose_command({}, which=which("docker"), runner=plugin(0)) == ("docker", "compose")
    assert vm.compose_command({"QSNAP_COMPOSE": "docker  compose"}, which=which("docker-compose")) == (
        "docker", "compose")
    assert vm.compose_command({"QSNAP_COMPOSE": "v1"}, which=which()) == ("docker-compose",)
    with pytest.raises(UsageError):
        vm.compose_command({"QSNAP_COMPOSE": "podman-compose"}, which=which("docker-compose"))
    with pytest.raises(ProgramMissing) as no_plugin:
        vm.compose_command({}, which=which("docker"), runner=plugin(1))
    assert no_plugin.value.exit_code == 9 and "apt-get install docker-compose" in str(no_plugin.value)
    with pytest.raises(ProgramMissing) as nothing:
        vm.compose_command({}, which=which())
    assert "apt-get install docker.io docker-compose" in str(nothing.value)


INSPECT = """[{"Id": "4f2a9c", "State": {"Status": "running", "ExitCode": 0, "Health": {"Status": "healthy"}},
 "HostConfig": {"PortBindings": {"9999/tcp": [{"HostIp": "127.0.0.1", "HostPort": "9999"}]}}}]"""


def test_compose_controller_runs_docker_compose() -> None:
    # No daemon here: the runner is replaced by a recorder, so this checks which commands qsnap
    # would run and how it reads their output (tests/docker drives a real daemon).
    calls: list[list[str]] = []

    def runner(argv: Sequence[str]) -> proc.Result:
        calls.append(list(argv))
        out = "4f2a9c\n" if "ps" in argv else INSPECT if "inspect" in argv else ""
        return proc.Result(tuple(argv), 0, out, "")

    controller = vm.controller_for("/img/d.qcow2", "compose:hurd@/srv/compose.yml", runner=runner)
    assert isinstance(controller, vm.ComposeService)
    controller._command = vm.COMPOSE_V2
    assert controller.name == "compose:hurd@/srv/compose.yml"
    assert controller.is_running()
    state = controller.state()
    assert state is not None and state.health == "healthy" and state.published(9999) == (("127.0.0.1", 9999),)
    controller.stop()
    controller.start()
    assert calls == [
        ["docker", "compose", "-f", "/srv/compose.yml", "ps", "--all", "--quiet", "hurd"],
        ["docker", "inspect", "--type", "container", "4f2a9c"],
        ["docker", "compose", "-f", "/srv/compose.yml", "ps", "--all", "--quiet", "hurd"],
        ["docker", "inspect", "--type", "container", "4f2a9c"],
        ["docker", "compose", "-f", "/srv/compose.yml", "stop", "hurd"],
        ["docker", "compose", "-f", "/srv/compose.yml", "start", "hurd"],
    ]


def test_controller_specs(blank_image: Path) -> None:
    assert vm.controller_for(blank_image, None).name == "none"  # qsnap never ran a VM here
    assert vm.controller_for(blank_image, "none").name == "none"
    assert vm.controller_for(blank_image, "qsnap").name == "qsnap"
    assert vm.controller_for(blank_image, "compose:web").name == "compose:web"
    for bad in ("compose:", "systemd:qemu", ""):
        with pytest.raises(UsageError):
            vm.controller_for(blank_image, bad)


def test_no_controller_refuses_with_a_hint(blank_image: Path) -> None:
    controller = vm.controller_for(blank_image, "none")
    assert not controller.is_running()
    with pytest.raises(MonitorError, match="does not know how to stop") as raised:
        controller.stop()
    assert raised.value.exit_code == 12
    assert "compose:SERVICE" in str(raised.value)


@pytest.mark.vm
def test_qsnap_controller_stops_and_restarts_without_loadvm(blank_image: Path, launch: Launch) -> None:
    maker = launch(no_os_spec(blank_image))
    with qmp_session(maker.qmp_socket) as qmp:  # a live snapshot (with VM state) to -loadvm
        assert command(qmp, "human-monitor-command", **{"command-line": "savevm base"}) == ""
    vm.stop(blank_image, timeout=0.1)
    first = launch(no_os_spec(blank_image, monitor_port=0, loadvm="base"))
    # auto: qsnap started a VM here. (SeaBIOS ignores ACPI powerdown: keep its wait short.)
    controller = vm.controller_for(blank_image, stop_timeout=0.2)
    assert controller.name == "qsnap" and controller.is_running()
    controller.stop()
    assert not controller.is_running()
    assert not vm.is_qemu_process(first.pid, first.qmp_socket)
    controller.start()
    again = vm.find_running(blank_image)
    assert again is not None and again.pid != first.pid
    assert again.monitor_port == first.monitor_port  # same ports as before
    assert "-loadvm" not in again.argv  # a restart after a restore must not revert the disk
    vm.stop(blank_image, timeout=0.2)


def test_qsnap_controller_without_a_recorded_vm(blank_image: Path) -> None:
    with pytest.raises(MonitorError, match="No VM was ever started"):
        vm.controller_for(blank_image, "qsnap").start()
