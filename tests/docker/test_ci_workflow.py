"""The guide's Workflow 3 (CI) end to end against the containerized VM, in the README's
recommended form: `sleep 120` replaced by `qsnap vm wait`, MONITOR_PORT and QSNAP_VM exported.

The test guest has no SSH server, so the script's two ssh/scp lines (run the tests, fetch the
results) run the same over the guest's serial console (tests/docker/guest_exec.py); every other
line is the README's, verbatim.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from qsnap_testlib import ROOT, VENV_BIN

from .conftest import COMMAND_TIMEOUT, SERVICE, ProjectFactory


def readme_ci_script() -> str:
    """The CI script of the README's section "The guide's Docker setup"."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The guide's Docker setup"):]
    match = re.search(r"```bash\n(#!/bin/bash\n# ci-test.sh.*?)```", section, re.S)
    assert match, "the README's Docker section has no ci-test.sh script"
    return match.group(1)


def test_the_guides_ci_workflow_with_vm_wait(project_factory: ProjectFactory) -> None:
    project = project_factory()
    script = readme_ci_script()
    assert "sleep 120" not in script and "qsnap vm wait" in script
    ssh = "ssh -p 2222 root@localhost '/mnt/host/run-tests.sh'"
    scp = "scp -P 2222 root@localhost:/test-results.xml ./"
    assert ssh in script and scp in script
    helper = f"{sys.executable} {Path(__file__).with_name('guest_exec.py')} $SERIAL_PORT"
    script = script.replace(ssh, f"{helper} 'cat /mnt/hello.txt > /mnt/results.txt'")
    script = script.replace(scp, f"{helper} 'cat /mnt/results.txt' > test-results.xml")
    script = script.replace("export MONITOR_PORT=9999", f"export MONITOR_PORT={project.monitor_port}")
    (project.directory / "ci-test.sh").write_text(script)
    (project.directory / "scripts").mkdir()
    (project.directory / "scripts" / "manage-snapshots.sh").symlink_to(ROOT / "scripts" / "manage-snapshots.sh")

    # The baseline the pipeline starts from: taken once, with the VM stopped (disk only).
    project.qsnap_ok("create", "ci-baseline")
    env = {**project.env, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "ci-test.sh"], cwd=project.directory, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT * 2, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, f"ci-test.sh exited {done.returncode}:\n{done.stdout}\n{done.stderr}"

    assert (project.directory / "test-results.xml").read_text() == "hello from the qsnap test guest\n"
    snapshots = json.loads(project.qsnap_ok("list", "--json"))["snapshots"]
    names = [s["name"] for s in snapshots]
    assert names[0] == "ci-baseline"
    [success] = [s for s in snapshots if s["name"].startswith("ci-test-")]
    assert success["vm_state_size"] > 0  # taken live, through the container's monitor
    assert sum(n.startswith("pre-restore-") for n in names) == 2  # one per restore: nothing lost
    assert "Snapshot 'ci-baseline' restored successfully" in done.stdout  # the guide's messages
    assert project.container_ids() == []  # docker-compose down removed it
    assert SERVICE in (project.directory / "docker-compose.yml").read_text()
