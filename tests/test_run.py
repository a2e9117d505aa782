"""`genssd run` end to end through the CLI: a real local teacher server process
(tests/fake_teacher.py, deterministic and counting requests) and the real demo student."""

import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import genssd, run_config, write_config

from genssd_cli.store import read_events


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_run_is_consistent(run: Path, problems: int, n: int) -> dict:
    events = read_events(run)
    summary = json.loads((run / "summary.json").read_text())
    t = summary["trajectories"]
    assert t["finished"] + t["truncated"] + t["pruned"] + t["failed"] == problems
    assert t["pending"] == 0
    received: dict[tuple, list[int]] = {}
    for event in events:
        if event["type"] == "response":
            key = (event["problem_id"], event["sample"], event["step"], event["attempt"])
            received.setdefault(key, []).extend(range(event["start"], event["start"] + len(event["candidates"])))
        if event["type"] == "choice":
            ppl = [math.inf if p is None else p for p in event["ppl"]]
            assert event["chosen"] == ppl.index(min(ppl))
    # Every scored step got its n candidates, each received exactly once: nothing asked for twice.
    for key, indices in received.items():
        assert sorted(indices) == list(range(n)), key
    rows = load_jsonl(run / "trajectories.jsonl")
    assert len(rows) == t["finished"] + t["truncated"]
    for row in rows:
        assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
        assert row["method"] == "genssd" and row["steps"] >= 1
        assert row["teacher_tokens"] >= row["completion_tokens"] > 0
    assert yaml_has_no_secret(run / "config.yaml")
    return summary


def yaml_has_no_secret(path: Path) -> bool:
    return "sk-" not in path.read_text()


def test_run_writes_consistent_records(tmp_path, fake_teacher):
    server = fake_teacher("--ignore-n")
    config = write_config(tmp_path / "c.yaml", run_config(server.base_url))
    result = genssd("run", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "done:" in result.stdout
    summary = check_run_is_consistent(tmp_path / "run", problems=4, n=3)
    assert summary["teacher"]["requests"] == len(server.requests())
    assert summary["steps"] > 4

    # Running again resumes: everything ended, so nothing is asked and nothing changes.
    before = (tmp_path / "run" / "trajectories.jsonl").read_bytes()
    again = genssd("run", str(config), "--out", str(tmp_path / "run"))
    assert again.returncode == 0, again.stderr
    assert len(server.requests()) == summary["teacher"]["requests"]
    assert (tmp_path / "run" / "trajectories.jsonl").read_bytes() == before


def test_pruning_retries_then_prunes(tmp_path, fake_teacher):
    server = fake_teacher()
    cfg = run_config(server.base_url, search={"prune_ppl": 1.0001, "retries": 2}, data={"count": 2})
    result = genssd("run", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    summary = check_run_is_consistent(tmp_path / "run", problems=2, n=3)
    assert summary["trajectories"]["pruned"] == 2
    events = read_events(tmp_path / "run")
    # Each problem's first step: the original attempt and two re-samples, then the prune.
    assert sorted(e["attempt"] for e in events if e["type"] == "choice") == [0, 0, 1, 1, 2, 2]
    assert (tmp_path / "run" / "trajectories.jsonl").read_text() == ""


def test_killed_run_resumes_without_asking_twice(tmp_path, fake_teacher):
    server = fake_teacher("--ignore-n")
    cfg = run_config(server.base_url, data={"count": 6}, engine={"max_active_problems": 2})
    config = write_config(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "genssd_cli", "run", str(config), "--out", str(run)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        events = run / "events.jsonl"
        if events.exists() and events.read_text().count('"type": "choice"') >= 6:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    recorded = [e for e in read_events(run) if e["type"] == "response"]
    assert recorded

    result = genssd("run", str(config), "--out", str(run))
    assert result.returncode == 0, result.stderr
    check_run_is_consistent(run, problems=6, n=3)
    asked = Counter(r["seed"] for r in server.requests())
    for event in recorded:
        assert asked[event["seed"]] == 1, "a recorded response was requested again"

    # Same outcome as a run that was never interrupted (choices depend only on seeds and PPLs).
    reference = genssd("run", str(config), "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    resumed, uninterrupted = (load_jsonl(d / "trajectories.jsonl") for d in (run, tmp_path / "reference"))
    assert [r["completion"] for r in resumed] == [r["completion"] for r in uninterrupted]
    assert [r["student_ppl"] for r in resumed] == pytest.approx([r["student_ppl"] for r in uninterrupted], rel=1e-4)


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A small finished run whose files every bad input below must leave alone."""
    from conftest import FakeTeacher

    tmp = tmp_path_factory.mktemp("existing")
    server = FakeTeacher(tmp)
    config = write_config(tmp / "c.yaml", run_config(server.base_url, data={"count": 1}))
    result = genssd("run", str(config), "--out", str(tmp / "run"))
    assert result.returncode == 0, result.stderr
    yield tmp, server
    server.stop()


def bad_inputs(tmp: Path, url: str) -> list[tuple[list[str], int, str]]:
    rows = tmp / "no_answer.jsonl"
    rows.write_text('{"question": "1+1?"}\n')
    base = write_config(tmp / "good.yaml", run_config(url, data={"count": 1}))
    return [
        (["run", str(tmp / "missing.yaml")], 2, "config file not found"),
        (["run", str(base), "--set", "search.n=0"], 2, "search.n: Input should be greater than or equal to 1"),
        (["run", str(base), "--set", "search.chunk_tokens=0"], 2, "search.chunk_tokens"),
        (["run", str(base), "--set", "search.colour=red"], 2, "search.colour: unknown key"),
        (["run", str(base), "--set", "search.n=lots"], 2, "search.n: Input should be a valid integer"),
        (["run", str(base), "--set", f"data.source={tmp}/nope.jsonl"], 2, "dataset not found"),
        (["run", str(base), "--set", f"data.source={rows}"], 2, "line 1: missing field 'answer'"),
        (["run", str(base), "--set", "teacher.base_url=http://127.0.0.1:9/v1"], 1, "unreachable"),
        (["run", str(base), "--force", "--set", "teacher.model=nobody"], 1, "'nobody' is not served"),
        (["run", str(base), "--force", "--set", "student.model=/no/such"], 2, "student model '/no/such' not found"),
        (["run", str(base), "--set", "search.n=5"], 2, "changed: search.n"),
        (["run", str(base), "--limit", "0"], 2, "--limit"),
        (["run", str(base), "--no-such-flag"], 2, "No such option: --no-such-flag"),
        (["walk"], 2, "No such command 'walk'"),
    ]


def test_bad_inputs_give_one_line_and_leave_the_run_alone(finished_run):
    tmp, server = finished_run
    run = tmp / "run"
    before = tree_digest(run)
    for args, code, message in bad_inputs(tmp, server.base_url):
        result = genssd(*args, "--out", str(run))
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout, args
        error_lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(error_lines) == 1 and error_lines[0].startswith("error: "), (args, result.stderr)
        assert tree_digest(run) == before, f"{args} changed the existing run"


def test_second_run_on_the_same_directory_is_refused(finished_run):
    from genssd_cli.store import RunStore

    tmp, server = finished_run
    config = write_config(tmp / "lock.yaml", run_config(server.base_url, data={"count": 1}))
    with RunStore(tmp / "run"):
        result = genssd("run", str(config), "--out", str(tmp / "run"))
    assert result.returncode == 1
    assert "in use by another genssd run" in result.stderr
