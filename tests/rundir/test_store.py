"""The run directory's log in process (genssd_cli/rundir/store.py and the log reader), on real files:
records appended and read back equal, a torn last line set aside and never a read failure, a
corrupt or foreign line or another format version refused in one line naming it, one genssd run
per directory at a time, and the fsync policies' syncs counted."""

import json

import pytest

from genssd_cli.errors import RuntimeFailure, UsageError
from genssd_cli.rundir.layout import EVENTS
from genssd_cli.rundir.log import read_events
from genssd_cli.rundir.records import SCHEMA_VERSION, Prune, TrajectoryError
from genssd_cli.rundir.store import RunStore


def prune(problem: str) -> Prune:
    return Prune(problem_id=problem, sample=0, step=1, best_ppl=9.5)


def test_append_and_read(tmp_path):
    with RunStore(tmp_path / "run") as store:
        store.open_log()
        store.append(prune("a"))
        store.append(TrajectoryError(problem_id="b", sample=1, step=0, error_class="timeout", message="é\nline"))
    events = read_events(tmp_path / "run")
    assert [e.type for e in events] == ["prune", "error"]
    assert events[1].message == "é\nline" and events[0].v == SCHEMA_VERSION
    assert events[0] == prune("a")


def test_torn_last_line_is_set_aside(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    whole = prune("a").line()
    (run / EVENTS).write_text(whole + '{"v": 2, "type": "cand')
    assert [e.problem_id for e in read_events(run)] == ["a"]  # reading never fails on a torn tail
    with RunStore(run) as store:
        store.open_log()
        store.append(prune("b"))
    assert (run / EVENTS).read_text() == whole + prune("b").line()
    assert (run / "events.jsonl.torn").read_text() == '{"v": 2, "type": "cand\n'


def test_corrupt_middle_line_names_the_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / EVENTS).write_text(prune("a").line() + "not json\n" + prune("b").line())
    with pytest.raises(RuntimeFailure, match="line 2 is corrupt"):
        read_events(run)


def test_a_log_of_another_format_version_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / EVENTS).write_text(json.dumps({"v": 1, "type": "candidates"}) + "\n")
    with pytest.raises(UsageError, match="log format 1, this one reads 2"):
        read_events(run)


def test_a_line_that_is_not_a_record_names_the_line_and_field(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / EVENTS).write_text(prune("a").line() + json.dumps({"v": 2, "type": "prune", "problem_id": "b"}) + "\n")
    with pytest.raises(RuntimeFailure, match=r"line 2 is not a genssd record: prune\.sample: Field required"):
        read_events(run)


def test_run_directory_is_exclusive(tmp_path):
    with RunStore(tmp_path / "run"), pytest.raises(RuntimeFailure, match="in use by another genssd run"):
        RunStore(tmp_path / "run").__enter__()
    with RunStore(tmp_path / "run"):  # released when the first one closed
        pass


@pytest.mark.parametrize(("policy", "expected"), [("record", 5), ("never", 0), ("interval", 1)])
def test_fsync_policy(tmp_path, monkeypatch, policy, expected):
    synced = []
    monkeypatch.setattr("genssd_cli.files.os.fsync", synced.append)
    with RunStore(tmp_path / "run", fsync=policy, fsync_interval_ms=60_000) as store:
        store.open_log()
        for i in range(5):
            store.append(prune(str(i)))
        during = len(synced)
    # "interval": nothing within the interval, one sync when the log is closed.
    assert (during, len(synced)) == ((5, 5) if policy == "record" else (0, expected))
