"""Opening an sqlite file that several processes share (the response cache, used by concurrent
runs): WAL, so readers never wait on the one writer, and a busy wait for every lock. WAL needs
every process on one host (its index is shared memory), not a network filesystem.

sqlite's busy timeout does not cover switching a file to WAL: when processes open a new file at
the same moment, all but one can get "database is locked" at once (measured: 2 of 450 openings
of a fresh file by 3 processes). That step is retried here until the timeout.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random


def _busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


def open_shared(path: Path, schema: str, timeout: float) -> sqlite3.Connection:
    """An autocommit connection (one statement, one transaction) to `path` in WAL mode with
    `schema` applied; waits up to `timeout` seconds for other processes' locks."""
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    try:
        for attempt in Retrying(retry=retry_if_exception(_busy), stop=stop_after_delay(timeout),
                                wait=wait_random(0.01, 0.1), reraise=True):  # fmt: skip
            with attempt:
                db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        db.executescript(schema)
    except BaseException:
        db.close()
        raise
    return db
