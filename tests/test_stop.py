"""A stop is a stop within seconds: SIGTERM while the real student is in the middle of a long
scoring batch (four problems of ~7,500 tokens each to prefill, a minute or more on 2 CPU cores)
ends the run at the model's next layer, not at the end of the batch."""

import json
import signal
import time

import pytest
from conftest import run_config, write_config
from test_resume import start_run

from genssd_cli.rundir.log import read_events

pytestmark = pytest.mark.slow

PROBLEMS = 4


def test_sigterm_during_a_long_scoring_batch_stops_within_seconds(tmp_path, fake_teacher):
    server = fake_teacher()
    rows = [{"id": f"long{i}", "question": f"{i} + " + "1 + " * 2500 + "1?", "answer": str(i + 2501)}
            for i in range(PROBLEMS)]  # fmt: skip
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = run_config(server.base_url, data={"source": str(data)}, engine={"max_active_problems": PROBLEMS},
                     search={"n": 3, "chunk_tokens": 8, "max_steps": 2, "max_new_tokens": 16})  # fmt: skip
    config = write_config(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    process = start_run(config, run)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if any(e.type == "response" for e in read_events(run)):
            break  # the teacher answered: the student is scoring
        time.sleep(0.05)
    time.sleep(2.0)  # well inside the first prefill
    scored_before = sum(e.type == "choice" for e in read_events(run))
    assert process.poll() is None and scored_before == 0, "the batch ended before the signal; make it longer"

    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=300)
    exit_s = time.monotonic() - signalled
    print(f"SIGTERM to exit during a scoring batch: {exit_s:.1f} s")

    assert process.returncode == 130, err
    assert "Traceback" not in err
    events = read_events(run)
    assert events[-1].type == "session_end" and events[-1].end == "stopped"
    # The batch was dropped, not finished: no step was scored, every response is on record.
    assert sum(e.type == "choice" for e in events) == 0
    assert {r["seed"] for r in server.requests()} == {e.seed for e in events if e.type == "response"}
    # Not a speed claim: the batch it interrupted needs many times this on any CPU this suite runs on.
    assert exit_s < 20
