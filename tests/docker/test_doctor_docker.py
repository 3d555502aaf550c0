"""`qsnap doctor --vm compose:SERVICE` on containers set up wrong, on our own daemon: a monitor
port published on every interface, and a running container whose monitor is not published.
(The stopped container is diagnosed in test_guide_setup.py, on the guide's own setup.)"""

from __future__ import annotations

import json
from typing import Any

from .conftest import SERVICE, Project, ProjectFactory

VM = f"compose:{SERVICE}"

#: A stand-alone compose file for the test guest with PORTS instead of the guide's bindings.
COMPOSE = """version: "3.8"
services:
  hurd-x86_64-qemu:
    image: ${{QSNAP_DOCKER_IMAGE}}
    environment:
      QEMU_RAM: 256
      QEMU_SMP: 1
      QEMU_DISK_INTERFACE: virtio
      QEMU_KERNEL: /opt/guest-boot/vmlinux
      QEMU_INITRD: /opt/guest-boot/initrd.gz
      QEMU_APPEND: "console=ttyS0 quiet loglevel=3 panic=-1"
      QSNAP_READY_SERIAL: QSNAP-GUEST-READY
    volumes:
      - .:/opt/hurd-image
      - ${{GUEST_BOOT_DIR}}:/opt/guest-boot:ro
{ports}"""


def doctor(project: Project) -> tuple[int, dict[str, dict[str, Any]]]:
    result = project.qsnap("--vm", VM, "doctor", "--json")
    return result.rc, {c["check"]: c for c in json.loads(result.out)["checks"]}


def test_doctor_warns_of_a_monitor_published_on_every_interface(project_factory: ProjectFactory) -> None:
    project = project_factory(compose_files=("exposed.yml",), extra_files={
        "exposed.yml": COMPOSE.format(ports='    ports:\n      - "0.0.0.0:${MONITOR_PORT}:9999"\n')})
    # Created, never started: the binding is configured, yet nothing listens on 0.0.0.0.
    project.compose("up", "--no-start")
    _, checks = doctor(project)
    exposure = checks["container monitor"]
    assert exposure["status"] == "warn"
    assert f"0.0.0.0:{project.monitor_port} (every network interface)" in exposure["found"]
    assert "127.0.0.1:PORT:9999" in exposure["fix"]
    assert checks["container"]["status"] == "warn" and "created" in checks["container"]["found"]


def test_doctor_fails_on_a_running_container_with_an_unpublished_monitor(project_factory: ProjectFactory) -> None:
    project = project_factory(compose_files=("unpublished.yml",), extra_files={
        "unpublished.yml": COMPOSE.format(ports="")})
    project.compose("up", "--detach")
    rc, checks = doctor(project)
    assert rc == 1
    unpublished = checks["container monitor"]
    assert unpublished["status"] == "fail" and "is not published" in unpublished["found"]
    assert '"127.0.0.1:9999:9999"' in unpublished["fix"]
    assert checks["container"]["status"] == "ok"
    # And MONITOR_PORT leads nowhere while a VM holds the image: the monitor check says so too.
    assert checks["monitor"]["status"] == "fail"
