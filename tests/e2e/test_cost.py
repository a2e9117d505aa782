"""Teacher cost: counted from the usage of every logged response, shown while running, in
summary.json, and `max_cost` stops a run cleanly so that raising it resumes without asking the
teacher anything twice. A bill genssd can only split (a server that bills one choice of n and
lists no tokens) is warned about once and marked approximate in summary.json and the report; a
server with no usage is refused with max_cost before anything is spent."""

import json

import pytest
from conftest import genssd, run_config, write_config

from genssd_cli.config import TeacherConfig, load_run_config
from genssd_cli.errors import UsageError
from genssd_cli.rundir.log import read_events
from genssd_cli.rundir.records import Response
from genssd_cli.rundir.replay import RunLog

PRICE = {"input": 100.0, "output": 400.0}  # per million tokens: big, so that small runs cost something


def expected_cost(run) -> float:
    responses = [e for e in read_events(run) if e.type == "response"]
    prompt = sum(e.prompt_tokens for e in responses)
    completion = sum(e.completion_tokens for e in responses)
    return (prompt * PRICE["input"] + completion * PRICE["output"]) / 1e6


@pytest.mark.slow
def test_max_cost_stops_cleanly_and_raising_it_resumes(tmp_path, fake_teacher):
    server = fake_teacher()
    config = run_config(server.base_url, teacher={"price": PRICE}, engine={"progress_interval_s": 0.2})
    path = write_config(tmp_path / "c.yaml", config)

    whole = tmp_path / "whole"
    assert genssd("run", str(path), "--out", str(whole)).returncode == 0
    total = json.loads((whole / "summary.json").read_text())["teacher"]["cost"]
    assert total == pytest.approx(expected_cost(whole), abs=1e-6) and total > 0
    asked_whole = len(server.requests())

    capped = tmp_path / "capped"
    limit = round(total / 3, 6)
    first = genssd("run", str(path), "--out", str(capped), "--set", f"max_cost={limit}")
    assert first.returncode == 1
    assert first.stderr.startswith("error: the teacher cost reached max_cost") and "--set max_cost" in first.stderr
    assert len(first.stderr.strip().splitlines()) == 1
    summary = json.loads((capped / "summary.json").read_text())
    assert limit <= summary["teacher"]["cost"] < total
    assert summary["teacher"]["cost"] == pytest.approx(expected_cost(capped), abs=1e-6)
    assert summary["trajectories"]["pending"] > 0
    assert "cost" in first.stdout and f"of max {limit:g}" in first.stdout  # the progress lines
    asked = len(server.requests())

    # The same cap again: refused before anything is started or asked.
    again = genssd("run", str(path), "--out", str(capped), "--set", f"max_cost={limit}")
    assert again.returncode == 1 and "reached max_cost" in again.stderr
    assert len(server.requests()) == asked

    # Raised: the run ends as the uncapped one did, asking only for what it never received (and,
    # in each session with max_cost set, the one-token request that shows the bill can be counted).
    done = genssd("run", str(path), "--out", str(capped), "--set", f"max_cost={10 * total}")
    assert done.returncode == 0, done.stderr
    probes = [r for r in server.requests()[asked_whole:] if r["max_tokens"] == 1]
    assert len(probes) == 2  # the first capped session's and this one's; the refused one sent none
    assert len(server.requests()) - asked_whole - len(probes) == asked_whole
    assert (capped / "trajectories.jsonl").read_text() == (whole / "trajectories.jsonl").read_text()
    final = json.loads((capped / "summary.json").read_text())["teacher"]
    assert final["cost"] == pytest.approx(total, abs=1e-6)
    assert final["price_per_million"] == PRICE


def test_max_cost_needs_prices(tmp_path):
    with pytest.raises(UsageError, match=r"max_cost needs teacher\.price"):
        load_run_config(None, ["max_cost=5"])
    cfg = load_run_config(None, ["max_cost=5", "teacher.price={input: 0.5, output: 2}"])
    assert cfg.teacher.price.cost(2_000_000, 1_000_000) == pytest.approx(3.0)


def test_a_cache_hit_answered_in_another_pool_has_no_price_here():
    """saved_cost prices a hit at the price of the server that answered it; a server of another
    run's pool has none here (each server has its own price): unknown, not 0."""
    teacher = TeacherConfig.model_validate({"model": "m", "endpoints": [
        {"base_url": "http://127.0.0.1:9/v1", "name": "a", "price": {"input": 1.0, "output": 2.0}}]})  # fmt: skip

    def hit(endpoint: str) -> Response:
        return Response(problem_id="p", sample=0, step=0, attempt=0, start=0, seed=1, n=1, prompt_tokens=10,
                        completion_tokens=5, endpoint=endpoint, candidates=[], cached=True)  # fmt: skip

    assert RunLog.of([hit("a")], teacher).saved_cost == pytest.approx((10 * 1.0 + 5 * 2.0) / 1e6)
    assert RunLog.of([hit("a"), hit("elsewhere")], teacher).saved_cost is None


@pytest.mark.slow
def test_a_bill_genssd_can_only_split_is_warned_and_marked_approximate(tmp_path, fake_teacher):
    """A server that bills one choice of n and lists no tokens per choice (llama.cpp's
    llama-server with logprobs off): the run warns once, summary.json marks its token figures
    approximate, and `genssd report` marks them ≈ with a note."""
    server = fake_teacher("--bill-one-choice", "--no-logprobs")
    path = write_config(tmp_path / "c.yaml", run_config(server.base_url, data={"count": 2}))
    run = tmp_path / "run"
    result = genssd("run", str(path), "--out", str(run))
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("split evenly") == 1
    teacher = json.loads((run / "summary.json").read_text())["teacher"]
    assert teacher["approximate_tokens"] is True and set(teacher["token_sources"]) == {"split"}
    report = genssd("report", str(run), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert "≈" in report.stdout and "token counts are approximate" in report.stdout
