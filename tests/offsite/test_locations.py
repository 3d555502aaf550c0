"""Pure pieces of the off-site targets, without servers: location syntax, restic tags, the
error sentences for restic's own messages (captured from restic 0.14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qsnap.backup.targets import ResticLocation, S3Location, is_remote, parse_location
from qsnap.backup.targets.restic import decode_tags, encode_tag, restic_error
from qsnap.core.errors import LockBusy, ProcessError, TargetError, UsageError


def test_locations_parse() -> None:
    assert parse_location("s3://bkt/a/b.qcow2.zst") == S3Location("bkt", "a/b.qcow2.zst")
    loc = parse_location("s3://bkt/a/b.qcow2.zst")
    assert isinstance(loc, S3Location)
    assert (loc.name, loc.prefix, loc.manifest_key, str(loc)) == ("b.qcow2.zst", "a/", "a/b.qcow2.zst.json",
                                                                  "s3://bkt/a/b.qcow2.zst")
    assert loc.child("c.qcow2") == S3Location("bkt", "a/c.qcow2")
    assert parse_location("s3://bkt/p/").prefix == "p/"  # type: ignore[union-attr]
    assert parse_location("restic:rest:http://127.0.0.1:8000/") == ResticLocation("rest:http://127.0.0.1:8000/")
    assert parse_location("backups/x.qcow2") == Path("backups/x.qcow2")
    assert is_remote("s3://b/k") and is_remote("restic:/srv/repo") and not is_remote("s3.qcow2")
    for bad in ("s3://", "s3:///key", "restic:"):
        with pytest.raises(UsageError):
            parse_location(bad)


def test_restic_tags_survive_commas_and_percent_signs() -> None:
    tags = [encode_tag("image", "/vms/a,b 100%.qcow2"), encode_tag("snapshot", "before-upgrade")]
    assert all("," not in t for t in tags)  # restic splits --tag values on commas
    assert decode_tags([*tags, "qsnap", "other"]) == {"image": "/vms/a,b 100%.qcow2", "snapshot": "before-upgrade"}


@pytest.mark.parametrize(("stderr", "cls", "said"), [
    ("Fatal: wrong password or no key found\n", TargetError, "Wrong password"),
    ("Fatal: unable to open config file: stat /x/config: no such file or directory\n"
     "Is there a repository at the following location?\n/x\n", TargetError, "There is no restic repository"),
    ("unable to create lock in backend: repository is already locked by PID 42 on host by root (UID 0, GID 0)\n"
     "lock was created at 2026-12-03 07:00:00 (1s ago)\n", LockBusy, "locked by another process"),
    ("Fatal: unable to open repo at rest:http://127.0.0.1:1/: Get \"http://127.0.0.1:1/config\": dial tcp "
     "127.0.0.1:1: connect: connection refused\n", TargetError, "Cannot reach"),
])
def test_restic_messages_become_one_sentence(stderr: str, cls: type, said: str) -> None:
    error = restic_error(ProcessError(["restic", "check"], 1, "", stderr), ResticLocation("/x"), "check")
    assert isinstance(error, cls) and said in str(error)
