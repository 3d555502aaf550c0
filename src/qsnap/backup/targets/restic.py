"""restic repositories through the restic program (Debian's ``restic``).

qsnap streams a snapshot's raw guest data into ``restic backup --stdin`` (restic's
content-defined chunking then deduplicates across snapshots, images and days) and tags the
restic snapshot with what qsnap's manifest holds. The repository is passed as
``RESTIC_REPOSITORY`` in the environment (a ``rest:`` URL may hold credentials: never argv);
the password is restic's business (``RESTIC_PASSWORD``, ``RESTIC_PASSWORD_FILE``,
``RESTIC_PASSWORD_COMMAND``).

The sha256 and size of the stream are known only at its end, so they are added afterwards
with ``restic tag --add`` (which rewrites the snapshot under a new ID): a restic snapshot
tagged ``qsnap`` without ``qsnap-sha256=`` is an interrupted backup, as a file without its
manifest is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import quote, unquote

from qsnap.backup.targets import ResticLocation
from qsnap.core import proc
from qsnap.core.errors import LockBusy, ProcessError, QsnapError, TargetError, UsageError

RESTIC = "restic"
TAG = "qsnap"
PASSWORD_VARIABLES = ("RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD_COMMAND")


def encode_tag(key: str, value: object) -> str:
    """``qsnap-KEY=VALUE`` with the characters restic treats specially (``,``) percent-encoded."""
    return f"qsnap-{key}=" + quote(str(value), safe="/:@+-._~ ")


def decode_tags(tags: Iterable[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for tag in tags:
        if tag.startswith("qsnap-") and "=" in tag:
            key, _, value = tag[len("qsnap-"):].partition("=")
            found[key] = unquote(value)
    return found


@dataclass(frozen=True)
class ResticSnapshot:
    id: str
    short_id: str
    time: str
    paths: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return "sha256" in self.tags and "size" in self.tags

    @property
    def file_name(self) -> str:
        return self.paths[0].lstrip("/") if self.paths else ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "short_id": self.short_id, "time": self.time, "file": self.file_name,
                "complete": self.complete, "tags": dict(self.tags)}


def restic_error(exc: ProcessError, location: ResticLocation, what: str) -> QsnapError:
    """restic's failure as one sentence (password, missing repository, lock, network)."""
    text = exc.stderr.lower()
    repo = location.repository
    if "wrong password" in text or "no key found" in text:
        return TargetError(f"Wrong password for the restic repository {repo}.",
                           hint="check RESTIC_PASSWORD / RESTIC_PASSWORD_FILE / RESTIC_PASSWORD_COMMAND")
    if "already locked" in text or "unable to create lock" in text:
        return LockBusy(f"The restic repository {repo} is locked by another process; nothing was changed.",
                        hint="wait for it, or if no restic runs any more: restic unlock")
    if "is there a repository at the following location" in text or "repository does not exist" in text \
            or "unable to open config file" in text:
        return TargetError(f"There is no restic repository at {repo}.", hint=f"create it with: restic -r {repo} init")
    if "connection refused" in text or "no such host" in text or "dial tcp" in text or "i/o timeout" in text:
        return TargetError(f"Cannot reach the restic repository {repo} to {what}.",
                           hint="check that its server runs and the address is right")
    if "permission denied" in text or "access denied" in text or "403" in text:
        return TargetError(f"Access denied to the restic repository {repo} while trying to {what}.")
    if "password" in text:
        return TargetError(f"restic could not get the password of {repo}.",
                           hint="set RESTIC_PASSWORD, RESTIC_PASSWORD_FILE or RESTIC_PASSWORD_COMMAND")
    said = exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else f"exit code {exc.returncode}"
    return TargetError(f"restic failed to {what} in {repo}: {said}")


