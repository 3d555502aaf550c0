"""Where a backup lives: a local file, an S3 object (``s3://BUCKET/KEY``) or a restic
repository (``restic:REPOSITORY``), behind one small interface so that formats and
verification never know where the bytes go.

- :class:`Sink`: a writable byte stream with atomic :meth:`Sink.commit` and :meth:`Sink.abort`
  (local: ``.partial`` + fsync + rename; S3: a multipart upload completed or aborted).
- :class:`Source`: a readable byte stream (local file; S3 ranged GETs in parallel).
- listing of what qsnap stored there (manifests), for ``qsnap backups list``, incremental base
  discovery and ``archive --keep-days``.

Only the location syntax lives here (no third-party import): the S3 and restic modules are
imported when a command actually uses such a target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qsnap.core.errors import UsageError

S3_SCHEME = "s3://"
RESTIC_SCHEME = "restic:"


class Sink(Protocol):
    """Bytes go in with :meth:`write`; nothing is visible at the target until :meth:`commit`."""

    size: int

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class Source(Protocol):
    """A backup's bytes, read front to back."""

    size: int

    def read(self, n: int, /) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # may be "" or end with "/" (a prefix)

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def prefix(self) -> str:
        """The "directory" of the key (with its trailing slash), or the key itself if it is one."""
        if not self.key or self.key.endswith("/"):
            return self.key
        return self.key.rsplit("/", 1)[0] + "/" if "/" in self.key else ""

    def child(self, name: str) -> S3Location:
        return S3Location(self.bucket, self.prefix + name)

    @property
    def manifest_key(self) -> str:
        return self.key + ".json"


@dataclass(frozen=True)
class ResticLocation:
    repository: str  # restic's own syntax: a path, sftp:, rest:, s3: ...

    def __str__(self) -> str:
        return f"{RESTIC_SCHEME}{self.repository}"


Location = Path | S3Location | ResticLocation


def is_remote(text: str | Any) -> bool:
    return isinstance(text, str) and (text.startswith(S3_SCHEME) or text.startswith(RESTIC_SCHEME))


def parse_location(text: str) -> Location:
    """``s3://BUCKET/KEY`` -> S3Location, ``restic:REPO`` -> ResticLocation, anything else a Path."""
    if text.startswith(S3_SCHEME):
        rest = text[len(S3_SCHEME):]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise UsageError(f"{text!r} names no bucket: use s3://BUCKET/KEY.")
        return S3Location(bucket, key)
    if text.startswith(RESTIC_SCHEME):
        repo = text[len(RESTIC_SCHEME):]
        if not repo:
            raise UsageError(f"{text!r} names no repository: use restic:REPOSITORY (a path, rest:URL, sftp:...).")
        return ResticLocation(repo)
    return Path(text)
