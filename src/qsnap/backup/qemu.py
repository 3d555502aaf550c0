"""The qemu-img calls the backup subsystem needs (argv builders + runners with progress).

Only commands that READ the source image get ``-U``; outputs are never opened with it.
Secrets (LUKS passphrases) reach QEMU through a 0600 file in a private directory, never argv.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from qsnap.core import proc
from qsnap.core.errors import ProcessError, QsnapError, UsageError
from qsnap.engines import qemu_img

QEMU_IMG = "qemu-img"
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


@contextlib.contextmanager
def secret_file(passphrase: str) -> Iterator[Path]:
    """A 0600 file holding PASSPHRASE in a 0700 directory, removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="qsnap-secret-"))
    path = directory / "passphrase"
    if "," in str(path):
        shutil.rmtree(directory, ignore_errors=True)
        raise UsageError(f"Temporary directory {directory} contains a comma; set TMPDIR elsewhere.")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(passphrase.encode())
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def secret_object(path: Path, secret_id: str = "sec0") -> list[str]:
    return ["--object", f"secret,id={secret_id},file={path},format=raw"]


def convert_argv(
    source: Path,
    snapshot_id: str | None,
    output: Path,
    *,
    output_format: str = "qcow2",
    source_format: str = "qcow2",
    compress: bool = False,
    options: tuple[str, ...] = (),
    force_share: bool = True,
    secret: Path | None = None,
    source_secret: Path | None = None,
) -> list[str]:
    """qemu-img convert SOURCE[@snapshot] -> OUTPUT, with progress output on stdout."""
    argv = [QEMU_IMG, "convert", "-p"]
    if secret is not None:
        argv += secret_object(secret, "sec0")
    if source_secret is not None:
        argv += secret_object(source_secret, "sec1")
        argv += ["--image-opts"]
    else:
        argv += ["-f", source_format]
    if force_share:
        argv.append("-U")
    if snapshot_id is not None:
        argv += ["-l", f"snapshot.id={snapshot_id}"]
    argv += ["-O", output_format]
    if compress:
        argv.append("-c")
    for option in options:
        argv += ["-o", option]
    src = f"driver=qcow2,file.filename={source},encrypt.key-secret=sec1" if source_secret else str(source)
    return [*argv, src, str(output)]


#: QEMU 7.2's LUKS PBKDF2 benchmark fails at random when its first timing round rounds to
#: 0 ms of CPU ("Unable to get accurate CPU usage", crypto/pbkdf.c); later QEMUs retry it.
_FLAKY_PBKDF = "Unable to get accurate CPU usage"


def run_with_progress(
    argv: list[str], source: Path, total: int, progress: Callable[[int, int], None] | None
) -> None:
    """Run a qemu-img command that prints ``(NN.NN/100%)``; map its percent onto TOTAL bytes.

    On any exception (KeyboardInterrupt from the callback included) the child is killed by PID
    and waited for before the exception propagates. QEMU 7.2's flaky LUKS benchmark error is
    retried (qemu-img writes nothing before it: the output is created only after the key setup).
    """
    for attempt in range(3):
        try:
            _run_once(argv, source, total, progress)
            return
        except ProcessError as exc:
            if _FLAKY_PBKDF not in exc.stderr or attempt == 2:
                raise


def _run_once(
    argv: list[str], source: Path, total: int, progress: Callable[[int, int], None] | None
) -> None:
    child = proc.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    try:
        last = -1
        while True:
            chunk = os.read(child.stdout.fileno(), 4096)
            if not chunk:
                break
            matches = _PROGRESS.findall(chunk)
            if matches and progress is not None:
                done = int(float(matches[-1]) / 100 * total)
                if done != last:
                    last = done
                    progress(done, total)
        stderr = child.stderr.read().decode("utf-8", "replace")
        code = child.wait()
    except BaseException:
        child.kill()
        child.wait()
        raise
    finally:
        child.stdout.close()
        child.stderr.close()
    if code != 0:
        error = ProcessError(argv, code, "", stderr)
        if _FLAKY_PBKDF in stderr:
            raise error
        raise qemu_img.translate_error(error, source) from error


def check_json(path: Path, *, secret: Path | None = None, force_share: bool = False) -> dict[str, object]:
    """`qemu-img check` as a dict; qemu-img's exit 2/3 (corrupt/leaks) still return the JSON."""
    argv = [QEMU_IMG, "check", "--output=json"]
    if secret is not None:
        argv += [*secret_object(secret), "--image-opts"]
    else:
        argv += ["-f", "qcow2"]
    if force_share:
        argv.append("-U")
    target = f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0" if secret else str(path)
    result = proc.run([*argv, target], check=False)
    try:
        data = json.loads(result.stdout)
    except ValueError:
        data = {"check-errors": 1, "error": result.stderr.strip() or f"exit code {result.returncode}"}
    if not isinstance(data, dict):
        data = {"check-errors": 1, "error": "no JSON"}
    data.setdefault("exit-code", result.returncode)
    if result.returncode not in (0, 2, 3):
        data["check-errors"] = max(1, int(data.get("check-errors", 0) or 0))
        data["error"] = result.stderr.strip()
    return data


def info_json(path: Path, *, secret: Path | None = None, backing_chain: bool = False) -> dict[str, object]:
    argv = [QEMU_IMG, "info", "--output=json", "-U"]
    if backing_chain:
        argv.append("--backing-chain")
    if secret is not None:
        argv += [*secret_object(secret), "--image-opts",
                 f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"]
    else:
        argv += ["-f", "qcow2", str(path)]
    try:
        result = proc.run(argv)
    except ProcessError as exc:
        raise qemu_img.translate_error(exc, path) from exc
    data = json.loads(result.stdout)
    return data[0] if isinstance(data, list) else data  # type: ignore[no-any-return]


def measure_required(source: Path, snapshot_id: str | None, output_format: str = "qcow2") -> int:
    argv = [QEMU_IMG, "measure", "--output=json", "-f", "qcow2", "-U", "-O", output_format]
    if snapshot_id is not None:
        argv += ["-l", f"snapshot.id={snapshot_id}"]
    try:
        result = proc.run([*argv, str(source)])
    except ProcessError as exc:
        raise qemu_img.translate_error(exc, source) from exc
    return int(json.loads(result.stdout)["required"])


def zstd_cluster_compression_supported() -> bool:
    """Whether this qemu-img was built with zstd cluster compression."""
    with tempfile.TemporaryDirectory(prefix="qsnap-probe-") as tmp:
        result = proc.run(
            [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", f"{tmp}/p.qcow2", "1M"],
            check=False,
        )
    return result.returncode == 0


def raise_for(exc: QsnapError) -> None:  # pragma: no cover - typing helper
    raise exc