class Restic:
    """The restic program on one repository."""

    def __init__(self, location: ResticLocation, environ: dict[str, str] | None = None) -> None:
        self.location = location
        base = dict(os.environ if environ is None else environ)
        if not any(base.get(name) for name in PASSWORD_VARIABLES):
            raise TargetError(f"No password for the restic repository {location.repository}.",
                              hint="set RESTIC_PASSWORD, RESTIC_PASSWORD_FILE or RESTIC_PASSWORD_COMMAND")
        base["RESTIC_REPOSITORY"] = location.repository
        base.setdefault("RESTIC_PROGRESS_FPS", "0.2")
        self.env = base

    def run(self, *args: str, what: str) -> proc.Result:
        try:
            return proc.run([RESTIC, *args], env=self.env)
        except ProcessError as exc:
            raise restic_error(exc, self.location, what) from exc

    def snapshots(self) -> list[ResticSnapshot]:
        """qsnap's snapshots in the repository, oldest first."""
        out = self.run("snapshots", "--json", "--no-lock", "--tag", TAG, what="list the snapshots").stdout
        try:
            items = json.loads(out or "[]") or []
        except ValueError as exc:
            raise TargetError(f"restic snapshots printed something that is not JSON: {out[:80]!r}") from exc
        found = [ResticSnapshot(str(i["id"]), str(i.get("short_id", i["id"][:8])), str(i.get("time", "")),
                                tuple(i.get("paths") or ()), decode_tags(i.get("tags") or ()))
                 for i in items]
        return sorted(found, key=lambda s: s.time)

    def backup(self, name: str, tags: Iterable[str], chunks: Iterable[bytes | bytearray | memoryview]) -> str:
        """Stream CHUNKS into a new snapshot holding one file NAME; return its ID."""
        argv = [RESTIC, "backup", "--stdin", "--stdin-filename", name, "--json", "--tag", TAG]
        for tag in tags:
            argv += ["--tag", tag]
        try:
            result = proc.feed(argv, chunks, env=self.env)
        except ProcessError as exc:
            raise restic_error(exc, self.location, "back up") from exc
        for line in reversed(result.stdout.splitlines()):
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("message_type") == "summary":
                return str(message["snapshot_id"])
        raise TargetError(f"restic backup into {self.location.repository} printed no summary.")

    def add_tags(self, snapshot_id: str, tags: Iterable[str]) -> None:
        argv = ["tag"]
        for tag in tags:
            argv += ["--add", tag]
        self.run(*argv, snapshot_id, what="tag the snapshot")

    def forget(self, snapshot_id: str) -> None:
        self.run("forget", snapshot_id, what="remove the snapshot")

    def check(self) -> proc.Result:
        return self.run("check", what="check the repository")

    def dump(self, snapshot: ResticSnapshot) -> AbstractContextManager[IO[bytes]]:
        """The file of SNAPSHOT as a stream (``restic dump``); errors are raised on leaving."""
        return _Dump(self, snapshot)

    def resolve(self, selector: str | None) -> ResticSnapshot:
        """A qsnap snapshot by restic ID (or its prefix), by qsnap snapshot name, or by a tag
        ``qsnap-KEY=VALUE`` (e.g. ``qsnap-date=2026-12-01T10:00:00Z``); the newest that matches."""
        snapshots = self.snapshots()
        if selector is None:
            raise UsageError("Which backup? Pass --snapshot ID_OR_NAME (see qsnap backups list "
                             f"restic:{self.location.repository}).")
        by_id = [s for s in snapshots if s.id.startswith(selector) or s.short_id == selector]
        chosen = by_id or [s for s in snapshots if selector in (s.tags.get("snapshot"), s.file_name)]
        if not chosen and "=" in selector:
            key, _, value = selector.partition("=")
            chosen = [s for s in snapshots if s.tags.get(key.removeprefix("qsnap-")) == value]
        if not chosen:
            raise TargetError(f"No qsnap backup {selector!r} in the restic repository {self.location.repository}.")
        return chosen[-1]


class _Dump(AbstractContextManager[IO[bytes]]):
    def __init__(self, restic: Restic, snapshot: ResticSnapshot) -> None:
        self.restic = restic
        self.manager = proc.reading([RESTIC, "dump", "--no-lock", snapshot.id, "/" + snapshot.file_name],
                                    env=restic.env)

    def __enter__(self) -> IO[bytes]:
        return self.manager.__enter__()

    def __exit__(self, *exc: Any) -> bool | None:
        try:
            return self.manager.__exit__(*exc)
        except ProcessError as error:
            raise restic_error(error, self.restic.location, "read the backup") from error


def read_blocks(handle: IO[bytes], block: int) -> Iterator[bytes]:
    """HANDLE's bytes in pieces of exactly BLOCK bytes (the last one may be shorter)."""
    pending = bytearray()
    while True:
        data = handle.read(block - len(pending))
        if not data:
            break
        pending += data
        if len(pending) == block:
            yield bytes(pending)
            pending = bytearray()
    if pending:
        yield bytes(pending)
