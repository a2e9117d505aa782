"""Writing files so that an OS refusal (disk full, quota, read-only, permission, I/O error) costs
nothing already written: a whole file is written beside its place and renamed in, an append-only
file gets whole lines only, and the error is one line naming the file (`WriteFailed`, exit 1).
Running the same command once the cause is fixed picks up from what is on disk.

Reading such a file back lives here too, beside its writer: whole lines only, a torn last line (a
crash mid-write) dropped, a corrupt line anywhere else refused in one line. And the output folder
of a command: a file in its place refused, the folder made or the reason given, in one line each,
and held (an OS lock, as a run holds its directory) so a second command on it is refused. A file
genssd appends to or replaces is refused when it is a symbolic link, never followed.

Written here rather than taken from a library: the atomic-write packages neither cut an append
back to its last whole line nor name the file in the error the CLI prints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from pydantic import BaseModel, ValidationError

from genssd_cli.errors import RuntimeFailure, UsageError

Row = TypeVar("Row", bound=BaseModel)

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


def write_atomic(path: Path, data: str | bytes | Iterable[bytes]) -> None:
    """The whole file or, on any error, the old one (if any) and no temporary file. `data` may
    come in pieces (an iterable of bytes), so a file larger than memory is written as it comes.
    Durable once it returns: the file is synced before the rename and the folder after it, so a
    power cut leaves the old file or the new one, never an empty one (resumes read these files).
    The temporary name is unique, so two writers of one file never share it."""
    refuse_symlink(path)
    pieces = [data.encode("utf-8") if isinstance(data, str) else data] if isinstance(data, str | bytes) else data
    tmp: Path | None = None
    try:
        tmp, fd = _new_temporary(path)
        with open(fd, "wb") as f:
            for piece in pieces:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        sync_dir(path.parent)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(exc, OSError):
            raise write_failed(path, exc) from None
        raise


def sync_dir(folder: Path) -> None:
    """Make the names in `folder` (a file just renamed in) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_temporary(path: Path) -> tuple[Path, int]:
    """A file of a name no other writer uses, beside `path`, with the mode the umask gives a new
    file (tempfile.mkstemp's would be 0o600 whatever the umask)."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        except FileExistsError:
            continue


def refuse_symlink(path: Path) -> None:
    """A run or eval file that links elsewhere is refused: writing it would cut the file it names."""
    if path.is_symlink():
        raise UsageError(f"{path} is a symbolic link; genssd writes only files of its own there: "
                         "replace it with the file itself")  # fmt: skip


class SortedSpool:
    """Lines set aside, each with a sort key, to be given back in key order without holding them
    in memory: they wait in an anonymous temporary file beside `place` (the file they end up in;
    in memory while under `in_memory` bytes), only the keys and offsets stay in memory."""

    def __init__(self, place: Path, in_memory: int = 32 << 20):
        self.place = place
        self._file = tempfile.SpooledTemporaryFile(max_size=in_memory, dir=place.parent)  # noqa: SIM115 -- closed by close()
        if in_memory <= 0:  # its max_size 0 would mean "no limit"
            self._spill()
        self._index: list[tuple[Any, int, int]] = []  # (key, offset, size), in the order added
        self._size = 0

    def _spill(self) -> None:
        try:
            self._file.rollover()
        except OSError as exc:
            raise write_failed(self.place, exc) from None

    def add(self, key: Any, line: bytes) -> None:
        try:
            self._file.write(line)
        except OSError as exc:  # the spill to disk: the same room the file itself needs
            raise write_failed(self.place, exc) from None
        self._index.append((key, self._size, len(line)))
        self._size += len(line)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def on_disk(self) -> bool:
        return self._file._rolled

    def lines(self, order: Callable[[Any], Any]) -> Iterator[bytes]:
        """The lines sorted by `order(key)`; lines of equal order stay in the order added."""
        for _, offset, size in sorted(self._index, key=lambda entry: order(entry[0])):
            self._file.seek(offset)
            yield self._file.read(size)

    def close(self) -> None:
        self._file.close()  # an anonymous file: closing removes it


class LineFile:
    """An append-only file of whole lines (a run's log, eval samples). Each line is one unbuffered
    write; if the OS refuses part of it, the file is cut back to its last whole line, so a later
    session appends after whole records."""

    def __init__(self, path: Path, mode: int = 0o666):
        self.path = path
        refuse_symlink(path)
        try:  # O_NOFOLLOW: a link put there after the check is refused too, never followed
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, mode)
            self._file = open(fd, "ab", buffering=0)  # noqa: SIM115 -- held for the session
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                refuse_symlink(path)
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


# ---- output folders -------------------------------------------------------------------------


def check_out_dir(path: Path, flag: str = "--out") -> None:
    """Refuse a file where a command's output folder goes, before any work is done."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} exists and is not a directory")


def make_out_dir(path: Path, mode: int = 0o777) -> None:
    """A command's output folder, made (with its parents) or the reason it cannot be, in one line.
    `mode` (less the umask) for the folder itself; its parents get the umask's default."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=mode, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write to {path}: {exc.strerror}") from None


LOCK = ".lock"


def hold_lock(path: Path, busy: str, folder: str | None = None) -> IO[str]:
    """The advisory lock in file `path` (made if missing), held until the returned file is closed;
    the OS releases it if the process dies. Held by another process: `busy (pid N)`, one line;
    not to be made: `cannot write to FOLDER` (`folder`, else the lock's folder)."""
    while True:
        try:
            lock = open(path, "a+")  # noqa: SIM115 -- the caller holds it
        except OSError as exc:
            raise UsageError(f"cannot write to {folder or path.parent}: {exc.strerror}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise RuntimeFailure(f"{busy} (pid {holder})") from None
        if _still_named(lock, path):
            break
        lock.close()  # its holder removed the file as it let go (`remove_lock`): take the new one
    # The holder's pid is for the message only; a full disk may refuse it. Written past the file
    # object's buffer: a refused write left in the buffer would be tried again, and raise, at close.
    with contextlib.suppress(OSError):
        os.ftruncate(lock.fileno(), 0)
        os.pwrite(lock.fileno(), str(os.getpid()).encode(), 0)
    return lock


def _still_named(lock: IO[str], path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
    except FileNotFoundError:
        return False


def remove_lock(lock: IO[str], path: Path) -> None:
    """Let go of a lock held with `hold_lock` and remove its file (one kept beside a folder would
    stay behind in the user's folder): removed while still held, so a process that opened it
    meanwhile sees, once it holds it, that the name is gone and takes a new file instead."""
    with contextlib.suppress(OSError):
        path.unlink()
    lock.close()


@contextlib.contextmanager
def locked_out_dir(path: Path, lock: Path | None = None) -> Iterator[None]:
    """A command's output folder, made and held while the command writes it: a second genssd
    command on it is refused in one line naming it. The lock is `path/.lock` unless `lock` names
    another file (a folder replaced whole keeps its lock beside it), removed when the command ends.
    A folder made here that is empty at the end (the command refused before writing) is taken back."""
    created = not path.exists()
    make_out_dir(path)
    lock = lock or path / LOCK
    held = hold_lock(lock, f"{path} is in use by another genssd command")
    try:
        yield
    finally:
        remove_lock(held, lock)  # the folder holds what the command wrote, and nothing of ours besides
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty: the command was refused before writing


# ---- reading what was appended --------------------------------------------------------------


def whole_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Each line of an append-only file with its number, the torn last line (no newline) left out."""
    if not path.exists():
        return
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.endswith(b"\n"):
                return  # the torn tail
            yield number, line


TAIL_BLOCK = 1 << 16


def torn_tail(path: Path) -> bytes:
    """Bytes after the last newline of an append-only file (a line whose write was cut short),
    read backwards from the end: the file may be larger than memory."""
    if not path.exists():
        return b""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        tail = b""
        while end > 0:
            start = max(0, end - TAIL_BLOCK)
            f.seek(start)
            tail = f.read(end - start) + tail
            cut = tail.rfind(b"\n")
            if cut >= 0:
                return tail[cut + 1 :]
            end = start
        return tail


def cut_torn_tail(path: Path) -> None:
    """An append-only file cut back to its last whole line, so new lines follow whole ones."""
    refuse_symlink(path)
    tail = torn_tail(path)
    if tail:
        try:
            os.truncate(path, path.stat().st_size - len(tail))
        except OSError as exc:
            raise write_failed(path, exc) from None


def iter_jsonl(path: Path, if_corrupt: str) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) of each line of an append-only JSONL file, read as a stream. A
    torn last line (crash mid-write: no newline) is dropped, never fatal; a corrupt line anywhere
    else means the file was edited or damaged, and we stop rather than guess (`if_corrupt` tells
    the user what to do)."""
    for number, line in whole_lines(path):
        try:
            yield number, json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RuntimeFailure(f"{path} line {number} is corrupt; {if_corrupt}") from None


def parse_jsonl(path: Path, if_corrupt: str) -> list[dict[str, Any]]:
    """Every JSON value of an append-only JSONL file (see `iter_jsonl`), checked before any is used."""
    return [value for _, value in iter_jsonl(path, if_corrupt)]


def read_rows(path: Path, record: type[Row], if_bad: str) -> list[Row]:
    """A .jsonl file of records (trajectories, failures) as typed rows."""
    rows = []
    for number, raw in enumerate(parse_jsonl(path, if_bad), start=1):
        try:
            rows.append(record.model_validate(raw))
        except ValidationError as exc:
            raise RuntimeFailure(
                f"{path} line {number}: not a {record.__name__} ({first_error(exc)}); {if_bad}"
            ) from None
    return rows


def first_error(exc: ValidationError) -> str:
    """A validation error's first complaint, for a one-line message."""
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]
