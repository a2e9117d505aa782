"""Writing files so that an OS refusal (disk full, quota, read-only, permission, I/O error) costs
nothing already written: a whole file is written beside its place and renamed in, an append-only
file gets whole lines only, and the error is one line naming the file (`WriteFailed`, exit 1).
Running the same command once the cause is fixed picks up from what is on disk.

Written here rather than taken from a library: the atomic-write packages neither cut an append
back to its last whole line nor name the file in the error the CLI prints.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from genssd_cli.errors import RuntimeFailure

# The errors a fix outside genssd cures (free space, a writable place); anything else is a bug.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO})


class WriteFailed(RuntimeFailure):
    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"cannot write {path}: {reason}; nothing written before was lost, "
                         "run the same command again once that is fixed")  # fmt: skip
        self.path = path


def write_failed(path: Path | str, exc: OSError) -> WriteFailed:
    return WriteFailed(path, exc.strerror or str(exc))


def is_write_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS


def write_atomic(path: Path, data: str | bytes) -> None:
    """The whole file or, on any OS error, the old one (if any) and no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_failed(path, exc) from None


class LineFile:
    """An append-only file of whole lines (a run's log, eval samples). Each line is one unbuffered
    write; if the OS refuses part of it, the file is cut back to its last whole line, so a later
    session appends after whole records."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "ab", buffering=0)  # noqa: SIM115 -- held for the session
        except OSError as exc:
            raise write_failed(path, exc) from None
        self._size = self._file.seek(0, os.SEEK_END)

    def append(self, line: str) -> None:
        data = line.encode("utf-8")
        try:
            done = 0
            while done < len(data):
                done += self._file.write(data[done:])
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._file.fileno(), self._size)
            raise write_failed(self.path, exc) from None
        self._size += len(data)

    def sync(self) -> None:
        try:
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise write_failed(self.path, exc) from None

    def close(self) -> None:
        self._file.close()  # unbuffered: nothing left to flush, so closing cannot fail on a full disk
