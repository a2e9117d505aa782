"""The resume promise, proven on the real CLI: SIGKILL at random moments, signals, faults, secrets.

A deterministic local teacher process (genssd_cli/teacher/servers/test_teacher.py) logs every request it receives, so
"no received response is ever paid for twice" is checked against the server's own count.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, check_run_is_consistent, genssd, load_jsonl, run_config, write_config

from genssd_cli.rundir.layout import EVENTS
from genssd_cli.rundir.log import read_events
from genssd_cli.teacher.servers.test_teacher import FAULTS

pytestmark = pytest.mark.slow


def start_run(config: Path, run: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "genssd_cli", "run", str(config), "--out", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def log_lines(run: Path) -> int:
    path = run / EVENTS
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for_lines(process: subprocess.Popen, run: Path, target: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while process.poll() is None and log_lines(run) < target and time.monotonic() < deadline:
        time.sleep(0.01)


def recorded_seeds(run: Path) -> set[int]:
    return {e.seed for e in read_events(run) if e.type == "response"}


def steps_cut_half_way(events: list, since: int, n: int) -> set[tuple]:
    """(problem, sample, step, attempt) of the steps that hold some of their n candidates but no
    choice, one of whose responses is among events[since:]: steps a kill now cut half-way."""
    received: dict[tuple, int] = {}
    fresh, chosen = set(), set()
    for index, event in enumerate(events):
        if event.type in ("response", "choice"):
            key = (event.problem_id, event.sample, event.step, event.attempt)
            if event.type == "choice":
                chosen.add(key)
                continue
            received[key] = received.get(key, 0) + len(event.candidates)
            if index >= since:
                fresh.add(key)
    return {key for key in fresh - chosen if 0 < received[key] < n}


def test_killed_at_random_moments_ends_as_if_never_stopped(tmp_path, fake_teacher):
    server = fake_teacher("--ignore-n", "--latency-per-token", "0.004")
    cfg = run_config(
        server.base_url,
        # One request per candidate, two at a time: every step spends a while half received.
        teacher={"max_concurrency": 2},
        search={"n": 3, "chunk_tokens": 8, "max_steps": 6, "max_new_tokens": 48},
        data={"count": 8},
        engine={"max_active_problems": 3, "fsync": "record"},
    )
    config = write_config(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    rng = random.Random(20261126)
    kills: list[tuple[int, set[int]]] = []  # (server requests so far, seeds recorded) at each kill
    cut: list[int] = []  # at each kill, the steps it cut half-way (what the per-response log is for)
    logged = 0
    while len(kills) < 22:
        process = start_run(config, run)
        # A random moment: during start-up (0 new lines) or after a random number of new records,
        # plus a random fraction of a request's latency.
        wait_for_lines(process, run, log_lines(run) + rng.choice([0, 1, 2, 3, 5, 8]))
        time.sleep(rng.uniform(0.0, 0.15))
        assert process.poll() is None, "the run finished before 22 kills; make it longer"
        process.send_signal(signal.SIGKILL)
        process.communicate()
        kills.append((len(server.requests()), recorded_seeds(run)))
        events = read_events(run)
        cut.append(len(steps_cut_half_way(events, logged, n=3)))
        logged = len(events)

    final = start_run(config, run)
    _out, err = final.communicate(timeout=600)
    assert final.returncode == 0, err

    # Every line of the log parses and the file ends with a whole record.
    events = read_events(run)
    assert (run / EVENTS).read_bytes().endswith(b"\n")
    assert len(events) == log_lines(run)
    check_run_is_consistent(run, problems=8, n=3)

    # Zero repeated requests for responses recorded before a kill.
    requests = server.requests()
    repeated = [r["seed"] for asked_before, seeds in kills for r in requests[asked_before:] if r["seed"] in seeds]
    assert repeated == []
    sessions = [e for e in events if e.type == "run_start"]
    assert len(sessions) > len([k for k in kills if k[1]]) // 2  # most kills hit a running engine
    # Several kills left a step with some of its candidates: the resume asked only for the rest
    # (check_run_is_consistent: each candidate received exactly once).
    assert sum(1 for c in cut if c) >= 3, cut

    reference = start_run(config, tmp_path / "reference")
    _out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err
    resumed = (run / "trajectories.jsonl").read_bytes()
    assert resumed == (tmp_path / "reference" / "trajectories.jsonl").read_bytes()
    assert resumed.count(b"\n") >= 4
    print(f"kills={len(kills)} sessions={len(sessions)} repeated={len(repeated)} requests={len(requests)} cut={cut}")


def test_faults_on_a_fifth_of_requests_lose_nothing(tmp_path, fake_teacher):
    server = fake_teacher("--ignore-n", "--fault-rate", "0.2", "--fault-seed", "95", "--hang-s", "2")
    clean = fake_teacher("--ignore-n")  # the same teacher without faults
    cfg = run_config(
        server.base_url,
        teacher={"retries": 1, "timeout_s": 1},
        search={"n": 3, "chunk_tokens": 8, "max_steps": 5},
        data={"count": 12},
        engine={"max_active_problems": 6},
    )
    run = tmp_path / "run"
    result = genssd("run", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(run))
    assert result.returncode == 0, result.stderr
    summary = check_run_is_consistent(run, problems=12, n=3)
    t = summary["trajectories"]
    # Every problem is accounted for: finished, truncated, pruned or listed with its reason.
    failures = load_jsonl(run / "failures.jsonl")
    assert len(failures) == t["failed"]
    ended = {r["problem_id"] for r in load_jsonl(run / "trajectories.jsonl")} | {f["problem_id"] for f in failures}
    ended |= {e.problem_id for e in read_events(run) if e.type == "prune"}
    assert len(ended) == 12
    for failure in failures:
        assert failure["error_class"] and "teacher failed after 2 attempts" in failure["message"]
    assert summary["teacher"]["failures"] == {
        k: sum(1 for f in failures if f["error_class"] == k) for k in {f["error_class"] for f in failures}
    }

    faults = [r["fault"] for r in server.requests() if r["fault"]]
    assert set(faults) == set(FAULTS), "every retryable class was injected"
    assert abs(len(faults) / len(server.requests()) - 0.2) < 0.08
    retries = summary["teacher"]["retries"]
    assert {"timeout", "connection", "malformed", "http_429", "http_500", "http_502", "http_503", "http_504"} <= set(
        retries
    )
    # Each injected fault was either retried or was the last attempt of a failed trajectory.
    assert sum(retries.values()) + t["failed"] >= len(faults) - faults.count("fewer")
    assert "retries" in result.stdout and "failures" in result.stdout  # the progress lines show both
    assert t["failed"] >= 1, "the fault seed makes some trajectory run out of retries"

    # Nothing is lost: resumed against the fault-free teacher, the failed trajectories are retried
    # (asking only for what was never received) and the run ends as a fault-free run from scratch.
    received = recorded_seeds(run)
    clean_cfg = {**cfg, "teacher": {**cfg["teacher"], "base_url": clean.base_url}}  # not a results setting
    clean_config = write_config(tmp_path / "clean.yaml", clean_cfg)
    resumed = genssd("run", str(clean_config), "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr
    after = check_run_is_consistent(run, problems=12, n=3)
    assert after["trajectories"]["failed"] == 0 and load_jsonl(run / "failures.jsonl") == []
    asked = clean.requests()
    assert asked, "the failed trajectories needed more candidates"
    assert [r["seed"] for r in asked if r["seed"] in received] == []  # nothing received was asked again
    reference = genssd("run", str(clean_config), "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    trajectories = (run / "trajectories.jsonl").read_bytes()
    assert trajectories == (tmp_path / "reference" / "trajectories.jsonl").read_bytes()
    assert trajectories.count(b"\n") == 12  # no pruning: every trajectory ends with a row
    print(f"requests={len(server.requests())} faults={len(faults)} retries={retries} trajectories={t} "
          f"asked on resume={len(asked)}")  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])  # SIGHUP: its terminal closed
def test_first_signal_drains_and_records_what_was_in_flight(tmp_path, fake_teacher, signum):
    server = fake_teacher("--ignore-n", "--latency-per-token", "0.03")
    cfg = run_config(server.base_url, data={"count": 6}, engine={"max_active_problems": 6})
    config = write_config(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    process = start_run(config, run)
    wait_for_lines(process, run, 6)
    assert process.poll() is None
    process.send_signal(signum)
    _out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"interrupted; resume with: genssd run {config} --out {run}" in err
    assert "Traceback" not in err
    events = read_events(run)
    assert events[-1].type == "session_end" and events[-1].end == "stopped"
    assert json.loads((run / "summary.json").read_text())["trajectories"]["pending"] > 0
    # Requests in flight when the signal came were answered and recorded, none thrown away.
    assert {r["seed"] for r in server.requests()} == recorded_seeds(run)

    resumed = genssd("run", str(config), "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr
    check_run_is_consistent(run, problems=6, n=3)


def test_second_signal_stops_at_once_and_the_log_stays_valid(tmp_path, fake_teacher):
    server = fake_teacher("--ignore-n", "--latency-per-token", "2")  # a request takes 16 s
    cfg = run_config(server.base_url, data={"count": 4})
    config = write_config(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    process = start_run(config, run)
    wait_for_lines(process, run, 1)  # run_start: the engine is sending
    while process.poll() is None and not server.requests():
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=10)  # well before the requests in flight could end
    assert process.returncode == 130
    assert "stopped at once; resume with: genssd run" in err
    events = read_events(run)
    assert (run / EVENTS).read_bytes().endswith(b"\n")
    assert not any(e.type == "session_end" for e in events)


def test_api_key_never_reaches_disk_or_output(tmp_path, fake_teacher):
    key = "sk-planted-" + "".join(random.choices("abcdef0123456789", k=24))
    server = fake_teacher("--api-key", key)
    cfg = run_config(server.base_url, teacher={"api_key_env": "GENSSD_PLANTED_KEY"}, data={"count": 2})
    config = write_config(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    process = start_run(config, run, env={"GENSSD_PLANTED_KEY": key})
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert len(server.requests()) > 0
    # A wrong key: refused with one line that does not echo it.
    wrong = start_run(config, tmp_path / "wrong", env={"GENSSD_PLANTED_KEY": key[::-1]})
    wrong_out, wrong_err = wrong.communicate(timeout=600)
    assert wrong.returncode == 1 and "rejected the API key" in wrong_err
    captured = out + err + wrong_out + wrong_err
    assert key not in captured and key[::-1] not in captured
    for path in [*run.rglob("*"), *(tmp_path / "wrong").rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert key.encode() not in data and key[::-1].encode() not in data, path
    assert "GENSSD_PLANTED_KEY" in (run / "config.yaml").read_text()  # the variable's name only
