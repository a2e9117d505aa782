"""Writing the run directory. `events.jsonl` is the append-only source of truth; trajectories.jsonl,
failures.jsonl and summary.json are materialised from it (atomically), so a crash can never leave
them disagreeing with the log. (layout.py names the files; log.py reads the log back.)

Only the event-loop thread writes, so one `RunStore` owns the log file alone.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import anyio

from genssd_cli import files
from genssd_cli.errors import UsageError
from genssd_cli.files import LineFile, WriteFailed, hold_lock, refuse_symlink, write_atomic, write_failed
from genssd_cli.rundir.layout import EVENTS, LOCK
from genssd_cli.rundir.records import Event, Record

# New run folders and logs: the owner's only (less what the umask takes too).
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def torn_tail(run_dir: Path) -> bytes:
    """Bytes after the last newline of the log: a record whose write was cut short."""
    return files.torn_tail(run_dir / EVENTS)


class RunStore:
    """Holds the directory's advisory lock for the whole run (the OS releases it on crash)."""

    def __init__(self, run_dir: Path, fsync: str = "interval", fsync_interval_ms: int = 1000):
        self.dir = run_dir
        self._fsync = fsync
        self._fsync_interval_s = fsync_interval_ms / 1000
        self._last_sync = time.monotonic()
        self._unsynced = False
        self._lock_file = None
        self._events: LineFile | None = None
        self.write_failed = False  # the log refused a record (disk full, …): write nothing more
        self._created = False  # this session made the directory (so it may take it back)

    def __enter__(self) -> RunStore:
        try:
            self._created = not self.dir.exists()
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            self.dir.mkdir(mode=PRIVATE_DIR, exist_ok=True)  # prompts and replies: the owner's only (docs/resume.md)
        except OSError as exc:
            raise UsageError(f"cannot write to run directory {self.dir}: {exc.strerror}") from None
        busy = f"run directory {self.dir} is in use by another genssd run"
        self._lock_file = hold_lock(self.dir / LOCK, busy, f"run directory {self.dir}")
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if self._events is not None:
            try:
                if not self.write_failed:
                    self.sync()
            except WriteFailed:
                if exc_type is None:  # else the error on its way out says more
                    raise
            finally:
                self._events.close()
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            if self._created and self._events is None:
                self._take_back()

    def _take_back(self) -> None:
        """A start refused before the log was opened (the teacher unreachable, no API there)
        leaves no empty run directory behind. Anything else written there (a launched server's
        log, to read) keeps it."""
        (self.dir / LOCK).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: it stays
            self.dir.rmdir()

    def open_log(self) -> None:
        """Set a torn tail aside (kept in events.jsonl.torn for inspection) and open for append."""
        path = self.dir / EVENTS
        refuse_symlink(path)  # before the torn tail is cut: never in the file a link names
        tail = torn_tail(self.dir)
        if tail:
            torn = path.with_suffix(".jsonl.torn")
            try:
                with open(torn, "ab") as f:
                    f.write(tail + b"\n")
            except OSError as exc:
                raise write_failed(torn, exc) from None
            with open(path, "r+b") as log:
                log.truncate(path.stat().st_size - len(tail))
        self._events = LineFile(path, PRIVATE_FILE)

    @property
    def log_open(self) -> bool:
        return self._events is not None

    def append(self, event: Event) -> None:
        # One write of one whole line: a crash leaves at most a torn last line, an OS refusal none.
        try:
            self._events.append(event.line())
        except WriteFailed:
            self.write_failed = True
            raise
        self._unsynced = True
        if self._fsync == "record":
            self.sync()
        elif self._fsync == "interval":
            self.sync_if_due()

    def sync(self) -> None:
        """Make every appended record durable against a machine crash, not just a process one."""
        if self._events is not None and self._unsynced and self._fsync != "never":
            self._events.sync()
        self._unsynced = False
        self._last_sync = time.monotonic()

    def sync_if_due(self) -> None:
        if self._unsynced and time.monotonic() - self._last_sync >= self._fsync_interval_s:
            self.sync()

    async def sync_every_interval(self) -> None:
        """Run as a task: records written just before a quiet spell get synced too."""
        while True:
            await anyio.sleep(self._fsync_interval_s)
            self.sync_if_due()

    def write_text(self, name: str, text: str) -> None:
        write_atomic(self.dir / name, text)

    def write_jsonl(self, name: str, rows: Sequence[Record]) -> None:
        self.write_text(name, "".join(row.line() for row in rows))

    def write_lines(self, name: str, lines: Iterable[bytes]) -> None:
        """A .jsonl file written as its lines come (atomically all the same)."""
        write_atomic(self.dir / name, lines)

    def write_json(self, name: str, record: Record) -> None:
        self.write_text(name, json.dumps(record.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n")
