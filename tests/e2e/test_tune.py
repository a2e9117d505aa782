"""`genssd tune` on the real CLI, against the deterministic test teacher (which logs every request)
and the real demo student: one run directory per grid point, cheapest first, sharing one response
cache; the table's numbers recomputed here from each run's events.jsonl; the recommendation by its
stated rule; a second identical tune asks nothing; the sweep's budget; bad inputs in one line."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, genssd, run_config, write_config

from genssd_cli.config import load_run_config
from genssd_cli.tune.measure import recommend
from genssd_cli.tune.plan import BUDGET, RAN, Point

PRICE = {"input": 100.0, "output": 400.0}  # per million tokens: big, so that a pilot costs something
# Between the student PPLs of the test teacher's first chunks (about 30 for two pilot problems, 60-90 for the
# third): with search.retries 0 (no re-sample), some trajectories are kept and some pruned.
PRUNE_PPL = 40.0


def events_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def wilson(k: int, n: int) -> tuple[float, float]:
    p, z = k / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def recomputed(run: Path) -> dict:
    """The table's numbers of one point, from its log alone."""
    events = events_of(run)
    finishes = [e for e in events if e["type"] == "finish"]
    rows = [r for e in finishes for r in (e["row"], *e["more"])]
    pruned = sum(e["type"] == "prune" for e in events)
    responses = [e for e in events if e["type"] == "response"]
    paid = sum(e["completion_tokens"] for e in responses)
    kept_tokens = sum(r["completion_tokens"] for r in rows)
    ppls = [r["student_ppl"] for r in rows if r["student_ppl"] is not None]
    correct = sum(r["correct"] for r in rows)
    texts: dict[tuple, dict[int, str]] = {}
    for e in responses:
        key = (e["problem_id"], e["sample"], e["step"], e["attempt"])
        for i, candidate in enumerate(e["candidates"]):
            texts.setdefault(key, {})[e["start"] + i] = candidate["text"]
    steps = [texts[(e["problem_id"], e["sample"], e["step"], e["attempt"])] for e in events if e["type"] == "choice"]
    return {
        "kept": len(finishes),
        "pruned": pruned,
        "prune_rate": pruned / (len(finishes) + pruned),
        "teacher_tokens_per_kept_token": paid / kept_tokens if kept_tokens else None,
        "teacher_tokens_per_correct_row": paid / correct if correct else None,
        "ppl_mean": statistics.fmean(ppls) if ppls else None,
        "ppl_median": statistics.median(ppls) if ppls else None,
        "length_tokens_mean": kept_tokens / len(rows) if rows else None,
        "correct": correct,
        "correct_share": correct / len(rows) if rows else None,
        "ci": wilson(correct, len(rows)) if rows else None,
        "diversity": statistics.fmean(len(set(t.values())) / len(t) for t in steps),
        "requests": len(responses),
        "hits": sum(e.get("cached", False) for e in responses),
    }


