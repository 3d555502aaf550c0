"""The one error tree of qsnap.

Every error qsnap raises on purpose is a :class:`QsnapError`. Each class carries the
process exit code the CLI uses (``exit_code``) and a one-sentence message; the class
docstring is the default message. ``hint`` says what to do next; errors that come from a
program carry their evidence (argv, exit status, stderr).

    QsnapError                    1  unexpected / generic failure
    ├── UsageError                2  bad command line
    ├── SnapshotNotFound          3
    ├── SnapshotExists            4
    ├── AmbiguousSnapshot         5  duplicate or numeric names: pick one with --id
    ├── InvalidName               6
    ├── ImageError                7  missing, unreadable, not qcow2
    ├── TargetError               7  a backup target (s3://, restic:) unreachable, refusing access, missing
    ├── ImageInUse                8  a running QEMU holds the image (write lock)
    │   └── LockBusy              8  another qsnap is working on the image
    ├── ProgramMissing            9  qemu-img & co. not installed
    ├── CorruptImage             10  the image is damaged
    │   └── CorruptFilesystem    10  the guest filesystem or partition table is damaged
    ├── GuestFsError             14  no readable guest filesystem (unsupported kind or feature)
    ├── GuestPathNotFound        15  no such file in the guest filesystem
    ├── VerificationFailed       11  a backup or copy does not match
    ├── MonitorError             12  the QEMU monitor refused, hung or went away
    │   └── DiskOnlySnapshot     12  no VM state: cannot be loaded into a running VM
    ├── OutputExists             13  refusing to overwrite a file
    ├── ProcessError              1  a program failed in a way we did not anticipate
    └── Interrupted             130  Ctrl-C

Keep "the tool broke" (ProcessError, exit 1) apart from "the user's request cannot be
done" (everything else): the first is a bug report, the second a sentence to act on.
"""

from __future__ import annotations

from collections.abc import Sequence


class QsnapError(Exception):
    """qsnap failed."""

    exit_code = 1

    def __init__(self, message: str | None = None, *, hint: str | None = None) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.hint = hint
        super().__init__(self.message)

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(QsnapError):
    """Invalid usage."""

    exit_code = 2


class SnapshotNotFound(QsnapError):
    """Snapshot not found."""

    exit_code = 3


class SnapshotExists(QsnapError):
    """A snapshot with that name already exists."""

    exit_code = 4


class AmbiguousSnapshot(QsnapError):
    """More than one snapshot matches that name."""

    exit_code = 5


class InvalidName(QsnapError):
    """Invalid snapshot name."""

    exit_code = 6


class ImageError(QsnapError):
    """The image is missing, unreadable or not a qcow2 image."""

    exit_code = 7


class TargetError(QsnapError):
    """The backup target is unreachable, refuses access or does not exist."""

    exit_code = 7


class ImageInUse(QsnapError):
    """The image is in use by a running VM."""

    exit_code = 8


class LockBusy(ImageInUse):
    """Another qsnap command is working on this image."""


class ProgramMissing(QsnapError):
    """A required program is not installed."""

    exit_code = 9


class CorruptImage(QsnapError):
    """The image is corrupt."""

    exit_code = 10


class CorruptFilesystem(CorruptImage):
    """The guest filesystem (or its partition table) is damaged."""


class GuestFsError(QsnapError):
    """The guest filesystem cannot be read (none found, or a kind or feature qsnap does not read)."""

    exit_code = 14


class GuestPathNotFound(QsnapError):
    """No such file or directory in the guest filesystem."""

    exit_code = 15


class VerificationFailed(QsnapError):
    """Verification failed."""

    exit_code = 11


class MonitorError(QsnapError):
    """The QEMU monitor failed."""

    exit_code = 12


class DiskOnlySnapshot(MonitorError):
    """This snapshot has no VM state and cannot be loaded into a running VM."""


class OutputExists(QsnapError):
    """The output file already exists."""

    exit_code = 13


class Interrupted(QsnapError):
    """Interrupted."""

    exit_code = 130


class ProcessError(QsnapError):
    """A program failed; carries what was run and what it said."""

    exit_code = 1

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int,
        stdout: str = "",
        stderr: str = "",
        message: str | None = None,
        *,
        hint: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        import shlex

        said = first_line(stderr) or first_line(stdout) or "no output"
        super().__init__(
            message or f"{shlex.join(self.argv)} failed with exit code {returncode}: {said}",
            hint=hint,
        )


def first_line(text: str) -> str:
    """The first non-empty line of a program's output, stripped."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


ALL_ERRORS: tuple[type[QsnapError], ...] = (
    QsnapError,
    UsageError,
    SnapshotNotFound,
    SnapshotExists,
    AmbiguousSnapshot,
    InvalidName,
    ImageError,
    TargetError,
    ImageInUse,
    LockBusy,
    ProgramMissing,
    CorruptImage,
    CorruptFilesystem,
    GuestFsError,
    GuestPathNotFound,
    VerificationFailed,
    MonitorError,
    DiskOnlySnapshot,
    OutputExists,
    Interrupted,
    ProcessError,
)
