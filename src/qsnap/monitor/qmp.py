"""QMP through the ``qemu.qmp`` library: a small synchronous session with deadlines, and jobs.

``qemu.qmp`` is imported lazily (it pulls in asyncio machinery). The session owns a private
event loop, so it works from plain synchronous code. Every call has a deadline; library
errors become :class:`MonitorError` (exit 12) carrying the command and QEMU's reply.

Jobs (``qapi/job.json``): snapshot-save/load/delete return ``{}`` at once and run as jobs.
Success goes created → running → waiting → pending → concluded; failure goes
created → running → aborting → concluded, and the error text is ONLY in
``query-jobs[].error``, so it is read before ``job-dismiss``. A concluded job stays until
dismissed and its id cannot be reused: ids are unique (``qsnap-<verb>-<pid>-<n>``) and stale
concluded ``qsnap-`` jobs are dismissed before a new one starts.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

from qsnap.core.errors import MonitorError

JOB_PREFIX = "qsnap-"
_T = TypeVar("_T")
_counter = itertools.count(1)


def new_job_id(verb: str) -> str:
    return f"{JOB_PREFIX}{verb}-{os.getpid()}-{next(_counter)}"


class QmpSession:
    """A negotiated QMP connection over an already connected socket."""

    def __init__(self, sock: socket.socket, description: str, *, timeout: float = 10.0) -> None:
        from qemu.qmp import EventListener, QMPClient

        self.description = description
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(f"qsnap:{description}")
        self._jobs = EventListener(("JOB_STATUS_CHANGE",))
        self._client.register_listener(self._jobs)
        self.greeting: dict[str, Any] = {}
        try:
            self._run(self._client.connect(sock), timeout, "the QMP handshake")
        except BaseException:
            self._loop.close()
            sock.close()
            raise
        greeting = self._client.greeting
        if greeting is not None:
            self.greeting = dict(greeting._asdict())

    @property
    def version(self) -> str:
        try:
            qemu = self.greeting["QMP"]["version"]["qemu"]
            return f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}"
        except (KeyError, TypeError):
            return ""

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float, what: str) -> _T:
        from qemu.qmp import ExecInterruptedError, ExecuteError, QMPError

        if self._loop.is_closed():
            coro.close()
            raise MonitorError(f"The connection to the QEMU monitor at {self.description} is closed.")
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except TimeoutError as exc:
            raise MonitorError(
                f"The QEMU monitor at {self.description} did not answer {what} within {timeout:g} s.",
                hint="the VM may be hung; the command may or may not have run",
            ) from exc
        except ExecuteError as exc:
            raise MonitorError(
                f"QEMU refused {what}: {exc}.", hint=f"QMP error class {exc.error_class}"
            ) from exc
        except (ExecInterruptedError, EOFError, ConnectionError) as exc:
            raise MonitorError(
                f"The QEMU monitor at {self.description} went away during {what}.",
                hint="QEMU may have exited; the command may or may not have run",
            ) from exc
        except (QMPError, OSError) as exc:
            raise MonitorError(
                f"The QEMU monitor at {self.description} failed during {what}: {exc}."
            ) from exc

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run one QMP command; its 'return' value, or MonitorError with QEMU's error text."""
        return self._run(
            self._client.execute(command, arguments),
            self.timeout if timeout is None else timeout,
            f"'{command}'",
        )

    def human(self, command_line: str, *, timeout: float | None = None) -> str:
        """``human-monitor-command``: HMP text through QMP (not injectable: it is one JSON string)."""
        result = self.execute("human-monitor-command", {"command-line": command_line}, timeout=timeout)
        return str(result)

    # ------------------------------------------------------------ jobs

    def query_jobs(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.execute("query-jobs"))

    def dismiss_stale_jobs(self) -> list[str]:
        """Dismiss concluded jobs a previous qsnap left behind; returns their ids."""
        dismissed = []
        for job in self.query_jobs():
            if str(job.get("id", "")).startswith(JOB_PREFIX) and job.get("status") == "concluded":
                self.execute("job-dismiss", {"id": job["id"]})
                dismissed.append(str(job["id"]))
        return dismissed

    def run_job(self, command: str, arguments: dict[str, Any], *, timeout: float) -> str | None:
        """Start job COMMAND, wait until it concludes, dismiss it; its error text or None."""
        job_id = new_job_id(command.replace("snapshot-", ""))
        self._jobs.clear()
        self.execute(command, {"job-id": job_id, **arguments})
        status = self._run(self._wait_concluded(job_id), timeout, f"the {command} job {job_id}")
        error: str | None = None
        for job in self.query_jobs():
            if job.get("id") == job_id:
                error = job.get("error")
                status = job.get("status", status)
        if status == "concluded":
            self.execute("job-dismiss", {"id": job_id})
        return error

    async def _wait_concluded(self, job_id: str) -> str:
        while True:
            jobs = cast(list[dict[str, Any]], await self._client.execute("query-jobs"))
            for job in jobs:
                if job.get("id") == job_id and job.get("status") in ("concluded", "null"):
                    return str(job["status"])
            if not any(job.get("id") == job_id for job in jobs):
                return "null"  # already gone (auto-dismiss)
            # Sleep until the next status change of any job (or poll again after 0.5 s).
            while True:
                try:
                    event = await asyncio.wait_for(self._jobs.get(), 0.5)
                except TimeoutError:
                    break
                data = cast(dict[str, Any], event.get("data", {}))
                if data.get("id") == job_id and data.get("status") in ("concluded", "null"):
                    return str(data["status"])

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 2.0))
        except Exception:
            pass
        finally:
            self._loop.close()
