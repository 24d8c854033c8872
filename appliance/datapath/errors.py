"""Errors of the data path. Each names the disk, the offset and what to do next."""

from __future__ import annotations

import errno as _errno
import os

from appliance.errors import Conflict, FerrymanError


def errno_name(err: int) -> str:
    return _errno.errorcode.get(err, str(err))


class DataPathError(FerrymanError):
    code = "datapath"
    http_status = 500


class SourceReadError(DataPathError):
    """A read from the source kept failing after every retry (or failed permanently)."""

    code = "source_read"

    def __init__(
        self, disk: str, offset: int, err: int, *, attempts: int, detail: str = ""
    ) -> None:
        self.disk, self.offset, self.errno, self.attempts = disk, offset, err, attempts
        msg = (
            f"disk {disk}: reading the source at offset {offset} failed with "
            f"{errno_name(err)} ({os.strerror(err)}) after {attempts} attempt(s)"
        )
        if detail:
            msg += f": {detail}"
        super().__init__(
            msg,
            hint="check the source disk/storage; the journal keeps what was copied, "
            "start the sync again to resume",
        )


class SourceUnavailable(DataPathError):
    """The source connection could not be (re)established, or stalled past the limit."""

    code = "source_unavailable"

    def __init__(self, disk: str, offset: int, reason: str) -> None:
        self.disk, self.offset = disk, offset
        super().__init__(
            f"disk {disk}: source unavailable near offset {offset}: {reason}",
            hint="check that the source host and its NBD export are up; the sync resumes "
            "from the journal when started again",
        )


class TargetWriteError(DataPathError):
    code = "target_write"

    def __init__(self, disk: str, offset: int, err: int, detail: str = "") -> None:
        self.disk, self.offset, self.errno = disk, offset, err
        msg = (
            f"disk {disk}: writing the restore point at offset {offset} failed with "
            f"{errno_name(err)} ({os.strerror(err)})"
        )
        if detail:
            msg += f": {detail}"
        super().__init__(msg, hint="check the volume store (ferryman status); then sync again")


class TargetFull(TargetWriteError):
    code = "target_full"

    def __init__(self, disk: str, offset: int, where: str = "") -> None:
        super().__init__(disk, offset, _errno.ENOSPC)
        self.message = (
            f"disk {disk}: the volume store{(' ' + where) if where else ''} is full "
            f"(no space left writing offset {offset})"
        )
        self.hint = (
            "free space (ferryman restore-points delete, or lower retention) and start the "
            "sync again: it resumes from the journal"
        )


class WriterError(DataPathError):
    """qemu-nbd (the writer) failed to start, died, or the sealed file failed its check."""

    code = "writer"


class ChainError(DataPathError):
    code = "chain"


class ResumeRefused(DataPathError):
    """The journal or partial overlay belongs to another source snapshot or disk."""

    code = "resume_refused"


class VerifyMismatch(DataPathError):
    code = "verify_mismatch"


class ReaderBusy(Conflict):
    """Retention refused: a reader (test run, verify, export) still uses the restore point."""

    code = "reader_busy"
