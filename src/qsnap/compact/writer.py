"""Writes through QEMU's own tools: ``qemu-img create`` / ``snapshot`` and ``qemu-io``.

Guest data goes in with qemu-io's ``write -s FILE OFF LEN`` (the write buffer is filled from
FILE), zeros with ``write -z -u`` (version 3: the zero flag, unmapping the cluster) or
``discard`` (version 2), compressed clusters with ``write -c -s``, VM state with
``write -b -s`` (qemu-io: "write to the VM state rather than the virtual disk"). Commands are
batched: up to 64 MiB of data (or 1,000 commands) per qemu-io process, each data command's
bytes staged in an anonymous memory file (memfd, which qemu-io opens as /proc/PID/fd/N and the
kernel frees when qsnap closes it or dies; where there is no memfd, a file in the work
directory), released once the batch is done. So memory and temporary space stay bounded
whatever the image size.
"""

from __future__ import annotations

import os
import queue
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from qsnap.backup.partial import _sync_file_range
from qsnap.compact.plan import OP_COMPRESSED, OP_DATA, OP_UNMAP, OP_ZERO, Op
from qsnap.core import proc
from qsnap.core.errors import ProcessError, QsnapError
from qsnap.engines import qemu_img

QEMU_IO = "qemu-io"
BATCH_BYTES = 64 << 20
BATCH_COMMANDS = 1000
BATCH_FILES = 200  # staged files open at once (file descriptors)


class WriteFailed(QsnapError):
    """QEMU refused a write while compacting."""

    exit_code = 1


def image_opts(path: Path | str) -> str:
    """PATH as qcow2 (never probed) without flushes: the partial image is fsynced once, at the
    end, and thrown away if anything fails before that (a flush per process cost 0.7 s here)."""
    return qemu_img.image_opts(path) + ",cache.no-flush=on"


def qemu_io_argv(path: Path | str, commands: Sequence[str]) -> list[str]:
    """qemu-io on PATH running COMMANDS in order."""
    argv = [QEMU_IO, "--image-opts"]
    for command in commands:
        argv += ["-c", command]
    return [*argv, image_opts(path)]


def snapshot_argv(path: Path | str, flag: str, argument: str) -> list[str]:
    """qemu-img snapshot FLAG ARGUMENT on PATH (-c NAME, -a ID, -d NAME)."""
    return [qemu_img.QEMU_IMG, "snapshot", "--image-opts", flag, argument, image_opts(path)]


def create_argv(path: Path | str, size: int, options: Sequence[str], backing: tuple[str, str] | None) -> list[str]:
    argv = [qemu_img.QEMU_IMG, "create", "-q", "-f", "qcow2"]
    for option in options:
        argv += ["-o", option]
    if backing is not None:
        argv += ["-b", backing[0], "-F", backing[1]]
    return [*argv, str(path), str(size)]