def close(value, expected) -> bool:
    return value is None if expected is None else value == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_a_grid_runs_cheapest_first_shares_the_cache_and_a_second_tune_asks_nothing(tmp_path, fake_teacher):
    server = fake_teacher()
    config = write_config(tmp_path / "c.yaml", run_config(server.base_url, search={"retries": 0}))
    out = tmp_path / "tune"
    args = ["tune", str(config), "--grid", f"search.prune_ppl=null,{PRUNE_PPL}", "--grid", "search.n=3,2",
            "--pilot", "3", "--out", str(out)]  # fmt: skip
    result = genssd(*args)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "tune.json").read_text())
    points = record["points"]

    # Cheapest first: n * max_new_tokens * samples teacher tokens per problem (ties: grid order).
    grid_order = [(p, n) for p in ("null", str(PRUNE_PPL)) for n in ("3", "2")]
    expected_order = sorted(grid_order, key=lambda s: int(s[1]) * 64)
    assert [(p["settings"]["search.prune_ppl"], p["settings"]["search.n"]) for p in points] == expected_order
    assert [p["estimate_teacher_tokens"] for p in points] == [int(n) * 64 for _, n in expected_order]
    assert [p["slug"] for p in points] == [f"prune_ppl-{p}_n-{n}" for p, n in expected_order]
    assert "cheapest first" in record["order"] and "search.n" in record["order"]

    # Each point an ordinary run directory of the 3 pilot problems with its settings and the shared cache.
    cache = out / "responses.sqlite"
    for point in points:
        run = out / point["slug"]
        assert point["status"] == "ran" and point["dir"] == str(run)
        resolved = yaml.safe_load((run / "config.yaml").read_text())
        assert resolved["search"]["n"] == int(point["settings"]["search.n"])
        assert resolved["search"]["prune_ppl"] == yaml.safe_load(point["settings"]["search.prune_ppl"])
        assert resolved["teacher"]["cache"] == str(cache.absolute())
        assert json.loads((run / "summary.json").read_text())["problems"] == 3

    # The table's numbers, recomputed from each run's log.
    numbers = {p["slug"]: recomputed(out / p["slug"]) for p in points}
    for point in points:
        mine = numbers[point["slug"]]
        assert (point["kept"], point["pruned"]) == (mine["kept"], mine["pruned"])
        assert point["failed"] == point["pending"] == 0  # a teacher without faults: every trajectory ended
        assert point["kept"] + point["pruned"] == 3
        for key in ("prune_rate", "teacher_tokens_per_kept_token", "length_tokens_mean", "correct_share", "diversity"):
            assert close(point[key], mine[key]), (point["slug"], key)
        assert close(point["student_ppl"]["mean"], mine["ppl_mean"])
        assert close(point["student_ppl"]["median"], mine["ppl_median"])
        assert point["correct"] == mine["correct"]
        if mine["ci"] is None:
            assert point["correct_ci95"] is None
        else:
            assert point["correct_ci95"] == pytest.approx(list(mine["ci"]), abs=1e-4)
        assert (point["requests"], point["cache_hits"]) == (mine["requests"], mine["hits"])
        assert point["cost"] is None  # no price
    # The threshold prunes some and keeps some (else the grid would test less than it says).
    strict = [numbers[p["slug"]] for p in points if p["settings"]["search.prune_ppl"] != "null"]
    assert sum(m["pruned"] for m in strict) > 0 and sum(m["kept"] for m in strict) > 0

    # One cache: a strict point's first requests are the loose point's (same n and chunk), paid once.
    for point in points:
        if point["settings"]["search.prune_ppl"] != "null":
            assert point["cache_hits"] >= 3  # at least each problem's first step
    sent = len(server.requests())
    assert sent == sum(p["requests"] - p["cache_hits"] for p in points) < sum(p["requests"] for p in points)
    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT count(*) FROM responses").fetchone()[0] == sent

    # The recommendation, by the stated rule on the recomputed numbers.
    for point in points:
        assert close(point["teacher_tokens_per_correct_row"], numbers[point["slug"]]["teacher_tokens_per_correct_row"])
    # (The rule's choices among points are tested in process: test_the_recommendation_rule_is_…; the
    # test teacher's answers are rarely right, so a pilot here may have no correct row, and then no pick.)
    most = max(m["correct"] for m in numbers.values())
    eligible = [p["slug"] for p in points if numbers[p["slug"]]["correct"] >= max(1, most / 2)]
    expected = min(eligible, key=lambda s: (numbers[s]["teacher_tokens_per_correct_row"], -numbers[s]["correct"]),
                   default=None)  # fmt: skip
    assert record["recommendation"]["slug"] == expected
    assert record["recommendation"]["rule"].startswith("our rule")
    assert (f"recommended: {expected}" in result.stdout) == (expected is not None)
    markdown = (out / "tune.md").read_text()
    assert "our rule" in markdown and "What a pilot can and cannot predict" in markdown
    assert "cannot predict the trained student's accuracy" in markdown
    assert all(f"`{p['slug']}`" in markdown for p in points)
    assert (out / "tune.png").read_bytes().startswith(b"\x89PNG")

    # The same tune again: every run has ended, so nothing is asked and the table is the same.
    again = genssd(*args)
    assert again.returncode == 0, again.stderr
    assert len(server.requests()) == sent
    assert json.loads((out / "tune.json").read_text()) == record


@pytest.mark.slow
def test_the_budget_is_the_whole_sweeps_and_ends_it_cleanly(tmp_path, fake_teacher):
    server = fake_teacher()
    config = write_config(tmp_path / "c.yaml", run_config(server.base_url, teacher={"price": PRICE}))
    out = tmp_path / "tune"
    budget = 0.03  # about one request of the first point (a ~140-word prompt at 100 per million, ~40 tokens out)
    args = ["tune", str(config), "--grid", "search.chunk_tokens=8,16", "--pilot", "2", "--out", str(out),
            "--max-cost", str(budget)]  # fmt: skip
    result = genssd(*args)
    assert result.returncode == 0, result.stderr
    assert "the sweep's budget is spent" in result.stdout
    record = json.loads((out / "tune.json").read_text())
    first, second = record["points"]
    assert (first["status"], second["status"]) == ("stopped at the budget", "not run")
    # The first point ran with all the budget (nothing spent before it) and spent it.
    assert first["max_cost"] == budget
    assert yaml.safe_load((out / first["slug"] / "config.yaml").read_text())["max_cost"] == budget
    spent = json.loads((out / first["slug"] / "summary.json").read_text())["teacher"]["cost"]
    assert first["cost"] == spent >= budget and record["spent"] == pytest.approx(spent)
    assert first["pending"] > 0
    assert not (out / second["slug"]).exists() and second["max_cost"] is None and "kept" not in second
    assert record["recommendation"]["slug"] is None  # a partial point is not recommended
    sent = len(server.requests())
    probes = [r for r in server.requests() if r["max_tokens"] == 1]  # max_cost's check that the bill can be counted
    assert len(probes) == 1 and sent - len(probes) == first["requests"] > 0

    # Again with the same budget: nothing asked, the same table.
    again = genssd(*args)
    assert again.returncode == 0, again.stderr
    assert len(server.requests()) == sent
    assert json.loads((out / "tune.json").read_text()) == record


