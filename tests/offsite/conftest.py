"""Real servers for the off-site backup tests, on free 127.0.0.1 ports, stopped by PID.

- S3: moto's standalone server (``moto_server`` from PyPI's ``moto[server]``). Why this one: it
  is a real HTTP endpoint implementing the S3 API (multipart uploads, ranged GETs, listing of
  unfinished uploads, IAM-checked credentials when asked to), it installs from PyPI into the
  venv in seconds and starts in about a second; MinIO or Ceph are not packaged for Debian or
  PyPI and cannot be downloaded here.
- :class:`S3Proxy`: a small HTTP proxy in front of moto that can reject one part or go away
  mid-upload (the faults a real network and a real provider produce; moto cannot be told to).
- restic: Debian's ``restic`` on a local repository, and ``rclone serve restic`` (Debian's
  ``rclone``) as a REST server over HTTP.

Credentials reach qsnap through the environment only (``s3_env`` / ``restic_env``), as in real use.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from qsnap_testlib import VENV_BIN, free_port, kill_popen

# Test modules import the helpers below as ``from offsite_testlib import ...`` (``import conftest``
# is ambiguous: several directories have one).
sys.modules.setdefault("offsite_testlib", sys.modules[__name__])

MOTO = VENV_BIN / "moto_server"


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.args}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise AssertionError(f"server on port {port} did not start: {proc.args}")


class Moto:
    """A moto S3 server process."""

    def __init__(self, log: Path, extra_env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **(extra_env or {})}
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            wait_port(self.port, self.proc)
        except BaseException:
            self.stop()
            raise

    def env(self, **extra: str) -> dict[str, str]:
        return s3_environ(self.url, **extra)

    def client(self, **extra: str) -> Any:
        import boto3

        env = self.env(**extra)
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def stop(self) -> None:
        kill_popen(self.proc)
        self.log.close()


def s3_environ(url: str, **extra: str) -> dict[str, str]:
    """The AWS configuration chain for a test endpoint (no developer ~/.aws can leak in)."""
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "2", "AWS_CONFIG_FILE": "/dev/null",
           "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    server = Moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(moto: Moto) -> str:
    name = f"qsnap-{uuid.uuid4().hex[:12]}"
    moto.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_env(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The AWS variables for moto, also set in os.environ (boto3 in in-process runs reads them)."""
    env = moto.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


# ------------------------------------------------------------------ a faulty network in front of moto

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class S3Proxy:
    """Forward HTTP to moto; ``reject_part=N`` answers UploadPart N with 403 AccessDenied;
    ``vanish_after_parts=N`` lets N parts through, then drops every connection (the endpoint is gone);
    ``part_delay=S`` holds every part S seconds (a slow link); ``first_part`` is set when a part arrives."""

    def __init__(self, upstream_port: int, *, reject_part: int | None = None,
                 vanish_after_parts: int | None = None, part_delay: float = 0.0) -> None:
        self.upstream_port = upstream_port
        self.reject_part = reject_part
        self.vanish_after_parts = vanish_after_parts
        self.part_delay = part_delay
        self.first_part = threading.Event()
        self.parts_seen = 0
        self.gone = False
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(data)
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                is_part = "partNumber=" in self.path and self.command == "PUT"
                with proxy.lock:
                    if proxy.gone:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if is_part:
                        proxy.parts_seen += 1
                        number = int(self.path.split("partNumber=")[1].split("&")[0])
                        if proxy.vanish_after_parts is not None and proxy.parts_seen > proxy.vanish_after_parts:
                            proxy.gone = True
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        if proxy.reject_part == number:
                            text = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                                    b"<Message>Part rejected by policy</Message></Error>")
                            self.send_response(403)
                            self.send_header("Content-Type", "application/xml")
                            self.send_header("Content-Length", str(len(text)))
                            self.end_headers()
                            self.wfile.write(text)
                            return
                if is_part:
                    proxy.first_part.set()
                    time.sleep(proxy.part_delay)
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status, reply.reason)
                for key, value in reply.getheaders():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_proxy(moto: Moto) -> Iterator[Any]:
    proxies: list[S3Proxy] = []

    def make(**faults: Any) -> S3Proxy:
        proxies.append(S3Proxy(moto.port, **faults))
        return proxies[-1]

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()


# ------------------------------------------------------------------ restic

@pytest.fixture
def restic_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    env = {"RESTIC_PASSWORD": "correct horse battery staple", "RESTIC_CACHE_DIR": str(tmp_path / "restic-cache")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD_COMMAND", "RESTIC_REPOSITORY"):
        monkeypatch.delenv(key, raising=False)
    return env


def restic(repo: str, *args: str, env: Mapping[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["restic", "-r", repo, *args], env={**os.environ, **env}, capture_output=True, text=True,
                          check=check, stdin=subprocess.DEVNULL, timeout=120)


@pytest.fixture
def restic_repo(tmp_path: Path, restic_env: dict[str, str]) -> str:
    repo = str(tmp_path / "repo")
    restic(repo, "init", env=restic_env)
    return repo


@pytest.fixture
def rest_server(tmp_path: Path, restic_env: dict[str, str]) -> Iterator[str]:
    """``rclone serve restic`` on a free port; yields the restic repository (rest:http://...)."""
    port = free_port()
    root = tmp_path / "rest-root"
    root.mkdir()
    log = open(tmp_path / "rclone.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(["rclone", "serve", "restic", "--addr", f"127.0.0.1:{port}", str(root)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "RCLONE_CONFIG": str(tmp_path / "rclone.conf")})
    try:
        wait_port(port, proc)
        repo = f"rest:http://127.0.0.1:{port}/"
        restic(repo, "init", env=restic_env)
        yield repo
    finally:
        kill_popen(proc)
        log.close()


# ------------------------------------------------------------------ images

def random_image(tmp_path: Path, size: str = "32M", data_mib: int = 20, name: str = "disk.qcow2") -> Path:
    """A qcow2 image with DATA_MIB MiB of incompressible data (so a backup has several 8 MiB
    parts), a 1 MiB 0x11 pattern, and snapshot 'base' of that state."""
    from qsnap_testlib import qemu_img, qemu_io

    path = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", str(path), size)
    rnd = tmp_path / f"{name}.rnd"
    rnd.write_bytes(os.urandom(data_mib << 20))
    qemu_io(path, f"write -s {rnd} 4M {data_mib}M")
    rnd.unlink()
    qemu_io(path, "write -P 0x11 0 1M")
    qemu_img("snapshot", "-c", "base", str(path))
    qemu_io(path, "write -P 0x22 0 64k")
    return path
