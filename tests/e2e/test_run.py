"""`genssd run` end to end through the CLI: a real local teacher server process
(genssd_cli/teacher/servers/test_teacher.py, deterministic and counting requests) and the real demo student."""

import json

from conftest import check_run_is_consistent, genssd, load_jsonl, run_config, write_config

from genssd_cli.rundir.log import read_events


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


def test_context_too_long_ends_the_trajectory_as_truncated(tmp_path, fake_teacher):
    server = fake_teacher("--max-prompt-words", "165")  # the few-shot prompt (~140 words) + 2-3 steps
    cfg = run_config(server.base_url, search={"max_steps": 20, "max_new_tokens": 400}, data={"count": 3})
    run = tmp_path / "run"
    result = genssd("run", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(run))
    assert result.returncode == 0, result.stderr
    summary = check_run_is_consistent(run, problems=3, n=3)
    assert summary["trajectories"]["failed"] == 0 and summary["trajectories"]["truncated"] >= 1
    rows = load_jsonl(run / "trajectories.jsonl")
    assert all(r["steps"] < 20 for r in rows)


def test_fatal_teacher_error_mid_run_stops_with_one_line(tmp_path, fake_teacher):
    server = fake_teacher("--status", "403")  # /v1/models answers; every completion is refused
    run = tmp_path / "run"
    result = genssd("run", str(write_config(tmp_path / "c.yaml", run_config(server.base_url))), "--out", str(run))
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"error: teacher {server.base_url} denied access (403)"
    ]
    assert len(server.requests()) <= 4  # at once: no retries, one request per trajectory in flight at most
    events = read_events(run)
    assert events[-1].type == "session_end" and events[-1].end == "failed"
    assert json.loads((run / "summary.json").read_text())["trajectories"]["pending"] == 4


def test_a_problem_longer_than_the_student_holds_is_refused_or_skipped(tmp_path, fake_teacher):
    server = fake_teacher()
    rows = [{"id": "small", "question": "What is 2 + 3?", "answer": "5"},
            {"id": "huge", "question": "Count the words. " + "word " * 9000, "answer": "9003"},
            {"id": "tiny", "question": "What is 4 - 1?", "answer": "3"}]  # fmt: skip
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(tmp_path / "c.yaml", run_config(server.base_url, data={"source": str(data)}))
    refused = genssd("run", str(config), "--out", str(tmp_path / "run"))
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("error: problem 'huge' needs 9") and "the student smollm2-135m-instruct holds 8192" in line
    assert "data.too_long: skip" in line and not (tmp_path / "run").exists() and server.requests() == []

    skipped = genssd("run", str(config), "--out", str(tmp_path / "run"), "--set", "data.too_long=skip")
    assert skipped.returncode == 0, skipped.stderr
    assert [r["problem_id"] for r in load_jsonl(tmp_path / "run" / "trajectories.jsonl")] == ["small", "tiny"]
    [failure] = load_jsonl(tmp_path / "run" / "failures.jsonl")
    assert (failure["problem_id"], failure["error_class"]) == ("huge", "too_long")
    assert not any("Count the words" in r["prompt"] for r in server.requests())  # never sent to the teacher