def test_the_recommendation_rule_is_cost_per_correct_row_not_the_selection_objective():
    """The rule on points made by hand: the fewest teacher tokens per correct kept row wins, even
    against a point whose kept PPL (the selection's own objective) is far lower; the bar (half the
    best point's correct count, at least one) leaves out a cheap point with few correct rows; a
    cost tie goes to more correct rows; a partial point (stopped by the budget, or with
    trajectories that failed or did not end) never wins; no correct row anywhere: none."""
    cfg = load_run_config(None)

    def point(name: str, correct: int, ppl: float | None, per_correct: float | None, status: str = RAN,
              failed: int = 0, pending: int = 0) -> Point:  # fmt: skip
        numbers = {"correct": correct, "student_ppl": {"mean": ppl}, "teacher_tokens_per_correct_row": per_correct,
                   "failed": failed, "pending": pending}  # fmt: skip
        return Point({"x": name}, name, cfg, [], status=status, numbers=numbers)

    most = point("most-correct", 6, 12.0, 400.0)
    lowest_ppl = point("lowest-ppl", 5, 2.0, 900.0)  # what the old rule (lowest kept PPL) picked
    few_correct = point("few-correct", 2, 9.0, 100.0)  # 2 < 6 / 2: below the bar
    tie_more = point("tie-more-correct", 4, 9.0, 300.0)
    tie_fewer = point("tie-fewer-correct", 3, 9.0, 300.0)
    partial = point("partial", 6, 1.0, 10.0, status=BUDGET)
    assert recommend([most, lowest_ppl, few_correct, tie_fewer, tie_more, partial]) is tie_more
    assert recommend([most, lowest_ppl]) is most
    assert recommend([few_correct, point("none-correct", 0, 1.0, None)]) is few_correct  # 2 >= 2 / 2
    assert recommend([point("none-correct", 0, 1.0, None)]) is None
    assert recommend([partial]) is None
    failures = [point("failed", 6, 1.0, 10.0, failed=1), point("pending", 6, 1.0, 10.0, pending=2)]
    assert recommend([lowest_ppl, *failures]) is lowest_ppl


def test_bad_inputs_are_one_line_and_create_nothing(tmp_path, fake_teacher):
    server = fake_teacher()
    config = write_config(tmp_path / "c.yaml", run_config(server.base_url))
    out = tmp_path / "tune"
    cases = [
        (["--grid", "search.chunk_tokens=8,16", "--grid", "search.nn=2,3"],
         f"error: --grid search.nn=2: config {config}: search.nn: unknown key"),
        (["--grid", "search.n=2,0"],
         f"error: --grid search.n=0: config {config}: search.n: Input should be greater than or equal to 1"),
        (["--grid", "search.n=2,4", "--max-cost", "1"],
         "error: --max-cost needs teacher.price (input and output per million tokens) for every endpoint: "
         f"set it in {config} or with --set"),
        ([], "error: give at least one --grid KEY=V1,V2 (e.g. --grid search.chunk_tokens=16,32,64)"),
        (["--grid", "search.n"], "error: --grid expects KEY=V1,V2,... (e.g. search.n=2,4,8), got 'search.n'"),
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    # Side by side: each is a whole `genssd` process, and none of them may create anything.
    processes = [subprocess.Popen([sys.executable, "-m", "genssd_cli", "tune", str(config), "--pilot", "2", "--out",
                                   str(out), *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for extra, _ in cases]  # fmt: skip
    for process, (extra, message) in zip(processes, cases, strict=True):
        _stdout, stderr = process.communicate(timeout=120)
        assert (process.returncode, stderr.strip()) == (2, message), extra
    assert not out.exists()
    assert server.requests() == []
