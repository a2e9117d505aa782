import json

import pytest

from genssd_cli.errors import RuntimeFailure
from genssd_cli.store import EVENTS, SCHEMA_VERSION, RunStore, read_events


def test_append_and_read(tmp_path):
    with RunStore(tmp_path / "run") as store:
        store.open_log()
        store.append({"type": "a", "x": 1})
        store.append({"type": "b", "text": "é\nline"})
    events = read_events(tmp_path / "run")
    assert [e["type"] for e in events] == ["a", "b"]
    assert events[1]["text"] == "é\nline" and events[0]["v"] == SCHEMA_VERSION


def test_torn_last_line_is_set_aside(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    whole = json.dumps({"v": 1, "type": "a"}) + "\n"
    (run / EVENTS).write_text(whole + '{"v": 1, "type": "cand')
    assert [e["type"] for e in read_events(run)] == ["a"]  # reading never fails on a torn tail
    with RunStore(run) as store:
        store.open_log()
        store.append({"type": "b"})
    assert (run / EVENTS).read_text() == whole + json.dumps({"v": SCHEMA_VERSION, "type": "b"}) + "\n"
    assert (run / "events.jsonl.torn").read_text() == '{"v": 1, "type": "cand\n'


def test_corrupt_middle_line_names_the_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / EVENTS).write_text('{"v": 1}\nnot json\n{"v": 1}\n')
    with pytest.raises(RuntimeFailure, match="line 2 is corrupt"):
        read_events(run)


def test_run_directory_is_exclusive(tmp_path):
    with RunStore(tmp_path / "run"), pytest.raises(RuntimeFailure, match="in use by another genssd run"):
        RunStore(tmp_path / "run").__enter__()
    with RunStore(tmp_path / "run"):  # released when the first one closed
        pass


@pytest.mark.parametrize(("policy", "expected"), [("record", 5), ("never", 0), ("interval", 1)])
def test_fsync_policy(tmp_path, monkeypatch, policy, expected):
    synced = []
    monkeypatch.setattr("genssd_cli.store.os.fsync", synced.append)
    with RunStore(tmp_path / "run", fsync=policy, fsync_interval_ms=60_000) as store:
        store.open_log()
        for i in range(5):
            store.append({"type": "a", "i": i})
        during = len(synced)
    # "interval": nothing within the interval, one sync when the log is closed.
    assert (during, len(synced)) == ((5, 5) if policy == "record" else (0, expected))