class QemuWriter:
    """The new image, written only by QEMU's tools."""

    def __init__(self, path: Path, workdir: Path, *, v3: bool = True) -> None:
        self.path = path
        self.v3 = v3
        self.workdir = workdir
        self._commands: list[str] = []
        self._files: list[Path] = []
        self._fds: list[int] = []
        self._memfd = hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")
        self._spare: queue.SimpleQueue[int] = queue.SimpleQueue()  # memfds of finished batches
        self._bytes = 0
        self._serial = 0
        self.processes = 0
        # one qemu-io runs in the background while the next batch is read and staged
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qsnap-qemu-io")
        self._running: Future[None] | None = None
        # start the kernel's writeback after each batch, so the final fsync has little left to do
        # (the backup's sync_file_range helper)
        self._sync_range = _sync_file_range()
        self._sync_fd = -1

    def create(self, size: int, options: Sequence[str], backing: tuple[str, str] | None) -> None:
        self.workdir.mkdir(mode=0o700, exist_ok=True)
        try:
            proc.run(create_argv(self.path, size, options, backing))
        except ProcessError as exc:
            raise qemu_img.translate_error(exc, self.path) from exc
        self.processes += 1

    # ---------------------------------------------------------------- guest data and VM state

    def write(self, ops: Iterable[Op]) -> None:
        """Queue OPS (materialized: data ops carry their bytes); batches run as they fill."""
        for op in ops:
            if op.kind == OP_ZERO:
                self._queue(f"write -q -z -u {op.offset} {op.length}")
            elif op.kind == OP_UNMAP:
                self._queue(f"discard -q {op.offset} {op.length}")
            elif op.kind in (OP_DATA, OP_COMPRESSED):
                assert op.data is not None
                flag = ""
                if op.kind == OP_COMPRESSED:
                    # "Compression can't overwrite anything" (qcow2_alloc_compressed_cluster_offset):
                    # drop this state's reference to the cluster first
                    self._queue(f"write -q -z -u {op.offset} {op.length}" if self.v3 else
                                f"discard -q {op.offset} {op.length}")
                    flag = "-c "
                self._queue(f"write -q {flag}-s {self._stage(op.data)} {op.offset} {op.length}", len(op.data))
            else:  # pragma: no cover
                raise ValueError(op.kind)

    def write_vm_state(self, offset: int, data: bytes | memoryview) -> None:
        """DATA into the VM-state area at OFFSET (both multiples of 512, qemu-io's rule)."""
        self._queue(f"write -q -b -s {self._stage(data)} {offset} {len(data)}", len(data))

    def _stage(self, data: bytes | memoryview) -> str:
        self._serial += 1
        if self._memfd:
            try:  # a memfd a finished batch gave back: its pages are already there
                fd = self._spare.get_nowait()
            except queue.Empty:
                fd = os.memfd_create(f"qsnap-compact-{self._serial}", os.MFD_CLOEXEC)
            self._fds.append(fd)
            name = f"/proc/{os.getpid()}/fd/{fd}"
        else:
            path = self.workdir / f"{self._serial:08d}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self._files.append(path)
            name = str(path)
        try:
            view = memoryview(data)
            pos = 0
            while view:  # from offset 0: qemu-io reads the first len(data) bytes of the file
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
        finally:
            if not self._memfd:
                os.close(fd)
        return name

    def _queue(self, command: str, size: int = 0) -> None:
        self._commands.append(command)
        self._bytes += size
        if self._bytes >= BATCH_BYTES or len(self._commands) >= BATCH_COMMANDS or \
                len(self._fds) + len(self._files) >= BATCH_FILES:
            self.flush()

    def flush(self) -> None:
        """Start the queued commands in one qemu-io process, in the background (after the
        previous one finished: one process at a time opens the image)."""
        if not self._commands:
            return
        self._wait()
        commands, self._commands, self._bytes = self._commands, [], 0
        files, self._files = self._files, []
        fds, self._fds = self._fds, []
        self._running = self._pool.submit(self._run_batch, commands, files, fds)

    def drain(self) -> None:
        """Run what is queued and wait until every qemu-io has finished."""
        self.flush()
        self._wait()

    def _wait(self) -> None:
        running, self._running = self._running, None
        if running is not None:
            running.result()

    def _run_batch(self, commands: list[str], files: list[Path], fds: list[int]) -> None:
        try:
            result = proc.run(qemu_io_argv(self.path, commands), check=False)
        finally:
            _release(files, [])
            for fd in fds:
                self._spare.put(fd)
        self.processes += 1
        self._start_writeback()
        # qemu-io exits 0 even when a -c command fails: its error text is the evidence
        said = (result.stdout + result.stderr).strip()
        if result.returncode != 0 or said:
            if "No space left" in said:
                raise OSError(28, "No space left on device")
            first = said.splitlines()[0] if said else f"exit {result.returncode}"
            raise WriteFailed(f"qemu-io could not write the new image {self.path}: {first}.")

    # ---------------------------------------------------------------- snapshots

    def snapshot_create(self, name: str) -> None:
        self.drain()
        self._img(snapshot_argv(self.path, "-c", name))

    def snapshot_apply(self, snapshot_id: str) -> None:
        self.drain()
        self._img(snapshot_argv(self.path, "-a", snapshot_id))

    def snapshot_delete(self, name: str) -> None:
        self.drain()
        self._img(snapshot_argv(self.path, "-d", name))

    def _img(self, argv: list[str]) -> None:
        try:
            proc.run(argv)
        except ProcessError as exc:
            if "No space left" in exc.stderr:
                raise OSError(28, "No space left on device") from exc
            raise qemu_img.translate_error(exc, self.path) from exc
        self.processes += 1

    def _start_writeback(self) -> None:
        if self._sync_range is None:
            return
        if self._sync_fd < 0:
            try:
                self._sync_fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            except OSError:
                self._sync_range = None
                return
        self._sync_range(self._sync_fd, 0, 0)  # 0, 0: the whole file; does not wait

    def cleanup(self) -> None:
        """Wait for a running qemu-io (never leave one writing), release everything staged."""
        try:
            self._wait()
        except BaseException:
            pass
        finally:
            self._pool.shutdown(wait=True)
            if self._sync_fd >= 0:
                os.close(self._sync_fd)
                self._sync_fd = -1
            while True:
                try:
                    self._fds.append(self._spare.get_nowait())
                except queue.Empty:
                    break
            _release(self._files, self._fds)
            self._files, self._fds = [], []
            shutil.rmtree(self.workdir, ignore_errors=True)


def _release(files: list[Path], fds: list[int]) -> None:
    for f in files:
        f.unlink(missing_ok=True)
    for fd in fds:
        os.close(fd)
