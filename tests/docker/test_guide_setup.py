"""The guide's QEMU-in-Docker setup, for real: docker/ (image, compose file, entrypoint) on our own
Docker daemon, the Hurd-style ext2 test guest inside, qsnap on the host reaching it through the
published HMP port (path matched by file name + virtual size, no QSNAP_PATH_MAP) and through the
compose controller (the guide's `docker-compose`, v1, detected first).

The tests of this module share one running project (``guide_vm``) and leave it running and ready.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .conftest import IMAGE_NAME, SERVICE, Project

VM = f"compose:{SERVICE}"


def names(project: Project) -> list[str]:
    return [s["name"] for s in json.loads(project.qsnap_ok("list", "--json"))["snapshots"]]


def delete_all(project: Project) -> None:
    for name in names(project):
        project.qsnap_ok("delete", name, "--yes")


def test_qsnap_and_manage_snapshots_inside_the_container(guide_vm: Project) -> None:
    listing = guide_vm.compose("exec", "-T", SERVICE, "qsnap", "list", "--json")
    data = json.loads(listing.out)
    assert data["image"] == f"/opt/hurd-image/{IMAGE_NAME}"
    assert data["engine"] == "qmp"  # QEMU's own QMP socket in the container (QSNAP_MONITOR)
    guide = guide_vm.compose("exec", "-T", SERVICE, "manage-snapshots.sh", "list")
    assert f"Snapshots in: {IMAGE_NAME}" in guide.out
    assert guide_vm.compose("exec", "-T", SERVICE, "qsnap", "--version").out.startswith("qsnap ")


def test_live_snapshots_through_the_published_monitor(guide_vm: Project) -> None:
    guide_vm.guest("printf v1 > /mnt/state.txt; sync")
    out = guide_vm.qsnap_ok("create", "live-one", "-m", "from the host")
    assert "via hmp" in out  # MONITOR_PORT → 127.0.0.1:PORT → the container's telnet:0.0.0.0:9999
    [snap] = json.loads(guide_vm.qsnap_ok("list", "--json"))["snapshots"]
    assert snap["name"] == "live-one" and snap["vm_state_size"] > 0 and snap["description"] == "from the host"
    # The same snapshot, seen by qsnap inside the container (same file through the bind mount).
    inside = json.loads(guide_vm.compose("exec", "-T", SERVICE, "qsnap", "list", "--json").out)
    assert [s["name"] for s in inside["snapshots"]] == ["live-one"]

    guide_vm.guest("printf v2 > /mnt/state.txt; sync")
    out = guide_vm.qsnap_ok("restore", "live-one", "--yes")
    assert "via hmp" in out
    assert guide_vm.guest("cat /mnt/state.txt") == "v1"  # the guest runs on from the saved state
    assert any(n.startswith("pre-restore-") for n in names(guide_vm))
    delete_all(guide_vm)
    assert names(guide_vm) == []


def test_backup_of_the_running_vm(guide_vm: Project) -> None:
    guide_vm.guest("printf backed-up > /mnt/state.txt; sync")
    guide_vm.qsnap_ok("create", "to-back-up")
    out = guide_vm.qsnap_ok("backup", "to-back-up", "backups/to-back-up.qcow2.gz")
    backup = guide_vm.directory / "backups" / "to-back-up.qcow2.gz"
    assert backup.is_file() and "to-back-up" in out
    verified = guide_vm.qsnap("verify", str(backup))
    assert verified.rc == 0, verified.err
    assert guide_vm.state()["Running"]  # the VM was never stopped
    delete_all(guide_vm)


def test_docker_stop_powers_off_then_a_disk_only_restore_goes_through_compose(guide_vm: Project) -> None:
    guide_vm.guest("printf clean > /mnt/state.txt; sync")
    guide_vm.compose("stop", SERVICE)
    state = guide_vm.state()
    assert not state["Running"] and state["ExitCode"] == 0  # powered off, not killed (137)
    assert "ACPI powerdown" in guide_vm.logs()
    check = subprocess.run(["qemu-img", "check", str(guide_vm.image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    # doctor on the stopped container
    report = json.loads(guide_vm.qsnap("--vm", VM, "doctor", "--json").out)
    container = next(c for c in report["checks"] if c["check"] == "container")
    assert container["status"] == "warn" and "is stopped" in container["found"]
    assert "docker-compose up -d" in container["fix"]

    assert "via qemu-img" in guide_vm.qsnap_ok("create", "clean-disk")  # offline: disk only
    guide_vm.compose("start", SERVICE)
    guide_vm.wait_ready()
    report = json.loads(guide_vm.qsnap("--vm", VM, "doctor", "--json").out)
    statuses = {c["check"]: c["status"] for c in report["checks"]}
    assert statuses["container"] == "ok" and statuses["container monitor"] == "ok"
    assert statuses["monitor"] == "ok" and statuses["monitor exposure"] == "ok"

    started = guide_vm.state()["StartedAt"]
    guide_vm.guest("printf dirty > /mnt/state.txt; sync")
    restored = guide_vm.qsnap("--vm", VM, "restore", "clean-disk", "--yes")
    assert restored.rc == 0, restored.err
    assert "via hmp+qemu-img" in restored.out and f"stopped ({VM})" in restored.err
    state = guide_vm.state()
    assert state["Running"] and state["StartedAt"] != started  # stopped, reverted, started again
    guide_vm.wait_ready()
    assert guide_vm.guest("cat /mnt/state.txt") == "clean"

    # compact through the same controller (issue 12): the service is stopped by docker-compose,
    # the image compacted with its snapshot kept, the service started again on the new file.
    refused = guide_vm.qsnap("compact")
    assert refused.rc == 8 and "--vm" in refused.err  # the VM holds the image, no controller named
    started, inode, kept = guide_vm.state()["StartedAt"], guide_vm.image.stat().st_ino, names(guide_vm)
    compacted = guide_vm.qsnap("--debug", "--vm", VM, "compact", "--json")
    assert compacted.rc == 0, compacted.err
    report = json.loads(compacted.out)
    assert report["vm_stopped"] == VM and report["snapshots"] == len(kept) and "clean-disk" in kept
    assert report["new_size"] <= report["file_size"]
    assert f"run: docker-compose stop --timeout 30 {SERVICE}" in compacted.err
    assert f"run: docker-compose start {SERVICE}" in compacted.err
    assert guide_vm.image.stat().st_ino != inode  # the compacted file took the image's place
    state = guide_vm.state()
    assert state["Running"] and state["StartedAt"] != started
    guide_vm.wait_ready()
    assert guide_vm.guest("cat /mnt/state.txt") == "clean"
    assert names(guide_vm) == kept  # clean-disk and the restore's safety snapshot
    delete_all(guide_vm)


def test_import_stops_and_restarts_the_service_with_compose_v2(guide_vm: Project, compose_v2_config: Path) -> None:
    # The other tests drive the guide's docker-compose (v1); this one the v2 plugin, chosen with
    # QSNAP_COMPOSE, on the same project.
    v2 = {"QSNAP_COMPOSE": "docker compose", "DOCKER_CONFIG": str(compose_v2_config)}
    guide_vm.guest("printf imported > /mnt/state.txt; sync")
    guide_vm.qsnap_ok("create", "for-import")
    guide_vm.qsnap_ok("backup", "for-import", "backups/for-import.qcow2")
    delete_all(guide_vm)
    guide_vm.guest("printf after > /mnt/state.txt; sync")
    started = guide_vm.state()["StartedAt"]

    refused = guide_vm.qsnap("import", "backups/for-import.qcow2", "--yes")
    assert refused.rc == 8 and "--vm compose:SERVICE" in refused.err  # no controller: refuses
    debug = guide_vm.qsnap("--debug", "--vm", VM, "import", "backups/for-import.qcow2", "--yes", env=v2)
    assert debug.rc == 0, debug.err
    assert "run: docker compose stop hurd-x86_64-qemu" in debug.err  # v2, as asked
    assert "run: docker compose start hurd-x86_64-qemu" in debug.err
    state = guide_vm.state()
    assert state["Running"] and state["StartedAt"] != started
    ready = guide_vm.qsnap("--vm", VM, "vm", "wait", "--timeout", "240", env=v2)
    assert ready.rc == 0, ready.err
    assert guide_vm.guest("cat /mnt/state.txt") == "imported"
    assert list(guide_vm.directory.glob(f"{IMAGE_NAME}.bak-*")), "the previous image is kept"


def test_vm_wait_on_the_container(guide_vm: Project) -> None:
    ready = json.loads(guide_vm.qsnap_ok("--vm", VM, "vm", "wait", "--json", "--timeout", "60"))
    assert ready["ready"] and "healthy" in ready["how"]
    # The SSH forward is published and QEMU accepts on it, but the test guest has no SSH
    # server: a connect alone must not count as ready.
    ssh = guide_vm.qsnap("--vm", VM, "vm", "wait", "--ssh", "--timeout", "3")
    assert ssh.rc == 12, ssh.err
    assert f"SSH banner on 127.0.0.1:{guide_vm.ssh_port}" in ssh.err
    # QSNAP_VM is the same as --vm (what the guide's scripts, which take no options, use).
    assert guide_vm.qsnap("vm", "wait", "--timeout", "60", env={"QSNAP_VM": VM}).rc == 0


def test_compose_v1_is_detected_and_a_missing_docker_is_exit_9(guide_vm: Project, tmp_path: Path) -> None:
    from qsnap.vm import COMPOSE_V1, compose_command

    assert compose_command(guide_vm.env) == COMPOSE_V1  # docker-compose first, the guide's spelling
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    no_docker = guide_vm.qsnap("--vm", VM, "vm", "wait", "--timeout", "5", env={"PATH": str(bin_dir)})
    assert no_docker.rc == 9
    assert "apt-get install docker.io docker-compose" in no_docker.err
