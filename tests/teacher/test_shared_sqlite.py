"""Many openers of one new sqlite file at once (runs sharing a response cache): every one gets a
WAL connection with the schema, none a "database is locked"."""

import sqlite3
import threading

from genssd_cli.teacher.response_cache import SCHEMA
from genssd_cli.teacher.shared_sqlite import open_shared

ROUNDS = 150  # without the retry, 4 openers of a fresh file failed 17 times in 300 rounds here
OPENERS = 4


def test_openers_of_a_new_file_at_the_same_moment_all_get_it(tmp_path):
    errors: list[sqlite3.Error] = []
    modes: list[str] = []

    def open_at(path, start):
        start.wait()
        try:
            db = open_shared(path, SCHEMA, timeout=30)
            modes.append(db.execute("PRAGMA journal_mode").fetchone()[0])
            db.close()
        except sqlite3.Error as exc:
            errors.append(exc)

    for k in range(ROUNDS):
        start = threading.Barrier(OPENERS)
        threads = [threading.Thread(target=open_at, args=(tmp_path / f"{k}.sqlite", start)) for _ in range(OPENERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert modes == ["wal"] * ROUNDS * OPENERS
    db = sqlite3.connect(tmp_path / "0.sqlite")
    tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall()
    assert [t for (t,) in tables] == ["facts", "responses"]
