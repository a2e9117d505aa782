"""The baselines through the same engine: `standard-kd` and `posthoc-ppl` end to end against a
local teacher server process and the real demo student, plus the selection rules alone."""

import json
import math
from pathlib import Path

import pytest
from conftest import genssd, run_config, write_config

from genssd_cli.answers import answers_match, extract_answer
from genssd_cli.methods import METHODS
from genssd_cli.store import read_events


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def problems_file(path: Path, count: int) -> Path:
    # The teacher's answers are drawn from {0, 1} (--answer-range 2): about half are right.
    rows = [{"id": f"p{i}", "question": f"Question number {i}: what is {i} - {i} + 1?", "answer": "1"}
            for i in range(count)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("ppls", "correct", "genssd", "posthoc"),
    [
        ([3.0, 2.0, 5.0], [True, False, True], 1, 0),  # the easiest is wrong: posthoc skips it
        ([3.0, 2.0, 5.0], [False, False, False], 1, 1),  # nothing right: the easiest, marked wrong
        ([2.0, 2.0, 1.5], [True, True, False], 2, 0),  # ties go to the first
        ([math.inf, 4.0], [True, True], 1, 1),  # a candidate with no tokens never wins
    ],
)
def test_selection_rules(ppls, correct, genssd, posthoc):
    assert METHODS["genssd"].select(ppls, correct) == genssd
    assert METHODS["posthoc-ppl"].select(ppls, correct) == posthoc
    assert METHODS["standard-kd"].candidates(8) == 1 and METHODS["posthoc-ppl"].candidates(8) == 8


def test_standard_kd_asks_one_whole_trajectory_per_sample(tmp_path, fake_teacher):
    server = fake_teacher("--answer-range", "2")
    data = problems_file(tmp_path / "p.jsonl", 4)
    config = run_config(server.base_url, method="standard-kd", data={"source": str(data)},
                        search={"samples": 2, "max_new_tokens": 48})  # fmt: skip
    run = tmp_path / "run"
    result = genssd("run", str(write_config(tmp_path / "c.yaml", config)), "--out", str(run))
    assert result.returncode == 0, result.stderr
    requests = server.requests()
    assert len(requests) == 8  # 4 problems x 2 samples, one request each
    assert all(r["n"] in (1, None) and r["max_tokens"] == 48 for r in requests)
    rows = load_jsonl(run / "trajectories.jsonl")
    assert len(rows) == 8
    for row in rows:
        assert row["method"] == "standard-kd" and row["steps"] == 1
        assert row["completion_tokens"] == row["teacher_tokens"] > 0
        assert row["correct"] == answers_match("1", extract_answer(row["completion"][0]["content"]))
        assert row["student_ppl"] > 1
    assert any(row["correct"] for row in rows) and not all(row["correct"] for row in rows)

    again = genssd("run", str(write_config(tmp_path / "c.yaml", config)), "--out", str(run))
    assert again.returncode == 0, again.stderr
    assert len(server.requests()) == 8  # resumed: nothing asked twice


def test_posthoc_ppl_keeps_the_easiest_correct_trajectory(tmp_path, fake_teacher):
    server = fake_teacher("--answer-range", "2")
    data = problems_file(tmp_path / "p.jsonl", 6)
    config = run_config(server.base_url, method="posthoc-ppl", data={"source": str(data)},
                        search={"n": 4, "max_new_tokens": 32})  # fmt: skip
    run = tmp_path / "run"
    result = genssd("run", str(write_config(tmp_path / "c.yaml", config)), "--out", str(run))
    assert result.returncode == 0, result.stderr
    events = read_events(run)
    candidates = {}
    for event in events:
        if event.type == "response":
            texts = [c.text.split("\nQuestion:")[0] for c in event.candidates]
            candidates.setdefault(event.problem_id, {}).update(enumerate(texts, start=event.start))
    choices = {e.problem_id: e for e in events if e.type == "choice"}
    rows = {r["problem_id"]: r for r in load_jsonl(run / "trajectories.jsonl")}
    assert len(rows) == len(choices) == 6
    with_a_choice = 0
    for pid, choice in choices.items():
        texts = [candidates[pid][i] for i in range(4)]
        # Correctness and the choice recomputed here, from the candidates' texts and the PPLs.
        correct = [answers_match("1", extract_answer(t)) for t in texts]
        assert choice.correct == correct
        ppl = [math.inf if p is None else p for p in choice.ppl]
        pool = [i for i in range(4) if correct[i]] or list(range(4))
        assert choice.chosen == min(pool, key=lambda i: (ppl[i], i))
        assert rows[pid]["completion"][0]["content"] == texts[choice.chosen]
        assert rows[pid]["correct"] == any(correct)
        with_a_choice += any(correct) and not all(correct)
    assert with_a_choice >= 2  # the filter had something to do
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher"]["candidates"] == 24 and summary["trajectories"]["pruned"] == 0
